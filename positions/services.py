"""Position services: unrealized PnL and its roll-up into StrategyCapital (SPEC §4.5); daily performance (§4.10)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Q, Sum

from accounts.allocation import allocate
from accounts.models import CapitalSnapshot, Strategy, StrategyAccount, StrategyCapital
from core.money import ZERO, quantize
from exchanges.selectors import price_for_valuation
from positions.arithmetic import unrealized_pnl
from positions.models import Fill, Position, StrategyDailyPerformance
from positions.performance import (
    FillFacts,
    day_bounds,
    day_tally,
    local_day,
    max_drawdown,
    percent_of,
    return_window,
    risk_figures,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UnrealizedReport:
    valued: int  # open positions priced and stored
    flat: int  # flat positions whose stale unrealized PnL was reset to 0
    skipped: int  # open positions without a fresh price (kept their last value)
    capitals: int  # StrategyCapital rows written
    skipped_keys: tuple[str, ...] = ()


def positions_unrealized_update(*, now: datetime) -> UnrealizedReport:
    """Value every open position at its (account's exchange, strategy's market type, symbol) price.

    Long q·(last − entry), short |q|·(entry − last), with `price_for_valuation` (at most
    PRICE_MAX_AGE_VALUE old). A position without a fresh price is skipped and keeps its last
    value; flat positions go to 0. Each StrategyCapital.current_pnl becomes the sum of its
    positions' stored unrealized PnL (the row is created when missing). Only the unrealized
    columns are written, so a fill landing meanwhile keeps its quantity; its new value
    follows on the next run.
    """
    positions = list(
        Position.objects.filter(~Q(quantity=0) | ~Q(unrealized_pnl=0))
        .select_related("strategy_account__account", "strategy_account__strategy")
        .order_by("pk")
    )
    prices: dict[tuple[str, str, str], Decimal | None] = {}
    changed: list[Position] = []
    valued = flat = 0
    skipped: list[str] = []
    for position in positions:
        if position.quantity == 0:
            position.unrealized_pnl, position.unrealized_updated_at = ZERO, now
            changed.append(position)
            flat += 1
            continue
        sa = position.strategy_account
        key = (sa.account.exchange, sa.strategy.market_type, position.symbol)
        if key not in prices:
            prices[key] = price_for_valuation(exchange=key[0], market_type=key[1], symbol=key[2], now=now)
        last = prices[key]
        if last is None:
            skipped.append(":".join(key))
            continue
        value = unrealized_pnl(quantity=position.quantity, average_entry=position.average_entry, last_price=last)
        position.unrealized_pnl = quantize(value)
        position.unrealized_updated_at = now
        changed.append(position)
        valued += 1
    totals: dict[int, Decimal] = {}
    for position in positions:
        totals[position.strategy_account_id] = totals.get(position.strategy_account_id, ZERO) + position.unrealized_pnl
    with transaction.atomic():
        Position.objects.bulk_update(changed, ["unrealized_pnl", "unrealized_updated_at"], batch_size=500)
        StrategyCapital.objects.bulk_create(
            [StrategyCapital(strategy_account_id=sa_id, current_pnl=total) for sa_id, total in sorted(totals.items())],
            batch_size=500,
            update_conflicts=True,
            unique_fields=["strategy_account"],
            update_fields=["current_pnl"],
        )
    if skipped:
        logger.info(
            "unrealized PnL: %d positions without a fresh price: %s", len(skipped), ", ".join(sorted(set(skipped)))
        )
    return UnrealizedReport(
        valued=valued, flat=flat, skipped=len(skipped), capitals=len(totals), skipped_keys=tuple(sorted(set(skipped)))
    )


# --- Daily performance (SPEC §4.10) --------------------------------------------------------

PERF_QUANTUM = Decimal("1e-12")
RATIO_LIMIT = Decimal("1e15")
PERF_FIELDS = (
    "daily_pnl",
    "cumulative_pnl",
    "daily_return",
    "cumulative_return",
    "trades",
    "winning",
    "losing",
    "win_rate",
    "fees",
    "volatility",
    "sharpe",
    "sortino",
    "sharpe_annualized",
    "sortino_annualized",
    "max_drawdown",
    "max_drawdown_pct",
)


@dataclass(frozen=True)
class PerformanceReport:
    strategies: int  # active strategies looked at
    written: int  # rows inserted or changed
    unchanged: int  # rows recomputed to the values already stored
    first_day: date | None = None
    last_day: date | None = None


@dataclass
class _StrategyHistory:
    """The stored rows of one strategy, kept current while days are computed in order."""

    first_day: date | None
    rows: dict[date, StrategyDailyPerformance] = field(default_factory=dict)

    def returns(self) -> dict[date, Decimal | None]:
        return {day: row.daily_return for day, row in self.rows.items()}

    def cumulative_before(self, day: date) -> list[Decimal]:
        return [row.cumulative_pnl for d, row in sorted(self.rows.items()) if d < day]


def _q(value: Decimal | None) -> Decimal | None:
    return None if value is None else value.quantize(PERF_QUANTUM)


def _ratio(value: Decimal | None) -> Decimal | None:
    """A ratio or % quantized for storage; None when it does not fit the column (16 integer digits),
    which only a capital base of dust produces, where the figure means nothing anyway."""
    if value is None or abs(value) >= RATIO_LIMIT:
        return None
    return value.quantize(PERF_QUANTUM)


def _timezone() -> str:
    return settings.SCHEDULER_TIMEZONE


def performance_last_complete_day(*, now: datetime) -> date:
    """Yesterday in the scheduler timezone (KST): the newest day that is over."""
    return local_day(now, _timezone()) - timedelta(days=1)


def _realized_between(*, strategy_account_id: int, since: datetime, until: datetime) -> Decimal:
    """Σ realized PnL of the StrategyAccount's Fills in (since, until]; negated when until < since."""
    if since == until:
        return ZERO
    low, high, sign = (since, until, 1) if since < until else (until, since, -1)
    total = Fill.objects.filter(
        strategy_account_id=strategy_account_id, filled_at__gt=low, filled_at__lte=high
    ).aggregate(total=Sum("realized_pnl"))["total"]
    return sign * (total or ZERO)


