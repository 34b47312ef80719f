"""Circuit breakers over exchange calls (SPEC §4.2): pure arithmetic plus the CircuitState rows that hold it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import transaction

from notifications.services import alert_raise
from orders.models import CircuitState

logger = logging.getLogger(__name__)

BREAKER_THRESHOLD = 3  # failed runs in a row that open the breaker
BREAKER_BASE_SECONDS = 60
BREAKER_MAX_SECONDS = 600


@dataclass(frozen=True)
class Breaker:
    failures: int = 0  # failed runs in a row
    opened_until: datetime | None = None
    cooldown_seconds: int = 0  # the last cool-down; 0 until the breaker first opens

    def is_open(self, now: datetime) -> bool:
        return self.opened_until is not None and now < self.opened_until


def breaker_next(breaker: Breaker, *, failed: bool, now: datetime) -> Breaker:
    """The breaker after one run of its scope. Pure.

    A success closes it and forgets the cool-down. The third failure in a row opens it for
    60 s; each failure after that (the trial run once a cool-down has passed) opens it again
    for twice the previous cool-down, capped at 10 minutes.
    """
    if not failed:
        return Breaker()
    failures = breaker.failures + 1
    if failures < BREAKER_THRESHOLD:
        return Breaker(failures=failures, cooldown_seconds=breaker.cooldown_seconds)
    if breaker.cooldown_seconds:
        cooldown = min(breaker.cooldown_seconds * 2, BREAKER_MAX_SECONDS)
    else:
        cooldown = BREAKER_BASE_SECONDS
    return Breaker(failures=failures, opened_until=now + timedelta(seconds=cooldown), cooldown_seconds=cooldown)


def exchange_scope(*, exchange: str, market_type: str) -> str:
    return f"exchange:{exchange}:{market_type}"


def account_scope(*, account_id: int) -> str:
    return f"account:{account_id}"


def circuit_states(*, scopes: list[str]) -> dict[str, Breaker]:
    """The breakers of the given scopes (a scope without a row is closed)."""
    return {
        row.scope: Breaker(failures=row.failures, opened_until=row.opened_until, cooldown_seconds=row.cooldown_seconds)
        for row in CircuitState.objects.filter(scope__in=scopes)
    }


def circuit_record(*, scope: str, failed: bool, now: datetime, error: str = "") -> Breaker:
    """Record one run's outcome for `scope` (row locked briefly; no exchange call inside).

    Alerts when the breaker opens. A success on a scope without a row writes nothing.
    """
    with transaction.atomic():
        row = CircuitState.objects.select_for_update().filter(scope=scope).first()
        if row is None:
            if not failed:
                return Breaker()
            row, _ = CircuitState.objects.get_or_create(scope=scope)
            row = CircuitState.objects.select_for_update().get(pk=row.pk)
        before = Breaker(failures=row.failures, opened_until=row.opened_until, cooldown_seconds=row.cooldown_seconds)
        after = breaker_next(before, failed=failed, now=now)
        if after == before:
            return after
        row.failures, row.opened_until, row.cooldown_seconds = (
            after.failures,
            after.opened_until,
            after.cooldown_seconds,
        )
        if failed:
            row.last_error = error[:500]
        row.save()
    if after.opened_until is not None and after.opened_until != before.opened_until:
        logger.warning(
            "circuit %s open for %d s after %d failed runs: %s", scope, after.cooldown_seconds, after.failures, error
        )
        alert_raise(
            key=f"circuit:{scope}",
            text=f"Circuit {scope} open for {after.cooldown_seconds} s after {after.failures} failed runs: {error}",
        )
    elif not failed and before.failures:
        logger.info("circuit %s closed after %d failed runs", scope, before.failures)
    return after
