"""Scheduler read side: leader, standbys, the running predicate and the status body (SPEC §2.5)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.db import connection
from django_apscheduler.models import DjangoJob

from scheduler.locks import LEADER_LOCK_CLASS, LEADER_LOCK_ID, is_postgres
from scheduler.models import JobControl, JobRun, SchedulerInstance, ShardLease
from scheduler.registry import JobSpec, registry_specs_lenient

logger = logging.getLogger(__name__)

# A leader whose heartbeat (every 2 s) is older than this is not running, even if it holds the lock:
# a frozen process keeps its PostgreSQL session, and with it the advisory lock.
LEADER_HEARTBEAT_MAX_AGE_POSTGRES = timedelta(seconds=10)
# SQLite has no lock visible to other processes; the heartbeat alone identifies the leader.
LEADER_HEARTBEAT_MAX_AGE_SQLITE = timedelta(seconds=3)
STANDBY_HEARTBEAT_MAX_AGE = timedelta(seconds=10)
OVERDUE_SLACK = 5  # seconds beyond a job's grace
DISABLED_REASON = "disabled by SCHEDULER_JOB_OVERRIDES"

LAST_RUN_FIELDS = ("outcome", "scheduled_at", "duration_ms", "lateness_ms", "summary")


def _scheduler_tz() -> ZoneInfo:
    """The zone datetimes are shown in: DISPLAY_TIMEZONE (by default the scheduler's own)."""
    return ZoneInfo(settings.DISPLAY_TIMEZONE)


def _local(value: datetime | None) -> datetime | None:
    return value.astimezone(_scheduler_tz()) if value is not None else None


def leader_lock_holder_pids() -> list[int]:
    """Backend pids holding the leader advisory lock in this database (PostgreSQL only; one query)."""
    # Advisory locks are per database; without the database filter another deployment
    # (or another test database) on the same cluster would look like our leader.
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [LEADER_LOCK_CLASS, LEADER_LOCK_ID],
        )
        return [row[0] for row in cursor.fetchall()]


def scheduler_leader(*, now: datetime) -> SchedulerInstance | None:
    """The live leader instance, or None. Reads SchedulerInstance (and pg_locks on PostgreSQL); no writes.

    PostgreSQL: role leader, its lock connection's backend pid holds the advisory lock, and a
    heartbeat younger than 10 s. SQLite: role leader with a heartbeat younger than 3 s.
    """
    leaders = SchedulerInstance.objects.filter(role=SchedulerInstance.Role.LEADER)
    if is_postgres():
        pids = leader_lock_holder_pids()
        if not pids:
            return None
        leaders = leaders.filter(backend_pid__in=pids, last_heartbeat__gte=now - LEADER_HEARTBEAT_MAX_AGE_POSTGRES)
    else:
        leaders = leaders.filter(last_heartbeat__gte=now - LEADER_HEARTBEAT_MAX_AGE_SQLITE)
    return leaders.order_by("-last_heartbeat").first()


def scheduler_standbys(*, now: datetime) -> list[SchedulerInstance]:
    """Standby instances with a heartbeat younger than 10 s, oldest first. One query, no writes."""
    return list(
        SchedulerInstance.objects.filter(
            role=SchedulerInstance.Role.STANDBY, last_heartbeat__gte=now - STANDBY_HEARTBEAT_MAX_AGE
        ).order_by("started_at", "id")
    )


def overdue_jobs(specs: list[JobSpec], now: datetime) -> list[str]:
    """Ids of enabled jobs whose next run is older than grace + 5 s (reads the id/next_run_time columns only)."""
    grace = {spec.id: spec.grace for spec in specs if spec.enabled}
    overdue = []
    for job_id, next_run in DjangoJob.objects.filter(id__in=list(grace), next_run_time__isnull=False).values_list(
        "id", "next_run_time"
    ):
        if (now - next_run).total_seconds() > grace[job_id] + OVERDUE_SLACK:
            overdue.append(job_id)
    return overdue


def _running(*, leader: SchedulerInstance | None, specs: list[JobSpec], now: datetime) -> bool:
    if leader is None or not leader.thread_alive:
        return False
    overdue = overdue_jobs(specs, now)
    if overdue:
        logger.debug("scheduler not running: overdue jobs %s", ", ".join(overdue))
    return not overdue


