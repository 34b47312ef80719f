"""The daily summary (SPEC §4.9): each user's figures for a KST day, the verdict, Telegram HTML, once per (user, day).

Definitions (all amounts in the quote currency, summed over the user's accounts, active or not):
- trade: a Trade row (one exchange order of one strategy account) with at least one fill in the
  day; ADJUSTMENT fills (dust closes) belong to no order and are not trades.
- volume: Σ |delta_qty| × price of the day's exchange fills (REST and STREAM; ADJUSTMENT fills are
  bookkeeping, not traded); average volume per trade = volume / trades.
- realized PnL: Σ realized_pnl of all the day's fills (gross, as in §4.3); win rate: % of the
  day's closing fills (realized ≠ 0) that won, as in §4.10.
- unrealized PnL: Σ Position.unrealized_pnl of the user's open positions, as last valued (§4.5);
  total PnL = realized + unrealized.
- changes vs yesterday: (today − yesterday) / |yesterday| × 100 of volume and of realized PnL;
  "n/a" when yesterday's figure is 0.
- the verdict judges the day's realized PnL (the day's own result, comparable with yesterday's),
  not the unrealized part, which carries moves of earlier days.
"""

from __future__ import annotations

import html
import logging
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from zoneinfo import ZoneInfo

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Sum

from accounts.models import Account, Strategy
from core.money import ZERO
from notifications.models import SummarySent
from notifications.services import outbox_enqueue, outbox_target
from orders.models import OpenOrder, PendingOrder, Signal
from orders.selectors import signal_execution
from orders.signal_report import DayExecution, execution_day
from positions.models import Fill, Position
from positions.performance import FillFacts, day_bounds, day_tally

logger = logging.getLogger(__name__)

SEND_AT = time(21, 3)  # the job's cron time (KST); the catch-up runs only after it, the same day
HUNDRED = Decimal(100)
CENT = Decimal("0.01")
TENTH = Decimal("0.1")

EXCELLENT = "excellent"
GOOD = "good"
PROFIT_LOW_WIN_RATE = "profit, low win rate"
LOSS = "loss — review strategies"
FLAT = "flat day"
VERDICT_ICONS = {EXCELLENT: "🚀", GOOD: "👍", PROFIT_LOW_WIN_RATE: "⚠️", LOSS: "🔻", FLAT: "➖"}


# --- Pure pieces ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class DayFigures:
    """One day's trading of one user."""

    trades: int = 0
    volume: Decimal = ZERO
    realized_pnl: Decimal = ZERO
    winning: int = 0
    losing: int = 0

    @property
    def win_rate(self) -> Decimal | None:
        """% of closing fills that won; None without closing fills."""
        closing = self.winning + self.losing
        return Decimal(self.winning) * HUNDRED / Decimal(closing) if closing else None


@dataclass(frozen=True)
class SummaryFigures:
    """Everything the message of one (user, day) shows."""

    day: date
    username: str
    today: DayFigures
    yesterday: DayFigures
    unrealized_pnl: Decimal
    active_strategies: int
    active_accounts: int
    open_positions: int
    queued_orders: int
    live_orders: int
    quote: str = ""  # the one quote currency of the figures, or "" when they mix several
    execution: DayExecution | None = None  # the day's copy execution; None without signals

    @property
    def total_pnl(self) -> Decimal:
        return self.today.realized_pnl + self.unrealized_pnl

    @property
    def average_volume(self) -> Decimal | None:
        return self.today.volume / self.today.trades if self.today.trades else None


def percent_change(today: Decimal, yesterday: Decimal) -> Decimal | None:
    """(today − yesterday) / |yesterday| × 100; None when yesterday is 0 (no base to compare with)."""
    if yesterday == 0:
        return None
    return (today - yesterday) * HUNDRED / abs(yesterday)


def summary_verdict(*, pnl: Decimal, win_rate: Decimal | None) -> str:
    """SPEC §4.9's table: > 0 and win rate ≥ 70 % excellent, ≥ 50 % good, else profit with a low win
    rate; < 0 a loss; 0 flat. A missing win rate (no closing fill) counts as below 50 %."""
    if pnl > 0:
        if win_rate is not None and win_rate >= 70:
            return EXCELLENT
        if win_rate is not None and win_rate >= 50:
            return GOOD
        return PROFIT_LOW_WIN_RATE
    if pnl < 0:
        return LOSS
    return FLAT


def _amount(value: Decimal, quote: str, *, signed: bool = False) -> str:
    rounded = value.quantize(CENT, rounding=ROUND_HALF_UP)
    if rounded == 0:
        rounded = ZERO.quantize(CENT)  # never "-0.00"
    text = f"{rounded:+,.2f}" if signed and rounded != 0 else f"{rounded:,.2f}"
    return f"{text} {html.escape(quote)}" if quote else text


