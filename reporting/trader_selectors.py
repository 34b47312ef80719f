"""Trader dashboard reads: PnL series, positions, orders with their queue rank, fills and balances.

Every reader takes a `TraderScope`: staff see every account, anyone else only their own. Rows come
back as plain JSON-ready dicts: datetimes in DISPLAY_TIMEZONE, numbers as text formatted to the
market's precision (prices to the tick, quantities to the step; quote amounts to 2 decimals), plus
plain `*_value` numbers where a chart needs them. Read-only; no exchange calls.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Max, QuerySet, Sum
from django.db.models.functions import TruncDate

from accounts.models import Account, CapitalSnapshot, Strategy, StrategyAccount, StrategyCapital
from core.money import decimal_text
from exchanges.models import MarketInfo, PriceQuote
from orders.models import CancelRequestedBy, OpenOrder, OrderEvent, PendingOrder, Signal
from orders.ranking import QueueEntry, Slot, entry_of, rank_key
from orders.selectors import queue_slots_for, signal_execution
from orders.transitions import IDENTITY_FIELDS
from positions.arithmetic import unrealized_pnl
from positions.models import Fill, Position, StrategyDailyPerformance
from positions.performance import day_bounds, local_day

QUOTE_PLACES = 2  # PnL, fees, balances and capital: quote-currency amounts
PERFORMANCE_DAYS = 90
RECENT_FILLS = 50
ORDERS_LIMIT = 500
INTRADAY_POINTS = 2000
RECENT_SIGNALS = 8

Key = tuple[str, str, str]  # (exchange, market_type, symbol)


@dataclass(frozen=True)
class TraderScope:
    """Whose accounts a dashboard shows: every account (staff) or one user's."""

    user_id: int
    everything: bool

    @classmethod
    def for_user(cls, user: Any) -> TraderScope:
        return cls(user_id=user.pk, everything=bool(user.is_staff))

    def accounts(self, queryset: QuerySet, path: str = "account") -> QuerySet:
        """`queryset` narrowed to this scope's accounts; `path` leads from its model to Account."""
        return queryset if self.everything else queryset.filter(**{f"{path}__user_id": self.user_id})


@dataclass(frozen=True)
class Precision:
    price: int | None = None
    amount: int | None = None


def display_zone() -> ZoneInfo:
    return ZoneInfo(settings.DISPLAY_TIMEZONE)


def local_iso(value: datetime | None) -> str | None:
    return value.astimezone(display_zone()).isoformat() if value is not None else None


def money_text(value: Decimal | None) -> str:
    return decimal_text(value, QUOTE_PLACES)


def plain(value: Decimal | None) -> str | None:
    return decimal_text(value) if value is not None else None


def _rows_by_key(model: type[MarketInfo] | type[PriceQuote], keys: Iterable[Key], *fields: str) -> dict[Key, tuple]:
    """`fields` of the `model` rows (MarketInfo, PriceQuote) of the given (exchange, market_type, symbol)
    keys; one query, narrowed by exchange and symbol, the exact keys kept in Python."""
    wanted = set(keys)
    if not wanted:
        return {}
    rows = model.objects.filter(exchange__in={k[0] for k in wanted}, symbol__in={k[2] for k in wanted})
    return {
        (e, m, s): tuple(rest)
        for e, m, s, *rest in rows.values_list("exchange", "market_type", "symbol", *fields)
        if (e, m, s) in wanted
    }


def market_precisions(keys: Iterable[Key]) -> dict[Key, Precision]:
    """Price and amount decimals per (exchange, market_type, symbol) from MarketInfo; one query."""
    rows = _rows_by_key(MarketInfo, keys, "price_precision", "amount_precision")
    return {key: Precision(*values) for key, values in rows.items()}


def quotes_for(keys: Iterable[Key]) -> dict[Key, tuple[Decimal, datetime]]:
    """The stored last price and its time per key; one query on PriceQuote (every process writes it)."""
    return {key: (price, as_of) for key, (price, as_of) in _rows_by_key(PriceQuote, keys, "price", "as_of").items()}


