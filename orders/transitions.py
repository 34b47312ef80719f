"""Every move of a logical order between PendingOrder and OpenOrder, and its end (SPEC §4.1, §4.2).

Promote, placement, SUBMITTING resolution, demote and cancel, the user cancel, exchange reports
(fill first, then the end they say), triggers and lost orders. Each commits an intent first
(SUBMITTING, CANCELLING) where an exchange call follows, calls the exchange with no row lock
held, and records the result in a second short transaction under the pair lock: a crash between
any two steps leaves a row whose state says what to look up next. The queue pass
(orders.queue), the REST poller (orders.reconcile) and the user streams (orders.streams) call
these; none of them moves an order row itself.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypedDict, cast

from django.db import transaction

from core.money import decimal_text
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
from notifications.services import alert_raise
from orders import selectors
from orders.faults import crash_point
from orders.fills import fill_apply
from orders.models import CancelRequestedBy, OpenOrder, OrderEvent, PendingOrder, QueueDirty
from orders.selectors import DirtyMark, Pair
from orders.services import client_order_id_for, order_event_add, pair_lock, queue_mark_dirty, queue_mark_dirty_by
from positions.models import Fill

logger = logging.getLogger(__name__)

LOOKUP_DELAY = timedelta(seconds=2)  # a SUBMITTING row is looked up no sooner after its create
LOOKUP_RETRY = timedelta(seconds=5)  # after a lookup that itself failed
NOT_FOUND_GAP = timedelta(seconds=30)  # two "not found" lookups at least this far apart re-queue
BACKOFF_BASE_SECONDS = 2
BACKOFF_MAX_SECONDS = 300
CANCEL_ALERT_AFTER = 3  # consecutive failed cancels of one order

# How a failed create is resolved. "unknown": the order may be on the exchange (a timeout, a
# 5xx, a duplicate client id, a rate limit or maintenance reply that may have come after the
# exchange accepted it): two not-found lookups at least NOT_FOUND_GAP apart before it may be
# sent again. "temporary"/"permanent": the exchange refused it; one not-found lookup confirms,
# then it is re-queued with backoff (temporary) or ended with an alert (permanent).
UNKNOWN, TEMPORARY, PERMANENT = "unknown", "temporary", "permanent"
# Cancels are safe to repeat, so only an explicit refusal returns a demoted order to its slot.
CANCEL_REFUSALS = (Rejected, InsufficientFunds)
LOST_AFTER_MISSING_RUNS = 2  # runs in which a live order is found neither open nor in history
# Errors raised by the client before a create leaves the process (not GatewayError, not database
# errors, which are transient): the same order fails the same way every time.
LOCAL_FAILURES = (ArithmeticError, ValueError, TypeError)


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


def lookup_due_at(*, submitting_at: datetime | None, next_attempt_at: datetime | None, now: datetime) -> datetime:
    """When a SUBMITTING order may next be looked up: LOOKUP_DELAY after its create, not before its backoff."""
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
    except LOCAL_FAILURES as exc:
        # The order could not even be formed into a request (a value the exchange client or the
        # simulator cannot represent): sending it again fails the same way. A permanent refusal,
        # confirmed by one lookup and then ended as rejected with an alert, never a retry loop.
        logger.exception("queue: create of %s (%s) failed before it was sent", row.order_key, client_order_id)
        _submitting_error_record(pending=row, exc=exc, kind=PERMANENT, now=now)
        return "submitting"
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


def _submitting_error_record(*, pending: PendingOrder, exc: Exception, kind: str, now: datetime) -> None:
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
    logger.info(
        "queue: placed %s %s on the exchange as order %s (%s)",
        live.order_key,
        live.describe(),
        state.exchange_order_id,
        via,
    )
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
    if now < lookup_due_at(submitting_at=pending.submitting_at, next_attempt_at=pending.next_attempt_at, now=now):
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
                queue_mark_dirty_by(pairs=[pair_of(pending)], due_at=now + LOOKUP_RETRY)
        return "unknown"
    return placement_record(pending=pending, state=state, now=now, via="lookup", dirty=dirty)


def pair_of(row: Any) -> Pair:
    """The (account_id, market_type, symbol) pair of an order row."""
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
                queue_mark_dirty_by(pairs=[pair_of(row)], due_at=next_attempt_at)
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
                queue_mark_dirty(pairs=[pair_of(pending)], now=now)
                return "cancelled"
            if pending.cancel_requested_by != CancelRequestedBy.USER:
                pending.cancel_requested_by = CancelRequestedBy.USER
                pending.save(update_fields=["cancel_requested_by", "updated_at"])
                queue_mark_dirty(pairs=[pair_of(pending)], now=now)
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
            queue_mark_dirty(pairs=[pair_of(live)], now=now)
        return "cancelling"


def _pair_by_key(order_key: Any) -> Pair | None:
    for model in (PendingOrder, OpenOrder):
        row = model.objects.filter(order_key=order_key).values_list("account_id", "market_type", "symbol").first()
        if row is not None:
            return row
    return None


# --- Exchange reports (REST poll, user streams, cancel replies) ------------------------------------


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
    what = f"{order.order_key} {order.describe()}"
    if kind == OrderEvent.Kind.REQUEUED:
        logger.info("order %s demoted: cancelled on the exchange, re-queued (%s filled)", what, filled)
    elif kind == OrderEvent.Kind.REJECTED:
        logger.warning("order %s rejected by the exchange (%s)", what, state.status.value)
    elif order.cancel_requested_by == CancelRequestedBy.USER:
        logger.info("order %s cancelled at the user's request (%s filled)", what, filled)
    elif order.cancel_requested_by == CancelRequestedBy.DEMOTION:
        logger.info("order %s demoted with nothing left to re-queue (%s filled)", what, filled)
    else:
        logger.warning("order %s closed by the exchange as %s (%s filled)", what, state.status.value, filled)


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
