"""Scheduler state: leadership term, instances, job runs, pause control, commands."""

from __future__ import annotations

from django.conf import settings
from django.db import models


class Leadership(models.Model):
    """Singleton row (id=1): the current leadership term and who holds it."""

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    term = models.BigIntegerField(default=0)
    host = models.CharField(max_length=255, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    backend_pid = models.IntegerField(null=True, blank=True)
    instance_id = models.CharField(max_length=64, blank=True)
    since = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "leadership"

    def __str__(self) -> str:
        return f"term {self.term} ({self.host}:{self.pid})"


class SchedulerInstance(models.Model):
    """One row per runscheduler process, upserted by its heartbeat every 2 s."""

    class Role(models.TextChoices):
        LEADER = "leader"
        STANDBY = "standby"
        STOPPED = "stopped"

    instance_id = models.CharField(max_length=64, unique=True)
    host = models.CharField(max_length=255)
    pid = models.IntegerField()
    role = models.CharField(max_length=16, choices=Role.choices, default=Role.STANDBY)
    term = models.BigIntegerField(null=True, blank=True)
    backend_pid = models.IntegerField(null=True, blank=True)
    started_at = models.DateTimeField()
    leader_since = models.DateTimeField(null=True, blank=True)
    last_heartbeat = models.DateTimeField(db_index=True)
    thread_alive = models.BooleanField(default=False)
    version = models.CharField(max_length=64, blank=True)
    rss_bytes = models.BigIntegerField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.host}:{self.pid} ({self.role})"


class JobRun(models.Model):
    """One claimed run of one job at one scheduled time; the source of truth for status."""

    class Kind(models.TextChoices):
        SCHEDULED = "SCHEDULED"
        MANUAL = "MANUAL"
        CATCHUP = "CATCHUP"
        WAKE = "WAKE"  # run at once on a wake-up (scheduler.wake), between ticks

    class Outcome(models.TextChoices):
        RUNNING = "running"
        OK = "ok"
        NOOP = "noop"
        ERROR = "error"
        OVERRUN = "overrun"

    job_id = models.CharField(max_length=64)
    scheduled_at = models.DateTimeField()
    term = models.BigIntegerField()
    host = models.CharField(max_length=255)
    pid = models.IntegerField()
    kind = models.CharField(max_length=16, choices=Kind.choices, default=Kind.SCHEDULED)
    started_at = models.DateTimeField()
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.IntegerField(null=True, blank=True)
    lateness_ms = models.IntegerField(null=True, blank=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.RUNNING)
    summary = models.CharField(max_length=500, blank=True)
    error = models.TextField(blank=True)
    # The account shards a per-account run covered ("3,7,11"); "" for every other run (and when
    # sharding is off). Runs of one scheduled time by different owners cover disjoint shards.
    shards = models.CharField(max_length=200, blank=True, default="", db_default="")

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["job_id", "scheduled_at", "shards"], name="jobrun_unique_job_scheduled_at_shards"
            ),
        ]
        indexes = [
            models.Index(fields=["scheduled_at"], name="jobrun_scheduled_at"),
            models.Index(fields=["outcome", "scheduled_at"], name="jobrun_outcome_scheduled"),
        ]

    def __str__(self) -> str:
        return f"{self.job_id} @ {self.scheduled_at:%Y-%m-%d %H:%M:%S} ({self.outcome})"


class JobControl(models.Model):
    """Operator pause state per job id, re-applied after every reconciliation."""

    job_id = models.CharField(max_length=64, primary_key=True)
    paused = models.BooleanField(default=False)
    pause_reason = models.CharField(max_length=500, blank=True)
    stale = models.BooleanField(default=False, help_text="Id no longer in the code registry; paused, kept.")
    updated_at = models.DateTimeField(auto_now=True)
    updated_by = models.CharField(max_length=150, blank=True)

    def __str__(self) -> str:
        return f"{self.job_id} ({'paused' if self.paused else 'active'})"


class JobCommand(models.Model):
    """An operator request (run now, pause, resume) carried out by the leader's command poller."""

    class Action(models.TextChoices):
        RUN = "run"
        PAUSE = "pause"
        RESUME = "resume"

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    job_id = models.CharField(max_length=64)
    action = models.CharField(max_length=16, choices=Action.choices)
    reason = models.CharField(max_length=500, blank=True)
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    result = models.CharField(max_length=500, blank=True)
    done_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["status", "id"], name="jobcommand_status_id")]

    def __str__(self) -> str:
        return f"{self.action} {self.job_id} ({self.status})"


class ShardLease(models.Model):
    """One row per account shard: its ownership term and who holds it (the advisory lock is the truth).

    The term increments every time a process takes the shard's lock, as Leadership.term does for the
    leader; a per-account run's claim is refused unless each of its shards is still at the term its
    process took it with.
    """

    shard = models.PositiveSmallIntegerField(primary_key=True)
    term = models.BigIntegerField(default=0)
    instance_id = models.CharField(max_length=64, blank=True)
    host = models.CharField(max_length=255, blank=True)
    pid = models.IntegerField(null=True, blank=True)
    backend_pid = models.IntegerField(null=True, blank=True)
    since = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"shard {self.shard} term {self.term} ({self.host}:{self.pid})"
