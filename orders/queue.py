"""The order queue pass (SPEC §4.1): express lane, top-N slots per bucket, demotions, promotions, user cancels.

Every state change commits an intent first (SUBMITTING, CANCELLING), then calls the exchange
with no row lock held, then records the result in a second short transaction under the pair
lock. A crash between any two steps leaves a row whose state says what to look up next.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypedDict, cast

from django.conf import settings
from django.db import transaction

from accounts.models import Account
from core.counters import counter_add
from core.models import MetricCounter
from core.scrub import scrub
from exchanges.gateway import (
    DuplicateClientId,
    ExchangeError,
    ExchangeGateway,
    GatewayError,
    InsufficientFunds,
    Maintenance,
    MarketType,
    Network,
    NotFound,
    OrderRequest,
    OrderState,
    OrderStatus,
    OrderType,
    RateLimited,
    Rejected,
    Side,
)
from exchanges.services import gateway_for
from notifications.services import alert_raise
from orders import selectors
from orders.circuit import Breaker, account_scope, circuit_states, exchange_scope
from orders.faults import crash_point
from orders.models import CancelRequestedBy, Fill, OpenOrder, OrderEvent, PendingOrder, QueueDirty
from orders.ranking import Bucket, PairPlan, QueueEntry, Slot, bucket_for, plan_pair
from orders.reconcile import order_state_apply, order_trigger_record
from orders.selectors import DirtyMark, Pair, PairRows
from orders.services import client_order_id_for, order_event_add, pair_lock, queue_mark_dirty, queue_mark_dirty_by

logger = logging.getLogger(__name__)

SWEEP_EVERY = timedelta(seconds=60)  # the safety-net sweep of every pair with queued or live orders
LOOKUP_DELAY = timedelta(seconds=2)  # a SUBMITTING row is looked up no sooner after its create
LOOKUP_RETRY = timedelta(seconds=5)  # after a lookup that itself failed
NOT_FOUND_GAP = timedelta(seconds=30)  # two "not found" lookups at least this far apart re-queue
BACKOFF_BASE_SECONDS = 2
BACKOFF_MAX_SECONDS = 300
CANCEL_ALERT_AFTER = 3  # consecutive failed cancels of one order
CONGESTION_QUEUED = 20  # queued orders that make a pair congested
CONGESTION_PAIRS = 10  # congested pairs that raise the alert
MAX_DIRTY_PER_PASS = 2000
PASS_BUDGET_SECONDS = 0.6  # stop starting new pairs after this; the rest stay dirty for the next tick
# A pass ends before the tick after next (the 1 s job's longest gap stays ≤ 2 s): no exchange call
# starts that could, at the queue's own timeout (EXCHANGE_QUEUE_TIMEOUT_MS), still run past this.
PASS_LIMIT_SECONDS = 1.8
SWEEP_LOAD_ALL = 2000  # a sweep that finds more pairs to look at than this loads every row at once

# How a failed create is resolved. "unknown": the order may be on the exchange (a timeout, a
# 5xx, a duplicate client id, a rate limit or maintenance reply that may have come after the
# exchange accepted it): two not-found lookups at least NOT_FOUND_GAP apart before it may be
# sent again. "temporary"/"permanent": the exchange refused it; one not-found lookup confirms,
# then it is re-queued with backoff (temporary) or ended with an alert (permanent).
UNKNOWN, TEMPORARY, PERMANENT = "unknown", "temporary", "permanent"
# Cancels are safe to repeat, so only an explicit refusal returns a demoted order to its slot.
CANCEL_REFUSALS = (Rejected, InsufficientFunds)
# Failures that say the exchange (or the way to it) is in trouble rather than the order. After one,
# the pass sends nothing more to that exchange and its pairs are due again TROUBLE_RETRY later: a
# timing-out exchange costs one timeout per pass, not one per order, and never holds up the other
# exchanges' orders (express MARKET orders included) for the length of many timeouts.
TRANSPORT_FAILURES = (Network, RateLimited, Maintenance)
TROUBLE_RETRY = timedelta(seconds=2)  # as LOOKUP_DELAY: an unknown create is looked up no later


def create_error_kind(exc: GatewayError) -> str:
    if isinstance(exc, InsufficientFunds | Rejected):
        return PERMANENT
    if isinstance(exc, Network | RateLimited | Maintenance | DuplicateClientId | ExchangeError | NotFound):
        return UNKNOWN
    # Auth (and anything unclassified that is not a refusal of the order itself): the order was
    # not accepted, but nothing is wrong with it. Temporary for the order; the account's
    # circuit breaker is update_open_orders' concern.
    return TEMPORARY


def backoff(attempts: int) -> timedelta:
    """2, 4, 8 … seconds, capped at 5 minutes."""
    return timedelta(seconds=min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(0, min(attempts, 16) - 1)))


def queue_slots_for(*, exchange: str, market_type: str) -> int:
    """Live slots per bucket: ORDER_QUEUE_SLOTS["EXCHANGE:MARKET_TYPE"], else its "default", else 2."""
    slots = settings.ORDER_QUEUE_SLOTS
    value = slots.get(f"{exchange}:{market_type}", slots.get("default", 2))
    return max(0, int(value))


# --- Dirty marks -------------------------------------------------------------------------------


class DirtyTracker:
    """The QueueDirty row of the pair being processed.

    While a pair is processed from its dirty row, that row stays as it was until the end, so a
    crash at any point leaves the pair dirty; a pair reached only by the sweep gets a row with
    its first change. At the end the row is deleted, or deferred to the pair's next due time,
    only if `marked_at` is still what this pass knows: a concurrent mark survives.
    """

    def __init__(self, pair: Pair, mark: DirtyMark | None):
        self.pair = pair
        self.known_at: datetime | None = mark.marked_at if mark else None

    def touch(self, now: datetime) -> None:
        """Call inside a transaction that changes the pair's orders."""
        if self.known_at is None:
            queue_mark_dirty(pairs=[self.pair], now=now)
            self.known_at = now

    def finish(self, next_due: datetime | None) -> None:
        if self.known_at is None:
            if next_due is not None:
                queue_mark_dirty_by(pairs=[self.pair], due_at=next_due)
            return
        # Built only here: a swept pair with nothing to do (most of a sweep) costs no ORM work.
        account_id, market_type, symbol = self.pair
        rows = QueueDirty.objects.filter(
            account_id=account_id, market_type=market_type, symbol=symbol, marked_at=self.known_at
        )
        if next_due is None:
            rows.delete()
        elif next_due != self.known_at:
            rows.update(marked_at=next_due)


