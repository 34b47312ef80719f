"""PostgreSQL with a shared connection pool for the execution engine's worker threads (see base.py).

ENGINE "core.pgpool" (settings selects it for every postgres DATABASE_URL). Threads marked with
`pooled_thread_mark` take a connection from the process's pool when they first touch the database
and give it back at `connection_release` (before each exchange call, after each task), so many
worker threads waiting on exchanges hold few database connections. Every other thread connects as
with Django's own backend.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from django.db import DEFAULT_DB_ALIAS, OperationalError, connections

logger = logging.getLogger(__name__)

# How long a pooled thread waits for a free connection before its database call fails.
POOL_WAIT_SECONDS = 30.0

_local = threading.local()


def pooled_thread_mark() -> None:
    """Mark the calling thread (a pool worker's initializer): its connections come from the shared pool."""
    _local.pooled = True


def pooled_thread() -> bool:
    return bool(getattr(_local, "pooled", False))


class ConnectionPool:
    """At most `size` open connections shared by the pooled threads; idle ones are kept for reuse.

    A thread takes one on its first query and holds it until it gives it back (Django's `close()` of
    that thread's wrapper): a thread never holds two, so waiting for one cannot deadlock the pool.
    """

    def __init__(self, size: int):
        self.size = size
        self._slots = threading.BoundedSemaphore(size)
        self._idle: list[Any] = []
        self._mine: set[int] = set()  # id() of every connection out of this pool, idle or taken
        self._lock = threading.Lock()
        self.taken = 0  # connections held by threads now

    def take(self, connect: Callable[[], Any]) -> Any:
        if not self._slots.acquire(timeout=POOL_WAIT_SECONDS):
            raise OperationalError(
                f"no database connection free in the execution pool after {POOL_WAIT_SECONDS:.0f} s "
                f"({self.size} connections, EXECUTION_DB_CONNECTIONS)"
            )
        with self._lock:
            while self._idle:
                conn = self._idle.pop()
                if not conn.closed:
                    self.taken += 1
                    return conn
                self._mine.discard(id(conn))
        try:
            conn = connect()
        except BaseException:
            self._slots.release()
            raise
        with self._lock:
            self._mine.add(id(conn))
            self.taken += 1
        return conn

    def owns(self, conn: Any) -> bool:
        with self._lock:
            return id(conn) in self._mine

    def give(self, conn: Any) -> None:
        """Take back a connection: reusable when open and outside a transaction, else closed. A broken
        one (a database restart, most likely) drops the idle ones too: they are broken alike."""
        reusable = not conn.closed
        if reusable and conn.info.transaction_status != 0:  # not TRANSACTION_STATUS_IDLE
            try:
                conn.rollback()
            except Exception:
                reusable = False
        stale: list[Any] = []
        with self._lock:
            self.taken -= 1
            if reusable:
                self._idle.append(conn)
            else:
                self._mine.discard(id(conn))
                stale, self._idle = self._idle, []
                self._mine.difference_update(id(c) for c in stale)
        if not reusable:
            stale.append(conn)
        for dead in stale:
            _quietly_close(dead)
        self._slots.release()

    def close_idle(self) -> int:
        """Close the idle connections (a stopping pool, a test database about to be dropped); how many."""
        with self._lock:
            idle, self._idle = self._idle, []
            self._mine.difference_update(id(c) for c in idle)
        for conn in idle:
            _quietly_close(conn)
        return len(idle)

    def idle_count(self) -> int:
        with self._lock:
            return len(self._idle)


def _quietly_close(conn: Any) -> None:
    try:
        conn.close()
    except Exception as exc:
        logger.debug("closing a pooled connection failed: %s", exc)


_pools: dict[str, ConnectionPool] = {}
_pools_lock = threading.Lock()


def connection_pool(alias: str = DEFAULT_DB_ALIAS) -> ConnectionPool:
    """The process's pool for database `alias`, sized by EXECUTION_DB_CONNECTIONS (rebuilt when that
    changed and no thread holds one of its connections, as orders.execution rebuilds its pools)."""
    from django.conf import settings

    size = int(settings.EXECUTION_DB_CONNECTIONS)
    with _pools_lock:
        pool = _pools.get(alias)
        if pool is not None and pool.size != size and not pool.taken:
            pool.close_idle()
            pool = None
        if pool is None:
            pool = _pools[alias] = ConnectionPool(size)
        return pool


def pool_owning(alias: str, conn: Any) -> ConnectionPool | None:
    """The pool `conn` was taken from, if any (no pool is made by asking)."""
    with _pools_lock:
        pool = _pools.get(alias)
    return pool if pool is not None and pool.owns(conn) else None


def connection_pools_close_idle() -> int:
    with _pools_lock:
        pools = list(_pools.values())
    return sum(pool.close_idle() for pool in pools)


def connection_release() -> None:
    """Give the calling pooled thread's connections back to the pool, unless inside a transaction
    (a no-op on other threads and other backends): before an exchange call, after a task."""
    if not pooled_thread():
        return
    for conn in connections.all(initialized_only=True):
        if getattr(conn, "pooled", False) and conn.connection is not None and not conn.in_atomic_block:
            conn.close()
