"""Order reads: a user's orders for the API, and the queue pass's dirty pairs, express orders and pair rows."""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import CharField, Count, Exists, F, Max, Min, OuterRef, Q, QuerySet, Value

from accounts.models import Account, StrategyAccount
from core.querysets import filter_given
from core.rawsql import rows_values
from exchanges.models import MarketInfo
from orders.models import OpenOrder, OrderEvent, PendingOrder, QueueDirty, Signal
from orders.signal_report import ExecutionSummary, FollowerExecution, execution_summarize
from positions.models import Trade
from scheduler.shards import ShardSet

Pair = tuple[int, str, str]  # (account_id, market_type, symbol)

PENDING_FIELDS = (
    "id",
    "order_key",
    "account_id",
    "market_type",
    "symbol",
    "side",
    "order_type",
    "price",
    "stop_price",
    "priority",
    "signal_at",
    "queue_seq",
    "express",
    "status",
    "cancel_requested_by",
    "submitting_at",
    "next_attempt_at",
    "last_lookup_at",
    "not_found_count",
    "last_error_kind",
)
OPEN_FIELDS = (
    "id",
    "order_key",
    "account_id",
    "market_type",
    "symbol",
    "side",
    "order_type",
    "price",
    "stop_price",
    "priority",
    "signal_at",
    "queue_seq",
    "express",
    "status",
    "status_before_cancel",
    "cancel_requested_by",
    "next_cancel_at",
)


# --- Queue pass reads -----------------------------------------------------------------------------


def queue_slots_for(*, exchange: str, market_type: str) -> int:
    """Live slots per bucket: ORDER_QUEUE_SLOTS["EXCHANGE:MARKET_TYPE"], else its "default", else 2."""
    slots = settings.ORDER_QUEUE_SLOTS
    value = slots.get(f"{exchange}:{market_type}", slots.get("default", 2))
    return max(0, int(value))


@dataclass(frozen=True)
class DirtyMark:
    id: int
    pair: Pair
    marked_at: datetime


@dataclass
class PairRows:
    """A snapshot of one pair's queued and live orders (plain dicts of PENDING_FIELDS / OPEN_FIELDS)."""

    pending: list[dict[str, Any]] = field(default_factory=list)
    open: list[dict[str, Any]] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.pending and not self.open


def queue_dirty_due(*, now: datetime, limit: int, shards: ShardSet | None = None) -> list[DirtyMark]:
    """Pairs marked dirty and due (`marked_at <= now`), oldest first: the pass's one steady-state query.

    `shards`: only accounts of these shards (a sharded scheduler's own).
    """
    rows = (
        QueueDirty.objects.filter(marked_at__lte=now)
        .filter(shards.q() if shards is not None else Q())
        .order_by("marked_at")
        .values_list("id", "account_id", "market_type", "symbol", "marked_at")[:limit]
    )
    return [DirtyMark(id=i, pair=(a, m, s), marked_at=at) for i, a, m, s, at in rows]


def queue_express_due(
    *, now: datetime, shards: ShardSet | None = None, busy: AbstractSet[Pair] = frozenset()
) -> list[PendingOrder]:
    """Queued MARKET orders whose backoff (if any) has passed, in arrival order (of `shards`' accounts only),
    but those of the `busy` pairs.

    With busy pairs (a fan-out's tasks still in flight, whose express rows wait their turn in the
    pool) the rows' pairs are read first and only the others' rows in full: a tick during a
    1,000-follower burst would otherwise build a model instance of every waiting row each second,
    on a process whose CPU the burst already holds.
    """
    due = (
        PendingOrder.objects.filter(express=True, status=PendingOrder.Status.QUEUED)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
        .filter(shards.q() if shards is not None else Q())
        .order_by("signal_at", "queue_seq")
    )
    if busy:
        idle = [
            pk
            for pk, account_id, market_type, symbol in due.values_list("pk", "account_id", "market_type", "symbol")
            if (account_id, market_type, symbol) not in busy
        ]
        if not idle:
            return []
        due = due.filter(pk__in=idle)
    return list(due)


def queue_pairs_all() -> set[Pair]:
    """Every pair with any queued or live order (the safety-net sweep); two index-only scans."""
    pairs: set[Pair] = set()
    for model in (PendingOrder, OpenOrder):
        pairs.update(model.objects.values_list("account_id", "market_type", "symbol").distinct())
    return pairs


