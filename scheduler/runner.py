"""The scheduler host: leader election, APScheduler lifecycle, watchdog, heartbeat, signals (SPEC §2.2-2.4)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque
from datetime import datetime, timedelta
from typing import Any

import psutil
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.util import ref_to_obj
from django.conf import settings
from django.db import DatabaseError, close_old_connections
from django.utils import timezone

from core.alerts import alert_raise
from core.runtime import HOST
from scheduler.executor import SafeDjangoJobStore, ScheduledTimeExecutor
from scheduler.leadership import LeaderLock, leader_lock_for_database
from scheduler.models import JobControl, SchedulerInstance
from scheduler.reconcile import job_function, reconcile
from scheduler.registry import JobSpec
from scheduler.selectors import overdue_jobs
from scheduler.services import instance_heartbeat, jobrun_close_abandoned, leadership_begin_term
from scheduler.shards import ShardOwner, shard_owner_install, sharding_enabled

logger = logging.getLogger(__name__)

VERSION = "0.1.0"
HEARTBEAT_EVERY = 2.0
WATCHDOG_EVERY = 2.0
RESTART_LIMIT = 3
RESTART_WINDOW = timedelta(minutes=10)

# Leader-only threads (SPEC §2.4), started on every term and stopped when leadership is lost.
# Each is "module:callable" taking the host and returning the thread object (start, stop, is_alive);
# domains append theirs (outbox sender, user streams).
LEADER_THREADS: list[str] = [
    "scheduler.poller:CommandPoller",
    "notifications.sender:OutboxSender",
    "orders.streams:user_stream_manager",
    "orders.execution:ExecutionPools",
    "scheduler.wake:JobWaker",
    "orders.execution:ClientWarmer",
]
# With account sharding on (PostgreSQL), these run in every process, leader or not, from start to
# exit, each touching only the accounts of the shards its process owns (they ask scheduler.shards).
SHARD_THREADS: list[str] = [
    "orders.streams:user_stream_manager",
    "orders.execution:ExecutionPools",
    "scheduler.wake:JobWaker",
    "orders.execution:ClientWarmer",
]
# Run once in the background on becoming leader (SPEC §2.2): the catch-ups declared on the registry's
# rows (JobSpec.on_leader), then the announcement.
LEADER_HOOKS: list[str] = [
    "scheduler.services:leader_catch_up",
    "scheduler.services:leader_announce",
]


class WatchdogExit(SystemExit):
    pass


class SchedulerHost:
    """One runscheduler process: standby until it holds the leader lock, then the only APScheduler."""

    def __init__(self, *, specs: list[JobSpec], lock: LeaderLock | None = None):
        self.specs = specs
        self.instance_id = f"{HOST}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.started_at = timezone.now()
        self.lock = lock or leader_lock_for_database()
        self.role = SchedulerInstance.Role.STANDBY
        self.term: int | None = None
        self.leader_since: datetime | None = None
        self.scheduler: BackgroundScheduler | None = None
        self.executor: ScheduledTimeExecutor | None = None
        self.stop_event = threading.Event()
        self.leader_threads: list[Any] = []
        self.restarts: deque[datetime] = deque()
        self._overdue_since: float | None = None
        self._standby_logged = False
        self._last_heartbeat = 0.0
        self._last_watchdog = 0.0
        self.exit_code = 0
        self._process = psutil.Process()
        self._hooks_thread: threading.Thread | None = None
        # Account shards (PostgreSQL): the owner thread, the per-account jobs' own scheduler and the
        # threads that work per account; all None/empty when sharding is off.
        self.sharded = False
        self.shard_owner: ShardOwner | None = None
        self.shard_scheduler: BackgroundScheduler | None = None
        self.shard_executor: ScheduledTimeExecutor | None = None
        self.shard_threads: list[Any] = []
        self._shard_paused: set[str] = set()

    # --- lifecycle ---------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        logger.info("received %s; stopping", signal.Signals(signum).name)
        self.stop_event.set()

    def run(self) -> int:
        """Main loop: poll for leadership, probe it every second, watchdog and heartbeat every 2 s."""
        backoff = 1.0
        while not self.stop_event.is_set():
            try:
                if self.sharded or (self.shard_owner is None and sharding_enabled()):
                    self._shard_tick()
                if self.role == SchedulerInstance.Role.LEADER:
                    self._leader_tick()
                    wait = 1.0
                else:
                    self._standby_tick()
                    wait = settings.SCHEDULER_STANDBY_POLL
                backoff = 1.0
            except WatchdogExit as exc:
                self._shutdown(wait_for_jobs=False)
                return int(exc.code or 1)
            except DatabaseError as exc:
                logger.warning("database unavailable (%s); retrying in %.0f s", exc, backoff)
                close_old_connections()
                wait, backoff = backoff, min(backoff * 2, 10.0)
            self.stop_event.wait(wait)
        self._shutdown(wait_for_jobs=True)
        return self.exit_code

    def _standby_tick(self) -> None:
        close_old_connections()
        if self.lock.try_acquire():
            self._become_leader()
            return
        if not self._standby_logged:
            logger.info("scheduler standby")
            self._standby_logged = True
        self._heartbeat()

    def _leader_tick(self) -> None:
        if not self.lock.probe():
            logger.error("leader lock lost (term %s); stepping down", self.term)
            self._step_down()
            return
        now = time.monotonic()
        if now - self._last_watchdog >= WATCHDOG_EVERY:
            self._last_watchdog = now
            close_old_connections()
            self._watchdog()
        self._heartbeat()

    # --- leadership --------------------------------------------------------
    def _become_leader(self) -> None:
        try:
            self.term = leadership_begin_term(
                instance_id=self.instance_id, host=HOST, pid=os.getpid(), backend_pid=self.lock.backend_pid
            )
        except Exception:
            self.lock.release()
            raise
        self.role = SchedulerInstance.Role.LEADER
        self.leader_since = timezone.now()
        self._standby_logged = False
        jobrun_close_abandoned(term=self.term, now=self.leader_since)
        self._start_scheduler(reconcile_jobs=True)
        logger.info("scheduler started as leader (term %s)", self.term)
        self._heartbeat(force=True)
        for path in LEADER_THREADS:
            if self.sharded and path in SHARD_THREADS:
                continue  # running since start, for this process's shards
            thread = ref_to_obj(path)(self)
            thread.start()
            self.leader_threads.append(thread)
        if LEADER_HOOKS:
            self._hooks_thread = threading.Thread(
                target=self._run_leader_hooks, args=(self.term,), name="leader-hooks", daemon=True
            )
            self._hooks_thread.start()

    def _run_leader_hooks(self, term: int) -> None:
        for path in LEADER_HOOKS:
            if self.term != term or self.stop_event.is_set():
                return
            try:
                close_old_connections()
                ref_to_obj(path)(host=self)
            except Exception:
                logger.exception("leader hook %s failed", path)
            finally:
                close_old_connections()

    def _start_scheduler(self, *, reconcile_jobs: bool) -> None:
        assert self.term is not None
        self.executor = ScheduledTimeExecutor(settings.SCHEDULER_THREADS, self.term)
        scheduler = BackgroundScheduler(
            jobstores={"default": SafeDjangoJobStore()},
            executors={"default": self.executor},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone=settings.SCHEDULER_TIMEZONE,
            jobstore_retry_interval=1,
        )
        scheduler.start(paused=True)
        try:
            if reconcile_jobs:
                report = reconcile(scheduler, self.specs)
                logger.info(
                    "reconciled term %s: %d added, %d replaced, %d unchanged, %d stale, %d paused",
                    self.term,
                    len(report.added),
                    len(report.replaced),
                    len(report.unchanged),
                    len(report.stale),
                    len(report.paused),
                )
            scheduler.resume()
        except Exception:
            scheduler.shutdown(wait=False)
            raise
        self.scheduler = scheduler

    def _stop_scheduler(self, *, wait: bool) -> None:
        if self.scheduler is not None:
            try:
                self.scheduler.shutdown(wait=wait)
            except Exception:
                logger.exception("scheduler shutdown failed")
            self.scheduler = None

    def _stop_leader_threads(self) -> None:
        for thread in self.leader_threads:
            thread.stop()
        self.leader_threads = []

    def _step_down(self) -> None:
        self._stop_scheduler(wait=False)
        self._stop_leader_threads()
        self.lock.release()
        self.role = SchedulerInstance.Role.STANDBY
        self.term = None
        self.leader_since = None
        with contextlib.suppress(DatabaseError):  # the database may be what we lost
            self._heartbeat(force=True)

    # --- account shards ------------------------------------------------------
    def _shard_tick(self) -> None:
        """Sharding on: start the owner, the shard scheduler and the shard threads once; keep pause state."""
        if self.shard_owner is None:
            self.sharded = True
            self.shard_owner = ShardOwner(instance_id=self.instance_id, host=HOST, pid=os.getpid())
            shard_owner_install(self.shard_owner)
            self.shard_owner.start()
            for path in SHARD_THREADS:
                thread = ref_to_obj(path)(self)
                thread.start()
                self.shard_threads.append(thread)
            logger.info("account sharding on: %d shards", self.shard_owner.count)
        thread = getattr(self.shard_scheduler, "_thread", None)
        if self.shard_scheduler is None or thread is None or not thread.is_alive():
            if self.shard_scheduler is not None:
                logger.error("shard scheduler thread is dead; rebuilding it")
                self._stop_shard_scheduler()
            self._start_shard_scheduler()
        self._shard_pause_sync()

    def _sharded_specs(self) -> list[JobSpec]:
        return [spec for spec in self.specs if spec.sharded]

    def _start_shard_scheduler(self) -> None:
        """The per-account jobs on an in-memory store: this process's own runs, for its own shards.

        Only the leader writes the job store; here the registry's rows are scheduled afresh (a restart
        runs them from now on, which for 1 s and 29 s pollers is what they want).
        """
        # One thread per job is enough (max_instances=1); each holds a database connection while it runs.
        self.shard_executor = ScheduledTimeExecutor(max(1, len(self._sharded_specs())), None, shard_run=True)
        scheduler = BackgroundScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": self.shard_executor},
            job_defaults={"coalesce": True, "max_instances": 1},
            timezone=settings.SCHEDULER_TIMEZONE,
        )
        for spec in self._sharded_specs():
            scheduler.add_job(
                job_function(spec),
                trigger=spec.trigger.build(settings.SCHEDULER_TIMEZONE),
                id=spec.id,
                name=spec.name,
                misfire_grace_time=spec.grace,
                replace_existing=True,
            )
        scheduler.start()
        self._shard_paused = set()
        self.shard_scheduler = scheduler

    def _shard_pause_sync(self) -> None:
        """Apply `enabled` and the operator's pause (JobControl) to the shard scheduler's jobs."""
        if self.shard_scheduler is None:
            return
        specs = self._sharded_specs()
        paused = set(
            JobControl.objects.filter(job_id__in=[s.id for s in specs], paused=True).values_list("job_id", flat=True)
        ) | {s.id for s in specs if not s.enabled}
        for job_id in paused - self._shard_paused:
            self.shard_scheduler.pause_job(job_id)
        for job_id in self._shard_paused - paused:
            self.shard_scheduler.resume_job(job_id)
        self._shard_paused = paused

    def _stop_shard_scheduler(self, *, wait_until: float | None = None) -> None:
        if self.shard_scheduler is None:
            return
        self.shard_scheduler.pause()
        if wait_until is not None and self.shard_executor is not None:
            while self.shard_executor.running_count() and time.monotonic() < wait_until:
                time.sleep(0.1)
        try:
            self.shard_scheduler.shutdown(wait=False)
        except Exception:
            logger.exception("shard scheduler shutdown failed")
        self.shard_scheduler = None

    # --- watchdog and heartbeat --------------------------------------------
    def thread_alive(self) -> bool:
        thread = getattr(self.scheduler, "_thread", None)
        return bool(thread is not None and thread.is_alive())

    def _watchdog(self) -> None:
        alive = self.thread_alive()
        overdue: list[str] = []
        if alive:
            overdue = overdue_jobs(self.specs, timezone.now())
            if overdue:
                # Two consecutive checks: a job store that just came back needs one pass to catch up.
                if self._overdue_since is None:
                    self._overdue_since = time.monotonic()
                    return
            else:
                self._overdue_since = None
                return
        problem = "APScheduler thread is dead" if not alive else f"jobs overdue: {', '.join(overdue)}"
        self._overdue_since = None
        self._restart_scheduler(problem)

    def _restart_scheduler(self, problem: str) -> None:

        now = timezone.now()
        while self.restarts and now - self.restarts[0] > RESTART_WINDOW:
            self.restarts.popleft()
        self.restarts.append(now)
        logger.error("watchdog: %s; rebuilding the scheduler (restart %d)", problem, len(self.restarts))
        try:
            alert_raise(key="scheduler:watchdog", text=f"Scheduler watchdog on {HOST}: {problem}; restarting")
        except Exception:
            logger.exception("watchdog alert failed")
        if len(self.restarts) > RESTART_LIMIT:
            logger.critical("watchdog: more than %d restarts in 10 minutes; exiting", RESTART_LIMIT)
            raise WatchdogExit(3)
        self._stop_scheduler(wait=False)
        if self.lock.probe():
            self._start_scheduler(reconcile_jobs=False)
        else:
            self._step_down()

    def _heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_heartbeat < HEARTBEAT_EVERY:
            return
        self._last_heartbeat = now
        instance_heartbeat(
            instance_id=self.instance_id,
            host=HOST,
            pid=os.getpid(),
            role=self.role,
            term=self.term,
            backend_pid=self.lock.backend_pid if self.role == SchedulerInstance.Role.LEADER else None,
            started_at=self.started_at,
            leader_since=self.leader_since,
            thread_alive=self.thread_alive(),
            version=VERSION,
            rss_bytes=self._process.memory_info().rss,
        )

    # --- shutdown ----------------------------------------------------------
    def _shutdown(self, *, wait_for_jobs: bool) -> None:
        deadline = time.monotonic() + settings.SCHEDULER_SHUTDOWN_GRACE
        if self.scheduler is not None:
            self.scheduler.pause()  # no new runs
            if wait_for_jobs and self.executor is not None:
                while self.executor.running_count() and time.monotonic() < deadline:
                    time.sleep(0.1)
                if self.executor.running_count():
                    logger.warning("shutdown grace over with jobs still running")
            self._stop_scheduler(wait=False)
        self._stop_shard_scheduler(wait_until=deadline if wait_for_jobs else None)
        if wait_for_jobs and self._hooks_thread is not None and self._hooks_thread.is_alive():
            # Catch-up runs started on becoming leader are job runs too: let the current one finish.
            self._hooks_thread.join(max(0.0, deadline - time.monotonic()))
        self._stop_leader_threads()
        for thread in self.shard_threads:
            thread.stop()
        self.shard_threads = []
        if self.shard_owner is not None:
            self.shard_owner.stop()  # its locks go with the process, after the runs above finished
        self.role = SchedulerInstance.Role.STOPPED
        try:
            close_old_connections()
            self._heartbeat(force=True)
        except Exception as exc:
            logger.warning("final heartbeat failed: %s", exc)
        logger.info("scheduler stopped")
        # The leader lock is released by process exit (after the jobs above finished).
