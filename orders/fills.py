"""The one idempotent fill path (SPEC §4.2, §4.3): REST reconciliation, the queue and the user streams."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

from django.db import IntegrityError, connection, transaction
from django.db.models import Sum

from core.money import ZERO, quantize
from exchanges.gateway import OrderState, OrderStatus
from exchanges.models import MarketInfo
from notifications.services import alert_raise
from orders.faults import crash_point
from orders.models import Fill, OpenOrder, OrderEvent, Trade
from orders.services import order_event_add, pair_lock, queue_mark_dirty
from positions.arithmetic import PositionState, apply_fill, fill_increment
from positions.models import Position

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppliedFill:
    """What one fill did to its position (returned by position_apply_fill)."""

    realized_pnl: Decimal
    quantity_after: Decimal


def fill_apply(*, order: OpenOrder, state: OrderState, source: str, now: datetime) -> Decimal:
    """Record what `state` (cumulative fill of one exchange order) adds beyond what is already recorded.

    One transaction under the (account, symbol) pair lock: Trade upsert (row locked), Fill
    insert (UNIQUE(trade, cum_filled_after) backs the cumulative comparison), Position
    update (row locked; waits, never skips), the OpenOrder's filled quantity and status (a
    completely filled order is ended here, in the same transaction as its fill), an event
    and a dirty mark. Idempotent: a fill already recorded (REST then stream, two threads)
    changes nothing and returns 0. Returns the newly applied quantity (unsigned).
    Raises FillRegressionError if the exchange reports less than was recorded (nothing written).
    """
    if state.filled_quantity <= 0:
        return ZERO
    # Cheap unlocked probe: the stream and the REST poll mostly repeat what is known already.
    known = (
        Trade.objects.filter(strategy_account_id=order.strategy_account_id, exchange_order_id=state.exchange_order_id)
        .values_list("cumulative_filled", flat=True)
        .first()
    )
    if known is not None and known >= state.filled_quantity:
        return ZERO
    with transaction.atomic(), pair_lock(account_id=order.account_id, symbol=order.symbol):
        trade = _trade_lock(order=order, state=state)
        crash_point("fill.after_trade_upsert")
        if trade.cumulative_filled >= state.filled_quantity:
            # Another writer (stream or REST) recorded this or a later report since the probe.
            return ZERO
        increment = fill_increment(
            filled_before=trade.cumulative_filled,
            average_before=trade.average_price,
            filled_after=state.filled_quantity,
            average_after=state.average_price or ZERO,
        )
        if increment is None:
            return ZERO
        fee_delta = max(state.fee - trade.fees, ZERO) if state.fee_currency == trade.fee_currency else state.fee
        signed = increment.delta if state.side == "BUY" else -increment.delta
        price = quantize(increment.price)
        try:
            # Savepoint: a duplicate (cum_filled_after) is a no-op, not a broken transaction.
            with transaction.atomic():
                fill = Fill.objects.create(
                    trade=trade,
                    strategy_account_id=order.strategy_account_id,
                    symbol=order.symbol,
                    cum_filled_after=state.filled_quantity,
                    delta_qty=signed,
                    price=price,
                    fee=fee_delta,
                    fee_currency=state.fee_currency,
                    filled_at=state.updated_at,
                    source=source,
                )
        except IntegrityError:
            logger.info("fill %s@%s already recorded", state.exchange_order_id, state.filled_quantity)
            return ZERO
        applied = position_apply_fill(
            fill=fill,
            market_type=order.market_type,
            exchange=order.account.exchange,
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
        _order_record_fill(order=order, state=state, increment=increment.delta, price=price, source=source)
        queue_mark_dirty(pairs=[(order.account_id, order.market_type, order.symbol)], now=now)
    logger.info(
        "fill %s %s %s %s @ %s (cum %s, %s)",
        order.order_key,
        order.symbol,
        state.side,
        increment.delta,
        price,
        state.filled_quantity,
        source,
    )
    return increment.delta


def _trade_lock(*, order: OpenOrder, state: OrderState) -> Trade:
    """Insert the Trade if missing (ON CONFLICT DO NOTHING), then lock it: safe against a concurrent insert."""
    Trade.objects.bulk_create(
        [
            Trade(
                strategy_account_id=order.strategy_account_id,
                account_id=order.account_id,
                exchange_order_id=state.exchange_order_id,
                order_key=order.order_key,
                symbol=order.symbol,
                market_type=order.market_type,
                side=state.side,
                fee_currency=state.fee_currency,
            )
        ],
        ignore_conflicts=True,
    )
    return Trade.objects.select_for_update().get(
        strategy_account_id=order.strategy_account_id, exchange_order_id=state.exchange_order_id
    )


def _order_record_fill(*, order: OpenOrder, state: OrderState, increment: Decimal, price: Decimal, source: str) -> None:
    """Bring the OpenOrder row (if it still exists) to the reported fill; end it when completely filled."""
    row = OpenOrder.objects.select_for_update().filter(pk=order.pk).first()
    details = {
        "exchange_order_id": state.exchange_order_id,
        "delta": increment,
        "price": price,
        "filled": state.filled_quantity,
        "quantity": state.quantity,
        "source": source,
    }
    complete = state.status == OrderStatus.FILLED or state.filled_quantity >= order.quantity
    if row is None:
        # The row ended already (its final state was confirmed); the fill still belongs to the order.
        order_event_add(
            order=order,
            kind=OrderEvent.Kind.FILLED if complete else OrderEvent.Kind.PARTIALLY_FILLED,
            details={**details, "row": "ended"},
        )
        return
    if complete:
        order_event_add(order=row, kind=OrderEvent.Kind.FILLED, details=details)
        row.delete()
        order.filled_quantity = state.filled_quantity
        return
    row.filled_quantity = state.filled_quantity
    fields = ["filled_quantity", "updated_at"]
    if row.status == OpenOrder.Status.NEW:
        # CANCELLING and TRIGGERED keep their status: the cancel or the spawned order is still in flight.
        row.status = OpenOrder.Status.PARTIALLY_FILLED
        fields.append("status")
    row.save(update_fields=fields)
    order.filled_quantity, order.status = row.filled_quantity, row.status
    order_event_add(order=row, kind=OrderEvent.Kind.PARTIALLY_FILLED, details=details)


def position_apply_fill(
    *, fill: Fill, market_type: str, exchange: str, side: str, quantity: Decimal, now: datetime
) -> AppliedFill:
    """Apply one ledger Fill to its Position (row locked; waits for a concurrent writer, never skips).

    Call inside the fill's transaction. Sets fill.realized_pnl. A spot sell below zero is
    recorded as reported, then brought back to zero by an ADJUSTMENT fill with a log line and
    an alert; a remainder below MarketInfo.min_qty after a close is closed by an ADJUSTMENT
    fill, so Position.quantity always equals the sum of Fill.delta_qty.
    """
    position = _position_lock(strategy_account_id=fill.strategy_account_id, symbol=fill.symbol, market_type=market_type)
    before = position.quantity
    effect = apply_fill(
        PositionState(position.quantity, position.average_entry), side=side, quantity=quantity, price=fill.price
    )
    realized = quantize(effect.realized_pnl)
    fill.realized_pnl = realized
    fill.save(update_fields=["realized_pnl"])
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
            position.quantity,
            quantity,
            adjustment,
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
                position.quantity,
                min_qty,
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
    Position.objects.bulk_create(
        [Position(strategy_account_id=strategy_account_id, symbol=symbol, market_type=market_type)],
        ignore_conflicts=True,
    )
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
