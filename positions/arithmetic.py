"""Fill and PnL arithmetic (SPEC §4.3, §4.5). Pure: no ORM, no clock, no network."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from core.money import ZERO


@dataclass(frozen=True)
class PositionState:
    quantity: Decimal  # signed: + long, - short
    average_entry: Decimal


@dataclass(frozen=True)
class FillEffect:
    position: PositionState
    realized_pnl: Decimal  # gross; fees are reported separately


@dataclass(frozen=True)
class Increment:
    delta: Decimal  # unsigned quantity filled since the last seen cumulative fill
    price: Decimal  # price of this increment


class FillRegressionError(ValueError):
    """The exchange reported less cumulative fill than already recorded."""


def fill_increment(
    *, filled_before: Decimal, average_before: Decimal, filled_after: Decimal, average_after: Decimal
) -> Increment | None:
    """The increment between two cumulative fill reports, priced from cumulative cost.

    price = (avg₁·f₁ − avg₀·f₀) / Δ. None when nothing new was filled.
    """
    delta = filled_after - filled_before
    if delta < 0:
        raise FillRegressionError(f"cumulative fill went back from {filled_before} to {filled_after}")
    if delta == 0:
        return None
    price = (average_after * filled_after - average_before * filled_before) / delta
    return Increment(delta=delta, price=price)


def apply_fill(
    position: PositionState, *, side: str, quantity: Decimal, price: Decimal, base_fee: Decimal = ZERO
) -> FillEffect:
    """Apply a fill of `quantity` (> 0) at `price` on `side` (BUY | SELL) to a signed position.

    `base_fee`: a fee paid in the base asset (spot: BUY 1 BTC, fee 0.001 BTC), which leaves the
    wallet with the trade. The position then holds what the wallet holds (0.999), at the same
    entry; it realizes nothing, since realized PnL is gross and fees are reported separately.
    """
    effect = _apply_trade(position, side=side, quantity=quantity, price=price)
    if not base_fee:
        return effect
    q1 = effect.position.quantity - base_fee
    return FillEffect(PositionState(q1, effect.position.average_entry if q1 else ZERO), effect.realized_pnl)


def _apply_trade(position: PositionState, *, side: str, quantity: Decimal, price: Decimal) -> FillEffect:
    if quantity <= 0:
        raise ValueError(f"fill quantity must be positive, got {quantity}")
    q0, p0 = position.quantity, position.average_entry
    t = quantity if side == "BUY" else -quantity
    if q0 == 0:
        return FillEffect(PositionState(t, price), ZERO)
    if (q0 > 0) == (t > 0):
        q1 = q0 + t
        p1 = (abs(q0) * p0 + abs(t) * price) / (abs(q0) + abs(t))
        return FillEffect(PositionState(q1, p1), ZERO)
    closed = min(abs(q0), abs(t))
    realized = closed * (price - p0) if q0 > 0 else closed * (p0 - price)
    r = q0 + t
    if r == 0:
        return FillEffect(PositionState(ZERO, ZERO), realized)
    if (r > 0) == (q0 > 0):
        return FillEffect(PositionState(r, p0), realized)
    return FillEffect(PositionState(r, price), realized)  # flipped


def unrealized_pnl(*, quantity: Decimal, average_entry: Decimal, last_price: Decimal) -> Decimal:
    """Long q·(last − entry); short |q|·(entry − last)."""
    if quantity >= 0:
        return quantity * (last_price - average_entry)
    return abs(quantity) * (average_entry - last_price)
