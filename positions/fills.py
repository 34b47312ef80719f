"""The fill ledger (SPEC §4.2, §4.3): Trade rows, append-only Fill rows and the Position each fill moves.

The orders app records an exchange report's fill through these services, inside its own
transaction and pair lock (orders.fills.fill_apply); this module never looks at orders.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from uuid import UUID

from django.db import connection, models
from django.db.models import Sum

from core.money import ZERO, decimal_text, quantize
from core.rawsql import rows_insert
from exchanges.gateway import OrderState
from exchanges.models import MarketInfo
from notifications.services import alert_raise
from positions.arithmetic import PositionState, apply_fill, fill_increment
from positions.models import Fill, Position, Trade

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedFill:
    """What one fill did to its position (returned by position_apply_fill)."""

    realized_pnl: Decimal
    quantity_after: Decimal


@dataclass(frozen=True)
class RecordedFill:
    """One increment newly in the ledger (returned by trade_fill_record)."""

    delta: Decimal  # unsigned quantity
    price: Decimal  # price of this increment, quantized


def trade_lock(
    *,
    strategy_account_id: int,
    account_id: int,
    exchange_order_id: str,
    order_key: UUID | None,
    symbol: str,
    market_type: str,
    side: str,
    fee_currency: str,
) -> Trade:
    """Insert the Trade if missing (ON CONFLICT DO NOTHING), else lock the existing one: safe against a
    concurrent insert. One statement for a new exchange order (the insert's own row lock), two otherwise.

    Call inside the fill's transaction.
    """
    trade = Trade(
        strategy_account_id=strategy_account_id,
        account_id=account_id,
        exchange_order_id=exchange_order_id,
        order_key=order_key,
        symbol=symbol,
        market_type=market_type,
        side=side,
        fee_currency=fee_currency,
    )
    if insert_if_new(trade, conflict=("strategy_account_id", "exchange_order_id")):
        return trade
    return Trade.objects.select_for_update().get(
        strategy_account_id=strategy_account_id, exchange_order_id=exchange_order_id
    )


def insert_if_new(obj: models.Model, *, conflict: tuple[str, ...]) -> bool:
    """INSERT `obj` unless a row with the same `conflict` columns exists (ON CONFLICT DO NOTHING RETURNING id).

    True (and obj.pk set) when inserted: the row is `obj` as given, and on PostgreSQL locked by the
    insert until the transaction ends. One statement on PostgreSQL and SQLite (3.35+: RETURNING).
    """
    rows_insert([obj], conflict=conflict)
    return obj.pk is not None


def trade_fill_record(
    *,
    trade: Trade,
    strategy_account_id: int,
    symbol: str,
    market_type: str,
    exchange: str,
    state: OrderState,
    source: str,
    now: datetime,
) -> RecordedFill | None:
    """Append what `state` (cumulative fill of the trade's exchange order) adds to the locked `trade`.

    Call inside the fill's transaction with `trade` from trade_lock. Fill insert with its final
    values (UNIQUE(trade, cum_filled_after) backs the cumulative comparison), Position update
    (position_apply_fill) and the Trade's totals. None when the ledger already holds this or a
    later report (another writer since the caller's probe).
    """
    if trade.cumulative_filled >= state.filled_quantity:
        return None
    increment = fill_increment(
        filled_before=trade.cumulative_filled,
        average_before=trade.average_price,
        filled_after=state.filled_quantity,
        average_after=state.average_price or ZERO,
    )
    if increment is None:
        return None
    fee_delta = max(state.fee - trade.fees, ZERO) if state.fee_currency == trade.fee_currency else state.fee
    signed = increment.delta if state.side == "BUY" else -increment.delta
    price = quantize(increment.price)
    # No savepoint around the insert: the Trade row is locked (trade_lock) and its cumulative fill
    # checked above, and every Fill of a trade is inserted under that lock with the Trade's totals,
    # so no Fill with this (trade, cum_filled_after) can exist here.
    fill = Fill(
        trade=trade,
        strategy_account_id=strategy_account_id,
        symbol=symbol,
        cum_filled_after=state.filled_quantity,
        delta_qty=signed,
        price=price,
        fee=fee_delta,
        fee_currency=state.fee_currency,
        filled_at=state.updated_at,
        source=source,
    )
    applied = position_apply_fill(
        fill=fill,
        market_type=market_type,
        exchange=exchange,
        side=state.side,
        quantity=increment.delta,
        now=now,
    )
    trade.cumulative_filled = state.filled_quantity
    trade.average_price = quantize(state.average_price or price)
    trade.fees = state.fee
    trade.fee_currency = state.fee_currency
    trade.realized_pnl = trade.realized_pnl + applied.realized_pnl
    trade.save(update_fields=["cumulative_filled", "average_price", "fees", "fee_currency", "realized_pnl"])
    return RecordedFill(delta=increment.delta, price=price)


def position_apply_fill(
    *, fill: Fill, market_type: str, exchange: str, side: str, quantity: Decimal, now: datetime
) -> AppliedFill:
    """Apply one ledger Fill to its Position (row locked; waits for a concurrent writer, never skips).

    Call inside the fill's transaction. Sets fill.realized_pnl and saves the fill (inserted here,
    with its final values, when it is new). A spot sell below zero is
    recorded as reported, then brought back to zero by an ADJUSTMENT fill with a log line and
    an alert; a remainder below MarketInfo.min_qty after a close is closed by an ADJUSTMENT
    fill, so Position.quantity always equals the sum of Fill.delta_qty.
    """
    position = _position_lock(strategy_account_id=fill.strategy_account_id, symbol=fill.symbol, market_type=market_type)
    before = position.quantity
    # A spot fee in the base asset leaves the wallet: the position (and the ledger row, so that
    # Σ delta_qty stays the position) holds the net quantity, so a later close sells what exists.
    base_fee = fill.fee if market_type == "SPOT" and fill.fee_currency == fill.symbol.partition("/")[0] else ZERO
    effect = apply_fill(
        PositionState(position.quantity, position.average_entry),
        side=side,
        quantity=quantity,
        price=fill.price,
        base_fee=base_fee,
    )
    realized = quantize(effect.realized_pnl)
    fill.realized_pnl = realized
    fill.delta_qty -= base_fee
    if fill.pk is None:
        fill.save(force_insert=True)  # before any adjustment fill, so fills keep their order by id
    else:
        fill.save(update_fields=["realized_pnl", "delta_qty"])
    position.quantity = effect.position.quantity
    position.average_entry = quantize(effect.position.average_entry)
    position.realized_pnl += realized

    adjustment = ZERO
    if market_type == "SPOT" and position.quantity < 0:
        adjustment = -position.quantity
        logger.error(
            "spot position %s %s would go below zero (%s after a %s sell); closed by an adjustment of +%s",
            fill.strategy_account_id,
            fill.symbol,
            decimal_text(position.quantity),
            decimal_text(quantity),
            decimal_text(adjustment),
        )
        alert_raise(
            key=f"spot_negative:{fill.strategy_account_id}:{fill.symbol}",
            text=(
                f"Spot position {fill.symbol} of strategy account {fill.strategy_account_id} would go below zero "
                f"({position.quantity}); sold more than the position held; adjusted to 0"
            ),
        )
    elif position.quantity != 0 and abs(position.quantity) < abs(before) and (before > 0) == (position.quantity > 0):
        min_qty = (
            MarketInfo.objects.filter(exchange=exchange, market_type=market_type, symbol=fill.symbol)
            .values_list("min_qty", flat=True)
            .first()
        )
        if min_qty is not None and abs(position.quantity) < min_qty:
            adjustment = -position.quantity
            logger.info(
                "dust %s %s after a close (min qty %s) closed by an adjustment",
                fill.symbol,
                decimal_text(position.quantity),
                decimal_text(min_qty),
            )
    if adjustment:
        # Adjustments realize nothing: no trade happened; the remainder is booked at its entry.
        Fill.objects.create(
            trade=None,
            strategy_account_id=fill.strategy_account_id,
            symbol=fill.symbol,
            cum_filled_after=ZERO,
            delta_qty=adjustment,
            price=position.average_entry,
            filled_at=fill.filled_at,
            source=Fill.Source.ADJUSTMENT,
        )
        position.quantity = ZERO
        position.average_entry = ZERO
    position.save(update_fields=["quantity", "average_entry", "realized_pnl", "updated_at"])
    return AppliedFill(realized_pnl=realized, quantity_after=position.quantity)


def _position_lock(*, strategy_account_id: int, symbol: str, market_type: str) -> Position:
    """The Position row, locked: a new one inserted (one statement), an existing one selected FOR UPDATE."""
    position = Position(strategy_account_id=strategy_account_id, symbol=symbol, market_type=market_type)
    if insert_if_new(position, conflict=("strategy_account_id", "symbol")):
        return position
    return Position.objects.select_for_update().get(strategy_account_id=strategy_account_id, symbol=symbol)


def position_matches_fills(*, strategy_account_id: int | None = None) -> list[tuple[int, str, Decimal, Decimal]]:
    """Positions whose quantity differs from the sum of their fills: (strategy account, symbol, position, Σ fills).

    Empty when the ledger invariant holds (tests and the drill assert it).
    """
    positions = Position.objects.all()
    fills = Fill.objects.all()
    if strategy_account_id is not None:
        positions = positions.filter(strategy_account_id=strategy_account_id)
        fills = fills.filter(strategy_account_id=strategy_account_id)
    sums: dict[tuple[int, str], Decimal] = {}
    if connection.vendor == "postgresql":
        for row in fills.values("strategy_account_id", "symbol").annotate(total=Sum("delta_qty")):
            sums[(row["strategy_account_id"], row["symbol"])] = row["total"]
    else:
        # SQLite sums decimals as floats; add them up exactly here instead.
        for sa_id, symbol, delta in fills.values_list("strategy_account_id", "symbol", "delta_qty").iterator():
            sums[(sa_id, symbol)] = sums.get((sa_id, symbol), ZERO) + delta
    held = {(p.strategy_account_id, p.symbol): p.quantity for p in positions}
    mismatches = []
    for key in sorted(set(sums) | set(held)):
        quantity, total = held.get(key, ZERO), sums.get(key) or ZERO
        if quantity != total:
            mismatches.append((key[0], key[1], quantity, total))
    return mismatches