def queue_rows_for_pairs(
    *, pairs: Iterable[Pair], everything: bool = False, shards: ShardSet | None = None
) -> dict[Pair, PairRows]:
    """Queued and live rows of the given pairs in two queries (all rows when `everything`, of `shards`' accounts)."""
    wanted = set(pairs)
    result: dict[Pair, PairRows] = defaultdict(PairRows)
    if not wanted and not everything:
        return result
    if len(wanted) == 1 and not everything and shards is None:
        # One pair (a pair task reading its rows again): plain SQL on the pair's index (core.rawsql),
        # as a fan-out's thousand tasks each do this once.
        ((account_id, market_type, symbol),) = wanted
        where, key = "account_id = %s AND market_type = %s AND symbol = %s", [account_id, market_type, symbol]
        rows = PairRows(
            pending=rows_values(PendingOrder, PENDING_FIELDS, where, key, order_by="id"),
            open=rows_values(OpenOrder, OPEN_FIELDS, where, key, order_by="id"),
        )
        if not rows.empty:  # as below: a pair without rows has no entry
            result[(account_id, market_type, symbol)] = rows
        return result
    pending = PendingOrder.objects.filter(shards.q() if shards is not None else Q())
    live = OpenOrder.objects.filter(shards.q() if shards is not None else Q())
    if not everything:
        # A superset filter the pair indexes serve; the exact pairs are kept below.
        accounts = {a for a, _, _ in wanted}
        symbols = {s for _, _, s in wanted}
        pending = pending.filter(account_id__in=accounts, symbol__in=symbols)
        live = live.filter(account_id__in=accounts, symbol__in=symbols)
    for row in pending.values(*PENDING_FIELDS):
        pair = (row["account_id"], row["market_type"], row["symbol"])
        if everything or pair in wanted:
            result[pair].pending.append(row)
    for row in live.values(*OPEN_FIELDS):
        pair = (row["account_id"], row["market_type"], row["symbol"])
        if everything or pair in wanted:
            result[pair].open.append(row)
    return result


def queue_sweep_groups(*, now: datetime) -> tuple[list[tuple], list[tuple]]:
    """The sweep's detector input: per-group aggregates of queued and live orders, two GROUP BY queries.

    PendingOrder rows grouped by (account_id, market_type, symbol, order_type, side, priority):
    `other` counts the rows that are not plain eligible QUEUED limit/stop orders (SUBMITTING, a
    backoff still running, express or MARKET, a user cancel); the rest give their count and the
    extremes of price and stop_price. OpenOrder rows grouped by the same plus status and
    status_before_cancel: `other` counts CANCELLING rows, a refused cancel's backoff still running
    and user cancels. Plain (filtered) aggregates only: the same on SQLite and PostgreSQL.
    """
    ready = (
        Q(status=PendingOrder.Status.QUEUED, express=False)
        & ~Q(order_type="MARKET")
        & ~Q(cancel_requested_by="USER")
        & (Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now))
    )
    pending = list(
        PendingOrder.objects.order_by()
        .values_list("account_id", "market_type", "symbol", "order_type", "side", "priority")
        .annotate(
            other=Count("id", filter=~ready),
            n=Count("id", filter=ready),
            n_price=Count("price", filter=ready),
            price_min=Min("price", filter=ready),
            price_max=Max("price", filter=ready),
            n_stop=Count("stop_price", filter=ready),
            stop_min=Min("stop_price", filter=ready),
            stop_max=Max("stop_price", filter=ready),
        )
    )
    busy = Q(status=OpenOrder.Status.CANCELLING) | Q(next_cancel_at__gt=now) | Q(cancel_requested_by="USER")
    live = list(
        OpenOrder.objects.order_by()
        .values_list(
            "account_id", "market_type", "symbol", "order_type", "side", "priority", "status", "status_before_cancel"
        )
        .annotate(
            other=Count("id", filter=busy),
            n=Count("id"),
            n_price=Count("price"),
            price_min=Min("price"),
            price_max=Max("price"),
            n_stop=Count("stop_price"),
            stop_min=Min("stop_price"),
            stop_max=Max("stop_price"),
        )
    )
    return pending, live


def account_exchanges(*, account_ids: Iterable[int]) -> dict[int, str]:
    return dict(Account.objects.filter(pk__in=set(account_ids)).values_list("id", "exchange"))