def _touch(dirty: DirtyTracker | None, row: Any, now: datetime) -> None:
    if dirty is not None and dirty.pair == (row.account_id, row.market_type, row.symbol):
        dirty.touch(now)
    else:
        queue_mark_dirty(pairs=[(row.account_id, row.market_type, row.symbol)], now=now)


# --- Shared pieces ----------------------------------------------------------------------------

IDENTITY_FIELDS = (
    "order_key",
    "placement_no",
    "client_order_id",
    "strategy_account_id",
    "account_id",
    "symbol",
    "market_type",
    "side",
    "order_type",
    "price",
    "stop_price",
    "quantity",
    "filled_quantity",
    "priority",
    "signal_at",
    "queue_seq",
    "cancel_requested_by",
    "express",
)


def _identity(row: Any) -> dict[str, Any]:
    return {name: getattr(row, name) for name in IDENTITY_FIELDS}


def _request_for(pending: PendingOrder, client_order_id: str) -> OrderRequest:
    """The exchange request of one placement (ValueError when the row cannot make a valid order)."""
    return OrderRequest(
        symbol=pending.symbol,
        market_type=MarketType(pending.market_type),
        side=Side(pending.side),
        order_type=OrderType(pending.order_type),
        quantity=pending.remaining_quantity,
        price=pending.price if pending.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None,
        stop_price=pending.stop_price if pending.conditional else None,
        client_order_id=client_order_id,
    )


def _lookup_due_at(*, submitting_at: datetime | None, next_attempt_at: datetime | None, now: datetime) -> datetime:
    due = (submitting_at or now) + LOOKUP_DELAY
    return max(due, next_attempt_at) if next_attempt_at else due


def _alert(key: str, text: str) -> None:
    alert_raise(key=key, text=text)


# --- Promote -----------------------------------------------------------------------------------


def order_promote(
    *, pending_id: int, gateway: ExchangeGateway, now: datetime, dirty: DirtyTracker | None = None
) -> str:
    """Place one QUEUED order: commit SUBMITTING with a new client id, create it, record the reply.

    Returns "placed", "filled", "submitting" (outcome unknown or refused: resolved by lookup on a
    later tick, never sent again meanwhile), "rejected" (could not form a valid order) or "skipped".
    """
    where = PendingOrder.objects.filter(pk=pending_id).values_list("account_id", "symbol").first()
    if where is None:
        return "skipped"
    with transaction.atomic(), pair_lock(account_id=where[0], symbol=where[1]):
        row = PendingOrder.objects.select_for_update().filter(pk=pending_id, status=PendingOrder.Status.QUEUED).first()
        if row is None or (row.next_attempt_at and row.next_attempt_at > now):
            return "skipped"
        placement_no = row.placement_no + 1
        client_order_id = client_order_id_for(order_key=row.order_key, placement_no=placement_no)
        try:
            request = _request_for(row, client_order_id)
        except ValueError as exc:
            # Nothing was sent: the row itself cannot make an order (intake validates, so rare).
            order_event_add(order=row, kind=OrderEvent.Kind.REJECTED, details={"reason": str(exc)})
            row.delete()
            _touch(dirty, row, now)
            invalid = str(exc)
        else:
            invalid = ""
            row.placement_no = placement_no
            row.client_order_id = client_order_id
            row.status = PendingOrder.Status.SUBMITTING
            row.submitting_at = now
            row.next_attempt_at = None
            row.not_found_count = 0
            row.last_lookup_at = None
            row.last_error = ""
            row.last_error_kind = ""
            row.save()
            order_event_add(
                order=row,
                kind=OrderEvent.Kind.SUBMITTING,
                details={"placement_no": placement_no, "client_order_id": client_order_id},
            )
            _touch(dirty, row, now)
    if invalid:
        _alert(f"queue:rejected:{row.order_key}", f"Order {row.order_key} {row.symbol} is invalid: {invalid}")
        return "rejected"
    crash_point("promote.after_submitting_commit")
    try:
        state = gateway.create_order(request)
    except GatewayError as exc:
        kind = create_error_kind(exc)
        _submitting_error_record(pending=row, exc=exc, kind=kind, now=now)
        logger.warning(
            "queue: create of %s (%s) failed (%s, %s): %s",
            row.order_key,
            client_order_id,
            kind,
            type(exc).__name__,
            exc,
        )
        return "submitting"
    crash_point("promote.after_exchange_ack")
    return placement_record(pending=row, state=state, now=now, via="create", dirty=dirty)


def _submitting_error_record(*, pending: PendingOrder, exc: GatewayError, kind: str, now: datetime) -> None:
    with transaction.atomic(), pair_lock(account_id=pending.account_id, symbol=pending.symbol):
        PendingOrder.objects.filter(
            pk=pending.pk, status=PendingOrder.Status.SUBMITTING, client_order_id=pending.client_order_id
        ).update(last_error=scrub(f"{type(exc).__name__}: {exc}")[:500], last_error_kind=kind)


def placement_record(
    *, pending: PendingOrder, state: OrderState, now: datetime, via: str, dirty: DirtyTracker | None = None
) -> str:
    """The exchange has the order (create reply or lookup): in one transaction create the OpenOrder,
    delete the PendingOrder, event `placed`; then record any fill (which ends a filled order).

    A user cancel requested while it was SUBMITTING makes the new row CANCELLING (USER) at once,
    so the next pass cancels it and ends it. Returns "placed", "filled", "cancelled" or "skipped".
    """
    with transaction.atomic(), pair_lock(account_id=pending.account_id, symbol=pending.symbol):
        row = (
            PendingOrder.objects.select_for_update()
            .filter(pk=pending.pk, status=PendingOrder.Status.SUBMITTING, client_order_id=pending.client_order_id)
            .first()
        )
        if row is None:
            return "skipped"  # resolved meanwhile by another path (update_open_orders' lookup)
        fields = _identity(row)
        fields["quantity"] = row.remaining_quantity
        fields["filled_quantity"] = Decimal(0)  # fill_apply records what the reply shows
        live = OpenOrder(
            **fields,
            exchange_order_id=state.exchange_order_id,
            conditional=row.conditional,
            status=OpenOrder.Status.NEW,
            last_seen_at=now,
        )
        if row.cancel_requested_by == CancelRequestedBy.USER:
            live.status = OpenOrder.Status.CANCELLING
            live.status_before_cancel = OpenOrder.Status.NEW
            live.cancel_requested_at = now
        row.delete()
        live.save()
        order_event_add(
            order=live,
            kind=OrderEvent.Kind.PLACED,
            details={
                "exchange_order_id": state.exchange_order_id,
                "client_order_id": row.client_order_id,
                "placement_no": row.placement_no,
                "status": state.status.value,
                "via": via,
            },
        )
        _touch(dirty, live, now)
    logger.info("queue: placed %s %s as %s (%s)", live.order_key, live.symbol, state.exchange_order_id, via)
    if state.status in (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED) and state.filled_quantity <= 0:
        return "placed"
    if state.conditional and state.status == OrderStatus.TRIGGERED:
        order_trigger_record(order=live, state=state, now=now)
        return "placed"
    outcome = order_state_apply(order=live, state=state, source=Fill.Source.REST, now=now)
    if outcome.ended == OrderEvent.Kind.FILLED:
        return "filled"
    return outcome.ended or "placed"