def _allocation_basis(snapshot: CapitalSnapshot) -> datetime:
    """When an allocation's total was true: a FALLBACK snapshot repeats an older LIVE reading
    (the same rule the allocation itself uses for the watermark, SPEC §4.11)."""
    if snapshot.source == CapitalSnapshot.Source.FALLBACK and snapshot.fallback_of is not None:
        return snapshot.fallback_of.taken_at
    return snapshot.taken_at


def _allocated_share(*, strategy_account: StrategyAccount, total: Decimal) -> Decimal:
    """This StrategyAccount's part of an allocation of `total`, split by today's active weights (the
    weights of that moment are not recorded; they change only by hand)."""
    weights = dict(
        StrategyAccount.objects.filter(
            account_id=strategy_account.account_id,
            strategy__market_type=strategy_account.strategy.market_type,
            is_active=True,
            strategy__is_active=True,
        ).values_list("pk", "weight")
    )
    if sum(weights.values(), ZERO) <= 0 or strategy_account.pk not in weights:
        return ZERO
    return allocate(total, weights)[strategy_account.pk]


def _capital_at(capital: StrategyCapital, *, at: datetime) -> Decimal:
    """One StrategyCapital's allocated capital as it stood at `at` (see performance_capital_at)."""
    sa = capital.strategy_account
    allocations = sorted(
        (
            (_allocation_basis(snapshot), snapshot)
            for snapshot in CapitalSnapshot.objects.filter(
                account_id=sa.account_id, market_type=sa.strategy.market_type, used_for_allocation=True
            ).select_related("fallback_of")
        ),
        key=lambda pair: (pair[0], pair[1].pk),
    )
    if not allocations or allocations[-1][0] <= at:
        # The current allocation already stood at `at`: undo (or add) the PnL compounded between
        # `at` and the watermark. Without a watermark nothing was ever compounded.
        watermark = capital.pnl_reflected_until
        if watermark is None:
            return capital.allocated_capital
        return capital.allocated_capital + _realized_between(strategy_account_id=sa.pk, since=watermark, until=at)
    earlier = [(basis, snapshot) for basis, snapshot in allocations if basis <= at]
    if not earlier:
        # First allocated after `at`: the capital it started with.
        return _allocated_share(strategy_account=sa, total=allocations[0][1].total)
    basis, snapshot = earlier[-1]
    # Reallocated since `at`: the allocation in force then, compounded up to `at`.
    return _allocated_share(strategy_account=sa, total=snapshot.total) + _realized_between(
        strategy_account_id=sa.pk, since=basis, until=at
    )


