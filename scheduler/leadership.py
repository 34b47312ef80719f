"""Leader election: a PostgreSQL session advisory lock, or a file lock beside the SQLite database."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Protocol

from django.db import connection

from scheduler.locks import LEADER_LOCK_CLASS, LEADER_LOCK_ID, FileLock, leader_lock_path, lock_connection

logger = logging.getLogger(__name__)


class LeaderLock(Protocol):
    backend_pid: int | None

    def try_acquire(self) -> bool: ...

    def probe(self) -> bool: ...

    def release(self) -> None: ...


class PostgresLeaderLock:
    """A session advisory lock held on a dedicated autocommit psycopg2 connection.

    Client and server keepalives (idle 5 s, interval 2 s, count 2) make a lost host
    drop the session, and with it the lock, within about 15 s; a killed process drops
    it at once. The lock is probed every second by the runner.
    """

    def __init__(self) -> None:
        self._conn: Any = None  # a psycopg2 connection (psycopg2 has no type stubs here)
        self.backend_pid: int | None = None

    def _connect(self):  # noqa: ANN202
        return lock_connection(application_name="tradingsite-leader-lock")

    def try_acquire(self) -> bool:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = self._connect()
            with self._conn.cursor() as cursor:
                cursor.execute(
                    "SELECT pg_try_advisory_lock(%s, %s), pg_backend_pid()", [LEADER_LOCK_CLASS, LEADER_LOCK_ID]
                )
                acquired, pid = cursor.fetchone()
        except Exception as exc:
            logger.warning("leader lock connection failed: %s", exc)
            self._close()
            return False
        self.backend_pid = pid
        return bool(acquired)

    def probe(self) -> bool:
        if self._conn is None or self._conn.closed:
            return False
        try:
            with self._conn.cursor() as cursor:
                cursor.execute(
                    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() "
                    "AND classid = %s AND objid = %s AND granted",
                    [LEADER_LOCK_CLASS, LEADER_LOCK_ID],
                )
                return cursor.fetchone() is not None
        except Exception as exc:
            logger.warning("leader lock probe failed: %s", exc)
            self._close()
            return False

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already dead
                self._conn.close()
        self._conn = None
        self.backend_pid = None

    def release(self) -> None:
        self._close()


class FileLeaderLock:
    """An exclusive OS file lock beside the SQLite database file (single-host guard)."""

    backend_pid: int | None = None

    def __init__(self) -> None:
        self._lock = FileLock(leader_lock_path())

    def try_acquire(self) -> bool:
        return self._lock.try_acquire()

    def probe(self) -> bool:
        return self._lock.held

    def release(self) -> None:
        self._lock.release()


def leader_lock_for_database() -> LeaderLock:
    if connection.vendor == "postgresql":
        return PostgresLeaderLock()
    return FileLeaderLock()