def _percent(value: Decimal | None, *, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    rounded = value.quantize(TENTH, rounding=ROUND_HALF_UP)
    if rounded == 0:
        rounded = ZERO.quantize(TENTH)
    return f"{rounded:+.1f}%" if signed and rounded != 0 else f"{rounded:.1f}%"


def summary_format(figures: SummaryFigures) -> str:
    """The Telegram HTML of one summary; every dynamic text escaped. The outbox splits it if too long."""
    today, quote = figures.today, figures.quote
    verdict = summary_verdict(pnl=today.realized_pnl, win_rate=today.win_rate)
    average = "n/a" if figures.average_volume is None else _amount(figures.average_volume, quote)
    volume_change = _percent(percent_change(today.volume, figures.yesterday.volume), signed=True)
    pnl_change = _percent(percent_change(today.realized_pnl, figures.yesterday.realized_pnl), signed=True)
    lines = [
        f"📊 <b>Daily summary</b> · {figures.day.isoformat()} (KST)",
        f"👤 {html.escape(figures.username)}",
        "",
        "<b>Trading</b>",
        f"Trades: {today.trades} (average volume {average})",
        f"Volume: {_amount(today.volume, quote)} ({volume_change} vs yesterday)",
        f"Win rate: {_percent(today.win_rate)} ({today.winning} won, {today.losing} lost)",
        "",
        "<b>PnL</b>",
        f"Realized: {_amount(today.realized_pnl, quote, signed=True)} ({pnl_change} vs yesterday)",
        f"Unrealized: {_amount(figures.unrealized_pnl, quote, signed=True)}",
        f"Total: {_amount(figures.total_pnl, quote, signed=True)}",
        "",
        "<b>Book</b>",
        f"Active strategies: {figures.active_strategies} · active accounts: {figures.active_accounts}",
        f"Open positions: {figures.open_positions} · open orders: "
        f"{figures.queued_orders + figures.live_orders} ({figures.queued_orders} queued, {figures.live_orders} live)",
        "",
        *_execution_lines(figures.execution),
        f"<b>Verdict</b>: {VERDICT_ICONS[verdict]} {html.escape(verdict)}",
    ]
    return "\n".join(lines)


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} s"


def _bps(value: Decimal | None) -> str:
    return "n/a" if value is None else f"{value:+.1f} bps"


def _execution_lines(execution: DayExecution | None) -> list[str]:
    """The copy-execution section: how fast and how close the day's followers traded (none without signals)."""
    if execution is None or not execution.signals:
        return []
    outcomes = ", ".join(f"{n} {html.escape(k.replace('_', ' '))}" for k, n in execution.by_outcome.items())
    ack = execution.acknowledged
    return [
        "<b>Copy execution</b>",
        f"Signals: {execution.signals} · orders: {execution.orders} ({outcomes})",
        f"Signal to exchange: median {_seconds(ack.median)} · p99 {_seconds(ack.p99)} · last {_seconds(ack.last)}",
        f"Slippage: average {_bps(execution.slippage_avg_bps)} · worst {_bps(execution.slippage_worst_bps)}",
        "",
    ]


# --- Reads ---------------------------------------------------------------------------------------


def _quote_of(symbol: str) -> str:
    return symbol.partition("/")[2]


def summary_day_figures(*, user: Any, day: date, tz: str) -> tuple[DayFigures, set[str]]:
    """One user's trading in one KST day, and the quote currencies it involved."""
    start, end = day_bounds(day, tz)
    rows = Fill.objects.filter(
        strategy_account__account__user=user, filled_at__gte=start, filled_at__lt=end
    ).values_list("trade_id", "delta_qty", "price", "realized_pnl", "source", "symbol")
    trades: set[int] = set()
    volume = ZERO
    facts = []
    quotes: set[str] = set()
    for trade_id, delta_qty, price, realized_pnl, source, symbol in rows:
        facts.append(FillFacts(realized_pnl=realized_pnl, fee=ZERO))
        quotes.add(_quote_of(symbol))
        if source == Fill.Source.ADJUSTMENT:
            continue
        volume += abs(delta_qty) * price
        if trade_id is not None:
            trades.add(trade_id)
    tally = day_tally(facts)
    figures = DayFigures(
        trades=len(trades),
        volume=volume,
        realized_pnl=tally.daily_pnl,
        winning=tally.winning,
        losing=tally.losing,
    )
    return figures, quotes