def performance_capital_at(*, strategy: Strategy, at: datetime) -> Decimal:
    """Σ allocated capital over the strategy's active StrategyAccounts on active accounts, as it
    stood at `at`, reconstructed from today's StrategyCapital, the allocation snapshots
    (CapitalSnapshot.used_for_allocation) and the realized PnL of Fills (SPEC §4.10, §4.11).

    Compounding (§4.11) adds realized PnL to allocated_capital up to a watermark, whenever the
    hourly job happens to run; the capital "at `at`" is the allocation then in force plus every
    realized PnL after its basis up to `at` — independent of when compounding ran, so a
    catch-up days later gives the same figure as a run on time.
    """
    capitals = StrategyCapital.objects.filter(
        strategy_account__strategy=strategy,
        strategy_account__is_active=True,
        strategy_account__account__is_active=True,
    ).select_related("strategy_account__strategy")
    return sum((_capital_at(capital, at=at) for capital in capitals), ZERO)


def _quote_of(symbol: str) -> str:
    return symbol.rpartition("/")[2].partition(":")[0]


def _history_load(strategy: Strategy) -> _StrategyHistory:
    rows = {row.day: row for row in StrategyDailyPerformance.objects.filter(strategy=strategy)}
    return _StrategyHistory(first_day=min(rows) if rows else None, rows=rows)


def performance_first_day(*, strategy: Strategy, until: date) -> date | None:
    """The first day the scheduled job computes for a strategy: the day after its newest row, or,
    without rows, the day of its first Fill (yesterday when it has none). None when up to date."""
    newest = StrategyDailyPerformance.objects.filter(strategy=strategy).order_by("-day").first()
    if newest is not None:
        start = newest.day + timedelta(days=1)
    else:
        first_fill = (
            Fill.objects.filter(strategy_account__strategy=strategy).order_by("filled_at").values("filled_at").first()
        )
        start = local_day(first_fill["filled_at"], _timezone()) if first_fill else until
    return start if start <= until else None


def performance_day_compute(
    *, strategy: Strategy, day: date, now: datetime, history: _StrategyHistory | None = None
) -> tuple[StrategyDailyPerformance, bool]:
    """Compute and upsert the StrategyDailyPerformance row of (strategy, KST day).

    capital_base is Σ allocated at the day's start: the previous day's `next_capital_base` (its
    capital at the day's end) when that row exists, else reconstructed by
    performance_capital_at; next_capital_base is reconstructed at the day's end, never "now"
    (a first day or a catch-up would otherwise count the day's compounded PnL in its own base).
    An existing row keeps both capital figures. Risk figures read the stored rows of earlier days,
    so days must be computed oldest first. A re-run that yields the stored values writes
    nothing. Returns (row, written). One upsert statement (INSERT … ON CONFLICT); idempotent.
    """
    tz = _timezone()
    if history is None:
        history = _history_load(strategy)
    start, end = day_bounds(day, tz)
    existing = history.rows.get(day)
    if existing is not None:
        capital_base, next_capital_base = existing.capital_base, existing.next_capital_base
    else:
        next_capital_base = _q(performance_capital_at(strategy=strategy, at=end))
        previous = history.rows.get(day - timedelta(days=1))
        if previous is not None:
            capital_base = previous.next_capital_base
        else:
            capital_base = _q(performance_capital_at(strategy=strategy, at=start))

    fills = Fill.objects.filter(strategy_account__strategy=strategy, filled_at__gte=start, filled_at__lt=end)
    facts = [
        FillFacts(
            realized_pnl=realized,
            # Fees in another currency (BNB, the base asset) cannot be added without a price.
            fee=fee if fee_currency in ("", _quote_of(symbol)) else ZERO,
        )
        for realized, fee, fee_currency, symbol in fills.values_list("realized_pnl", "fee", "fee_currency", "symbol")
    ]
    tally = day_tally(facts)
    cumulative = (
        Fill.objects.filter(strategy_account__strategy=strategy, filled_at__lt=end).aggregate(
            total=Sum("realized_pnl")
        )["total"]
        or ZERO
    )
    daily_return = _ratio(percent_of(tally.daily_pnl, capital_base))
    first_day = min(history.first_day, day) if history.first_day else day
    returns = history.returns()
    returns[day] = daily_return
    risk = risk_figures(return_window(returns, day=day, first_day=first_day))
    drawdown = max_drawdown([*history.cumulative_before(day), cumulative])

    values = {
        "daily_pnl": _q(tally.daily_pnl),
        "cumulative_pnl": _q(cumulative),
        "daily_return": daily_return,
        "cumulative_return": _ratio(percent_of(cumulative, capital_base)),
        "trades": tally.trades,
        "winning": tally.winning,
        "losing": tally.losing,
        "win_rate": _ratio(tally.win_rate),
        "fees": _q(tally.fees),
        "volatility": _ratio(risk.volatility),
        "sharpe": _ratio(risk.sharpe),
        "sortino": _ratio(risk.sortino),
        "sharpe_annualized": _ratio(risk.sharpe_annualized),
        "sortino_annualized": _ratio(risk.sortino_annualized),
        "max_drawdown": _q(drawdown.amount),
        "max_drawdown_pct": _ratio(drawdown.pct) or ZERO,
    }
    if existing is not None and all(getattr(existing, name) == values[name] for name in PERF_FIELDS):
        return existing, False
    row = StrategyDailyPerformance(
        strategy=strategy,
        day=day,
        capital_base=capital_base,
        next_capital_base=next_capital_base,
        computed_at=now,
        **values,
    )
    # ON CONFLICT keeps the stored capital figures even if another writer inserted the row meanwhile.
    StrategyDailyPerformance.objects.bulk_create(
        [row],
        update_conflicts=True,
        unique_fields=["strategy", "day"],
        update_fields=[*PERF_FIELDS, "computed_at"],
    )
    row = StrategyDailyPerformance.objects.get(strategy=strategy, day=day)
    history.rows[day] = row
    if history.first_day is None or day < history.first_day:
        history.first_day = day
    return row, True