def market_ticks(*, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str, str], tuple[Decimal, Decimal]]:
    """(exchange, market_type, symbol) → (tick_size, min_qty) for the given (exchange, market_type) keys."""
    keys = set(keys)
    if not keys:
        return {}
    exchanges = {e for e, _ in keys}
    rows = MarketInfo.objects.filter(exchange__in=exchanges).values_list(
        "exchange", "market_type", "symbol", "tick_size", "min_qty"
    )
    return {(e, m, s): (tick, min_qty) for e, m, s, tick, min_qty in rows if (e, m) in keys}


def market_min_qty(*, exchange: str, market_type: str, symbol: str) -> Decimal | None:
    return (
        MarketInfo.objects.filter(exchange=exchange, market_type=market_type, symbol=symbol)
        .values_list("min_qty", flat=True)
        .first()
    )


def queue_congested_pairs(*, threshold: int) -> int:
    """How many pairs have at least `threshold` queued orders."""
    return (
        PendingOrder.objects.filter(status=PendingOrder.Status.QUEUED)
        .values("account_id", "market_type", "symbol")
        .annotate(n=Count("id"))
        .filter(n__gte=threshold)
        .count()
    )


def order_last_event(*, order_key: Any) -> str | None:
    return OrderEvent.objects.filter(order_key=order_key).order_by("-id").values_list("kind", flat=True).first()


# --- The orders API: a user's queued and live orders, and who owns an order key ----------------

ORDER_LIST_FIELDS = (
    "order_key",
    "location",
    "status",
    "account_id",
    "strategy",
    "symbol",
    "market_type",
    "side",
    "order_type",
    "price",
    "stop_price",
    "quantity",
    "filled_quantity",
    "priority",
    "express",
    "cancel_requested_by",
    "ext_id",
    "signal_at",
    "queue_seq",
    "created_at",
)


def order_list_for_user(
    *,
    user: User,
    account_id: int | None = None,
    symbol: str | None = None,
    status: str | None = None,
) -> QuerySet:
    """The user's queued (PendingOrder) and live (OpenOrder) orders as one query of dicts, newest first.

    `location` is "queued" or "live"; `status` is the row's own status; `ext_id` the exchange
    order id of a live order. One UNION ALL query, so slicing and counting for pagination happen
    in the database.
    """
    halves = []
    for model, location, exchange_order_id in (
        (PendingOrder, "queued", Value("", output_field=CharField())),
        (OpenOrder, "live", F("exchange_order_id")),
    ):
        rows = model.objects.filter(account__user=user)
        if account_id is not None:
            rows = rows.filter(account_id=account_id)
        if symbol is not None:
            rows = rows.filter(symbol=symbol)
        if status is not None:
            rows = rows.filter(status=status)
        # The UNION's columns line up by position: both halves list ORDER_LIST_FIELDS in order.
        halves.append(
            rows.annotate(
                location=Value(location, output_field=CharField()),
                strategy=F("strategy_account__strategy__group_name"),
                ext_id=exchange_order_id,
            )
            .values(*ORDER_LIST_FIELDS)
            .order_by()
        )
    return halves[0].union(halves[1], all=True).order_by("-queue_seq", "order_key")


def order_key_owned_by(*, user: User, order_key: uuid.UUID) -> bool:
    """Whether the logical order exists (queued, live or ended) on one of the user's accounts."""
    return (
        PendingOrder.objects.filter(order_key=order_key, account__user=user).exists()
        or OpenOrder.objects.filter(order_key=order_key, account__user=user).exists()
        or OrderEvent.objects.filter(order_key=order_key, account__user=user).exists()
    )


# --- Order and fill history: every logical order, whatever became of it -------------------------


def order_history_latest(
    *,
    user: User | None,
    account_id: int | None = None,
    symbol: str | None = None,
    state: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    order_key: uuid.UUID | None = None,
) -> QuerySet[OrderEvent]:
    """One row per logical order: its latest OrderEvent (whose kind says where it is), newest first.

    `user` None: every account (callers decide who may see that). `since`/`until` bound the order's
    latest activity. One query; an order's other events, live row and trades come from
    `order_history_rows` for just the page being shown.
    """
    later = OrderEvent.objects.filter(order_key=OuterRef("order_key"), id__gt=OuterRef("id"))
    latest = filter_given(
        OrderEvent.objects.filter(~Exists(later)),
        account__user=user,
        account_id=account_id,
        symbol=symbol,
        kind=state,
        created_at__gte=since,
        created_at__lt=until,
        order_key=order_key,
    )
    return latest.order_by("-id")