# --- positions ------------------------------------------------------------------------------------


def trader_positions(*, scope: TraderScope, now: datetime) -> list[dict[str, Any]]:
    """Open positions with unrealized PnL marked to the stored last price (else the job's stored figure)."""
    positions = list(
        scope.accounts(Position.objects.exclude(quantity=0), "strategy_account__account")
        .select_related("strategy_account__strategy", "strategy_account__account")
        .order_by("strategy_account__account_id", "symbol", "strategy_account_id")
    )
    keys = {(p.strategy_account.account.exchange, p.market_type, p.symbol) for p in positions}
    precisions = market_precisions(keys)
    quotes = quotes_for(keys)
    rows = []
    for position in positions:
        account = position.strategy_account.account
        key = (account.exchange, position.market_type, position.symbol)
        precision = precisions.get(key, Precision())
        quote = quotes.get(key)
        if quote is not None and quote[1] >= now - timedelta(seconds=settings.PRICE_MAX_AGE_VALUE):
            mark, marked_at = quote
            pnl = unrealized_pnl(quantity=position.quantity, average_entry=position.average_entry, last_price=mark)
        else:
            mark, marked_at, pnl = None, position.unrealized_updated_at, position.unrealized_pnl
        rows.append(
            {
                "id": position.pk,
                "account": account.pk,
                "account_name": account.name,
                "strategy": position.strategy_account.strategy.group_name,
                "symbol": position.symbol,
                "market_type": position.market_type,
                "side": "LONG" if position.quantity > 0 else "SHORT",
                "quantity": decimal_text(abs(position.quantity), precision.amount),
                "average_entry": decimal_text(position.average_entry, precision.price),
                "mark_price": decimal_text(mark, precision.price) if mark is not None else None,
                "marked_at": local_iso(marked_at),
                "unrealized_pnl": money_text(pnl),
                "unrealized_value": plain(pnl),
                "realized_pnl": money_text(position.realized_pnl),
            }
        )
    return rows


# --- orders: queued and live, per bucket, with rank and slot ------------------------------------


def _slot_of(row: dict[str, Any]) -> Slot:
    if row["location"] == "queued":
        return Slot.SUBMITTING if row["status"] == PendingOrder.Status.SUBMITTING else Slot.QUEUED
    if row["status"] == OpenOrder.Status.CANCELLING:
        return Slot.CANCELLING
    if row["status"] in (OpenOrder.Status.PARTIALLY_FILLED, OpenOrder.Status.TRIGGERED):
        return Slot.PINNED
    return Slot.LIVE


def _express(row: dict[str, Any]) -> bool:
    return bool(row["express"]) or row["order_type"] == "MARKET"


def order_wait_reason(*, row: dict[str, Any], rank: int | None, size: int, slots: int, now: datetime) -> str:
    """Why an order is where it is, in words, from its slot state, its rank in the bucket and the slots.
    MARKET orders take the express lane, outside the slots: they have no rank (`rank` None)."""
    slot = _slot_of(row)
    where = f"rank {rank} of {size}, {slots} slot{'s' if slots != 1 else ''}"
    if row["cancel_requested_by"] == CancelRequestedBy.USER:
        return "cancel requested by the user"
    if slot == Slot.SUBMITTING:
        return "being placed on the exchange (outcome pending)"
    if _express(row):
        queued = slot == Slot.QUEUED
        return "MARKET order: placed within about a second, outside the slots" if queued else "MARKET order, live"
    if slot == Slot.CANCELLING:
        return f"being demoted: a better-ranked order takes its slot ({where})"
    if slot == Slot.PINNED:
        return "live and keeps its slot (partly filled or triggered)"
    if slot == Slot.LIVE:
        return f"live ({where})"
    if row["next_attempt_at"] is not None and row["next_attempt_at"] > now:
        at = row["next_attempt_at"].astimezone(display_zone())
        return f"placement failed ({row['last_error_kind'] or 'error'}); retry at {at:%H:%M:%S}"
    if rank is not None and rank <= slots:
        return f"next to be placed ({where})"
    return f"waits for a slot: {where} held by better-ranked orders"


