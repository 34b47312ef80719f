"""The job wrapper: JobRun claim before the body, outcome after it (SPEC §2.3)."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import logging
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol, cast

from django.db import close_old_connections as _close_old_connections
from django.db import connection
from django.utils import timezone

from core.alerts import alert_raise
from core.counters import counter_add
from core.runtime import HOST
from core.scrub import scrub
from scheduler import shards
from scheduler.locks import JobLock
from scheduler.models import JobRun, Leadership
from scheduler.registry import registry_spec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResult:
    """What a job body returns: a one-line summary, and whether it did any work."""

    summary: str = ""
    noop: bool = False


@dataclass(frozen=True)
class RunContext:
    scheduled_at: datetime
    kind: str = JobRun.Kind.SCHEDULED
    term: int | None = None  # None: whatever term is current (manual runs outside the leader)
    lock_timeout: float = 0.0
    # Sharded jobs (JobSpec.sharded, sharding on): `shard_run` marks a run fired by the process's
    # shard scheduler; `shards` the shards the run covers, each at its term in `shard_terms`.
    shard_run: bool = False
    shards: tuple[int, ...] | None = None
    shard_terms: tuple[tuple[int, int], ...] = ()


class JobFailedError(Exception):
    """Raised to APScheduler in place of the body's exception, with its text scrubbed."""


current_run: contextvars.ContextVar[RunContext | None] = contextvars.ContextVar("current_run", default=None)


def close_old_connections() -> None:
    """close_old_connections, except inside an outer transaction (a test, or a caller's atomic block)."""
    if not connection.in_atomic_block:
        _close_old_connections()


def jobrun_claim(*, job_id: str, ctx: RunContext, started_at: datetime) -> int | None:
    """Insert the JobRun row in its own statement, only if (job, scheduled_at) is new and the term current.

    Returns the row id, or None when the claim is refused (duplicate or stale term).
    """
    if ctx.term is None:
        term_sql, params_term = "", []
    else:
        term_sql, params_term = " AND term = %s", [ctx.term]
    if ctx.shard_terms:
        # Every shard of the run still at the term this process took it with (a fence like the term's).
        held = " OR ".join(["(shard = %s AND term = %s)"] * len(ctx.shard_terms))
        term_sql += f" AND (SELECT count(*) FROM scheduler_shardlease WHERE {held}) = %s"
        params_term += [value for pair in ctx.shard_terms for value in pair] + [len(ctx.shard_terms)]
    # FOR SHARE makes a concurrent term increment wait for this claim (and vice versa).
    lock_sql = " FOR SHARE" if connection.vendor == "postgresql" else ""
    sql = (
        "INSERT INTO scheduler_jobrun (job_id, scheduled_at, term, host, pid, kind, started_at, "
        "lateness_ms, outcome, summary, error, shards) "
        "SELECT %s, %s, term, %s, %s, %s, %s, %s, %s, '', '', %s FROM scheduler_leadership "
        f"WHERE id = 1{term_sql}{lock_sql} "
        "ON CONFLICT (job_id, scheduled_at, shards) DO NOTHING RETURNING id"
    )
    adapt = connection.ops.adapt_datetimefield_value
    params = [
        job_id,
        adapt(ctx.scheduled_at),
        HOST,
        os.getpid(),
        ctx.kind,
        adapt(started_at),
        max(0, int((started_at - ctx.scheduled_at).total_seconds() * 1000)),
        JobRun.Outcome.RUNNING,
        ",".join(str(shard) for shard in ctx.shards or ()),
        *params_term,
    ]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
        if row is None and ctx.term is None and not Leadership.objects.filter(id=1).exists():
            # The singleton comes from a data migration; a flushed database (tests) lacks it.
            Leadership.objects.get_or_create(id=1)
            cursor.execute(sql, params)
            row = cursor.fetchone()
    return row[0] if row else None


def jobrun_finish(
    *, run_id: int, started_at: datetime, duration_ms: int, outcome: str, summary: str, error: str = ""
) -> None:
    JobRun.objects.filter(pk=run_id).update(
        finished_at=started_at + timedelta(milliseconds=duration_ms),
        duration_ms=duration_ms,
        outcome=outcome,
        summary=scrub(summary)[:500],
        error=scrub(error),
    )


def _outcome(result: Any, duration_s: float, budget: float) -> tuple[str, str]:
    if isinstance(result, JobResult):
        summary, noop = result.summary, result.noop
    elif result is None:
        summary, noop = "", True
    else:
        summary, noop = str(result), False
    if duration_s > budget:
        return JobRun.Outcome.OVERRUN, summary
    return (JobRun.Outcome.NOOP if noop else JobRun.Outcome.OK), summary


def _budget(job_id: str) -> float:
    spec = registry_spec(job_id)
    return spec.budget if spec else float("inf")


def _shard_context(job_id: str, ctx: RunContext) -> RunContext | None:
    """A sharded job's run: the shards this process owns now, or None when it must not run here.

    The leader's job store still schedules the job (status, pause, next run), but with sharding on
    its firing is left to the shard schedulers; a manual or catch-up run covers this process's shards.
    Sharding is on in a process when the scheduler host installed a shard owner (PostgreSQL).
    """
    spec = registry_spec(job_id)
    if spec is None or not spec.sharded or shards.shard_owner() is None:
        return ctx  # not sharded, or a process that owns no shards by design (`--run`, tests): every account
    if ctx.kind == JobRun.Kind.SCHEDULED and not ctx.shard_run:
        return None
    owned = shards.shards_owned()
    if not owned:
        logger.debug("[%s] run at %s skipped: this process owns no account shard", job_id, ctx.scheduled_at)
        return None
    terms = tuple(sorted(owned.items()))
    return dataclasses.replace(ctx, shards=tuple(s for s, _ in terms), shard_terms=terms)


