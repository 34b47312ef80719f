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
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, TypedDict, cast

from django.db import connection, transaction

from accounts.models import Account
from core.money import decimal_text
from core.rawsql import rows_delete, rows_insert
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
    not_sent,
)
from notifications.services import alert_raise
from orders import selectors
from orders.faults import crash_point
from orders.fills import fill_apply, fill_event_details, fill_record_placed
from orders.models import CancelRequestedBy, OpenOrder, OrderEvent, PendingOrder, QueueDirty
from orders.selectors import DirtyMark, Pair
from orders.services import (
    client_order_id_for,
    order_event_add,
    order_event_new,
    pair_lock,
    queue_mark_dirty,
    queue_mark_dirty_by,
)
from positions.fills import RecordedFill
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
        if next_due is None:
            # Plain SQL (core.rawsql): every placement's pair ends here, and the ORM's delete
            # collects cascades that a marker table has none of.
            rows_delete(
                QueueDirty, account_id=account_id, market_type=market_type, symbol=symbol, marked_at=self.known_at
            )
        elif next_due != self.known_at:
            QueueDirty.objects.filter(
                account_id=account_id, market_type=market_type, symbol=symbol, marked_at=self.known_at
            ).update(marked_at=next_due)


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
    """Place one QUEUED order (orders_promote with one row). Returns what orders_promote returns for it."""
    row = PendingOrder.objects.filter(pk=pending_id).first()
    if row is None:
        return "skipped"
    return orders_promote(rows=[row], gateway=gateway, now=now, dirty=dirty)[row.pk]


def orders_promote(
    *,
    rows: list[PendingOrder],
    gateway: ExchangeGateway,
    now: datetime,
    dirty: DirtyTracker | None = None,
    may_call: Callable[[], bool] | None = None,
    exchange: str | None = None,
) -> dict[int, str]:
    """Place QUEUED orders of one pair as a batch: claim them all SUBMITTING (new client ids) in one
    guarded UPDATE with their events, create each on the exchange with no lock held, then record the
    replies together (placements_record).

    `rows`: the orders as last read (full rows); one whose status, placement_no or backoff changed
    since is left alone ("skipped"). `may_call` is asked before each create after the first: once it
    says no, the orders not sent are released (QUEUED again, event `requeued`: "released"). Returns
    an outcome per row id: "placed", "filled", "submitting" (unknown or refused: resolved by lookup,
    never sent again meanwhile), "rejected" (could not form a valid order), "released" or "skipped".
    """
    outcomes = {row.pk: "skipped" for row in rows}
    if not rows:
        return outcomes
    claims, invalid = _claim(rows=rows, now=now, dirty=dirty)
    for row, reason in invalid:
        _alert(f"queue:rejected:{row.order_key}", f"Order {row.order_key} {row.symbol} is invalid: {reason}")
        outcomes[row.pk] = "rejected"
    if not claims:
        return outcomes
    crash_point("promote.after_submitting_commit")
    acknowledged: list[tuple[PendingOrder, OrderState]] = []
    for index, (row, request) in enumerate(claims):
        if index and may_call is not None and not may_call():
            released = _claims_release(rows=[r for r, _ in claims[index:]], now=now, dirty=dirty)
            outcomes.update(dict.fromkeys(released, "released"))
            break
        try:
            state = gateway.create_order(request)
        except LOCAL_FAILURES as exc:
            # The order could not even be formed into a request (a value the exchange client or the
            # simulator cannot represent): sending it again fails the same way. A permanent refusal,
            # confirmed by one lookup and then ended as rejected with an alert, never a retry loop.
            logger.exception("queue: create of %s (%s) failed before it was sent", row.order_key, row.client_order_id)
            _submitting_error_record(pending=row, exc=exc, kind=PERMANENT, now=now)
            outcomes[row.pk] = "submitting"
            continue
        except GatewayError as exc:
            if not_sent(exc):
                # Our own rate budget refused it before sending: nothing can be on the exchange under
                # this id, so it and the rest of the batch (the budget is spent) are QUEUED again now.
                logger.info("queue: create of %s held back here: %s", row.order_key, exc)
                released = _claims_release(
                    rows=[r for r, _ in claims[index:]], now=now, dirty=dirty, reason=f"not sent: {exc}"
                )
                outcomes.update(dict.fromkeys(released, "released"))
                break
            kind = create_error_kind(exc)
            _submitting_error_record(pending=row, exc=exc, kind=kind, now=now)
            logger.warning(
                "queue: create of %s (%s) failed (%s, %s): %s",
                row.order_key,
                row.client_order_id,
                kind,
                type(exc).__name__,
                exc,
            )
            outcomes[row.pk] = "submitting"
            continue
        crash_point("promote.after_exchange_ack")
        acknowledged.append((row, state))
    if acknowledged:
        # Every reply of the batch is in: a crash here leaves them all SUBMITTING, found by lookup.
        crash_point("promote.before_batch_record")
        outcomes.update(placements_record(placed=acknowledged, now=now, via="create", dirty=dirty, exchange=exchange))
    return outcomes