ORDER_FIELDS = (
    *IDENTITY_FIELDS,
    "status",
    "account__name",
    "account__exchange",
    "strategy_account__strategy__group_name",
)


def trader_orders(*, scope: TraderScope, now: datetime, limit: int = ORDERS_LIMIT) -> dict[str, Any]:
    """Queued and live orders grouped per bucket (account, market type, symbol, LIMIT/STOP × side), each
    order with its rank in the bucket, the bucket's slots and why it waits. Two queries for the orders,
    one for the market rules; at most `limit` orders (newest signals first), `truncated` says how many more.
    """
    pending = scope.accounts(PendingOrder.objects.all()).values(*ORDER_FIELDS, "next_attempt_at", "last_error_kind")
    live = scope.accounts(OpenOrder.objects.all()).values(*ORDER_FIELDS, "exchange_order_id")
    rows = [{**r, "location": "queued"} for r in pending.order_by("-queue_seq")[: limit + 1]]
    rows += [
        {**r, "location": "live", "next_attempt_at": None, "last_error_kind": ""}
        for r in live.order_by("-queue_seq")[: limit + 1]
    ]
    rows.sort(key=lambda r: -r["queue_seq"])
    truncated = max(0, len(rows) - limit)
    rows = rows[:limit]
    keys = {(r["account__exchange"], r["market_type"], r["symbol"]) for r in rows}
    rules = _rows_by_key(MarketInfo, keys, "tick_size", "price_precision", "amount_precision")
    buckets: dict[tuple, list[tuple[QueueEntry, dict[str, Any]]]] = defaultdict(list)
    for row in rows:
        entry = entry_of(row, slot=_slot_of(row), triggered=row["status"] == OpenOrder.Status.TRIGGERED)
        buckets[(row["account_id"], row["market_type"], row["symbol"], entry.bucket.value)].append((entry, row))
    out = []
    for (account_id, market_type, symbol, bucket_name), members in sorted(buckets.items(), key=lambda i: i[0]):
        exchange = members[0][1]["account__exchange"]
        key = (exchange, market_type, symbol)
        tick, *places = rules.get(key, (None, None, None))
        precision = Precision(*places)
        slots = queue_slots_for(exchange=exchange, market_type=market_type)
        # As the queue ranks them: MARKET orders are placed at once, outside the bucket's ranking.
        ranked = sorted((m for m in members if not _express(m[1])), key=lambda m: rank_key(m[0], tick))
        numbered: list[tuple[int | None, QueueEntry, dict[str, Any]]] = [
            (rank, entry, row) for rank, (entry, row) in enumerate(ranked, start=1)
        ]
        numbered += [(None, entry, row) for entry, row in members if _express(row)]
        orders = []
        for rank, entry, row in numbered:
            orders.append(
                {
                    "order_key": entry.key,
                    "location": row["location"],
                    "status": row["status"],
                    "strategy": row["strategy_account__strategy__group_name"],
                    "side": row["side"],
                    "order_type": row["order_type"],
                    "price": decimal_text(row["price"], precision.price) if row["price"] is not None else None,
                    "stop_price": (
                        decimal_text(row["stop_price"], precision.price) if row["stop_price"] is not None else None
                    ),
                    "quantity": decimal_text(row["quantity"], precision.amount),
                    "filled_quantity": decimal_text(row["filled_quantity"], precision.amount),
                    "rank": rank,
                    "reason": order_wait_reason(row=row, rank=rank, size=len(ranked), slots=slots, now=now),
                }
            )
        out.append(
            {
                "account": account_id,
                "account_name": members[0][1]["account__name"],
                "exchange": exchange,
                "market_type": market_type,
                "symbol": symbol,
                "bucket": bucket_name,
                "slots": slots,
                "live": sum(1 for e, _ in members if e.slot != Slot.QUEUED),
                "orders": orders,
            }
        )
    return {"buckets": out, "truncated": truncated}


def order_event_marker(*, scope: TraderScope) -> int:
    """The newest OrderEvent id in scope: it moves whenever any order in scope changes. One query."""
    return scope.accounts(OrderEvent.objects.all()).aggregate(m=Max("id"))["m"] or 0