def _order_field(*, row: Any, arrived: dict[str, Any], name: str, detail: str) -> Any:
    """A field of a logical order: from its queued or live row while it exists, else as it arrived."""
    return getattr(row, name) if row is not None else arrived.get(detail)


def order_history_rows(latest: Iterable[OrderEvent]) -> list[dict[str, Any]]:
    """The orders of a page of `order_history_latest` with their fields, fills summary and full event list.

    Four queries for any page size: events, queued rows, live rows, trades. Fields come from the live
    or queued row while the order exists, else from its `queued` event (what arrived).
    """
    latest = list(latest)
    keys = [event.order_key for event in latest]
    events: dict[uuid.UUID, list[OrderEvent]] = defaultdict(list)
    for event in OrderEvent.objects.filter(order_key__in=keys).order_by("id"):
        events[event.order_key].append(event)
    current: dict[uuid.UUID, tuple[str, Any]] = {}
    for location, model in (("queued", PendingOrder), ("live", OpenOrder)):
        for row in model.objects.filter(order_key__in=keys).select_related("strategy_account__strategy"):
            current[row.order_key] = (location, row)
    trades: dict[uuid.UUID, list[Trade]] = defaultdict(list)
    for trade in Trade.objects.filter(order_key__in=keys).select_related("strategy_account__strategy"):
        if trade.order_key is not None:
            trades[trade.order_key].append(trade)
    strategy_names = dict(
        StrategyAccount.objects.filter(
            pk__in={
                e.details.get("strategy_account")
                for key in keys
                for e in events[key][:1]
                if isinstance(e.details.get("strategy_account"), int)
            }
        ).values_list("pk", "strategy__group_name")
    )
    rows = []
    for last in latest:
        history = events[last.order_key]
        arrived = history[0].details if history and history[0].kind == OrderEvent.Kind.QUEUED else {}
        location, row = current.get(last.order_key, ("ended", None))
        filled = sum((t.cumulative_filled for t in trades[last.order_key]), Decimal(0))
        cost = sum((t.cumulative_filled * t.average_price for t in trades[last.order_key]), Decimal(0))
        first_trade = trades[last.order_key][0] if trades[last.order_key] else None

        def field_of(name: str, detail: str) -> Any:
            return _order_field(row=row, arrived=arrived, name=name, detail=detail)  # noqa: B023 (used at once)

        strategy = (
            row.strategy_account.strategy.group_name
            if row is not None
            else first_trade.strategy_account.strategy.group_name
            if first_trade is not None
            else strategy_names.get(cast(int, arrived.get("strategy_account")))
        )
        rows.append(
            {
                "order_key": last.order_key,
                "account_id": last.account_id,
                "strategy": strategy,
                "symbol": last.symbol,
                "market_type": field_of("market_type", "market_type")
                or (first_trade.market_type if first_trade else None),
                "side": field_of("side", "side"),
                "order_type": field_of("order_type", "type"),
                "price": field_of("price", "price"),
                "stop_price": field_of("stop_price", "stop_price"),
                "quantity": arrived.get("quantity") if arrived else (row.quantity if row is not None else None),
                "filled_quantity": filled,
                "average_price": (cost / filled) if filled else None,
                "realized_pnl": sum((t.realized_pnl for t in trades[last.order_key]), Decimal(0)),
                "fees": sum((t.fees for t in trades[last.order_key]), Decimal(0)),
                "state": last.kind,
                "location": location,
                "status": row.status if row is not None else None,
                "created_at": history[0].created_at if history else last.created_at,
                "updated_at": last.created_at,
                "events": [{"kind": e.kind, "at": e.created_at, "details": e.details} for e in history],
            }
        )
    return rows


# --- Signals: the per-signal execution report ------------------------------------------------------

