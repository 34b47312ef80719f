"""Cross-process locks: the per-job run lock and the SQLite leader file lock."""

from __future__ import annotations

import fcntl
import os
import time
import zlib
from pathlib import Path
from typing import Any

from django.conf import settings
from django.db import connection

# Advisory lock key spaces (two-int form): leadership and per-job run locks never collide.
LEADER_LOCK_CLASS = 0x7472  # "tr"
LEADER_LOCK_ID = 1
JOB_LOCK_CLASS = 0x6A62  # "jb"
PAIR_LOCK_CLASS = 0x7072  # "pr", used by the order queue


def is_postgres() -> bool:
    return connection.vendor == "postgresql"


def advisory_key(name: str) -> int:
    """A stable signed 32-bit key for a name."""
    value = zlib.crc32(name.encode())
    return value - (1 << 32) if value >= (1 << 31) else value


def lock_connection(*, application_name: str) -> Any:
    """A dedicated autocommit psycopg2 connection for session advisory locks (leader, shards).

    Client and server keepalives (idle 5 s, interval 2 s, count 2) make a lost host drop the
    session, and its locks, within about 15 s; connect timeout 3 s; statement timeout 5 s.
    """
    import psycopg2

    db = settings.DATABASES["default"]
    options = (
        "-c statement_timeout=5000 -c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 "
        "-c tcp_keepalives_count=2 -c idle_in_transaction_session_timeout=0"
    )
    conn = psycopg2.connect(
        dbname=db["NAME"],
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        host=db.get("HOST") or None,
        port=db.get("PORT") or None,
        connect_timeout=3,
        keepalives=1,
        keepalives_idle=5,
        keepalives_interval=2,
        keepalives_count=2,
        application_name=application_name,
        options=options,
    )
    conn.autocommit = True
    return conn


def lock_dir() -> Path:
    path = Path(settings.VAR_DIR) / "locks"
    path.mkdir(parents=True, exist_ok=True)
    return path


def leader_lock_path() -> Path:
    """The SQLite leader lock file: beside the database file (a single-host guard)."""
    if settings.SCHEDULER_LOCK_FILE:
        return Path(settings.SCHEDULER_LOCK_FILE)
    name = str(settings.DATABASES["default"]["NAME"])
    if name.startswith("file:") or name == ":memory:":
        return lock_dir() / "scheduler-leader.lock"
    return Path(name + ".scheduler.lock")


class FileLock:
    """An exclusive, non-blocking flock on a file; released when closed or when the process dies."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None


class JobLock:
    """The lock a job holds while its body runs, so a manual run never overlaps a scheduled one.

    PostgreSQL: a session advisory lock on the calling thread's Django connection.
    SQLite: a flock on var/locks/job-<id>.lock (flock locks are per open file, so
    threads of one process exclude each other too).
    """

    def __init__(self, job_id: str):
        self.job_id = job_id
        self._file: FileLock | None = None
        self._pg = False

    def acquire(self, timeout: float = 0.0) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if self._try():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)

    def _try(self) -> bool:
        if is_postgres():
            with connection.cursor() as cursor:
                cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [JOB_LOCK_CLASS, advisory_key(self.job_id)])
                self._pg = bool(cursor.fetchone()[0])
            return self._pg
        self._file = FileLock(lock_dir() / f"job-{self.job_id}.lock")
        return self._file.try_acquire()

    def release(self) -> None:
        if self._pg:
            self._pg = False
            try:
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [JOB_LOCK_CLASS, advisory_key(self.job_id)])
            except Exception:  # the session is gone, and the lock with it
                connection.close_if_unusable_or_obsolete()
        if self._file is not None:
            self._file.release()
            self._file = None
