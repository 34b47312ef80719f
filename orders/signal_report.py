"""The per-signal execution report's arithmetic: how fast and how close to its reference each follower filled.

Pure functions over plain values (no ORM, no clock): the selector orders.selectors.signal_execution
feeds them the stored signal, its followers' order events and their fills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

BPS = Decimal(10000)
BPS_PLACES = Decimal("0.01")


@dataclass(frozen=True)
class FollowerExecution:
    """One follower's order of a signal: when it moved, what it filled at, how it ended."""

    order_key: str
    account_id: int
    side: str
    order_type: str
    quantity: Decimal
    reference_price: Decimal | None
    queued_at: datetime | None
    submitted_at: datetime | None  # claimed for the exchange (SUBMITTING)
    acknowledged_at: datetime | None  # the exchange holds it (placed)
    filled_at: datetime | None  # completely filled
    filled_quantity: Decimal
    fill_price: Decimal | None  # average over its fills
    outcome: str  # queued | submitting | live | partially_filled | filled | rejected | cancelled | failed | lost
    failure: str = ""

    @property
    def slippage_bps(self) -> Decimal | None:
        return slippage_bps(side=self.side, reference=self.reference_price, fill=self.fill_price)


def slippage_bps(*, side: str, reference: Decimal | None, fill: Decimal | None) -> Decimal | None:
    """How much worse than its reference an order filled, in basis points (negative: better).

    A BUY is worse when it paid more, a SELL when it got less. None without both prices.
    """
    if reference is None or fill is None or reference <= 0:
        return None
    diff = fill - reference if side == "BUY" else reference - fill
    return (diff / reference * BPS).quantize(BPS_PLACES)


def percentile(values: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile of `values` (None when empty): p99 of 100 values is the 99th smallest."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Latency:
    """Seconds from the signal to an event, over the followers that reached it."""

    count: int
    first: float | None
    median: float | None
    p99: float | None
    last: float | None


def latency(received_at: datetime, times: list[datetime | None]) -> Latency:
    seconds = [(t - received_at).total_seconds() for t in times if t is not None]
    return Latency(
        count=len(seconds),
        first=min(seconds) if seconds else None,
        median=percentile(seconds, 0.5),
        p99=percentile(seconds, 0.99),
        last=max(seconds) if seconds else None,
    )


@dataclass(frozen=True)
class ExecutionSummary:
    followers: int
    by_outcome: dict[str, int]
    submitted: Latency
    acknowledged: Latency
    filled: Latency
    slippage_avg_bps: Decimal | None  # quantity-weighted over filled quantity
    slippage_worst_bps: Decimal | None
    failures: list[str]


def execution_summarize(*, received_at: datetime, followers: list[FollowerExecution]) -> ExecutionSummary:
    """The signal's figures: counts by outcome, latency from the signal to each step, slippage."""
    by_outcome: dict[str, int] = {}
    for f in followers:
        by_outcome[f.outcome] = by_outcome.get(f.outcome, 0) + 1
    weighted = Decimal(0)
    weight = Decimal(0)
    worst: Decimal | None = None
    for f in followers:
        bps = f.slippage_bps
        if bps is None or f.filled_quantity <= 0:
            continue
        weighted += bps * f.filled_quantity
        weight += f.filled_quantity
        worst = bps if worst is None or bps > worst else worst
    return ExecutionSummary(
        followers=len(followers),
        by_outcome=dict(sorted(by_outcome.items())),
        submitted=latency(received_at, [f.submitted_at for f in followers]),
        acknowledged=latency(received_at, [f.acknowledged_at for f in followers]),
        filled=latency(received_at, [f.filled_at for f in followers]),
        slippage_avg_bps=(weighted / weight).quantize(BPS_PLACES) if weight else None,
        slippage_worst_bps=worst,
        failures=[f"account {f.account_id}: {f.failure}" for f in followers if f.failure],
    )


@dataclass(frozen=True)
class DayExecution:
    """Copy execution over a day's signals (the daily summary's section)."""

    signals: int
    orders: int
    by_outcome: dict[str, int]
    acknowledged: Latency  # seconds from each follower's own signal
    slippage_avg_bps: Decimal | None
    slippage_worst_bps: Decimal | None


def execution_day(signals: list[tuple[datetime, list[FollowerExecution]]]) -> DayExecution:
    """Pool (received_at, followers) of every signal of a day: latencies are per follower from its signal."""
    followers = [f for _, rows in signals for f in rows]
    seconds = [
        (f.acknowledged_at - received_at).total_seconds()
        for received_at, rows in signals
        for f in rows
        if f.acknowledged_at is not None
    ]
    # Counts and slippage do not depend on the reference time; latency is pooled above.
    summary = execution_summarize(
        received_at=signals[0][0] if signals else datetime.min.replace(tzinfo=UTC), followers=followers
    )
    return DayExecution(
        signals=len(signals),
        orders=len(followers),
        by_outcome=summary.by_outcome,
        acknowledged=Latency(
            count=len(seconds),
            first=min(seconds) if seconds else None,
            median=percentile(seconds, 0.5),
            p99=percentile(seconds, 0.99),
            last=max(seconds) if seconds else None,
        ),
        slippage_avg_bps=summary.slippage_avg_bps,
        slippage_worst_bps=summary.slippage_worst_bps,
    )
