"""Shared pieces of the in-process benchmarks: a fresh database, Django set-up on it, timing, report lines."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def pg_recreate(url: str, *, drop_only: bool = False) -> None:
    """DROP (WITH FORCE) and CREATE the database named in a postgres:// URL (only DROP when `drop_only`)."""
    import environ
    import psycopg2
    from psycopg2 import sql

    config = environ.Env.db_url_config(url)
    admin = psycopg2.connect(
        dbname="postgres",
        user=config.get("USER") or None,
        password=config.get("PASSWORD") or None,
        host=config.get("HOST") or None,
        port=config.get("PORT") or None,
        connect_timeout=3,
    )
    admin.autocommit = True
    try:
        with admin.cursor() as cursor:
            name = sql.Identifier(config["NAME"])
            cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
            if not drop_only:
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(name))
    finally:
        admin.close()


def bench_env(database_url: str, var_dir: Path) -> dict[str, str]:
    """The environment of a measured Django: this database, quiet logs, no knobs that skew the hot paths."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_SETTINGS")}
    for name in ("SCHEDULER_JOB_OVERRIDES", "ORDER_CRASH_POINTS", "ORDER_QUEUE_SLOTS"):
        env.pop(name, None)
    env.update(
        DJANGO_SETTINGS_MODULE="tradingsite.settings",
        DATABASE_URL=database_url,
        TRADINGSITE_VAR_DIR=str(var_dir),
        LOG_LEVEL="WARNING",
        PYTHONUNBUFFERED="1",
    )
    return env


def migrate(env: dict[str, str]) -> None:
    result = subprocess.run(  # noqa: S603 - our own manage.py
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(f"migrate failed:\n{result.stdout}{result.stderr}")


def django_start(env: dict[str, str]) -> None:
    """Point this process at the benchmark database (before anything reads settings) and set Django up."""
    os.environ.update(env)
    import django

    django.setup()


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


def median_seconds(fn: Callable[[], Any], repeat: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(repeat))


@contextmanager
def statements() -> Iterator[list[str]]:
    """Every SQL statement the default connection runs inside the block (works with DEBUG off)."""
    from django.db import connection

    seen: list[str] = []

    def record(execute: Callable, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        yield seen


def fmt(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 0.01 else f"{value:.4f}"


def ratio(value: float, baseline: float) -> str:
    return "-" if not baseline else f"{value / baseline:.3g}x"


def line(name: str, value: float, baseline: float | None) -> str:
    """`name  value  baseline  ratio` (ratio = value / baseline)."""
    if baseline is None:
        return f"{name:52} {fmt(value):>10} {'-':>10} {'-':>10}"
    return f"{name:52} {fmt(value):>10} {fmt(baseline):>10} {ratio(value, baseline):>10}"


def header() -> str:
    return f"{'name':52} {'value':>10} {'baseline':>10} {'ratio':>10}"