# --- fills ----------------------------------------------------------------------------------------


def _fill_rows(fills: Iterable[Fill]) -> list[dict[str, Any]]:
    fills = list(fills)
    keys = {(f.strategy_account.account.exchange, f.strategy_account.strategy.market_type, f.symbol) for f in fills}
    precisions = market_precisions(keys)
    rows = []
    for fill in fills:
        account = fill.strategy_account.account
        strategy = fill.strategy_account.strategy
        precision = precisions.get((account.exchange, strategy.market_type, fill.symbol), Precision())
        rows.append(
            {
                "id": fill.pk,
                "filled_at": local_iso(fill.filled_at),
                "account": account.pk,
                "account_name": account.name,
                "strategy": strategy.group_name,
                "symbol": fill.symbol,
                "market_type": strategy.market_type,
                "side": "BUY" if fill.delta_qty > 0 else "SELL",
                "quantity": decimal_text(abs(fill.delta_qty), precision.amount),
                "price": decimal_text(fill.price, precision.price),
                "fee": decimal_text(fill.fee),
                "fee_currency": fill.fee_currency,
                "realized_pnl": money_text(fill.realized_pnl),
                "realized_value": plain(fill.realized_pnl),
                "source": fill.source,
                "order_key": str(fill.trade.order_key) if fill.trade and fill.trade.order_key else None,
            }
        )
    return rows


def _fills(scope: TraderScope) -> QuerySet[Fill]:
    return scope.accounts(Fill.objects.all(), "strategy_account__account").select_related(
        "strategy_account__strategy", "strategy_account__account", "trade"
    )


def trader_fills_recent(*, scope: TraderScope, limit: int = RECENT_FILLS) -> list[dict[str, Any]]:
    """The newest fills, newest first."""
    return _fill_rows(_fills(scope).order_by("-id")[:limit])


def trader_fills_after(*, scope: TraderScope, after_id: int, exclude: set[int], limit: int) -> list[dict[str, Any]]:
    """Fills with id > after_id not in `exclude`, oldest first (the live feed's cursor read)."""
    return _fill_rows(_fills(scope).filter(id__gt=after_id).exclude(id__in=exclude).order_by("id")[:limit])


def fill_max_id() -> int:
    return Fill.objects.order_by("-id").values_list("id", flat=True).first() or 0


# --- balances -------------------------------------------------------------------------------------


def trader_balances(*, scope: TraderScope) -> list[dict[str, Any]]:
    """Per account and market type: the newest capital snapshot and each strategy's allocation and PnL.

    Three queries: newest snapshot ids per (account, market type), those rows, the capital rows.
    """
    newest = (
        scope.accounts(CapitalSnapshot.objects.all())
        .values("account_id", "market_type")
        .annotate(last=Max("id"))
        .values_list("last", flat=True)
    )
    snapshots = {(s.account_id, s.market_type): s for s in CapitalSnapshot.objects.filter(id__in=list(newest))}
    capitals = (
        scope.accounts(StrategyCapital.objects.all(), "strategy_account__account")
        .filter(strategy_account__is_active=True)
        .select_related("strategy_account__strategy", "strategy_account__account")
        .order_by("strategy_account__account_id", "strategy_account__strategy__group_name")
    )
    grouped: dict[tuple[int, str], dict[str, Any]] = {}

    def group(account: Account, market_type: str) -> dict[str, Any]:
        key = (account.pk, market_type)
        if key not in grouped:
            snapshot = snapshots.get(key)
            grouped[key] = {
                "account": account.pk,
                "account_name": account.name,
                "exchange": account.exchange,
                "market_type": market_type,
                "total": money_text(snapshot.total) if snapshot else None,
                "source": snapshot.source if snapshot else None,
                "taken_at": local_iso(snapshot.taken_at) if snapshot else None,
                "strategies": [],
            }
        return grouped[key]

    for capital in capitals:
        sa = capital.strategy_account
        group(sa.account, sa.strategy.market_type)["strategies"].append(
            {
                "strategy": sa.strategy.group_name,
                "allocated": money_text(capital.allocated_capital),
                "unrealized_pnl": money_text(capital.current_pnl),
            }
        )
    accounts = {a.pk: a for a in Account.objects.filter(pk__in={k[0] for k in snapshots})}
    for account_id, market_type in snapshots:
        group(accounts[account_id], market_type)
    return [grouped[key] for key in sorted(grouped)]