# The last event of an order → where it is now, in the report's words.
_OUTCOME_OF_EVENT: dict[str, str] = {
    OrderEvent.Kind.QUEUED: "queued",
    OrderEvent.Kind.REQUEUED: "queued",
    OrderEvent.Kind.DEMOTED: "queued",
    OrderEvent.Kind.SUBMITTING: "submitting",
    OrderEvent.Kind.PLACED: "live",
    OrderEvent.Kind.TRIGGERED: "live",
    OrderEvent.Kind.PARTIALLY_FILLED: "partially_filled",
    OrderEvent.Kind.FILLED: "filled",
    OrderEvent.Kind.CANCELLED: "cancelled",
    OrderEvent.Kind.REJECTED: "rejected",
    OrderEvent.Kind.FAILED: "failed",
    OrderEvent.Kind.LOST: "lost",
}
_FAILURES = {OrderEvent.Kind.REJECTED, OrderEvent.Kind.FAILED, OrderEvent.Kind.LOST}


@dataclass(frozen=True)
class SignalExecution:
    signal: Signal
    followers: list[FollowerExecution]
    summary: ExecutionSummary


def signal_list_for_user(*, user: User, order_key: str | None = None) -> QuerySet[Signal]:
    """Signals with at least one order on the user's accounts (staff: every signal), newest first."""
    signals = Signal.objects.all() if user.is_staff else Signal.objects.filter(orders__account__user=user).distinct()
    if order_key is not None:
        signals = signals.filter(orders__order_key=order_key)
    return signals.select_related("strategy").order_by("-received_at", "-id")


def signal_execution(*, signal: Signal, user: User | None = None) -> SignalExecution:
    """The signal's followers (only `user`'s own accounts unless staff or None) with their times from the
    order events, their average fill prices from the Trade ledger and, while an order is still being placed,
    its last create error. Four queries."""
    rows = signal.orders.order_by("id")
    if user is not None and not user.is_staff:
        rows = rows.filter(account__user=user)
    members = list(rows)
    keys = [m.order_key for m in members]
    events: dict[str, list[tuple[str, datetime, dict]]] = {}
    for key, kind, at, details in (
        OrderEvent.objects.filter(order_key__in=keys)
        .order_by("id")
        .values_list("order_key", "kind", "created_at", "details")
    ):
        events.setdefault(str(key), []).append((kind, at, details))
    # An order still being placed whose last create failed (e.g. refused for funds) says why meanwhile.
    pending_errors = {
        str(key): f"{kind or 'error'}: {error}"
        for key, error, kind in PendingOrder.objects.filter(order_key__in=keys)
        .exclude(last_error="")
        .values_list("order_key", "last_error", "last_error_kind")
    }
    fills: dict[str, tuple[Decimal, Decimal]] = {}  # order_key → (filled quantity, Σ price × quantity)
    for trade_key, filled, average in Trade.objects.filter(order_key__in=keys).values_list(
        "order_key", "cumulative_filled", "average_price"
    ):
        quantity, notional = fills.get(str(trade_key), (Decimal(0), Decimal(0)))
        fills[str(trade_key)] = (quantity + filled, notional + filled * average)
    followers = []
    for member in members:
        history = events.get(str(member.order_key), [])

        def first(kind: str, history: list = history) -> datetime | None:
            return next((at for k, at, _ in history if k == kind), None)

        failure = next(
            (
                f"{k}: {details.get('reason') or details.get('error') or k}"
                for k, _, details in history
                if k in _FAILURES
            ),
            "",
        ) or pending_errors.get(str(member.order_key), "")

        filled, notional = fills.get(str(member.order_key), (Decimal(0), Decimal(0)))
        followers.append(
            FollowerExecution(
                order_key=str(member.order_key),
                account_id=member.account_id,
                side=member.side,
                order_type=member.order_type,
                quantity=member.quantity,
                reference_price=member.reference_price,
                queued_at=first(OrderEvent.Kind.QUEUED),
                submitted_at=first(OrderEvent.Kind.SUBMITTING),
                acknowledged_at=first(OrderEvent.Kind.PLACED),
                filled_at=first(OrderEvent.Kind.FILLED),
                filled_quantity=filled,
                fill_price=(notional / filled).quantize(Decimal("1e-12")) if filled > 0 else None,
                outcome=_OUTCOME_OF_EVENT.get(history[-1][0], history[-1][0]) if history else "queued",
                failure=failure[:300],
            )
        )
    return SignalExecution(
        signal=signal,
        followers=followers,
        summary=execution_summarize(received_at=signal.received_at, followers=followers),
    )