def _claim(
    *, rows: list[PendingOrder], now: datetime, dirty: DirtyTracker | None
) -> tuple[list[tuple[PendingOrder, OrderRequest]], list[tuple[PendingOrder, str]]]:
    """Claim the rows SUBMITTING in one transaction: one guarded UPDATE (status QUEUED, the placement_no
    read, backoff passed) that returns the ids it claimed, and their `submitting` events in one insert.

    A row that cannot make a valid order is ended `rejected` instead (nothing is sent). Returns the
    claimed rows (updated in memory) with their requests, and the rejected rows with the reason.
    """
    wanted: list[tuple[PendingOrder, int, str, OrderRequest]] = []
    invalid: list[tuple[PendingOrder, str]] = []
    for row in rows:
        placement_no = row.placement_no + 1
        client_order_id = client_order_id_for(order_key=row.order_key, placement_no=placement_no)
        try:
            request = _request_for(row, client_order_id)
        except ValueError as exc:
            invalid.append((row, str(exc)))  # nothing was sent: the row itself cannot make an order
            continue
        wanted.append((row, placement_no, client_order_id, request))
    rejected: list[tuple[PendingOrder, str]] = []
    claims: list[tuple[PendingOrder, OrderRequest]] = []
    with transaction.atomic():
        claimed = _claim_update(wanted=wanted, now=now) if wanted else set()
        events = []
        for row, placement_no, client_order_id, request in wanted:
            if row.pk not in claimed:
                continue
            row.placement_no = placement_no
            row.client_order_id = client_order_id
            row.status = PendingOrder.Status.SUBMITTING
            row.submitting_at = now
            row.next_attempt_at = None
            row.not_found_count = 0
            row.last_lookup_at = None
            row.last_error = ""
            row.last_error_kind = ""
            claims.append((row, request))
            events.append(
                order_event_new(
                    order=row,
                    kind=OrderEvent.Kind.SUBMITTING,
                    details={"placement_no": placement_no, "client_order_id": client_order_id},
                )
            )
        for row, reason in invalid:
            gone, _ = PendingOrder.objects.filter(
                pk=row.pk, status=PendingOrder.Status.QUEUED, placement_no=row.placement_no
            ).delete()
            if gone:
                events.append(order_event_new(order=row, kind=OrderEvent.Kind.REJECTED, details={"reason": reason}))
                rejected.append((row, reason))
        if events:
            rows_insert(events)
            _touch(dirty, rows[0], now)
    return claims, rejected


def _claim_update(*, wanted: list[tuple[PendingOrder, int, str, OrderRequest]], now: datetime) -> set[int]:
    """One UPDATE … RETURNING id: each row QUEUED → SUBMITTING with its own client order id, only if its
    status, placement_no and backoff are still what the caller read (two claims of one row: one wins)."""
    quote = connection.ops.quote_name
    at = connection.ops.adapt_datetimefield_value(now)
    case_client: list[Any] = []
    case_placement: list[Any] = []
    for row, placement_no, client_order_id, _ in wanted:
        case_client += [row.pk, client_order_id]
        case_placement += [row.pk, placement_no - 1]
    whens = " ".join(["WHEN %s THEN %s"] * len(wanted))
    ids = [row.pk for row, *_ in wanted]
    sql = (
        f"UPDATE {quote(PendingOrder._meta.db_table)} SET status = %s, placement_no = placement_no + 1, "  # noqa: S608 - our names
        f"client_order_id = CASE id {whens} END, submitting_at = %s, next_attempt_at = NULL, "
        "not_found_count = 0, last_lookup_at = NULL, last_error = '', last_error_kind = '', updated_at = %s "
        f"WHERE id IN ({', '.join(['%s'] * len(ids))}) AND status = %s "
        "AND (next_attempt_at IS NULL OR next_attempt_at <= %s) "
        f"AND placement_no = CASE id {whens} END RETURNING id"
    )
    params = [PendingOrder.Status.SUBMITTING.value, *case_client, at, at, *ids]
    params += [PendingOrder.Status.QUEUED.value, at, *case_placement]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {pk for (pk,) in cursor.fetchall()}


