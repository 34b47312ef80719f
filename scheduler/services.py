"""Scheduler services: leadership terms, heartbeats, pause control, commands."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from scheduler.models import JobCommand, JobControl, JobRun, Leadership, SchedulerInstance

logger = logging.getLogger(__name__)


def leadership_begin_term(*, instance_id: str, host: str, pid: int, backend_pid: int | None) -> int:
    """Increment the leadership term for a new holder of the leader lock; returns the new term.

    Call only while holding the leader lock. The row lock orders this against in-flight
    JobRun claims (which read the term FOR SHARE), so a stale leader's claim is refused.
    """
    now = timezone.now()
    with transaction.atomic():
        leadership, _ = Leadership.objects.select_for_update().get_or_create(id=1)
        leadership.term += 1
        leadership.host = host
        leadership.pid = pid
        leadership.backend_pid = backend_pid
        leadership.instance_id = instance_id
        leadership.since = now
        leadership.save()
    return leadership.term


def jobrun_close_abandoned(*, term: int, now: datetime) -> int:
    """Close runs of earlier terms still marked running: their leader died mid-run (SIGKILL, host loss).

    Scheduled and catch-up runs only; a manual `--run` may legitimately outlive a takeover.
    Returns how many rows were closed. Called by a new leader once per term.
    """
    closed = JobRun.objects.filter(
        outcome=JobRun.Outcome.RUNNING, term__lt=term, kind__in=[JobRun.Kind.SCHEDULED, JobRun.Kind.CATCHUP]
    ).update(
        outcome=JobRun.Outcome.ERROR,
        finished_at=now,
        summary=f"abandoned: its leader stopped before the run finished (closed by term {term})",
    )
    if closed:
        logger.warning("closed %d job run(s) abandoned by an earlier leader", closed)
    return closed


def leadership_current_term() -> int:
    return Leadership.objects.filter(id=1).values_list("term", flat=True).first() or 0


def instance_heartbeat(
    *,
    instance_id: str,
    host: str,
    pid: int,
    role: str,
    term: int | None,
    backend_pid: int | None,
    started_at: datetime,
    leader_since: datetime | None,
    thread_alive: bool,
    version: str,
    rss_bytes: int | None = None,
) -> None:
    """Upsert this process's SchedulerInstance row (every 2 s)."""
    SchedulerInstance.objects.update_or_create(
        instance_id=instance_id,
        defaults={
            "host": host,
            "pid": pid,
            "role": role,
            "term": term,
            "backend_pid": backend_pid,
            "started_at": started_at,
            "leader_since": leader_since,
            "last_heartbeat": timezone.now(),
            "thread_alive": thread_alive,
            "version": version,
            "rss_bytes": rss_bytes,
        },
    )


def jobcontrol_set_paused(*, job_id: str, paused: bool, reason: str = "", by: str = "") -> JobControl:
    control, _ = JobControl.objects.update_or_create(
        job_id=job_id, defaults={"paused": paused, "pause_reason": reason if paused else "", "updated_by": by}
    )
    return control


def jobcommand_request(*, job_id: str, action: str, reason: str = "", user=None) -> JobCommand:  # noqa: ANN001
    """Queue an operator command for the leader's command poller; nothing runs in the caller."""
    from scheduler.registry import registry_spec

    if registry_spec(job_id) is None:
        raise ValueError(f"unknown job id {job_id!r}")
    if action not in JobCommand.Action.values:
        raise ValueError(f"unknown action {action!r}")
    return JobCommand.objects.create(job_id=job_id, action=action, reason=reason[:500], requested_by=user)


def jobcommand_claim_next() -> JobCommand | None:
    """Claim the oldest pending command (pending → running) so it is carried out once."""
    for command in JobCommand.objects.filter(status=JobCommand.Status.PENDING).order_by("id")[:20]:
        claimed = JobCommand.objects.filter(pk=command.pk, status=JobCommand.Status.PENDING).update(
            status=JobCommand.Status.RUNNING
        )
        if claimed:
            command.status = JobCommand.Status.RUNNING
            return command
    return None


def jobcommand_finish(*, command_id: int, ok: bool, result: str) -> None:
    JobCommand.objects.filter(pk=command_id).update(
        status=JobCommand.Status.DONE if ok else JobCommand.Status.FAILED,
        result=result[:500],
        done_at=timezone.now(),
    )
