"""SQLite support for core.fields.MoneyField: the "decimal" collation and an exact SUM, on every connection.

The sqlite3 command-line shell (and so `manage.py dbshell`) ships a collation of the same name and
meaning (its decimal extension), so the database stays usable there.
"""

from __future__ import annotations

from decimal import Context, Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

_SUM_CONTEXT = Context(prec=80)
_INT64 = 2**63


@lru_cache(maxsize=65536)
def _number(text: str) -> Decimal | None:
    try:
        value = Decimal(text)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def decimal_collate(left: str, right: str) -> int:
    """Order two texts as decimal numbers ("10" > "9.5", "1.0" == "1"); text that is no number sorts
    after every number, by its characters (MoneyField never stores such text)."""
    a, b = _number(left), _number(right)
    if a is not None and b is not None:
        return (a > b) - (a < b)
    if a is None and b is None:
        return (left > right) - (left < right)
    return 1 if a is None else -1


class DecimalAwareSum:
    """SQLite's sum(X), exact for decimal text (MoneyField columns): integers sum to an integer,
    any REAL makes the result a REAL (as the built-in does), decimal text sums exactly and is
    returned as text. NULLs are skipped; no rows give NULL."""

    def __init__(self) -> None:
        self.total: Any = None
        self.kind = "int"  # int | decimal | float

    def step(self, value: Any) -> None:
        if value is None:
            return
        if isinstance(value, float):
            self.kind = "float"
        elif isinstance(value, str | bytes):
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            number = _number(text.strip())
            value = number if number is not None else 0
            if self.kind == "int" and number is not None:
                self.kind = "decimal"
        if self.kind == "float":
            self.total = float(self.total or 0) + float(value)
        elif self.kind == "decimal":
            self.total = _SUM_CONTEXT.add(Decimal(self.total or 0), Decimal(value))
        else:
            self.total = (self.total or 0) + value

    def finalize(self) -> Any:
        if self.total is None:
            return None
        if self.kind == "decimal":
            return format(self.total, "f")
        if self.kind == "int" and not -_INT64 <= self.total < _INT64:
            return float(self.total)  # the built-in raises "integer overflow"; a REAL is kinder
        return self.total


def sqlite_money_install(connection: Any) -> None:
    """Register the collation and SUM on a DB-API sqlite3 connection (Django's, or a raw one)."""
    connection.create_collation("decimal", decimal_collate)
    connection.create_aggregate("sum", 1, DecimalAwareSum)


def on_connection_created(sender: Any, connection: Any, **kwargs: Any) -> None:
    if connection.vendor == "sqlite":
        sqlite_money_install(connection.connection)
