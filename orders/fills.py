"""The one idempotent fill path of an order (SPEC §4.2, §4.3): REST reconciliation, the queue and the user streams.

The ledger itself (Trade, Fill, Position) is the positions app's (positions.fills); this module
records an exchange report's fill there and moves the order row, under the order's pair lock.
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal

from django.db import transaction

from core.money import ZERO, decimal_text
from exchanges.gateway import OrderState, OrderStatus
from orders.faults import crash_point
from orders.models import OpenOrder, OrderEvent
from orders.services import order_event_add, pair_lock, queue_mark_dirty
from positions.fills import RecordedFill, trade_fill_record, trade_lock
from positions.models import Fill
from positions.selectors import trade_cumulative_filled

logger = logging.getLogger(__name__)


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
    known = trade_cumulative_filled(
        strategy_account_id=order.strategy_account_id, exchange_order_id=state.exchange_order_id
    )
    if known is not None and known >= state.filled_quantity:
        return ZERO
    with transaction.atomic(), pair_lock(account_id=order.account_id, symbol=order.symbol):
        trade = trade_lock(
            strategy_account_id=order.strategy_account_id,
            account_id=order.account_id,
            exchange_order_id=state.exchange_order_id,
            order_key=order.order_key,
            symbol=order.symbol,
            market_type=order.market_type,
            side=state.side,
            fee_currency=state.fee_currency,
        )
        crash_point("fill.after_trade_upsert")
        # None: another writer (stream or REST) recorded this or a later report since the probe.
        recorded = trade_fill_record(
            trade=trade,
            strategy_account_id=order.strategy_account_id,
            symbol=order.symbol,
            market_type=order.market_type,
            exchange=order.account.exchange,
            state=state,
            source=source,
            now=now,
        )
        if recorded is None:
            return ZERO
        increment, price = recorded.delta, recorded.price
        _order_record_fill(order=order, state=state, increment=increment, price=price, source=source)
        queue_mark_dirty(pairs=[(order.account_id, order.market_type, order.symbol)], now=now)
    logger.info(
        "fill %s %s %s %s @ %s (order %s, filled %s of %s, %s)",
        order.order_key,
        state.side,
        decimal_text(increment),
        order.symbol,
        decimal_text(price),
        order.describe(),
        decimal_text(state.filled_quantity),
        decimal_text(order.quantity),
        source,
    )
    return increment


def fill_record_placed(*, live: OpenOrder, state: OrderState, now: datetime, exchange: str) -> RecordedFill | None:
    """Record the fill a placement's reply already shows (orders.transitions.placements_record), in its
    transaction under the pair lock: Trade (a new exchange order: one insert), Fill, Position. The
    caller builds the OpenOrder (or none, when complete) and the events. None: the ledger has it already.
    """
    trade = trade_lock(
        strategy_account_id=live.strategy_account_id,
        account_id=live.account_id,
        exchange_order_id=state.exchange_order_id,
        order_key=live.order_key,
        symbol=live.symbol,
        market_type=live.market_type,
        side=state.side,
        fee_currency=state.fee_currency,
    )
    crash_point("fill.after_trade_upsert")
    return trade_fill_record(
        trade=trade,
        strategy_account_id=live.strategy_account_id,
        symbol=live.symbol,
        market_type=live.market_type,
        exchange=exchange,
        state=state,
        source=Fill.Source.REST,
        now=now,
    )


def fill_event_details(*, state: OrderState, delta: Decimal, price: Decimal, source: str) -> dict:
    """The details of a `filled` / `partially_filled` event."""
    return {
        "exchange_order_id": state.exchange_order_id,
        "delta": delta,
        "price": price,
        "filled": state.filled_quantity,
        "quantity": state.quantity,
        "source": source,
    }


def _order_record_fill(*, order: OpenOrder, state: OrderState, increment: Decimal, price: Decimal, source: str) -> None:
    """Bring the OpenOrder row (if it still exists) to the reported fill; end it when completely filled."""
    row = OpenOrder.objects.select_for_update().filter(pk=order.pk).first()
    details = fill_event_details(state=state, delta=increment, price=price, source=source)
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
