"""Harness for tests that start real manage.py processes against a database of their own."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from core.db import sqlite_money_install

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
# Prefix of the databases subprocess tests create (engineers sharing one server use their own).
PG_DB_PREFIX = os.environ.get("TEST_PG_DB_PREFIX", "ts_")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    env.update({"DJANGO_SETTINGS_MODULE": "tradingsite.settings", "PYTHONUNBUFFERED": "1", "LOG_LEVEL": "INFO"})
    env.update(extra)
    return env


def manage(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "manage.py"), *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class ProcDB:
    """A migrated database that subprocesses and the test both use (never the pytest test database)."""

    url: str
    var_dir: Path

    @property
    def is_pg(self) -> bool:
        return self.url.startswith("postgres")

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(DATABASE_URL=self.url, TRADINGSITE_VAR_DIR=str(self.var_dir), **extra)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        if self.is_pg:
            import psycopg2

            conn = psycopg2.connect(self.url)
            conn.autocommit = True
            try:
                with conn.cursor() as cursor:
                    cursor.execute(sql, params)
                    return cursor.fetchall() if cursor.description else []
            finally:
                conn.close()
        conn = sqlite3.connect(self.url.removeprefix("sqlite:///"), timeout=30)
        sqlite_money_install(conn)  # money columns compare through the "decimal" collation
        try:
            rows = conn.execute(sql.replace("%s", "?"), params).fetchall()
            conn.commit()
            return rows
        finally:
            conn.close()

    def scalar(self, sql: str, params: tuple = ()) -> Any:
        rows = self.query(sql, params)
        return rows[0][0] if rows else None


def _migrate(url: str, var_dir: Path) -> None:
    result = manage("migrate", "-v0", env=base_env(DATABASE_URL=url, TRADINGSITE_VAR_DIR=str(var_dir)))
    assert result.returncode == 0, result.stderr


def sqlite_template(directory: Path) -> Path:
    path = directory / "template.sqlite3"
    _migrate(f"sqlite:///{path}", directory)
    return path


def sqlite_db(template: Path, directory: Path) -> ProcDB:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "db.sqlite3"
    shutil.copy(template, path)
    return ProcDB(url=f"sqlite:///{path}", var_dir=directory)


def _pg_admin(sql: str) -> None:
    import psycopg2

    conn = psycopg2.connect(PG_ADMIN_URL)
    conn.autocommit = True
    try:
        with conn.cursor() as cursor:
            cursor.execute(sql)
    finally:
        conn.close()


def _pg_url(name: str) -> str:
    parsed = urlparse(PG_ADMIN_URL)
    return parsed._replace(path=f"/{name}").geturl()


def pg_template(directory: Path) -> str:
    name = f"{PG_DB_PREFIX}tmpl_{uuid.uuid4().hex[:8]}"
    _pg_admin(f"CREATE DATABASE {name}")
    _migrate(_pg_url(name), directory)
    return name


def pg_db(template: str, directory: Path) -> ProcDB:
    name = f"{PG_DB_PREFIX}proc_{uuid.uuid4().hex[:8]}"
    _pg_admin(f"CREATE DATABASE {name} TEMPLATE {template}")
    directory.mkdir(parents=True, exist_ok=True)
    return ProcDB(url=_pg_url(name), var_dir=directory)


def pg_drop(name_or_url: str) -> None:
    name = urlparse(name_or_url).path.lstrip("/") if "://" in name_or_url else name_or_url
    _pg_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@dataclass
class Proc:
    """A running `manage.py runscheduler` (or other command) with its output in a file."""

    popen: subprocess.Popen
    log_path: Path
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)

    def stop(self, timeout: float = 40) -> int:
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(10)


def spawn(db: ProcDB, *args: str, name: str = "sched", **env: str) -> Proc:
    log_path = db.var_dir / f"{name}-{uuid.uuid4().hex[:6]}.log"
    handle = log_path.open("w")
    popen = subprocess.Popen(
        [sys.executable, str(ROOT / "manage.py"), *(args or ("runscheduler",))],
        env=db.env(**env),
        cwd=ROOT,
        stdout=handle,
        stderr=subprocess.STDOUT,
    )
    return Proc(popen=popen, log_path=log_path)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for a server the test starts)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], Any], *, timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@contextmanager
def daphne(env: dict[str, str], log_path: Path) -> Iterator[str]:
    """daphne serving tradingsite.asgi on a free local port; yields its base URL once it answers HTTP.

    Any HTTP status counts as answering (e.g. /healthz's 503 without a scheduler). Stopped on exit.
    """
    port = free_port()
    with log_path.open("w") as log:
        popen = subprocess.Popen(
            [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tradingsite.asgi:application"],
            env=env,
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    server = Proc(popen=popen, log_path=log_path)
    base = f"http://127.0.0.1:{port}"

    def answering() -> bool:
        if popen.poll() is not None:
            raise AssertionError(f"daphne exited with {popen.returncode}:\n{server.log()}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=2):  # noqa: S310 (a local http URL)
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    try:
        wait_for(answering, timeout=30, what="daphne to answer")
        yield base
    finally:
        server.stop(timeout=10)