# --- performance: equity curve, daily PnL, drawdown per strategy ---------------------------------


def drawdown_series(cumulative: Iterable[Decimal]) -> list[Decimal]:
    """Distance below the running peak of cumulative PnL (≤ 0), the peak starting at 0 (no PnL yet)."""
    peak = Decimal(0)
    out = []
    for value in cumulative:
        peak = max(peak, value)
        out.append(value - peak)
    return out


def _visible_strategies(scope: TraderScope) -> dict[int, tuple[Strategy, bool]]:
    """Strategy id → (strategy, whether its stored daily rows may be shown).

    StrategyDailyPerformance sums every account of a strategy: a user who is not staff sees those rows
    only for strategies traded on their own accounts alone; for shared ones their series is computed
    from their own fills.
    """
    links = scope.accounts(StrategyAccount.objects.all()).select_related("strategy")
    strategies = {link.strategy_id: link.strategy for link in links}
    if scope.everything:
        return {sid: (s, True) for sid, s in strategies.items()}
    shared = set(
        StrategyAccount.objects.filter(strategy_id__in=strategies)
        .exclude(account__user_id=scope.user_id)
        .values_list("strategy_id", flat=True)
    )
    return {sid: (s, sid not in shared) for sid, s in strategies.items()}


def trader_performance(*, scope: TraderScope, now: datetime, days: int = PERFORMANCE_DAYS) -> list[dict[str, Any]]:
    """Per strategy: daily points (day, daily PnL, cumulative PnL, drawdown) for the last `days` days, and
    today's realized PnL curve from its fills.

    Days up to the last stored StrategyDailyPerformance row come from it; later days (today, and any
    day the daily job has not reached yet) are summed from the fills, so the curve moves with each
    fill; the series always ends today. Days are SCHEDULER_TIMEZONE calendar days (SPEC §3). Four queries.
    """
    tz = settings.SCHEDULER_TIMEZONE
    today = local_day(now, tz)
    first_day = today - timedelta(days=days - 1)
    visible = _visible_strategies(scope)
    stored: dict[int, list[StrategyDailyPerformance]] = defaultdict(list)
    for row in StrategyDailyPerformance.objects.filter(
        strategy_id__in=[sid for sid, (_, ok) in visible.items() if ok], day__gte=first_day
    ).order_by("day"):
        stored[row.strategy_id].append(row)
    # The newest stored day per strategy: fills after its end are summed live.
    last_stored = {sid: rows[-1].day for sid, rows in stored.items()}
    fills = _fills(scope).filter(strategy_account__strategy_id__in=list(visible))
    live_days: dict[int, dict[date, Decimal]] = defaultdict(dict)
    since = day_bounds(first_day, tz)[0]
    daily = (
        fills.filter(filled_at__gte=since)
        .annotate(day=TruncDate("filled_at", tzinfo=ZoneInfo(tz)))
        .values("strategy_account__strategy_id", "day")
        .annotate(pnl=Sum("realized_pnl"))
        .order_by()
    )
    for item in daily:
        sid, day = item["strategy_account__strategy_id"], item["day"]
        if sid in last_stored and day <= last_stored[sid]:
            continue
        live_days[sid][day] = item["pnl"] or Decimal(0)
    today_start = day_bounds(today, tz)[0]
    intraday: dict[int, list[tuple[datetime, Decimal]]] = defaultdict(list)
    for sid, at, pnl in (
        fills.filter(filled_at__gte=today_start)
        .order_by("filled_at", "id")
        .values_list("strategy_account__strategy_id", "filled_at", "realized_pnl")[:INTRADAY_POINTS]
    ):
        intraday[sid].append((at, pnl))

    out = []
    for sid, (strategy, _) in sorted(visible.items(), key=lambda i: i[1][0].group_name):
        points: list[tuple[date, Decimal, Decimal]] = [(r.day, r.daily_pnl, r.cumulative_pnl) for r in stored[sid]]
        cumulative = points[-1][2] if points else Decimal(0)
        for day in sorted(live_days[sid]):
            cumulative += live_days[sid][day]
            points.append((day, live_days[sid][day], cumulative))
        if not points or points[-1][0] < today:
            points.append((today, Decimal(0), cumulative))  # the curve reaches today even before a fill
        drawdowns = drawdown_series(p[2] for p in points)
        running = Decimal(0)
        curve = []
        for at, pnl in intraday[sid]:
            running += pnl
            curve.append({"at": local_iso(at), "value": plain(running)})
        out.append(
            {
                "strategy": strategy.group_name,
                "name": strategy.name,
                "market_type": strategy.market_type,
                "days": [
                    {
                        "day": day.isoformat(),
                        "daily_pnl": plain(pnl),
                        "cumulative_pnl": plain(cum),
                        "drawdown": plain(dd),
                    }
                    for (day, pnl, cum), dd in zip(points, drawdowns, strict=True)
                ],
                "cumulative_pnl": money_text(points[-1][2] if points else Decimal(0)),
                "today_pnl": money_text(sum((p for _, p in intraday[sid]), Decimal(0))),
                "max_drawdown": money_text(-min(drawdowns, default=Decimal(0))),
                "intraday": curve,
            }
        )
    return out


