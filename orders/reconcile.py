"""Reconciliation of OpenOrder rows with the exchange (SPEC §4.2): fills, triggers, cancels, lost orders."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.db import transaction

from accounts.models import Account
from core.money import decimal_text
from exchanges.gateway import (
    Auth,
    ExchangeError,
    ExchangeGateway,
    GatewayError,
    Maintenance,
    MarketType,
    Network,
    NotFound,
    OrderState,
    OrderStatus,
    RateLimited,
)
from notifications.services import alert_raise
from orders.fills import fill_apply
from orders.models import CancelRequestedBy, Fill, OpenOrder, OrderEvent, OrderType, PendingOrder
from orders.services import order_event_add, pair_lock, queue_mark_dirty

logger = logging.getLogger(__name__)

LOST_AFTER_MISSING_RUNS = 2
# Errors that say nothing about an order, only that the exchange (market) cannot be asked now:
# they never end or change a row, and count against the (exchange, market type) breaker.
EXCHANGE_FAILURES = (Network, RateLimited, Maintenance, ExchangeError)


@dataclass
class ReconcileReport:
    """What one (account, market type) pass did; the job adds these up for its summary."""

    orders: int = 0
    fills: int = 0
    filled: int = 0
    triggered: int = 0
    cancelled: int = 0
    requeued: int = 0
    missing: int = 0
    lost: int = 0
    submitting: dict[str, int] = field(default_factory=dict)
    row_errors: int = 0

    def add(self, other: ReconcileReport) -> None:
        for name in (
            "orders",
            "fills",
            "filled",
            "triggered",
            "cancelled",
            "requeued",
            "missing",
            "lost",
            "row_errors",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for outcome, count in other.submitting.items():
            self.submitting[outcome] = self.submitting.get(outcome, 0) + count


def orders_reconcile(*, account: Account, market_type: str, gateway: ExchangeGateway, now: datetime) -> ReconcileReport:
    """Reconcile every OpenOrder and SUBMITTING PendingOrder of (account, market_type) with the exchange.

    One open-orders call for regular orders and one for conditional orders (only when rows
    of that kind exist), then a lookup only for rows missing from those sets. No row lock is
    held across an exchange call. Network, rate-limit, maintenance and other exchange errors
    and Auth propagate (the caller feeds its circuit breakers); rows already handled keep
    their changes, the rest stay as they are.
    """
    report = ReconcileReport()
    mt = MarketType(market_type)
    rows = list(OpenOrder.objects.filter(account=account, market_type=market_type).select_related("account"))
    report.orders = len(rows)
    if rows:
        listed: dict[tuple[bool, str], OrderState] = {}
        for conditional in (False, True):
            if any(row.conditional == conditional for row in rows):
                for open_state in gateway.fetch_open_orders(mt, conditional=conditional):
                    listed[(conditional, open_state.exchange_order_id)] = open_state
        seen = []
        for row in rows:
            state = listed.get((row.conditional, row.exchange_order_id))
            if state is None:
                try:
                    state = gateway.fetch_order(
                        symbol=row.symbol,
                        market_type=mt,
                        exchange_order_id=row.exchange_order_id,
                        conditional=row.conditional,
                    )
                except NotFound:
                    # Missing from the open list, and the lookup (open and closed/history) says not found.
                    if order_mark_missing(order=row, now=now):
                        report.lost += 1
                    else:
                        report.missing += 1
                    continue
                except (Auth, *EXCHANGE_FAILURES):
                    raise
                except GatewayError as exc:
                    # Rejected and the like concern this one lookup (e.g. a delisted symbol); the row stays.
                    report.row_errors += 1
                    logger.warning(
                        "lookup of %s (%s) failed: %s: %s",
                        row.order_key,
                        row.exchange_order_id,
                        type(exc).__name__,
                        exc,
                    )
                    continue
            if state.is_open:
                seen.append(row.pk)
            _observe(row=row, state=state, gateway=gateway, now=now, report=report)
        if seen:
            OpenOrder.objects.filter(pk__in=seen).update(last_seen_at=now, missing_runs=0)
    submitting = list(
        PendingOrder.objects.filter(account=account, market_type=market_type, status=PendingOrder.Status.SUBMITTING)
    )
    if submitting:
        # orders.queue imports this module (cancel_complete); import it here to keep the cycle out of import time.
        from orders.queue import submitting_resolve

        for pending in submitting:
            outcome = submitting_resolve(pending=pending, gateway=gateway, now=now)
            report.submitting[outcome] = report.submitting.get(outcome, 0) + 1
    return report


def _observe(
    *, row: OpenOrder, state: OrderState, gateway: ExchangeGateway, now: datetime, report: ReconcileReport
) -> None:
    if row.conditional and state.status == OrderStatus.TRIGGERED:
        spawned = order_trigger_record(order=row, state=state, now=now)
        if spawned is None:
            return
        report.triggered += 1
        # Follow the spawned order at once (a STOP_MARKET's child usually fills immediately);
        # an error here leaves the row TRIGGERED for the next run.
        try:
            child = gateway.fetch_order(
                symbol=spawned.symbol,
                market_type=MarketType(spawned.market_type),
                exchange_order_id=spawned.exchange_order_id,
            )
        except GatewayError as exc:
            logger.info("spawned order %s of %s not fetched yet: %s", spawned.exchange_order_id, row.order_key, exc)
            return
        _observe(row=spawned, state=child, gateway=gateway, now=now, report=report)
        return
    if state.is_open and state.filled_quantity == row.filled_quantity:
        return  # the steady state: nothing new (the row's filled quantity moves with its ledger)
    outcome = order_state_apply(order=row, state=state, source=Fill.Source.REST, now=now)
    if outcome.applied:
        report.fills += 1
    if outcome.ended == OrderEvent.Kind.FILLED:
        report.filled += 1
    elif outcome.ended == OrderEvent.Kind.REQUEUED:
        report.requeued += 1
    elif outcome.ended in (OrderEvent.Kind.CANCELLED, OrderEvent.Kind.REJECTED):
        report.cancelled += 1


@dataclass(frozen=True)
class StateOutcome:
    applied: Decimal  # quantity newly filled
    ended: str = ""  # the event that ended the row, if it ended


def order_state_apply(*, order: OpenOrder, state: OrderState, source: str, now: datetime) -> StateOutcome:
    """Apply one exchange report of a regular order (REST poll or user stream): fill first, then its end.

    FILLED ends the row in the fill's own transaction; CANCELED, EXPIRED and REJECTED go to
    cancel_complete (fill recorded first, in the same transaction). Open states only fill.
    """
    if state.conditional and state.status == OrderStatus.TRIGGERED:
        raise ValueError("a triggered conditional order is recorded by order_trigger_record, never as a fill")
    if state.status in (OrderStatus.CANCELED, OrderStatus.EXPIRED, OrderStatus.REJECTED):
        return cancel_complete(order=order, state=state, now=now, source=source)
    applied = fill_apply(order=order, state=state, source=source, now=now)
    if state.status != OrderStatus.FILLED:
        return StateOutcome(applied=applied)
    if applied or order_end_filled(order=order, state=state, now=now):
        return StateOutcome(applied=applied, ended=OrderEvent.Kind.FILLED)
    return StateOutcome(applied=applied)


def order_end_filled(*, order: OpenOrder, state: OrderState, now: datetime) -> bool:
    """End a row the exchange reports FILLED whose fill is already in the ledger (recorded by another path).

    fill_apply ends a completely filled row itself; this covers a FILLED report whose
    cumulative quantity was recorded earlier under a non-final status. Returns True when it ended a row.
    """
    with transaction.atomic(), pair_lock(account_id=order.account_id, symbol=order.symbol):
        row = (
            OpenOrder.objects.select_for_update().filter(pk=order.pk, exchange_order_id=state.exchange_order_id).first()
        )
        if row is None:
            return False
        order_event_add(
            order=row,
            kind=OrderEvent.Kind.FILLED,
            details={"exchange_order_id": state.exchange_order_id, "filled": state.filled_quantity},
        )
        row.delete()
        queue_mark_dirty(pairs=[(row.account_id, row.market_type, row.symbol)], now=now)
    return True


def cancel_complete(*, order: OpenOrder, state: OrderState, now: datetime, source: str = "REST") -> StateOutcome:
    """Finish an order the exchange reports closed without a complete fill (cancel confirmed, expired, rejected).

    One transaction under the pair lock: the fill in `state` is recorded first; then a
    demotion (cancel_requested_by=DEMOTION) re-queues the remaining quantity as a QUEUED
    PendingOrder with the same order_key, signal_at and queue_seq (event `requeued`); a
    user cancel or an exchange-side close ends the order (event `cancelled`, or `rejected`
    with an alert). Idempotent: a row already gone, or not the exchange order in `state`,
    is left alone. A state still open does nothing (the cancel is not confirmed).
    """
    if state.is_open:
        return StateOutcome(applied=Decimal("0"))
    alert = ""
    with transaction.atomic(), pair_lock(account_id=order.account_id, symbol=order.symbol):
        applied = fill_apply(order=order, state=state, source=source, now=now)
        row = (
            OpenOrder.objects.select_for_update().filter(pk=order.pk, exchange_order_id=state.exchange_order_id).first()
        )
        if row is None:
            return StateOutcome(applied=applied)
        remaining = row.quantity - state.filled_quantity
        details = {
            "exchange_order_id": state.exchange_order_id,
            "status": state.status.value,
            "filled": state.filled_quantity,
            "remaining": remaining,
        }
        if row.cancel_requested_by == CancelRequestedBy.DEMOTION and remaining > 0:
            PendingOrder.objects.create(
                order_key=row.order_key,
                placement_no=row.placement_no,
                client_order_id=row.client_order_id,
                strategy_account_id=row.strategy_account_id,
                account_id=row.account_id,
                symbol=row.symbol,
                market_type=row.market_type,
                side=row.side,
                order_type=row.order_type,
                price=row.price,
                stop_price=row.stop_price,
                quantity=remaining,
                priority=row.priority,
                signal_at=row.signal_at,
                queue_seq=row.queue_seq,
                express=row.express,
                status=PendingOrder.Status.QUEUED,
            )
            kind = OrderEvent.Kind.REQUEUED
        elif state.status == OrderStatus.REJECTED:
            kind = OrderEvent.Kind.REJECTED
            alert = f"Order {row.order_key} ({row.symbol}) was rejected by the exchange: {state.exchange_order_id}"
        else:
            kind = OrderEvent.Kind.CANCELLED
            details["by"] = (
                "user"
                if row.cancel_requested_by == CancelRequestedBy.USER
                else "demotion"
                if row.cancel_requested_by == CancelRequestedBy.DEMOTION
                else "exchange"
            )
        order_event_add(order=row, kind=kind, details=details)
        row.delete()
        queue_mark_dirty(pairs=[(row.account_id, row.market_type, row.symbol)], now=now)
    _log_closed(order=row, state=state, kind=kind)
    if alert:
        alert_raise(key=f"order_rejected:{order.account_id}", text=alert)
    return StateOutcome(applied=applied, ended=kind)


def _log_closed(*, order: OpenOrder, state: OrderState, kind: str) -> None:
    """One line per closed order that says what happened in words: a demotion is routine, not an error."""
    filled = decimal_text(state.filled_quantity)
    if kind == OrderEvent.Kind.REQUEUED:
        logger.info(
            "order %s %s demoted: cancelled on the exchange, re-queued (%s filled)",
            order.order_key,
            order.describe(),
            filled,
        )
    elif kind == OrderEvent.Kind.REJECTED:
        logger.warning(
            "order %s %s rejected by the exchange (%s)", order.order_key, order.describe(), state.status.value
        )
    elif order.cancel_requested_by == CancelRequestedBy.USER:
        logger.info(
            "order %s %s cancelled at the user's request (%s filled)", order.order_key, order.describe(), filled
        )
    elif order.cancel_requested_by == CancelRequestedBy.DEMOTION:
        logger.info(
            "order %s %s demoted with nothing left to re-queue (%s filled)", order.order_key, order.describe(), filled
        )
    else:
        logger.warning(
            "order %s %s closed by the exchange as %s (%s filled)",
            order.order_key,
            order.describe(),
            state.status.value,
            filled,
        )


def order_trigger_record(*, order: OpenOrder, state: OrderState, now: datetime) -> OpenOrder | None:
    """Record that a conditional order triggered: event `triggered`, the spawned order linked to it.

    The row stays (status TRIGGERED) and is tracked as the spawned regular order from now on
    (exchange_order_id switched, conditional off; a STOP_LIMIT becomes a LIMIT in its
    bucket). A trigger is never a fill. Returns the updated row, or None when nothing was
    recorded (row gone or already switched, or the exchange has not named the spawned order yet).
    """
    if not state.spawned_order_id:
        logger.info("order %s triggered but its spawned order is not known yet", order.order_key)
        return None
    with transaction.atomic(), pair_lock(account_id=order.account_id, symbol=order.symbol):
        row = (
            OpenOrder.objects.select_for_update()
            .filter(pk=order.pk, exchange_order_id=state.exchange_order_id, conditional=True)
            .first()
        )
        if row is None:
            return None
        order_type_before = row.order_type
        row.conditional = False
        row.exchange_order_id = state.spawned_order_id
        row.spawned_order_id = state.spawned_order_id
        row.spawned_client_order_id = state.spawned_client_order_id or ""
        row.missing_runs = 0
        row.last_seen_at = now
        if row.order_type == OrderType.STOP_LIMIT:
            row.order_type = OrderType.LIMIT
        if row.status == OpenOrder.Status.CANCELLING and row.cancel_requested_by == CancelRequestedBy.USER:
            # The user's cancel still stands: it now applies to the spawned order.
            row.status_before_cancel = OpenOrder.Status.TRIGGERED
        else:
            # A triggered stop is never demoted: a demotion in flight is void.
            row.status = OpenOrder.Status.TRIGGERED
            row.cancel_requested_by = CancelRequestedBy.NONE
            row.status_before_cancel = ""
        row.save()
        order_event_add(
            order=row,
            kind=OrderEvent.Kind.TRIGGERED,
            details={
                "conditional_order_id": state.exchange_order_id,
                "spawned_order_id": state.spawned_order_id,
                "spawned_client_order_id": state.spawned_client_order_id or "",
                "order_type_before": order_type_before,
            },
        )
        queue_mark_dirty(pairs=[(row.account_id, row.market_type, row.symbol)], now=now)
    logger.info("order %s triggered; tracking spawned order %s", row.order_key, row.exchange_order_id)
    return row


def order_mark_missing(*, order: OpenOrder, now: datetime) -> bool:
    """Count one run in which the order was in neither the open list nor the open/history lookup.

    On the second such run the row ends as lost (event `lost`, alert). Returns True when it ended.
    """
    with transaction.atomic(), pair_lock(account_id=order.account_id, symbol=order.symbol):
        row = (
            OpenOrder.objects.select_for_update().filter(pk=order.pk, exchange_order_id=order.exchange_order_id).first()
        )
        if row is None:
            return False
        row.missing_runs += 1
        if row.missing_runs < LOST_AFTER_MISSING_RUNS:
            row.save(update_fields=["missing_runs", "updated_at"])
            logger.warning(
                "order %s (%s) not found on the exchange (run %d)",
                row.order_key,
                row.exchange_order_id,
                row.missing_runs,
            )
            return False
        order_event_add(
            order=row,
            kind=OrderEvent.Kind.LOST,
            details={
                "exchange_order_id": row.exchange_order_id,
                "missing_runs": row.missing_runs,
                "filled": row.filled_quantity,
                "status": row.status,
            },
        )
        row.delete()
        queue_mark_dirty(pairs=[(row.account_id, row.market_type, row.symbol)], now=now)
    logger.error(
        "order %s (%s) lost: not found on the exchange in %d runs",
        order.order_key,
        order.exchange_order_id,
        LOST_AFTER_MISSING_RUNS,
    )
    alert_raise(
        key=f"order_lost:{order.account_id}",
        text=f"Order {order.order_key} {order.symbol} ({order.exchange_order_id}) is lost: "
        f"not found open or in history in {LOST_AFTER_MISSING_RUNS} runs",
    )
    return True