# --- SUBMITTING resolution (shared with update_open_orders) ------------------------------------


def submitting_resolve(
    *, pending: PendingOrder, gateway: ExchangeGateway, now: datetime, dirty: DirtyTracker | None = None
) -> str:
    """Resolve a SUBMITTING order by its client order id; never sends it again while its fate is unknown.

    Found → placement_record. Not found: after a refusal (temporary or permanent) one lookup
    confirms it (re-queued with backoff, or ended `rejected` with an alert); otherwise two
    lookups at least 30 s apart must both miss before it is re-queued. A failed lookup changes
    nothing but the time of the next one. Returns "waiting" (not due), "placed", "filled",
    "cancelled", "requeued", "rejected", "not_found" (first miss), "unknown" or "skipped".
    """
    if pending.status != PendingOrder.Status.SUBMITTING or not pending.client_order_id:
        return "skipped"
    if now < _lookup_due_at(submitting_at=pending.submitting_at, next_attempt_at=pending.next_attempt_at, now=now):
        return "waiting"
    try:
        state = gateway.fetch_order(
            symbol=pending.symbol,
            market_type=MarketType(pending.market_type),
            client_order_id=pending.client_order_id,
            conditional=pending.conditional,
        )
    except NotFound:
        return _submitting_not_found(pending=pending, now=now, dirty=dirty)
    except GatewayError as exc:
        logger.warning(
            "queue: lookup of %s (%s) failed: %s: %s",
            pending.order_key,
            pending.client_order_id,
            type(exc).__name__,
            exc,
        )
        with transaction.atomic(), pair_lock(account_id=pending.account_id, symbol=pending.symbol):
            PendingOrder.objects.filter(
                pk=pending.pk, status=PendingOrder.Status.SUBMITTING, client_order_id=pending.client_order_id
            ).update(next_attempt_at=now + LOOKUP_RETRY)
            if dirty is None:
                queue_mark_dirty_by(pairs=[_pair_of(pending)], due_at=now + LOOKUP_RETRY)
        return "unknown"
    return placement_record(pending=pending, state=state, now=now, via="lookup", dirty=dirty)


def _pair_of(row: Any) -> Pair:
    return (row.account_id, row.market_type, row.symbol)


def _submitting_not_found(*, pending: PendingOrder, now: datetime, dirty: DirtyTracker | None) -> str:
    alert = ""
    with transaction.atomic(), pair_lock(account_id=pending.account_id, symbol=pending.symbol):
        row = (
            PendingOrder.objects.select_for_update()
            .filter(pk=pending.pk, status=PendingOrder.Status.SUBMITTING, client_order_id=pending.client_order_id)
            .first()
        )
        if row is None:
            return "skipped"
        refused = row.last_error_kind in (TEMPORARY, PERMANENT)
        confirmed = refused or (
            row.not_found_count >= 1 and row.last_lookup_at is not None and now - row.last_lookup_at >= NOT_FOUND_GAP
        )
        if not confirmed:
            if row.not_found_count == 0:
                row.not_found_count = 1
                row.last_lookup_at = now
            # Set with the first not-found (not_found_count >= 1 from then on).
            next_attempt_at = cast(datetime, row.last_lookup_at) + NOT_FOUND_GAP
            row.next_attempt_at = next_attempt_at
            row.save(update_fields=["not_found_count", "last_lookup_at", "next_attempt_at", "updated_at"])
            if dirty is None:
                queue_mark_dirty_by(pairs=[_pair_of(row)], due_at=next_attempt_at)
            return "not_found"
        details = {
            "placement_no": row.placement_no,
            "client_order_id": row.client_order_id,
            "reason": row.last_error or "not found in two lookups 30 s apart",
        }
        if row.cancel_requested_by == CancelRequestedBy.USER and row.last_error_kind != PERMANENT:
            order_event_add(order=row, kind=OrderEvent.Kind.CANCELLED, details={**details, "by": "user"})
            row.delete()
            result = "cancelled"
        elif row.last_error_kind == PERMANENT:
            order_event_add(order=row, kind=OrderEvent.Kind.REJECTED, details=details)
            row.delete()
            alert = f"Order {row.order_key} {row.side} {row.quantity} {row.symbol} rejected: {row.last_error}"
            result = "rejected"
        else:
            row.attempts += 1
            row.status = PendingOrder.Status.QUEUED
            row.next_attempt_at = now + backoff(row.attempts)
            row.submitting_at = None
            row.not_found_count = 0
            row.last_lookup_at = None
            row.save()
            order_event_add(
                order=row,
                kind=OrderEvent.Kind.REQUEUED,
                details={**details, "attempts": row.attempts, "next_attempt_at": row.next_attempt_at},
            )
            result = "requeued"
        _touch(dirty, row, now)
    if alert:
        logger.error("queue: %s", alert)
        _alert(f"queue:rejected:{pending.order_key}", alert)
    return result


# --- Demote and cancel -------------------------------------------------------------------------


