"""Scheduler services: leadership terms, heartbeats, pause control, commands, leader catch-ups."""

from __future__ import annotations

import html
import logging
from collections.abc import Collection
from datetime import datetime
from typing import Any

from apscheduler.util import ref_to_obj
from django.db import transaction
from django.utils import timezone

from core.alerts import notice_send
from core.runtime import HOST
from scheduler.models import JobCommand, JobControl, JobRun, Leadership, SchedulerInstance
from scheduler.reconcile import job_function
from scheduler.registry import catch_up_specs, registry_spec
from scheduler.runs import JobFailedError, RunContext, run_in_context

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
    # Runs of the shard schedulers (shards set) belong to their processes, not to leadership.
    closed = JobRun.objects.filter(
        outcome=JobRun.Outcome.RUNNING,
        term__lt=term,
        kind__in=[JobRun.Kind.SCHEDULED, JobRun.Kind.CATCHUP],
        shards="",
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


# --- on becoming leader (SPEC §2.2) ---------------------------------------------------------------


def catch_up_run(*, host: Any, job_id: str) -> bool:
    """Run one declared leader catch-up (JobSpec.on_leader) as a CATCHUP JobRun of the host's term.

    Not run (False) without a term, when the row declares no catch-up, when its `when` condition
    says it is not due, or when the job is disabled or paused. Otherwise the job goes through its
    wrapped function (resolved from the registry's text reference): it takes the job's lock
    (waiting up to its budget, never overlapping a scheduled run) and its claim is refused once the
    term is no longer current. A failure is stored, counted and alerted by the wrapper and only
    logged here. Returns whether it ran.
    """
    term = host.term
    spec = registry_spec(job_id)
    if term is None or spec is None or spec.on_leader is None:
        return False
    when = spec.on_leader.when
    if when is not None and not ref_to_obj(when)(now=timezone.now()):
        logger.info("leader catch-up (term %s): %s not due", term, job_id)
        return False
    if not spec.enabled or JobControl.objects.filter(job_id=job_id, paused=True).exists():
        logger.info("leader catch-up (term %s): %s skipped, disabled or paused", term, job_id)
        return False
    ctx = RunContext(scheduled_at=timezone.now(), kind=JobRun.Kind.CATCHUP, term=term, lock_timeout=spec.budget)
    try:
        run_in_context(ctx, job_function(spec))
    except JobFailedError as exc:
        # The wrapper stored, counted and alerted it; the next catch-up (and the next scheduled run) still runs.
        logger.warning("leader catch-up (term %s): %s failed: %s", term, job_id, exc)
    return True


def leader_catch_up(*, host: Any, job_ids: Collection[str] | None = None) -> list[str]:
    """Leader hook (SPEC §2.2): every catch-up declared in the registry, in step order (or only `job_ids`).

    Declared today: precision_cache_update when MarketInfo is empty or older than 24 h, then
    update_price_cache, calculate_daily_performance (§4.10) and send_daily_summary after 21:03 KST
    (§4.9). A failed or crashed step does not stop the next; the loop stops when the term is over or
    the host is stopping. Returns the job ids run.
    """
    term = host.term
    if term is None:
        return []
    stop_event = getattr(host, "stop_event", None)
    ran = []
    for spec in catch_up_specs():
        if job_ids is not None and spec.id not in job_ids:
            continue
        if host.term != term or (stop_event is not None and stop_event.is_set()):
            logger.info("leader catch-up stopped: term %s is over or the host is stopping", term)
            break
        try:
            if catch_up_run(host=host, job_id=spec.id):
                ran.append(spec.id)
        except Exception:
            # As separate leader hooks they were isolated: one catch-up's crash (its condition's query,
            # say) must not cost the others theirs.
            logger.exception("leader catch-up (term %s): %s failed", term, spec.id)
    return ran


def leader_announce(*, host: Any) -> list[Any]:
    """Leader hook (SPEC §2.2): queue "scheduler leader on <host> (term N)" once per term.

    Delivered through core's notice hook (the notifications outbox); returns the queued rows,
    none when no Telegram is configured or no handler is installed.
    """
    term = host.term
    if term is None:
        return []
    rows = notice_send(text=f"scheduler leader on {html.escape(HOST)} (term {term})", dedupe_key=f"leader-term-{term}")
    if not rows:
        logger.info("leader announce for term %s not queued: no Telegram configured", term)
    return rows