def _claims_release(
    *,
    rows: list[PendingOrder],
    now: datetime,
    dirty: DirtyTracker | None,
    reason: str = "not sent: the batch stopped before it",
) -> list[int]:
    """Claimed orders the batch did not send (its exchange failed, the pass ran out of time, our own
    rate budget refused the create): QUEUED again at once, event `requeued`. Only rows still
    SUBMITTING with this claim's client id; none reached the exchange under that id."""
    released = []
    with transaction.atomic():
        events = []
        for row in rows:
            if PendingOrder.objects.filter(
                pk=row.pk, status=PendingOrder.Status.SUBMITTING, client_order_id=row.client_order_id
            ).update(status=PendingOrder.Status.QUEUED, submitting_at=None, updated_at=now):
                row.status, row.submitting_at = PendingOrder.Status.QUEUED, None
                released.append(row.pk)
                details = {
                    "placement_no": row.placement_no,
                    "client_order_id": row.client_order_id,
                    "reason": scrub(reason)[:300],
                    "attempts": row.attempts,
                }
                events.append(order_event_new(order=row, kind=OrderEvent.Kind.REQUEUED, details=details))
        if events:
            OrderEvent.objects.bulk_create(events)
            _touch(dirty, rows[0], now)
    return released


def _submitting_error_record(*, pending: PendingOrder, exc: Exception, kind: str, now: datetime) -> None:
    # One guarded UPDATE: its row lock is enough (no pair lock needed for two error columns).
    PendingOrder.objects.filter(
        pk=pending.pk, status=PendingOrder.Status.SUBMITTING, client_order_id=pending.client_order_id
    ).update(last_error=scrub(f"{type(exc).__name__}: {exc}")[:500], last_error_kind=kind)


def placement_record(
    *, pending: PendingOrder, state: OrderState, now: datetime, via: str, dirty: DirtyTracker | None = None
) -> str:
    """The exchange has the order (create reply or lookup): placements_record for one order."""
    return placements_record(placed=[(pending, state)], now=now, via=via, dirty=dirty)[pending.pk]