def order_demote(*, open_id: int, gateway: ExchangeGateway, now: datetime, dirty: DirtyTracker | None = None) -> str:
    """Demote one live (NEW) order: commit CANCELLING (DEMOTION), then cancel it on the exchange.

    Never a PARTIALLY_FILLED or TRIGGERED order. Returns what order_cancel_send returns, or "skipped".
    """
    with transaction.atomic():
        row = OpenOrder.objects.filter(pk=open_id).first()
        if row is None:
            return "skipped"
        with pair_lock(account_id=row.account_id, symbol=row.symbol):
            row = (
                OpenOrder.objects.select_for_update()
                .filter(pk=open_id, status=OpenOrder.Status.NEW, cancel_requested_by=CancelRequestedBy.NONE)
                .first()
            )
            if row is None:
                return "skipped"
            row.status_before_cancel = row.status
            row.status = OpenOrder.Status.CANCELLING
            row.cancel_requested_by = CancelRequestedBy.DEMOTION
            row.cancel_requested_at = now
            row.next_cancel_at = None
            row.save()
            order_event_add(
                order=row,
                kind=OrderEvent.Kind.DEMOTED,
                details={"exchange_order_id": row.exchange_order_id, "placement_no": row.placement_no},
            )
            _touch(dirty, row, now)
    crash_point("demote.after_cancelling_commit")
    return order_cancel_send(order=row, gateway=gateway, now=now, dirty=dirty)


class _OrderTarget(TypedDict):
    """The keyword arguments of cancel_order and fetch_order that name one live order."""

    symbol: str
    market_type: MarketType
    exchange_order_id: str
    conditional: bool


def order_cancel_send(
    *, order: OpenOrder, gateway: ExchangeGateway, now: datetime, dirty: DirtyTracker | None = None
) -> str:
    """Cancel a CANCELLING order on the exchange with its own market type and conditional flag.

    Confirmed (CANCELED, or FILLED meanwhile) → recorded through the reconciliation path (fill
    first, then re-queue the remainder for a demotion, end it for a user cancel). "Not open"
    → looked up, never assumed. Unknown outcome → stays CANCELLING and is retried with backoff.
    An explicit refusal returns a demoted order to its previous status (event `failed`).
    Returns "requeued", "cancelled", "filled", "triggered", "cancel_unknown", "cancel_refused" or "skipped".
    """
    target: _OrderTarget = {
        "symbol": order.symbol,
        "market_type": MarketType(order.market_type),
        "exchange_order_id": order.exchange_order_id,
        "conditional": order.conditional,
    }
    try:
        state = gateway.cancel_order(**target)
    except NotFound:
        # No longer open on the exchange: find out whether it filled, was cancelled or triggered.
        try:
            state = gateway.fetch_order(**target)
        except GatewayError as exc:
            return _cancel_failed(order=order, exc=exc, refused=False, now=now, dirty=dirty)
    except CANCEL_REFUSALS as exc:
        return _cancel_failed(order=order, exc=exc, refused=True, now=now, dirty=dirty)
    except GatewayError as exc:
        return _cancel_failed(order=order, exc=exc, refused=False, now=now, dirty=dirty)
    if order.cancel_requested_by == CancelRequestedBy.DEMOTION:
        crash_point("demote.after_cancel_ack")
    return cancel_outcome_apply(order=order, state=state, now=now, dirty=dirty)


def cancel_outcome_apply(
    *, order: OpenOrder, state: OrderState, now: datetime, dirty: DirtyTracker | None = None
) -> str:
    """Record what the exchange says about a CANCELLING order after a cancel (reply or lookup)."""
    if state.conditional and state.status == OrderStatus.TRIGGERED:
        # The stop fired first: the order is now its spawned order. A demotion is void (a
        # triggered stop is never demoted); a user cancel moves on to the spawned order.
        return "triggered" if order_trigger_record(order=order, state=state, now=now) else "skipped"
    if state.is_open:
        return _cancel_failed(
            order=order, exc=ExchangeError(f"still {state.status} after cancel"), refused=False, now=now, dirty=dirty
        )
    outcome = order_state_apply(order=order, state=state, source=Fill.Source.REST, now=now)
    return outcome.ended or "skipped"


def _cancel_failed(
    *, order: OpenOrder, exc: GatewayError, refused: bool, now: datetime, dirty: DirtyTracker | None
) -> str:
    reason = scrub(f"{type(exc).__name__}: {exc}")[:300]
    with transaction.atomic(), pair_lock(account_id=order.account_id, symbol=order.symbol):
        row = (
            OpenOrder.objects.select_for_update()
            .filter(pk=order.pk, status=OpenOrder.Status.CANCELLING, exchange_order_id=order.exchange_order_id)
            .first()
        )
        if row is None:
            return "skipped"
        row.cancel_failures += 1
        if refused and row.cancel_requested_by == CancelRequestedBy.DEMOTION:
            # The order is still live: give it its slot back, and do not demote it again
            # before the backoff has passed (else it would be retried every tick).
            row.status = row.status_before_cancel or OpenOrder.Status.NEW
            row.cancel_requested_by = CancelRequestedBy.NONE
            row.status_before_cancel = ""
            row.next_cancel_at = now + backoff(row.cancel_failures)
            result = "cancel_refused"
            order_event_add(
                order=row,
                kind=OrderEvent.Kind.FAILED,
                details={"action": "demote", "reason": reason, "status": row.status},
            )
        else:
            row.next_cancel_at = now + backoff(row.cancel_failures)
            result = "cancel_unknown"
        row.save()
        failures = row.cancel_failures
        _touch(dirty, row, now)
    logger.warning(
        "queue: cancel of %s (%s) failed %d time(s): %s", order.order_key, order.exchange_order_id, failures, reason
    )
    if failures >= CANCEL_ALERT_AFTER:
        _alert(
            f"queue:cancel:{order.order_key}",
            f"Cancel of order {order.order_key} {order.symbol} ({order.exchange_order_id}) failed {failures} "
            f"times in a row: {reason}",
        )
    return result


# --- User cancel -------------------------------------------------------------------------------