def scheduler_running(*, now: datetime) -> bool:
    """The health predicate: a live leader whose APScheduler thread is alive, and no enabled job
    overdue beyond grace + 5 s. Reads only id/next_run_time columns of DjangoJob; no writes."""
    return _running(leader=scheduler_leader(now=now), specs=registry_specs_lenient(), now=now)


def jobrun_last_by_job(*, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The latest JobRun of each job (by scheduled_at), as plain dicts.

    One query per job, each a backward scan of the unique (job_id, scheduled_at) index
    limited to one row, so the cost does not grow with the size of JobRun.
    """
    latest = {}
    for job_id in job_ids:
        row = JobRun.objects.filter(job_id=job_id).order_by("-scheduled_at").values(*LAST_RUN_FIELDS).first()
        if row is not None:
            row["scheduled_at"] = _local(row["scheduled_at"])
            latest[job_id] = row
    return latest


def scheduler_jobs(*, specs: list[JobSpec]) -> list[dict[str, Any]]:
    """One entry per registry job: trigger, next run (SCHEDULER_TIMEZONE), pause state, last run.

    Never unpickles DjangoJob.job_state: only the id/next_run_time columns are read.
    """
    ids = [spec.id for spec in specs]
    next_runs = dict(DjangoJob.objects.filter(id__in=ids).values_list("id", "next_run_time"))
    controls = {
        control.job_id: control
        for control in JobControl.objects.filter(job_id__in=ids, paused=True).only("job_id", "paused", "pause_reason")
    }
    last_runs = jobrun_last_by_job(job_ids=ids)
    jobs = []
    for spec in specs:
        control = controls.get(spec.id)
        stored = spec.id in next_runs
        next_run = next_runs.get(spec.id)
        if control is not None:
            pause_reason: str | None = control.pause_reason or None
        elif not spec.enabled:
            pause_reason = DISABLED_REASON
        else:
            pause_reason = None
        jobs.append(
            {
                "id": spec.id,
                "name": spec.name,
                "trigger": spec.trigger_text(),
                "next_run": _local(next_run),
                "paused": (stored and next_run is None) or control is not None or not spec.enabled,
                "pause_reason": pause_reason,
                "last_run": last_runs.get(spec.id),
            }
        )
    return jobs


def scheduler_status(*, now: datetime) -> dict[str, Any]:
    """The status body of SPEC §2.5 as plain values (datetimes aware, in SCHEDULER_TIMEZONE).

    Read-only; a bounded number of queries (a few plus one per registry job) whatever the
    size of JobRun. Never touches DjangoJob.job_state or the DjangoJobStore.
    """
    specs = registry_specs_lenient()
    leader = scheduler_leader(now=now)
    return {
        "running": _running(leader=leader, specs=specs, now=now),
        **_instance_bodies(leader=leader, standbys=scheduler_standbys(now=now)),
        "jobs": scheduler_jobs(specs=specs),
    }


def scheduler_shards() -> list[dict[str, Any]]:
    """Account shard ownership: per shard its holder (host, pid), term and since, and whether the holder's
    lock connection holds the shard's advisory lock now (`held`; false: free, moving or the lease is stale).

    Empty when sharding is off (SQLite, SCHEDULER_SHARDING=off). Two small queries, no writes.
    """
    from scheduler.shards import SHARD_LOCK_CLASS, shard_count, sharding_enabled

    if not sharding_enabled():
        return []
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT objid::int, pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s "
            "AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            [SHARD_LOCK_CLASS],
        )
        holders = dict(cursor.fetchall())
    leases = {lease.shard: lease for lease in ShardLease.objects.all()}
    rows = []
    for shard in range(shard_count()):
        lease = leases.get(shard)
        held = lease is not None and lease.backend_pid is not None and holders.get(shard) == lease.backend_pid
        rows.append(
            {
                "shard": shard,
                "held": held,
                "host": lease.host if lease else None,
                "pid": lease.pid if lease else None,
                "term": lease.term if lease else None,
                "since": _local(lease.since) if lease else None,
            }
        )
    return rows


def _instance_bodies(*, leader: SchedulerInstance | None, standbys: list[SchedulerInstance]) -> dict[str, Any]:
    return {
        "shards": scheduler_shards(),
        "leader": None
        if leader is None
        else {
            "host": leader.host,
            "pid": leader.pid,
            "term": leader.term,
            "since": _local(leader.leader_since),
            "last_heartbeat": _local(leader.last_heartbeat),
        },
        "standbys": [
            {"host": standby.host, "pid": standby.pid, "last_heartbeat": _local(standby.last_heartbeat)}
            for standby in standbys
        ],
    }


# --- Live feed and dashboard (SPEC §2.5) ------------------------------------------------

JOBRUN_FEED_FIELDS = (
    "id",
    "job_id",
    "kind",
    "scheduled_at",
    "started_at",
    "finished_at",
    "duration_ms",
    "lateness_ms",
    "outcome",
    "summary",
    "host",
    "pid",
    "term",
)


def _feed_rows(queryset: Any) -> list[dict[str, Any]]:
    rows = list(queryset.values(*JOBRUN_FEED_FIELDS))
    for row in rows:
        for name in ("scheduled_at", "started_at", "finished_at"):
            row[name] = _local(row[name])
    return rows


def jobrun_max_id() -> int:
    """The highest JobRun id (0 when there is none): the starting cursor of a live feed. One query."""
    return JobRun.objects.order_by("-id").values_list("id", flat=True).first() or 0


def jobrun_list_after(*, after_id: int, limit: int) -> list[dict[str, Any]]:
    """At most `limit` JobRuns with id > after_id, oldest first, as plain dicts. One primary-key range query."""
    return _feed_rows(JobRun.objects.filter(id__gt=after_id).order_by("id")[:limit])


def jobrun_list_by_ids(*, ids: list[int]) -> list[dict[str, Any]]:
    """The JobRuns with these ids, by id, as plain dicts. One query (callers keep the list short)."""
    if not ids:
        return []
    return _feed_rows(JobRun.objects.filter(id__in=ids).order_by("id"))


def jobrun_list_running_ids(*, since: datetime, limit: int) -> list[int]:
    """Ids of JobRuns still running that were scheduled at or after `since`, newest first.

    One query on the (outcome, scheduled_at) index.
    """
    return list(
        JobRun.objects.filter(outcome=JobRun.Outcome.RUNNING, scheduled_at__gte=since)
        .order_by("-scheduled_at")
        .values_list("id", flat=True)[:limit]
    )


def jobrun_list_recent(*, limit: int, noop: bool | None = None) -> list[dict[str, Any]]:
    """The `limit` newest JobRuns (by id), newest first, as plain dicts. One backward primary-key scan.

    `noop`: only no-op runs (True), only runs that did something or failed (False), or all (None).
    """
    runs = JobRun.objects.all()
    if noop is not None:
        runs = runs.filter(outcome=JobRun.Outcome.NOOP) if noop else runs.exclude(outcome=JobRun.Outcome.NOOP)
    return _feed_rows(runs.order_by("-id")[:limit])


def jobrun_series(*, job_id: str, limit: int) -> list[dict[str, Any]]:
    """The `limit` newest finished runs of one job, oldest first: id, scheduled_at (display zone),
    outcome, duration_ms, lateness_ms. The dashboard's per-job charts. One query on (job_id, scheduled_at)."""
    runs = (
        JobRun.objects.filter(job_id=job_id)
        .exclude(outcome=JobRun.Outcome.RUNNING)
        .order_by("-scheduled_at")
        .values("id", "scheduled_at", "outcome", "duration_ms", "lateness_ms")[:limit]
    )
    rows: list[dict[str, Any]] = [{**run, "scheduled_at": _local(run["scheduled_at"])} for run in runs]
    rows.reverse()
    return rows


def scheduler_next_runs(*, job_ids: list[str]) -> dict[str, datetime | None]:
    """Next run time (SCHEDULER_TIMEZONE) per job id stored in DjangoJob; never unpickles job_state."""
    if not job_ids:
        return {}
    rows = DjangoJob.objects.filter(id__in=job_ids).values_list("id", "next_run_time")
    return {job_id: _local(next_run) for job_id, next_run in rows}


def scheduler_instances(*, now: datetime) -> dict[str, Any]:
    """`running`, leader and standbys in the shapes of the status body, without the jobs.

    Reads SchedulerInstance (and pg_locks on PostgreSQL) and the next_run_time column of DjangoJob:
    three or four small queries, no writes.
    """
    leader = scheduler_leader(now=now)
    return {
        "running": _running(leader=leader, specs=registry_specs_lenient(), now=now),
        **_instance_bodies(leader=leader, standbys=scheduler_standbys(now=now)),
    }
