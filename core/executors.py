"""Thread pools for ORM and exchange work, whose DB connections are closed on stop."""

from __future__ import annotations

import contextvars
import functools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, TypeVar

from django.db import close_old_connections, connections

from core.pgpool import connection_pools_close_idle, connection_release, pooled_thread_mark

T = TypeVar("T")
logger = logging.getLogger(__name__)


class DbExecutor(ThreadPoolExecutor):
    """Worker threads for ORM calls; `close()` waits for them and closes every connection they opened.

    Connections live per thread and outlive an exited worker (keeping, among others, a test
    database from being dropped). Each call records its thread's connections; once every worker
    has finished (shutdown waits), they are closed from the stopping thread, with Django's
    thread-sharing switch that exists for exactly this hand-over.
    """

    def __init__(
        self, max_workers: int = 8, *, thread_name_prefix: str = "db", initializer: Callable[[], Any] | None = None
    ):
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix, initializer=initializer)
        self._connections: dict[int, Any] = {}
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        def tracked() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                opened = connections.all(initialized_only=True)
                with self._lock:
                    self._connections.update((id(conn), conn) for conn in opened)

        return super().submit(tracked)

    def close(self) -> None:
        """Wait for the running calls (a cancelled await does not stop its thread), then close every connection."""
        self.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            opened, self._connections = list(self._connections.values()), {}
        for conn in opened:
            conn.inc_thread_sharing()
            try:
                conn.close()
            except Exception as exc:
                logger.debug("closing a worker's connection failed: %s", exc)
            finally:
                conn.dec_thread_sharing()


class KeyedPool:
    """A bounded pool of worker threads that runs at most one task per key at a time.

    `submit` refuses (returns None) while a task of the same key is in flight, so work on one key
    is serialized without a lock held over its I/O. Each task runs in a copy of the submitter's
    contextvars (call policies, the current job run), its connections checked every few seconds, on
    a DbExecutor whose connections `close()` closes. With `max_workers=0` tasks run inline in the
    submitting thread (tests that hold their data in one uncommitted transaction use this).
    """

    def __init__(self, max_workers: int, *, name: str):
        self.max_workers = max_workers
        self.name = name
        # Pooled threads (core.pgpool): on PostgreSQL they share the process's connection pool.
        self._executor = (
            DbExecutor(max_workers, thread_name_prefix=name, initializer=pooled_thread_mark)
            if max_workers > 0
            else None
        )
        self._inflight: dict[Hashable, Future] = {}
        self._lock = threading.Lock()
        if self._executor is not None:
            self._prestart(self._executor, max_workers)

    @staticmethod
    def _prestart(executor: DbExecutor, count: int) -> None:
        """Start every worker now. A ThreadPoolExecutor starts its threads one per submit while none is
        idle, and a thread's start waits for the thread to run: a fan-out's first burst of submits,
        in the 1 s job and beside the tasks it has already started, paid for up to `count` of them
        (about 0.2 s of the job's time for 48). Each worker holds a task until all have one."""
        barrier = threading.Barrier(count + 1)
        for _ in range(count):
            executor.submit(barrier.wait, 10)
        try:
            barrier.wait(10)
        except threading.BrokenBarrierError:  # the rest start on demand, as without this
            logger.warning("pool %s: not every worker started within 10 s", executor._thread_name_prefix)

    @property
    def inline(self) -> bool:
        return self._executor is None

    def busy(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._inflight

    def in_flight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def keys_in_flight(self) -> list[Hashable]:
        """The keys of the tasks in flight now."""
        with self._lock:
            return list(self._inflight)

    def submit(self, key: Hashable, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future | None:
        """Start `fn(*args, **kwargs)` for `key`; None when a task of `key` is still in flight."""
        if self._executor is None:
            future: Future = Future()
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # handed to the caller through the future, as a worker would
                future.set_exception(exc)
            return future
        context = contextvars.copy_context()
        with self._lock:
            if key in self._inflight:
                return None
            future = self._executor.submit(_run_in_context, context, fn, args, kwargs)
            self._inflight[key] = future
        future.add_done_callback(functools.partial(self._done, key))
        return future

    def _done(self, key: Hashable, future: Future) -> None:
        with self._lock:
            if self._inflight.get(key) is future:
                del self._inflight[key]

    def drain(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for every task in flight; True when none is left."""
        with self._lock:
            futures = list(self._inflight.values())
        _, pending = wait(futures, timeout=timeout)
        return not pending

    def close(self, timeout: float = 10.0) -> None:
        """Let the tasks in flight finish (up to `timeout`), then stop the workers and close their connections."""
        if self._executor is None:
            return
        if not self.drain(timeout):
            logger.warning("pool %s: tasks still running after %.0f s; closing anyway", self.name, timeout)
        self._executor.close()
        connection_pools_close_idle()


# A worker checks its connections (close_old_connections: CONN_MAX_AGE, and with CONN_HEALTH_CHECKS
# a `SELECT 1` on the next use) at most this often, and after any task that raised: a check per
# task cost a database round trip per exchange call of the execution engine.
CONNECTION_CHECK_SECONDS = 5.0
_worker = threading.local()


def connections_checked(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """Run `fn` in a long-lived worker thread, checking the thread's connections at most every
    CONNECTION_CHECK_SECONDS and after a failure (the engine's pools, the simulator's handlers)."""
    now = time.monotonic()
    if now - getattr(_worker, "checked_at", -CONNECTION_CHECK_SECONDS) >= CONNECTION_CHECK_SECONDS:
        close_old_connections()
        _worker.checked_at = now
    try:
        return fn(*args, **kwargs)
    except BaseException:
        _worker.checked_at = -CONNECTION_CHECK_SECONDS  # a database error may have left it unusable
        close_old_connections()
        raise
    finally:
        connection_release()  # a pooled thread's connection goes back to the pool between tasks


def _run_in_context(context: contextvars.Context, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    return context.run(connections_checked, fn, *args, **kwargs)