def order_cancel_by_user(*, order_key: Any, now: datetime) -> str:
    """A user's cancel (DELETE /api/orders/{key}/); no exchange call here.

    Queued → removed at once (event `cancelled`): "cancelled". Placing (SUBMITTING) → marked;
    ended once its placement resolves: "cancelling". Live or being demoted → CANCELLING with
    cancel_requested_by=USER; the queue pass cancels it and ends it (never re-queued):
    "cancelling". Already ended: "ended"; unknown key: "not_found".
    """
    pair = _pair_by_key(order_key)
    if pair is None:
        return "ended" if selectors.order_last_event(order_key=order_key) else "not_found"
    with transaction.atomic(), pair_lock(account_id=pair[0], symbol=pair[2]):
        pending = PendingOrder.objects.select_for_update().filter(order_key=order_key).first()
        if pending is not None:
            if pending.status == PendingOrder.Status.QUEUED:
                order_event_add(order=pending, kind=OrderEvent.Kind.CANCELLED, details={"by": "user"})
                pending.delete()
                queue_mark_dirty(pairs=[_pair_of(pending)], now=now)
                return "cancelled"
            if pending.cancel_requested_by != CancelRequestedBy.USER:
                pending.cancel_requested_by = CancelRequestedBy.USER
                pending.save(update_fields=["cancel_requested_by", "updated_at"])
                queue_mark_dirty(pairs=[_pair_of(pending)], now=now)
            return "cancelling"
        live = OpenOrder.objects.select_for_update().filter(order_key=order_key).first()
        if live is None:
            return "ended"  # ended between the two reads
        if live.cancel_requested_by != CancelRequestedBy.USER:
            if live.status != OpenOrder.Status.CANCELLING:
                live.status_before_cancel = live.status
                live.status = OpenOrder.Status.CANCELLING
                live.cancel_requested_at = now
                live.next_cancel_at = None
            # A demotion's cancel in flight now ends the order instead of re-queueing it.
            live.cancel_requested_by = CancelRequestedBy.USER
            live.save()
            queue_mark_dirty(pairs=[_pair_of(live)], now=now)
        return "cancelling"


def _pair_by_key(order_key: Any) -> Pair | None:
    for model in (PendingOrder, OpenOrder):
        row = model.objects.filter(order_key=order_key).values_list("account_id", "market_type", "symbol").first()
        if row is not None:
            return row
    return None


# --- The pass ----------------------------------------------------------------------------------


@dataclass
class QueueTally:
    """What a pass (or one pair of it) did, by outcome name."""

    counts: Counter = field(default_factory=Counter)
    pairs: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, outcome: str, n: int = 1) -> None:
        if outcome not in ("skipped", "waiting"):
            self.counts[outcome] += n

    def merge(self, other: QueueTally) -> None:
        self.counts.update(other.counts)
        self.errors.extend(other.errors)

    @property
    def moves(self) -> int:
        return self.counts["placed"] + self.counts["filled_at_once"] + self.counts["demoted"]

    @property
    def noop(self) -> bool:
        return not self.counts and not self.errors

    def summary(self) -> str:
        order = ("placed", "filled_at_once", "demoted", "requeued", "cancelled", "filled", "rejected", "triggered")
        parts = [f"{self.counts[k]} {k.replace('_', ' ')}" for k in order if self.counts[k]]
        parts += [f"{v} {k.replace('_', ' ')}" for k, v in sorted(self.counts.items()) if k not in order and v]
        text = f"{self.pairs} pairs: " + (", ".join(parts) if parts else "nothing to do")
        if self.errors:
            text += f"; {len(self.errors)} errors: " + "; ".join(self.errors[:3])
        return text


class _CountingGateway:
    """Counts exchange calls and errors of one pass (written once per pass as per-minute counters)."""

    def __init__(self, inner: ExchangeGateway, counts: Counter, troubled: set[str] | None = None, key: str = ""):
        self._inner = inner
        self._counts = counts
        self._troubled = troubled if troubled is not None else set()
        self._key = key or inner.exchange
        self.exchange = inner.exchange

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self._counts[("exchange_calls", self.exchange)] += 1
            try:
                return attr(*args, **kwargs)
            except GatewayError as exc:
                self._counts[("exchange_errors", self.exchange)] += 1
                if isinstance(exc, TRANSPORT_FAILURES):
                    self._troubled.add(self._key)
                raise

        return call


# The last sweep, kept in the process and tied to the leadership term: a new leader (or a
# leader that lost and regained the lock) sweeps on its first pass, then every SWEEP_EVERY.
# Nothing is written per pass for it, so the steady state stays at one query.
_sweep: dict[str, Any] = {"term": object(), "at": None}


def queue_sweep_reset() -> None:
    _sweep.update(term=object(), at=None)


def _sweep_due(now: datetime, term: Any) -> bool:
    last = _sweep["at"]
    return _sweep["term"] != term or last is None or now < last or now - last >= SWEEP_EVERY


@dataclass
class QueueWork:
    """One pass's snapshot: due dirty marks, express orders, the rows of every pair to look at."""

    now: datetime
    dirty: dict[Pair, DirtyMark]
    express: list[PendingOrder]
    rows: dict[Pair, PairRows]
    pairs: list[Pair]
    accounts: dict[int, Account]
    ticks: dict[tuple[str, str, str], tuple[Decimal, Decimal]]
    breakers: dict[str, Breaker]
    swept: bool
    started: float = field(default_factory=lambda: time.monotonic())  # looked up per pass (tests fake it)
    counts: Counter = field(default_factory=Counter)
    troubled: set[str] = field(default_factory=set)  # exchanges that failed in transport this pass
    _gateways: dict[int, ExchangeGateway] = field(default_factory=dict)

    def gateway(self, account_id: int) -> ExchangeGateway:
        if account_id not in self._gateways:
            account = self.accounts[account_id]
            self._gateways[account_id] = _CountingGateway(
                gateway_for(account), self.counts, self.troubled, key=str(account.exchange)
            )
        return self._gateways[account_id]

    def in_trouble(self, account_id: int) -> bool:
        """Whether the account's exchange failed in transport (timeout, rate limit, maintenance) this pass."""
        account = self.accounts.get(account_id)
        return account is not None and str(account.exchange) in self.troubled

    def over_budget(self) -> bool:
        return time.monotonic() - self.started > PASS_BUDGET_SECONDS

    def out_of_time(self) -> bool:
        """Whether an exchange call started now could outlast PASS_LIMIT_SECONDS (never before the budget)."""
        cutoff = max(PASS_BUDGET_SECONDS, PASS_LIMIT_SECONDS - settings.EXCHANGE_QUEUE_TIMEOUT_MS / 1000)
        return time.monotonic() - self.started > cutoff

    def may_call(self, account_id: int) -> bool:
        """Whether the pass may still send a call to the account's exchange (not in trouble, not out of time)."""
        return not self.in_trouble(account_id) and not self.out_of_time()

    def blocked_until(self, pair: Pair) -> datetime | None:
        """When an open circuit breaker of the pair's exchange market or account closes (None: not blocked)."""
        account = self.accounts.get(pair[0])
        if account is None:
            return None
        until = [
            cast(datetime, b.opened_until)  # an open breaker has one
            for scope in (
                exchange_scope(exchange=account.exchange, market_type=pair[1]),
                account_scope(account_id=pair[0]),
            )
            if (b := self.breakers.get(scope)) is not None and b.is_open(self.now)
        ]
        return max(until) if until else None


