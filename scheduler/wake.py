"""Wake-ups: a job run at once when work arrives, instead of at its next tick (PostgreSQL LISTEN/NOTIFY).

A signal that lands half a second into the queue's 1 s tick would otherwise wait half a second for
its pass. The process that commits work calls `job_wake(job_id)`; on PostgreSQL that is a NOTIFY
sent when the transaction commits (so the woken run sees the rows). `JobWaker`, a leader thread,
LISTENs on a dedicated autocommit connection and submits one run of each woken job to the host's
executor as a WAKE JobRun: through the same wrapper as a tick (persisted, fenced by the term), and
never beside another run of the same job (the executor's max_instances). With account sharding on,
every process LISTENs and wakes a per-account job on its own shard scheduler, so each owner places
the orders of its own shards at once. Only jobs whose registry row says `wakeable` are woken. A
wake that finds the job running, or its tick due within WAKE_SKIP_BEFORE_TICK, is dropped: that
run (or tick) picks the work up.

On SQLite there is no NOTIFY: `job_wake` does nothing and the work waits for the tick, as before.
"""

from __future__ import annotations

import contextlib
import logging
import select
import threading
from datetime import datetime, timedelta
from typing import Any

from django.db import connection, transaction
from django.utils import timezone

from scheduler.locks import lock_connection

logger = logging.getLogger(__name__)

CHANNEL = "tradingsite_job_wake"
LISTEN_POLL = 0.5  # seconds between checks of the stop flag while no notification arrives
WAKE_SKIP_BEFORE_TICK = timedelta(milliseconds=150)  # a tick this close does the work anyway


def job_wake(job_id: str) -> None:
    """Ask the scheduler running `job_id` to run it now, once the caller's transaction commits.

    Best effort by design: a lost wake-up costs at most the job's interval (its tick runs it).
    """
    if connection.vendor != "postgresql":
        return

    def send() -> None:
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, job_id])
        except Exception as exc:  # the work is committed and its tick will run it
            logger.warning("wake-up of %s not sent: %s", job_id, exc)

    transaction.on_commit(send)


class JobWaker:
    """LISTEN for wake-ups and run the woken jobs at once.

    A leader thread (scheduler.runner LEADER_THREADS); with account sharding on, a thread of every
    process (SHARD_THREADS) from start to exit: a per-account job is woken on the process's own
    shard scheduler, a global one only where this process leads.
    """

    def __init__(self, host: Any):
        self.host = host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-waker", daemon=True)
        self._conn: Any = None
        self.wakes = 0  # runs submitted (tests and the status read it)

    def start(self) -> None:
        if connection.vendor != "postgresql":
            return  # nothing to listen to: ticks only
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive() or connection.vendor != "postgresql"

    def _connect(self) -> Any:
        conn = lock_connection(application_name="tradingsite-job-waker")  # the locks' keepalives and timeouts
        with conn.cursor() as cursor:
            cursor.execute(f"LISTEN {CHANNEL}")
        return conn

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already gone
                self._conn.close()
        self._conn = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self._conn is None:
                    self._conn = self._connect()
                ready, _, _ = select.select([self._conn], [], [], LISTEN_POLL)
                if not ready:
                    continue
                self._conn.poll()
                woken = {n.payload for n in self._conn.notifies}
                self._conn.notifies.clear()
                for job_id in sorted(woken):
                    self.wake(job_id)
            except Exception as exc:
                logger.warning("job waker: %s; reconnecting", exc)
                self._close()
                self._stop.wait(1.0)
        self._close()

    def wake(self, job_id: str, now: datetime | None = None) -> bool:
        """Submit one WAKE run of `job_id` to the host's executor; False when it is not run (and why is logged)."""
        spec = next((s for s in self.host.specs if s.id == job_id), None)
        if spec is not None and spec.sharded and self.host.sharded:
            # Per-account jobs run on this process's own shard scheduler, for the shards it owns;
            # every process LISTENs, so each wakes its own part of the work.
            scheduler, executor = self.host.shard_scheduler, self.host.shard_executor
        else:
            scheduler, executor = self.host.scheduler, self.host.executor
        if spec is None or not spec.wakeable or scheduler is None or executor is None:
            return False
        job = scheduler.get_job(job_id)
        if job is None or job.next_run_time is None:
            return False  # not scheduled here, or paused
        now = now or timezone.now()
        if job.next_run_time - now <= WAKE_SKIP_BEFORE_TICK:
            return False
        if not executor.submit_wake(job, now):
            logger.debug("wake-up of %s dropped: a run is in progress", job_id)
            return False
        self.wakes += 1
        return True
