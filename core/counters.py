"""Per-minute metric counters any process may add to (summed by /metrics)."""

from __future__ import annotations

from datetime import datetime

from django.db import connection
from django.utils import timezone

from core.models import MetricCounter


def counter_add(*, name: str, labels: str = "", value: int = 1, now: datetime | None = None) -> None:
    """Add `value` to this minute's counter row (one upsert statement; safe from any process)."""
    minute = (now or timezone.now()).replace(second=0, microsecond=0)
    adapt = connection.ops.adapt_datetimefield_value
    table = MetricCounter._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (minute, name, labels, value) VALUES (%s, %s, %s, %s) "  # noqa: S608 - table name is ours
            f"ON CONFLICT (minute, name, labels) DO UPDATE SET value = {table}.value + %s",
            [adapt(minute), name, labels, value, value],
        )
