"""The leader's command poller: carries out Run now / Pause / Resume from JobCommand rows (SPEC §2.4)."""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.db import close_old_connections
from django.utils import timezone

from scheduler.models import JobCommand, JobRun
from scheduler.reconcile import job_function
from scheduler.registry import JobSpec
from scheduler.runs import RunContext, run_in_context
from scheduler.services import jobcommand_claim_next, jobcommand_finish, jobcontrol_set_paused

logger = logging.getLogger(__name__)

POLL_EVERY = 1.0


def run_manual(*, spec: JobSpec, term: int | None, scheduled_at: Any = None) -> JobRun | None:
    """Run a job once through its wrapper as a MANUAL JobRun, waiting for the job's lock.

    The lock wait (budget + grace) keeps a manual run from overlapping a scheduled one.
    Returns the JobRun written, or None when the run was refused.
    """
    scheduled_at = scheduled_at or timezone.now()
    ctx = RunContext(
        scheduled_at=scheduled_at, kind=JobRun.Kind.MANUAL, term=term, lock_timeout=spec.budget + spec.grace
    )
    func = job_function(spec)
    with contextlib.suppress(Exception):  # the wrapper recorded it on the JobRun
        run_in_context(ctx, func)
    return JobRun.objects.filter(job_id=spec.id, scheduled_at=scheduled_at).first()


class CommandPoller:
    """Leader-only thread polling JobCommand every second; runs execute in a small pool of their own."""

    def __init__(self, host: Any):
        self.host = host
        self.term = host.term
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="command-poller", daemon=True)
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="manual-run")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                close_old_connections()
                while not self._stop.is_set() and (command := jobcommand_claim_next()) is not None:
                    self.handle(command)
            except Exception:
                logger.exception("command poller failed; retrying")
            finally:
                close_old_connections()
            self._stop.wait(POLL_EVERY)

    def _spec(self, job_id: str) -> JobSpec | None:
        return next((spec for spec in self.host.specs if spec.id == job_id), None)

    def handle(self, command: JobCommand) -> None:
        spec = self._spec(command.job_id)
        by = command.requested_by.get_username() if command.requested_by is not None else ""
        if spec is None:
            jobcommand_finish(command_id=command.pk, ok=False, result=f"unknown job {command.job_id!r}")
            return
        logger.info("[%s] command %s by %s", spec.id, command.action, by or "-")
        if command.action == JobCommand.Action.RUN:
            self._pool.submit(self._run, command, spec)
        elif command.action == JobCommand.Action.PAUSE:
            jobcontrol_set_paused(job_id=spec.id, paused=True, reason=command.reason, by=by)
            if self.host.scheduler is not None:
                self.host.scheduler.pause_job(spec.id)
            jobcommand_finish(command_id=command.pk, ok=True, result=f"paused: {command.reason}".strip())
        elif command.action == JobCommand.Action.RESUME:
            jobcontrol_set_paused(job_id=spec.id, paused=False, by=by)
            if not spec.enabled:
                result = "pause cleared, but the job stays disabled by SCHEDULER_JOB_OVERRIDES"
            else:
                if self.host.scheduler is not None:
                    self.host.scheduler.resume_job(spec.id)
                result = "resumed"
            jobcommand_finish(command_id=command.pk, ok=True, result=result)

    def _run(self, command: JobCommand, spec: JobSpec) -> None:
        try:
            close_old_connections()
            run = run_manual(spec=spec, term=self.term)
            if run is None:
                jobcommand_finish(command_id=command.pk, ok=False, result="refused: job busy or leadership changed")
            else:
                ok = run.outcome in (JobRun.Outcome.OK, JobRun.Outcome.NOOP, JobRun.Outcome.OVERRUN)
                jobcommand_finish(command_id=command.pk, ok=ok, result=f"{run.outcome}: {run.summary}")
        except Exception as exc:
            logger.exception("[%s] manual run failed", spec.id)
            jobcommand_finish(command_id=command.pk, ok=False, result=str(exc))
        finally:
            close_old_connections()