def queue_work_load(*, now: datetime, term: Any = None) -> QueueWork | None:
    """Select the pass's work. Nothing dirty and no sweep due: exactly one (indexed) query, None."""
    marks = selectors.queue_dirty_due(now=now, limit=MAX_DIRTY_PER_PASS)
    swept = _sweep_due(now, term)
    if not marks and not swept:
        return None
    dirty = {m.pair: m for m in marks}
    express = selectors.queue_express_due(now=now)
    if swept:
        wanted = set(dirty) | queue_sweep_detect(now=now)
        if len(wanted) > SWEEP_LOAD_ALL:
            rows = selectors.queue_rows_for_pairs(pairs=(), everything=True)  # as many: one plain load
        else:
            rows = selectors.queue_rows_for_pairs(pairs=wanted)
        _sweep.update(term=term, at=now)
    else:
        rows = selectors.queue_rows_for_pairs(pairs=dirty)
    pairs = sorted(set(dirty) | set(rows), key=lambda p: (dirty[p].marked_at if p in dirty else now, p))
    account_ids = {p[0] for p in pairs} | {o.account_id for o in express}
    accounts = Account.objects.in_bulk(account_ids) if account_ids else {}
    ticks = selectors.market_ticks(keys={(a.exchange, p[1]) for p in pairs if (a := accounts.get(p[0]))})
    scopes = {account_scope(account_id=a) for a in accounts}
    scopes |= {exchange_scope(exchange=accounts[p[0]].exchange, market_type=p[1]) for p in pairs if p[0] in accounts}
    scopes |= {exchange_scope(exchange=accounts[o.account_id].exchange, market_type=o.market_type) for o in express}
    breakers = circuit_states(scopes=sorted(scopes)) if scopes else {}
    return QueueWork(
        now=now,
        dirty=dirty,
        express=express,
        rows=rows,
        pairs=pairs,
        accounts=accounts,
        ticks=ticks,
        breakers=breakers,
        swept=swept,
    )


# --- The sweep's detector --------------------------------------------------------------------------

_NO_PRICE = (1, 0, Decimal(0))  # rank_key's head for an order without a price: last
_EPSILON = Decimal("1e-9")


