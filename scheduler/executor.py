"""APScheduler pieces: an executor that tells each run its scheduled time, and a job store that never deletes."""

from __future__ import annotations

import pickle
from typing import Any

from apscheduler.executors.base import run_job
from apscheduler.executors.pool import ThreadPoolExecutor
from django_apscheduler.jobstores import DjangoJobStore
from django_apscheduler.models import DjangoJob

from scheduler.models import JobRun
from scheduler.runs import RunContext, current_run


def _run_with_scheduled_time(
    job: Any,
    alias: str,
    run_times: list,
    logger_name: str,
    term: int | None,
    shard_run: bool = False,
    kind: str = JobRun.Kind.SCHEDULED,
) -> list:
    # APScheduler 3 does not pass the scheduled time to the function; the wrapper reads it here.
    events: list = []
    for run_time in run_times:
        ctx = RunContext(scheduled_at=run_time, kind=kind, term=term, shard_run=shard_run)
        token = current_run.set(ctx)
        try:
            events.extend(run_job(job, alias, [run_time], logger_name))
        finally:
            current_run.reset(token)
    return events


class ScheduledTimeExecutor(ThreadPoolExecutor):
    """ThreadPoolExecutor whose runs carry (scheduled time, leadership term) into the job wrapper.

    `shard_run`: the executor of a process's shard scheduler (per-account jobs for its own shards;
    term None: its runs are fenced by their shards' terms, not by leadership).
    """

    def __init__(self, max_workers: int, term: int | None, *, shard_run: bool = False):
        super().__init__(max_workers)
        self.term = term
        self.shard_run = shard_run

    def _do_submit_job(self, job: Any, run_times: list, kind: str = JobRun.Kind.SCHEDULED) -> None:
        def callback(future: Any) -> None:
            exc = future.exception()
            if exc:
                self._run_job_error(job.id, exc, getattr(exc, "__traceback__", None))
            else:
                self._run_job_success(job.id, future.result())

        future = self._pool.submit(
            _run_with_scheduled_time,
            job,
            job._jobstore_alias,
            run_times,
            self._logger.name,
            self.term,
            self.shard_run,
            kind,
        )
        future.add_done_callback(callback)

    def submit_wake(self, job: Any, run_time: Any) -> bool:
        """Submit one WAKE run of `job` at `run_time` (scheduler.wake), unless one of its runs is in progress.

        The same bookkeeping as APScheduler's submit_job: max_instances holds across ticks and wakes.
        """
        with self._lock:
            if self._instances[job.id] >= job.max_instances:
                return False
            self._do_submit_job(job, [run_time], JobRun.Kind.WAKE)
            self._instances[job.id] += 1
        return True

    def running_count(self) -> int:
        with self._lock:
            return sum(self._instances.values())


class SafeDjangoJobStore(DjangoJobStore):
    """DjangoJobStore that skips, instead of deleting, rows it cannot unpickle.

    django-apscheduler deletes such rows, and the delete cascades to their execution
    history; a job whose function moved must be paused and flagged, never lost.
    """

    def _get_jobs(self, **filters: Any) -> list:
        jobs = []
        for job_id, job_state in DjangoJob.objects.filter(**filters).values_list("id", "job_state"):
            try:
                jobs.append(self._reconstitute_job(job_state))
            except Exception:
                self._logger.exception("Unable to restore job %r; left in place (paused by reconciliation)", job_id)
        return jobs

    def lookup_job(self, job_id: str) -> Any:
        row = DjangoJob.objects.filter(id=job_id).values_list("job_state", flat=True).first()
        if not row:
            return None
        try:
            return self._reconstitute_job(row)
        except (pickle.UnpicklingError, ImportError, LookupError, AttributeError, ValueError):
            self._logger.exception("Unable to restore job %r", job_id)
            return None