def run_wrapped(job_id: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:

    started_at = timezone.now()
    ctx = current_run.get() or RunContext(scheduled_at=started_at, kind=JobRun.Kind.MANUAL, lock_timeout=60.0)
    sharded = _shard_context(job_id, ctx)
    if sharded is None:
        return None
    if sharded is not ctx:
        ctx = sharded
        owner = shards.shard_owner()
        covered = ctx.shards or ()
        if owner is not None:
            owner.run_started(covered)  # a shard given up from now on is released only after this run
            still = owner.owned()
            if any(still.get(shard) != term for shard, term in ctx.shard_terms):
                # Given up (or lost) between the look and the registration: leave those shards out.
                terms = tuple((shard, term) for shard, term in ctx.shard_terms if still.get(shard) == term)
                if not terms:
                    owner.run_finished(covered)
                    return None
                kept = tuple(s for s, _ in terms)
                ctx = dataclasses.replace(ctx, shards=kept, shard_terms=terms)
                owner.run_finished(tuple(s for s in covered if s not in kept))
                covered = kept
        token = current_run.set(ctx)  # the body reads its shards from here
        try:
            return _run_claimed(job_id, fn, args, kwargs, ctx=ctx, started_at=started_at)
        finally:
            current_run.reset(token)
            if owner is not None:
                owner.run_finished(covered)
    return _run_claimed(job_id, fn, args, kwargs, ctx=ctx, started_at=started_at)


def _run_claimed(
    job_id: str, fn: Callable[..., Any], args: tuple, kwargs: dict, *, ctx: RunContext, started_at: datetime
) -> Any:
    close_old_connections()
    # Sharded runs of different processes cover different accounts and may overlap in time; within
    # one process a manual run still never overlaps a scheduled one.
    owner = shards.shard_owner()
    lock = JobLock(f"{job_id}@{owner.instance_id}" if ctx.shards is not None and owner is not None else job_id)
    try:
        if not lock.acquire(timeout=ctx.lock_timeout):
            counter_add(name="suppressed_duplicates", labels=f"job={job_id}")
            logger.warning("[%s] run at %s skipped: the job is already running", job_id, ctx.scheduled_at)
            return None
        run_id = jobrun_claim(job_id=job_id, ctx=ctx, started_at=started_at)
        if run_id is None:
            counter_add(name="suppressed_duplicates", labels=f"job={job_id}")
            logger.warning(
                "[%s] run at %s suppressed: already claimed or term %s is no longer current",
                job_id,
                ctx.scheduled_at,
                ctx.term,
            )
            return None
        t0 = time.monotonic()
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            duration_ms = int((time.monotonic() - t0) * 1000)
            message = scrub(f"{type(exc).__name__}: {exc}")
            close_old_connections()  # the body may have left a broken connection behind
            jobrun_finish(
                run_id=run_id,
                started_at=started_at,
                duration_ms=duration_ms,
                outcome=JobRun.Outcome.ERROR,
                summary=message[:500],
                error=scrub(traceback.format_exc()),
            )
            counter_add(name="job_errors", labels=f"job={job_id}")
            logger.error("[%s] run at %s failed after %d ms: %s", job_id, ctx.scheduled_at, duration_ms, message)
            alert_raise(key=f"job:{job_id}", text=f"Job {job_id} failed: {message}")
            raise JobFailedError(message) from None
        duration_s = time.monotonic() - t0
        duration_ms = int(duration_s * 1000)
        outcome, summary = _outcome(result, duration_s, _budget(job_id))
        jobrun_finish(run_id=run_id, started_at=started_at, duration_ms=duration_ms, outcome=outcome, summary=summary)
        if outcome == JobRun.Outcome.OVERRUN:
            counter_add(name="job_overruns", labels=f"job={job_id}")
            logger.warning("[%s] overran its budget: %d ms; %s", job_id, duration_ms, summary)
        else:
            level = logging.DEBUG if outcome == JobRun.Outcome.NOOP else logging.INFO
            logger.log(level, "[%s] %s in %d ms: %s", job_id, outcome, duration_ms, summary)
        return result
    finally:
        lock.release()
        close_old_connections()


class ScheduledJob(Protocol):
    """A job function wrapped by `scheduler_job`: `__wrapped__` is the body without the JobRun bookkeeping."""

    scheduler_job_id: str
    __wrapped__: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...


def scheduler_job(job_id: str) -> Callable[[Callable[..., Any]], ScheduledJob]:
    """Wrap a job function at module level so APScheduler's text reference resolves to the wrapper."""

    def decorate(fn: Callable[..., Any]) -> ScheduledJob:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return run_wrapped(job_id, fn, args, kwargs)

        job = cast(ScheduledJob, wrapper)  # functools.wraps set __wrapped__; the job id is set here
        job.scheduler_job_id = job_id
        return job

    return decorate


def run_in_context(ctx: RunContext, fn: Callable[[], Any]) -> Any:
    token = current_run.set(ctx)
    try:
        return fn()
    finally:
        current_run.reset(token)