def placements_record(
    *,
    placed: list[tuple[PendingOrder, OrderState]],
    now: datetime,
    via: str,
    dirty: DirtyTracker | None = None,
    exchange: str | None = None,
) -> dict[int, str]:
    """The exchange has these orders of one pair (create replies or a lookup): in one transaction under the
    pair lock, delete the SUBMITTING rows (one DELETE … RETURNING), insert the OpenOrders (one insert)
    and the events (one insert), and record fills the replies already show in the ledger.

    A reply that is completely filled ends its order here (events `placed` and `filled`, no OpenOrder
    row); a partial fill makes a PARTIALLY_FILLED row. A user cancel requested while it was SUBMITTING
    makes the new row CANCELLING (USER) at once, so the next pass cancels it and ends it. Triggered,
    closed and user-cancelled replies with fills go through order_trigger_record / order_state_apply
    after the commit. Returns an outcome per row id: "placed", "filled", "cancelled", … or "skipped"
    (resolved meanwhile by another path, e.g. update_open_orders' lookup).
    """
    outcomes = {pending.pk: "skipped" for pending, _ in placed}
    first = placed[0][0]
    later: list[tuple[OpenOrder, OrderState]] = []
    logged: list[tuple[OpenOrder, OrderState]] = []
    fills: list[tuple[OpenOrder, OrderState, RecordedFill]] = []
    with transaction.atomic(), pair_lock(account_id=first.account_id, symbol=first.symbol):
        taken = _pending_take(placed=placed)
        lives: list[OpenOrder] = []
        events: list[OrderEvent] = []
        for pending, state in placed:
            if pending.pk not in taken:
                continue
            pending.cancel_requested_by = taken[pending.pk]
            fields = _identity(pending)
            fields["quantity"] = pending.remaining_quantity
            fields["filled_quantity"] = Decimal(0)  # the fill below records what the reply shows
            live = OpenOrder(
                **fields,
                exchange_order_id=state.exchange_order_id,
                conditional=pending.conditional,
                status=OpenOrder.Status.NEW,
                last_seen_at=now,
            )
            user_cancel = pending.cancel_requested_by == CancelRequestedBy.USER
            if user_cancel:
                live.status = OpenOrder.Status.CANCELLING
                live.status_before_cancel = OpenOrder.Status.NEW
                live.cancel_requested_at = now
            events.append(
                order_event_new(
                    order=live,
                    kind=OrderEvent.Kind.PLACED,
                    details={
                        "exchange_order_id": state.exchange_order_id,
                        "client_order_id": pending.client_order_id,
                        "placement_no": pending.placement_no,
                        "status": state.status.value,
                        "via": via,
                    },
                )
            )
            logged.append((live, state))
            opened = state.status in (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED)
            if opened and state.filled_quantity <= 0:
                lives.append(live)
                outcomes[pending.pk] = "placed"
            elif (
                state.status in (OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED, OrderStatus.FILLED)
                and not (state.conditional and state.status == OrderStatus.TRIGGERED)
                and not user_cancel
            ):
                recorded = None
                if state.filled_quantity > 0:
                    recorded = fill_record_placed(
                        live=live, state=state, now=now, exchange=exchange or _exchange_of(live.account_id)
                    )
                complete = state.status == OrderStatus.FILLED or state.filled_quantity >= live.quantity
                details = {"exchange_order_id": state.exchange_order_id, "filled": state.filled_quantity}
                if recorded is not None:
                    fills.append((live, state, recorded))
                    details = fill_event_details(
                        state=state, delta=recorded.delta, price=recorded.price, source=Fill.Source.REST
                    )
                    if not complete:
                        live.filled_quantity = state.filled_quantity
                        live.status = OpenOrder.Status.PARTIALLY_FILLED
                        partial = order_event_new(order=live, kind=OrderEvent.Kind.PARTIALLY_FILLED, details=details)
                        events.append(partial)
                if complete:
                    events.append(order_event_new(order=live, kind=OrderEvent.Kind.FILLED, details=details))
                    outcomes[pending.pk] = "filled"
                else:
                    lives.append(live)
                    outcomes[pending.pk] = "placed"
            else:
                lives.append(live)
                later.append((live, state))
        if lives:
            rows_insert(lives)
        if events:
            rows_insert(events)
        if taken:
            _touch(dirty, first, now)
    for live, state in logged:
        logger.info(
            "queue: placed %s %s on the exchange as order %s (%s)",
            live.order_key,
            live.describe(),
            state.exchange_order_id,
            via,
        )
    for live, state, recorded in fills:
        logger.info(
            "fill %s %s %s %s @ %s (order %s, filled %s of %s, %s)",
            live.order_key,
            state.side,
            decimal_text(recorded.delta),
            live.symbol,
            decimal_text(recorded.price),
            live.describe(),
            decimal_text(state.filled_quantity),
            decimal_text(live.quantity),
            Fill.Source.REST,
        )
    for live, state in later:
        outcomes[_pk_of_pending(placed, live)] = _placement_after(live=live, state=state, now=now)
    return outcomes


def _pk_of_pending(placed: list[tuple[PendingOrder, OrderState]], live: OpenOrder) -> int:
    return next(pending.pk for pending, _ in placed if pending.order_key == live.order_key)


def _placement_after(*, live: OpenOrder, state: OrderState, now: datetime) -> str:
    """What a reply other than open or filled does to the new row: a trigger, a close, a fill of a cancelled one."""
    if state.conditional and state.status == OrderStatus.TRIGGERED:
        order_trigger_record(order=live, state=state, now=now)
        return "placed"
    outcome = order_state_apply(order=live, state=state, source=Fill.Source.REST, now=now)
    if outcome.ended == OrderEvent.Kind.FILLED:
        return "filled"
    return outcome.ended or "placed"


def _pending_take(*, placed: list[tuple[PendingOrder, OrderState]]) -> dict[int, str]:
    """Delete the rows still SUBMITTING under the client ids given (one DELETE … RETURNING).

    Returns id → cancel_requested_by of the rows deleted."""
    quote = connection.ops.quote_name
    ids = [pending.pk for pending, _ in placed]
    client_ids = [pending.client_order_id for pending, _ in placed]
    sql = (
        f"DELETE FROM {quote(PendingOrder._meta.db_table)} "  # noqa: S608 - our names
        f"WHERE id IN ({', '.join(['%s'] * len(ids))}) AND status = %s "
        f"AND client_order_id IN ({', '.join(['%s'] * len(client_ids))}) RETURNING id, cancel_requested_by"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*ids, PendingOrder.Status.SUBMITTING.value, *client_ids])
        return dict(cursor.fetchall())


def _exchange_of(account_id: int) -> str:
    return cast(str, Account.objects.filter(pk=account_id).values_list("exchange", flat=True).get())


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
