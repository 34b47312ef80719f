"""Per-minute metric counters any process may add to (summed by /metrics)."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import datetime

from django.db import connection
from django.utils import timezone

from core.models import MetricCounter

# (minute, name, labels) → value added here and not yet written (counters_buffer_add).
_buffer: Counter[tuple[datetime, str, str]] = Counter()
_buffer_lock = threading.Lock()


def _minute(now: datetime | None) -> datetime:
    return (now or timezone.now()).replace(second=0, microsecond=0)


def counter_add(*, name: str, labels: str = "", value: int = 1, now: datetime | None = None) -> None:
    """Add `value` to this minute's counter row (one upsert statement; safe from any process)."""
    _upsert([(_minute(now), name, labels, value)])


def counters_buffer_add(*, name: str, labels: str = "", value: int = 1, now: datetime | None = None) -> None:
    """Add `value` to this minute's counter in memory; the next counters_buffer_flush writes it.

    For counts made by many short tasks at once (the queue's pair tasks that outlive their pass):
    an upsert each would queue them on one row, every one holding its lock until its commit is
    flushed to disk. The owner of the tasks flushes (every pass, and when its pools stop).
    """
    if value:
        with _buffer_lock:
            _buffer[(_minute(now), name, labels)] += value


def counters_buffer_flush() -> int:
    """Write every buffered count in one upsert (the rows it touched); kept for the next flush if that fails."""
    with _buffer_lock:
        rows = [(*key, value) for key, value in sorted(_buffer.items()) if value]
        _buffer.clear()
    if not rows:
        return 0
    try:
        _upsert(rows)
    except Exception:
        with _buffer_lock:
            for minute, name, labels, value in rows:
                _buffer[(minute, name, labels)] += value
        raise
    return len(rows)


def counters_buffer_discard() -> None:
    """Forget the buffered counts (tests: one test's counts never reach the next one's database)."""
    with _buffer_lock:
        _buffer.clear()


def _upsert(rows: list[tuple[datetime, str, str, int]]) -> None:
    """Add each (minute, name, labels, value) in one statement; keys are unique and sorted (no deadlock
    between two processes adding the same counters)."""
    adapt = connection.ops.adapt_datetimefield_value
    table = MetricCounter._meta.db_table
    values = ", ".join(["(%s, %s, %s, %s)"] * len(rows))
    params = [p for minute, name, labels, value in rows for p in (adapt(minute), name, labels, value)]
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (minute, name, labels, value) VALUES {values} "  # noqa: S608 - table name is ours
            f"ON CONFLICT (minute, name, labels) DO UPDATE SET value = {table}.value + excluded.value",
            params,
        )
