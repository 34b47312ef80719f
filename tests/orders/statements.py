"""Counting SQL statements by what they touch: our tables, the simulated exchange, scheduler bookkeeping.

Used by the placement statement-count tests (tests/orders/test_placement_statements.py). Every
statement the default connection sends inside the block is recorded (DEBUG need not be on) and put
in one class:

- "ours": statements on the application's tables (orders, positions, accounts, exchanges' market
  data, core counters, notifications) and the pair lock (`pg_advisory_xact_lock`): the figure the
  ≤ 12 per placement target is about;
- "control": BEGIN/COMMIT/ROLLBACK and SAVEPOINT/RELEASE (transaction control; on SQLite Django
  issues no BEGIN statement through the cursor, on PostgreSQL autocommit is off inside atomic);
- "exchange": the simulated exchange's own tables (`exchanges_sim*`): the PAPER gateway keeps its
  orders in this database, but in production that work happens on the exchange;
- "metrics": the per-minute counters (`scheduler_metriccounter`) a queue pass writes once at its end,
  whatever it placed: a cost per pass, not per placement;
- "scheduler": the job wrapper's bookkeeping (`scheduler_*`, `django_apscheduler_*`), which the
  tests avoid by calling the job body (`__wrapped__`), listed in case a path reaches it.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from django.db import connection

_CONTROL = re.compile(r"^\s*(BEGIN|COMMIT|ROLLBACK|SAVEPOINT|RELEASE|START TRANSACTION)\b", re.IGNORECASE)
_TABLE = re.compile(r'(?:FROM|INTO|UPDATE|JOIN)\s+"?(?!SET\b)([a-z_][a-z0-9_]*)"?', re.IGNORECASE)
_WRITE = re.compile(r"^\s*(INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


def statement_class(sql: str) -> str:
    """ "ours", "control", "exchange", "metrics" or "scheduler" (see the module docstring)."""
    if _CONTROL.match(sql):
        return "control"
    tables = {t.lower() for t in _TABLE.findall(sql)}
    if tables and all(t.startswith("exchanges_sim") for t in tables):
        return "exchange"
    if tables == {"scheduler_metriccounter"}:
        return "metrics"
    if tables and all(t.startswith(("scheduler_", "django_apscheduler_")) for t in tables):
        return "scheduler"
    return "ours"


@dataclass
class StatementLog:
    """The statements of one block, classified."""

    sql: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[str]:
        return [s for s in self.sql if statement_class(s) == kind]

    @property
    def ours(self) -> int:
        return len(self.of("ours"))

    @property
    def writes(self) -> int:
        return sum(1 for s in self.of("ours") if _WRITE.match(s))

    def by_class(self) -> Counter:
        return Counter(statement_class(s) for s in self.sql)

    def tables(self) -> Counter:
        """Statements on our tables, by their first table (for the printed breakdown)."""
        out: Counter = Counter()
        for sql in self.of("ours"):
            found = _TABLE.findall(sql)
            verb = sql.split(None, 1)[0].upper()
            out[f"{verb} {found[0].lower() if found else sql[:40]}"] += 1
        return out

    def summary(self, label: str, per: int = 1) -> str:
        counts = self.by_class()
        text = f"{label}: {self.ours} statements on our tables"
        if per > 1:
            text += f" ({self.ours / per:.1f} per placement of {per})"
        text += f", {counts['control']} transaction control, {counts['exchange']} simulated exchange"
        if counts["metrics"]:
            text += f", {counts['metrics']} per-pass counters"
        if counts["scheduler"]:
            text += f", {counts['scheduler']} scheduler bookkeeping"
        return text


@contextmanager
def statements_counted() -> Iterator[StatementLog]:
    """Record every statement the default connection runs inside the block."""
    log = StatementLog()

    def record(execute: Callable, sql: str, params: Any, many: bool, context: Any) -> Any:
        log.sql.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        yield log