def performance_strategy_update(
    *,
    strategy: Strategy,
    since: date,
    until: date,
    now: datetime,
    progress: Callable[[Strategy, date], None] | None = None,
) -> tuple[int, int]:
    """Compute every day of [since, until] for one strategy, oldest first. Returns (written, unchanged)."""
    history = _history_load(strategy)
    written = unchanged = 0
    day = since
    while day <= until:
        _, changed = performance_day_compute(strategy=strategy, day=day, now=now, history=history)
        written += changed
        unchanged += not changed
        if progress is not None:
            progress(strategy, day)
        day += timedelta(days=1)
    return written, unchanged


def performance_update_all(*, now: datetime) -> PerformanceReport:
    """The scheduled job's work: for each active strategy, every day after its newest row up to
    yesterday (KST); a strategy without rows starts at its first Fill's day (yesterday without
    fills). Missed days (the leader was down) are therefore all computed on the next run."""
    until = performance_last_complete_day(now=now)
    strategies = list(Strategy.objects.filter(is_active=True).order_by("pk"))
    written = unchanged = 0
    first: date | None = None
    last: date | None = None
    for strategy in strategies:
        since = performance_first_day(strategy=strategy, until=until)
        if since is None:
            continue
        w, u = performance_strategy_update(strategy=strategy, since=since, until=until, now=now)
        written, unchanged = written + w, unchanged + u
        first = since if first is None else min(first, since)
        last = until
    return PerformanceReport(
        strategies=len(strategies), written=written, unchanged=unchanged, first_day=first, last_day=last
    )


def performance_backfill(
    *,
    since: date,
    until: date,
    now: datetime,
    strategies: Sequence[Strategy] | None = None,
    progress: Callable[[Strategy, date], None] | None = None,
) -> PerformanceReport:
    """Recompute [since, until] for the given (default: active) strategies; rows present keep their
    capital_base. Raises ValueError when the range is reversed or not over yet (after yesterday, KST)."""
    if until < since:
        raise ValueError(f"--until {until} is before --since {since}")
    latest = performance_last_complete_day(now=now)
    if until > latest:
        raise ValueError(f"{until} is not over yet in {_timezone()}: the newest complete day is {latest}")
    chosen = list(strategies) if strategies is not None else list(Strategy.objects.filter(is_active=True))
    written = unchanged = 0
    for strategy in sorted(chosen, key=lambda s: s.pk):
        w, u = performance_strategy_update(strategy=strategy, since=since, until=until, now=now, progress=progress)
        written, unchanged = written + w, unchanged + u
    return PerformanceReport(
        strategies=len(chosen), written=written, unchanged=unchanged, first_day=since, last_day=until
    )