# --- the per-signal execution report (orders.selectors.signal_execution), newest signals ---------------


def _seconds(value: float | None) -> str | None:
    return f"{value:.2f}" if value is not None else None


def _bps(value: Decimal | None) -> str | None:
    return decimal_text(value, 1) if value is not None else None


def trader_signals(*, scope: TraderScope, limit: int = RECENT_SIGNALS) -> list[dict[str, Any]]:
    """The newest signals with orders in scope and their execution summary: followers by outcome, seconds
    from the signal to the exchange's acknowledgement and to the fill (median, p99), slippage in basis points
    (quantity-weighted and worst; positive is worse) and the first failures. A user who is not staff sees
    only their own followers. One query for the signals, then the report's four per signal."""
    signals = (
        Signal.objects.all() if scope.everything else Signal.objects.filter(orders__account__user_id=scope.user_id)
    )
    user = None if scope.everything else get_user_model().objects.filter(pk=scope.user_id).first()
    rows = []
    for signal in signals.distinct().select_related("strategy").order_by("-received_at", "-id")[:limit]:
        report = signal_execution(signal=signal, user=user)
        summary = report.summary
        rows.append(
            {
                "id": signal.pk,
                "received_at": local_iso(signal.received_at),
                "source": signal.source,
                "strategy": signal.strategy.group_name,
                "symbol": signal.symbol,
                "side": signal.side,
                "order_type": signal.order_type,
                "followers": summary.followers,
                "by_outcome": dict(sorted(summary.by_outcome.items())),
                "acknowledged_median_s": _seconds(summary.acknowledged.median),
                "acknowledged_p99_s": _seconds(summary.acknowledged.p99),
                "filled_median_s": _seconds(summary.filled.median),
                "slippage_avg_bps": _bps(summary.slippage_avg_bps),
                "slippage_worst_bps": _bps(summary.slippage_worst_bps),
                "failures": summary.failures[:3],
            }
        )
    return rows


def trader_snapshot(*, scope: TraderScope, now: datetime) -> dict[str, Any]:
    """Every panel of the trader dashboard at once (the page and the feed's first message)."""
    return {
        "display_timezone": settings.DISPLAY_TIMEZONE,
        "performance": trader_performance(scope=scope, now=now),
        "positions": trader_positions(scope=scope, now=now),
        "orders": trader_orders(scope=scope, now=now),
        "signals": trader_signals(scope=scope),
        "fills": trader_fills_recent(scope=scope),
        "balances": trader_balances(scope=scope),
    }