def _number(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _group_extremes(bucket: Bucket, g: tuple) -> tuple[tuple, tuple]:
    """(best, worst) of rank_key's head (missing price, priority, nearest) over one group's rows.

    `g`: (priority, n, n_price, price_min, price_max, n_stop, stop_min, stop_max). Raw prices, not
    rounded to the tick: rounding is monotone, so the extremes stay the extremes; the comparison
    (`_may_outrank`) allows for it.
    """
    priority, n, n_price, price_min, price_max, n_stop, stop_min, stop_max = g
    if bucket in (Bucket.LIMIT_BUY, Bucket.LIMIT_SELL):
        have, lo, hi, prio = n_price, price_min, price_max, priority
        negate = bucket == Bucket.LIMIT_BUY  # BUY: higher price first
    else:
        have, lo, hi, prio = n_stop, stop_min, stop_max, 0
        negate = bucket == Bucket.STOP_SELL  # STOP-BUY: lower stop first; STOP-SELL: higher first
    if not have:
        return _NO_PRICE, _NO_PRICE
    lo, hi = _number(lo), _number(hi)
    best = (0, prio, -hi if negate else lo)
    worst = _NO_PRICE if n > have else (0, prio, -lo if negate else hi)
    return best, worst


def _may_outrank(queued: tuple, live: tuple, tick: Decimal | None) -> bool:
    """Whether a queued order with rank head `queued` may rank at or before a live one with `live`.

    Ties count (the tails decide, unknown here), and so does anything within one tick (prices rank
    after rounding down to the tick): a superset of the ranking's real overlaps.
    """
    if queued[0] != live[0]:
        return queued[0] < live[0]
    if queued[1] != live[1]:
        return queued[1] < live[1]
    slack = (tick if tick and tick > 0 else Decimal(0)) + _EPSILON * (1 + abs(live[2]))
    return queued[2] <= live[2] + slack


@dataclass
class _BucketBook:
    live: int = 0
    pinned: int = 0
    queued: int = 0
    best_queued: tuple | None = None
    worst_live: tuple | None = None

    def needs_work(self, slots: int, tick: Decimal | None) -> bool:
        """A superset of plan_bucket's non-empty plans for a bucket with no SUBMITTING/CANCELLING order."""
        occupied = self.live + self.pinned
        if self.live and occupied > slots:
            return True  # more live than the slots left by pinned orders: a demotion
        if self.queued and occupied < slots:
            return True  # a free slot and an eligible queued order: a promotion
        return bool(
            self.queued
            and self.live
            and self.best_queued is not None
            and self.worst_live is not None
            and _may_outrank(self.best_queued, self.worst_live, tick)
        )


def queue_sweep_detect(*, now: datetime) -> set[Pair]:
    """The pairs a full sweep must look at, found by two aggregate queries instead of loading every row.

    A superset of the pairs for which the pass would do or schedule anything: any SUBMITTING row
    (a lookup), CANCELLING row or refused cancel's backoff, queued backoff still running, express
    or MARKET row, user cancel; and any bucket whose plan (orders.ranking.plan_bucket) may be
    non-empty: live orders beyond the slots, a free slot with an eligible queued order, or a queued
    order that may rank at or before a live one. A flagged pair that needs nothing costs only its
    normal pass (which then does nothing).
    """
    pending, live = selectors.queue_sweep_groups(now=now)
    found: set[Pair] = set()
    books: dict[tuple[Pair, Bucket], _BucketBook] = {}
    for account_id, market_type, symbol, order_type, side, priority, other, n, *rest in pending:
        pair = (account_id, market_type, symbol)
        if other:
            found.add(pair)
        if not n or pair in found:
            continue
        bucket = bucket_for(order_type=order_type, side=side)
        book = books.setdefault((pair, bucket), _BucketBook())
        book.queued += n
        best, _ = _group_extremes(bucket, (priority, n, *rest))
        if book.best_queued is None or best < book.best_queued:
            book.best_queued = best
    for account_id, market_type, symbol, order_type, side, priority, status, before, other, n, *rest in live:
        pair = (account_id, market_type, symbol)
        if other:
            found.add(pair)
        if pair in found or order_type == OrderType.MARKET:
            continue
        triggered = OpenOrder.Status.TRIGGERED in (status, before)
        bucket = bucket_for(order_type=order_type, side=side, triggered=triggered)
        book = books.setdefault((pair, bucket), _BucketBook())
        if status == OpenOrder.Status.NEW:
            book.live += n
            _, worst = _group_extremes(bucket, (priority, n, *rest))
            if book.worst_live is None or worst > book.worst_live:
                book.worst_live = worst
        else:
            book.pinned += n  # PARTIALLY_FILLED, TRIGGERED (as _entries: anything not NEW/CANCELLING)
    exchanges = selectors.account_exchanges(account_ids={pair[0] for pair, _ in books})
    ticks = selectors.market_ticks(keys={(exchanges[p[0]], p[1]) for p, _ in books if p[0] in exchanges})
    for (pair, _), book in books.items():
        exchange = exchanges.get(pair[0])
        if exchange is None or pair in found:
            continue  # the account is gone (its orders with it)
        slots = queue_slots_for(exchange=exchange, market_type=pair[1])
        tick = ticks.get((exchange, pair[1], pair[2]), (None, None))[0]
        if book.needs_work(slots, tick):
            found.add(pair)
    return found


def queue_express_place(*, work: QueueWork, pending: PendingOrder) -> str:
    """Place one express (MARKET) order at once, before any slot logic."""
    pair = _pair_of(pending)
    if pending.account_id not in work.accounts or work.blocked_until(pair):
        return "skipped"
    outcome = order_promote(pending_id=pending.pk, gateway=work.gateway(pending.account_id), now=work.now)
    return "filled_at_once" if outcome == "filled" else outcome


def _entries(rows: PairRows, now: datetime) -> tuple[list[QueueEntry], dict[str, int], dict[str, int]]:
    """QueueEntry rows for the ranking, and order_key → row id maps for pending and live rows."""
    entries: list[QueueEntry] = []
    pending_ids: dict[str, int] = {}
    open_ids: dict[str, int] = {}
    for p in rows.pending:
        if p["express"] or p["order_type"] == OrderType.MARKET:
            continue  # the express lane, outside the slot logic
        key = str(p["order_key"])
        pending_ids[key] = p["id"]
        queued = p["status"] == PendingOrder.Status.QUEUED
        entries.append(
            QueueEntry(
                key=key,
                bucket=bucket_for(order_type=p["order_type"], side=p["side"]),
                slot=Slot.QUEUED if queued else Slot.SUBMITTING,
                side=p["side"],
                price=p["price"],
                stop_price=p["stop_price"],
                priority=p["priority"],
                signal_at=p["signal_at"],
                queue_seq=p["queue_seq"],
                eligible=not queued or p["next_attempt_at"] is None or p["next_attempt_at"] <= now,
            )
        )
    for o in rows.open:
        if o["order_type"] == OrderType.MARKET:
            continue
        key = str(o["order_key"])
        open_ids[key] = o["id"]
        status = o["status"]
        triggered = OpenOrder.Status.TRIGGERED in (status, o["status_before_cancel"])
        if status == OpenOrder.Status.CANCELLING:
            slot = Slot.CANCELLING
        elif status == OpenOrder.Status.NEW and o["next_cancel_at"] and o["next_cancel_at"] > now:
            # The exchange refused its demotion: until the backoff passes the bucket is left as it
            # is, as while a cancel is pending (demoting another order instead would churn).
            slot = Slot.CANCELLING
        elif status == OpenOrder.Status.NEW:
            slot = Slot.LIVE
        else:
            slot = Slot.PINNED  # PARTIALLY_FILLED and TRIGGERED are never demoted
        entries.append(
            QueueEntry(
                key=key,
                bucket=bucket_for(order_type=o["order_type"], side=o["side"], triggered=triggered),
                slot=slot,
                side=o["side"],
                price=o["price"],
                stop_price=o["stop_price"],
                priority=o["priority"],
                signal_at=o["signal_at"],
                queue_seq=o["queue_seq"],
            )
        )
    return entries, pending_ids, open_ids


def _plan(work: QueueWork, pair: Pair, rows: PairRows) -> tuple[PairPlan, dict[str, int], dict[str, int]]:
    account = work.accounts[pair[0]]
    tick = work.ticks.get((account.exchange, pair[1], pair[2]), (None, None))[0]
    entries, pending_ids, open_ids = _entries(rows, work.now)
    plan = plan_pair(entries, slots=queue_slots_for(exchange=account.exchange, market_type=pair[1]), tick=tick)
    return plan, pending_ids, open_ids


def _next_due(work: QueueWork, pair: Pair, rows: PairRows, plan: PairPlan | None = None) -> datetime | None:
    """When the pair next needs a pass: now if its plan is not empty, else its earliest backoff or lookup.

    `plan`: the pair's plan of these same rows, when the caller has it already (saves planning twice).
    """
    now = work.now
    due: list[datetime] = []
    for p in rows.pending:
        if p["status"] == PendingOrder.Status.SUBMITTING:
            due.append(_lookup_due_at(submitting_at=p["submitting_at"], next_attempt_at=p["next_attempt_at"], now=now))
        elif p["next_attempt_at"] and p["next_attempt_at"] > now:
            due.append(p["next_attempt_at"])
        elif p["express"]:
            due.append(now)
    for o in rows.open:
        if o["status"] == OpenOrder.Status.CANCELLING:
            due.append(max(o["next_cancel_at"] or now, now))
        elif o["next_cancel_at"] and o["next_cancel_at"] > now:
            due.append(o["next_cancel_at"])
    if plan is None:
        plan = _plan(work, pair, rows)[0]
    if not plan.empty:
        due.append(now)
    return min(due) if due else None


def queue_pair_rebalance(*, work: QueueWork, pair: Pair) -> QueueTally:
    """One pair: resolve due SUBMITTING rows, send due cancels, then demote and promote toward the
    ranking's target (demotions first; no promotion into a bucket with a demotion pending).

    Expected gateway errors are outcomes here; the unexpected propagate (the pair stays dirty).
    A pass out of time stops between moves; the rest of the plan keeps the pair due now.
    """
    tally = QueueTally(pairs=1)
    now = work.now
    dirty = DirtyTracker(pair, work.dirty.get(pair))
    rows = work.rows.get(pair) or PairRows()
    if pair[0] not in work.accounts:
        dirty.finish(None)  # the account is gone (its orders with it)
        return tally
    blocked = work.blocked_until(pair)
    if blocked is not None:
        dirty.finish(blocked if not rows.empty else None)
        return tally
    acted = False
    for p in rows.pending:
        if not work.may_call(pair[0]):
            break
        lookup_due = _lookup_due_at(submitting_at=p["submitting_at"], next_attempt_at=p["next_attempt_at"], now=now)
        if p["status"] == PendingOrder.Status.SUBMITTING and lookup_due <= now:
            pending = PendingOrder.objects.filter(pk=p["id"]).first()
            if pending is not None:
                tally.add(submitting_resolve(pending=pending, gateway=work.gateway(pair[0]), now=now, dirty=dirty))
                acted = True
    for o in rows.open:
        if not work.may_call(pair[0]):
            break
        if o["status"] == OpenOrder.Status.CANCELLING and (o["next_cancel_at"] is None or o["next_cancel_at"] <= now):
            order = OpenOrder.objects.filter(pk=o["id"], status=OpenOrder.Status.CANCELLING).first()
            if order is not None:
                tally.add(order_cancel_send(order=order, gateway=work.gateway(pair[0]), now=now, dirty=dirty))
                acted = True
    if acted:
        rows = selectors.queue_rows_for_pairs(pairs=[pair]).get(pair) or PairRows()
    plan, pending_ids, open_ids = _plan(work, pair, rows)
    for key in plan.demote:
        if not work.may_call(pair[0]):
            break  # and promote nothing either: the plan's promotions counted on these demotions
        tally.add("demoted")
        tally.add(order_demote(open_id=open_ids[key], gateway=work.gateway(pair[0]), now=now, dirty=dirty))
    for key in plan.promote:
        if not work.may_call(pair[0]):
            break
        tally.add(order_promote(pending_id=pending_ids[key], gateway=work.gateway(pair[0]), now=now, dirty=dirty))
    if acted or not plan.empty:
        rows = selectors.queue_rows_for_pairs(pairs=[pair]).get(pair) or PairRows()
        due = _next_due(work, pair, rows)
    else:
        due = _next_due(work, pair, rows, plan)  # rows as planned: nothing changed them
    if due is not None and work.in_trouble(pair[0]):
        due = max(due, now + TROUBLE_RETRY)
    dirty.finish(due)
    return tally


def queue_pair_defer(*, work: QueueWork, pair: Pair, until: datetime) -> None:
    """Leave a pair that failed this pass (e.g. no gateway for its exchange) dirty, due again at `until`."""
    DirtyTracker(pair, work.dirty.get(pair)).finish(until)


def queue_pass_defer(*, work: QueueWork, pairs: Iterable[Pair]) -> int:
    """Pairs the pass had no time for: dirty ones stay as they are; swept ones with work get a mark."""
    todo = [p for p in pairs if p not in work.dirty and p in work.accounts and _next_due(work, p, work.rows[p])]
    if todo:
        queue_mark_dirty(pairs=todo, now=work.now)
    return len(todo)


def queue_express_defer(*, work: QueueWork, pairs: Iterable[Pair]) -> int:
    """Pairs of express orders the pass had no time for: due now (an earlier mark is kept), first next tick."""
    todo = sorted(set(pairs))
    if todo:
        with transaction.atomic():
            queue_mark_dirty_by(pairs=todo, due_at=work.now)
    return len(todo)


def queue_trouble_defer(*, work: QueueWork, pairs: Iterable[Pair], express: Iterable[Pair] = ()) -> int:
    """Pairs of an exchange in trouble this pass (`QueueWork.in_trouble`), skipped: due TROUBLE_RETRY later.

    Their marks move to then, this pass's own (a failed create marks its pair) and concurrent ones
    alike: nothing is lost, a change made meanwhile just waits out the retry with the rest. Swept
    pairs with work, and the pairs of skipped `express` orders, get a mark (a later pass must see them).
    """
    until = work.now + TROUBLE_RETRY
    express = set(express)
    todo = sorted(
        {
            p
            for p in pairs
            if p in work.dirty or (p in work.accounts and _next_due(work, p, work.rows.get(p) or PairRows()))
        }
        | express
    )
    with transaction.atomic():
        for account_id, market_type, symbol in todo:
            QueueDirty.objects.filter(
                account_id=account_id, market_type=market_type, symbol=symbol, marked_at__lt=until
            ).update(marked_at=until)
        queue_mark_dirty_by(pairs=todo, due_at=until)
    return len(todo)


def queue_pass_finish(*, work: QueueWork, tally: QueueTally) -> None:
    """Per-minute counters (moves, exchange calls) and, with the sweep, the congestion check."""
    if tally.moves:
        counter_add(name="queue_moves", labels="", value=tally.moves, now=work.now)
    for (name, exchange), value in sorted(work.counts.items()):
        counter_add(name=name, labels=f"exchange={exchange}", value=value, now=work.now)
    if work.swept:
        queue_congestion_check(now=work.now)


def queue_congestion_check(*, now: datetime) -> int:
    """Count pairs with ≥ 20 queued orders; alert (throttled) at ≥ 10; write the metric once per minute."""
    congested = selectors.queue_congested_pairs(threshold=CONGESTION_QUEUED)
    minute = now.replace(second=0, microsecond=0)
    if not MetricCounter.objects.filter(minute=minute, name="queue_congested_pairs", labels="").exists():
        counter_add(name="queue_congested_pairs", labels="", value=congested, now=now)
    if congested >= CONGESTION_PAIRS:
        logger.warning("queue: %d pairs have %d or more queued orders", congested, CONGESTION_QUEUED)
        _alert(
            "queue:congestion",
            f"Order queue congested: {congested} pairs have {CONGESTION_QUEUED} or more queued orders",
        )
    return congested