def summary_figures(*, user: Any, day: date, tz: str) -> SummaryFigures:
    """Every figure of the (user, day) summary: the day and the day before, the book as it is now."""
    today, quotes = summary_day_figures(user=user, day=day, tz=tz)
    yesterday, _ = summary_day_figures(user=user, day=day - timedelta(days=1), tz=tz)
    positions = Position.objects.filter(strategy_account__account__user=user).exclude(quantity=0)
    quotes |= {_quote_of(symbol) for symbol in positions.values_list("symbol", flat=True)}
    active_strategies = (
        Strategy.objects.filter(
            is_active=True,
            strategy_accounts__is_active=True,
            strategy_accounts__account__user=user,
            strategy_accounts__account__is_active=True,
        )
        .distinct()
        .count()
    )
    return SummaryFigures(
        day=day,
        username=user.get_username(),
        today=today,
        yesterday=yesterday,
        unrealized_pnl=positions.aggregate(total=Sum("unrealized_pnl"))["total"] or ZERO,
        active_strategies=active_strategies,
        active_accounts=Account.objects.filter(user=user, is_active=True).count(),
        open_positions=positions.count(),
        queued_orders=PendingOrder.objects.filter(account__user=user).count(),
        live_orders=OpenOrder.objects.filter(account__user=user).count(),
        quote=quotes.pop() if len(quotes) == 1 else "",
        execution=summary_execution(user=user, day=day, tz=tz),
    )


def summary_execution(*, user: Any, day: date, tz: str) -> DayExecution | None:
    """The user's followers of the day's signals (their own accounts only); None when there were none."""
    start, end = day_bounds(day, tz)
    signals = (
        Signal.objects.filter(received_at__gte=start, received_at__lt=end, orders__account__user=user)
        .distinct()
        .order_by("received_at")
    )
    executions = [signal_execution(signal=signal, user=user) for signal in signals]
    if not executions:
        return None
    return execution_day([(e.signal.received_at, e.followers) for e in executions])


# --- Sending -------------------------------------------------------------------------------------


@dataclass
class SummaryReport:
    day: date
    users: int = 0
    sent: int = 0
    already: int = 0
    unconfigured: int = 0
    parts: int = 0
    sent_to: list[int] = field(default_factory=list)

    def summary(self) -> str:
        if not self.users:
            return f"{self.day}: no users with active accounts"
        if self.unconfigured == self.users:
            return f"{self.day}: no Telegram configured: 0 sent ({self.users} users with active accounts)"
        text = f"{self.day}: {self.sent} sent ({self.parts} messages), {self.already} already sent"
        if self.unconfigured:
            text += f", {self.unconfigured} without Telegram"
        return text


def summary_local_day(now: datetime) -> date:
    return now.astimezone(ZoneInfo(settings.SCHEDULER_TIMEZONE)).date()


def summary_send_all(*, day: date) -> SummaryReport:
    """Queue the summary of `day` for every user with an active account, once per (user, day).

    Per user, the SummarySent row and the outbox rows are written in one transaction; the unique
    (user, day) makes a second run, or a concurrent one, skip the user. A user with no Telegram
    target (own or global) is skipped without a SummarySent row, so configuring Telegram later
    the same day still sends it.
    """
    tz = settings.SCHEDULER_TIMEZONE
    report = SummaryReport(day=day)
    users = get_user_model().objects.filter(accounts__is_active=True).distinct().order_by("pk")
    for user in users:
        report.users += 1
        if SummarySent.objects.filter(user=user, day=day).exists():
            report.already += 1
            continue
        if outbox_target(user=user) is None:
            report.unconfigured += 1
            continue
        text = summary_format(summary_figures(user=user, day=day, tz=tz))
        try:
            with transaction.atomic():
                SummarySent.objects.create(user=user, day=day)
                rows = outbox_enqueue(text=text, user=user, dedupe_key=f"daily-summary:{user.pk}:{day.isoformat()}")
        except IntegrityError:
            report.already += 1  # a concurrent run got there first
            continue
        report.sent += 1
        report.parts += len(rows)
        report.sent_to.append(user.pk)
        logger.info("daily summary %s queued for user %s in %d parts", day, user.pk, len(rows))
    return report


def summary_catch_up_due(*, now: datetime) -> bool:
    """Leader catch-up condition (SPEC §2.2, §4.9): a leader starting after 21:03 KST sends the day's summary.

    Due only between 21:03 and midnight (SCHEDULER_TIMEZONE): a summary missed yesterday is not sent
    today. Users already served (SummarySent) are skipped by the job, so a leader change after the
    21:03 run sends nothing again.
    """
    return now.astimezone(ZoneInfo(settings.SCHEDULER_TIMEZONE)).time() >= SEND_AT
