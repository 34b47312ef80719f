"""The drill's processes and database: a fresh PostgreSQL database, children in process groups of their own.

Every child is started in a new session (its own process group), so a stop reaches it and anything it
spawned, and nothing the drill started outlives it: `Supervisor.stop_all` sends SIGTERM to every
group, waits, then SIGKILLs what is left; the drill calls it from a `finally`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psycopg2
from psycopg2 import sql

logger = logging.getLogger("drill")

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PG_ADMIN_URL = "postgres://postgres@127.0.0.1:5432/postgres"
# Knobs of the environment that would change what the drill measures.
SCRUBBED_ENV = ("SCHEDULER_JOB_OVERRIDES", "ORDER_CRASH_POINTS", "ORDER_QUEUE_SLOTS", "SIMULATOR_SYNTHETIC_SYMBOLS")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str) -> Any:
    """Poll `predicate` until it returns something truthy; RuntimeError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- the database --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DrillDatabase:
    """A database of the drill's own on the admin URL's server."""

    admin_url: str
    name: str

    @classmethod
    def fresh_name(cls, admin_url: str) -> DrillDatabase:
        prefix = os.environ.get("DRILL_DB_PREFIX", "tradingsite_drill_")  # one per engineer on a shared server
        return cls(admin_url=admin_url, name=f"{prefix}{uuid.uuid4().hex[:8]}")

    @property
    def url(self) -> str:
        return urlparse(self.admin_url)._replace(path=f"/{self.name}").geturl()

    def _admin(self, statement: sql.Composable) -> None:
        conn = psycopg2.connect(self.admin_url, connect_timeout=5)
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                cursor.execute(statement)
        finally:
            conn.close()

    def create(self) -> None:
        self._admin(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.name)))

    def drop(self) -> None:
        self._admin(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))

    def connect(self) -> Any:
        """An autocommit psycopg2 connection (the drill's monitor and chaos threads each hold one)."""
        conn = psycopg2.connect(self.url, connect_timeout=5, application_name="tradingsite-drill")
        conn.autocommit = True
        return conn


class Sql:
    """A small reconnecting psycopg2 helper for one thread."""

    def __init__(self, db: DrillDatabase):
        self.db = db
        self._conn: Any = None

    def rows(self, statement: str, params: tuple = ()) -> list[tuple]:
        for attempt in (1, 2):
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = self.db.connect()
                with self._conn.cursor() as cursor:
                    cursor.execute(statement, params)
                    return cursor.fetchall() if cursor.description else []
            except psycopg2.OperationalError:
                self.close()
                if attempt == 2:
                    raise
        return []

    def scalar(self, statement: str, params: tuple = ()) -> Any:
        rows = self.rows(statement, params)
        return rows[0][0] if rows else None

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self._conn = None


# --- child processes -----------------------------------------------------------------------------


def child_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    for name in SCRUBBED_ENV:
        env.pop(name, None)
    env.update(base)
    env.update(extra)
    return env


@dataclass
class Child:
    name: str
    popen: subprocess.Popen
    log_path: Path
    started_at: float = field(default_factory=time.time)
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)


class Supervisor:
    """Starts manage.py (or any) commands in process groups of their own and stops every one of them."""

    def __init__(self, *, log_dir: Path, env: dict[str, str]):
        self.log_dir = log_dir
        self.env = env
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str], **extra_env: str) -> Child:
        log_path = self.log_dir / f"{name}-{len(self.children):02d}.log"
        with log_path.open("w") as handle:
            popen = subprocess.Popen(  # noqa: S603 - our own commands
                argv,
                cwd=ROOT,
                env=child_env(self.env, **extra_env),
                stdout=handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        child = Child(name=name, popen=popen, log_path=log_path)
        self.children.append(child)
        logger.info("started %s (pid %s)", name, popen.pid)
        return child

    def manage(self, name: str, *args: str, **extra_env: str) -> Child:
        return self.spawn(name, [sys.executable, str(ROOT / "manage.py"), *args], **extra_env)

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        """Run a manage.py command to completion (bounded), in its own session."""
        return subprocess.run(  # noqa: S603 - our own manage.py
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=child_env(self.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            check=False,
        )

    def by_pid(self, pid: int) -> Child | None:
        return next((c for c in self.children if c.pid == pid), None)

    def living(self, name: str) -> list[Child]:
        return [c for c in self.children if c.name == name and c.alive()]

    def kill(self, child: Child) -> None:
        child.killed = True
        child.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(10)

    def stop(self, children: list[Child], *, timeout: float = 40) -> dict[str, int | None]:
        """SIGTERM to each group, wait up to `timeout` s for all, then SIGKILL the rest; exit codes by name-pid."""
        for child in children:
            if child.alive():
                child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int | None] = {}
        for child in children:
            try:
                code = child.popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s (pid %s) ignored SIGTERM for %.0f s; killing it", child.name, child.pid, timeout)
                child.signal_group(signal.SIGKILL)
                code = child.popen.wait(10)
            codes[f"{child.name}-{child.pid}"] = code
        return codes

    def stop_all(self, *, timeout: float = 40) -> dict[str, int | None]:
        codes = self.stop([c for c in self.children if c.alive()], timeout=timeout)
        for child in self.children:
            # Grandchildren left in a group whose leader already exited.
            child.signal_group(signal.SIGKILL)
        return codes

    def ports_of(self, pids: list[int]) -> set[int]:
        """Local TCP ports of the given processes' sockets (to find their PostgreSQL backends)."""
        import psutil

        ports: set[int] = set()
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.laddr:
                        ports.add(conn.laddr.port)
        return ports
