"""Daily performance metrics (SPEC §4.10). Pure: no ORM, no clock, no network; Decimal in, Decimal out."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from core.money import ZERO

HUNDRED = Decimal("100")
DAYS_PER_YEAR = Decimal("365")
SQRT_YEAR = DAYS_PER_YEAR.sqrt()
WINDOW_DAYS = 30


@dataclass(frozen=True)
class FillFacts:
    """What the day's metrics need of one fill."""

    realized_pnl: Decimal
    fee: Decimal  # in the quote currency; fees in other currencies are left out by the caller


@dataclass(frozen=True)
class DayTally:
    trades: int  # fills in the day
    winning: int  # closing fills with realized > 0
    losing: int  # closing fills with realized < 0
    win_rate: Decimal | None  # % of closing fills that won; None without closing fills
    fees: Decimal
    daily_pnl: Decimal  # Σ realized (gross)


@dataclass(frozen=True)
class RiskFigures:
    volatility: Decimal | None
    sharpe: Decimal | None
    sortino: Decimal | None
    sharpe_annualized: Decimal | None
    sortino_annualized: Decimal | None


@dataclass(frozen=True)
class Drawdown:
    amount: Decimal  # in the quote currency, ≥ 0
    pct: Decimal  # % of the peak it fell from; 0 when that peak ≤ 0


def day_bounds(day: date, tz: str) -> tuple[datetime, datetime]:
    """[00:00, next 00:00) of `day` in timezone `tz`, as aware UTC datetimes."""
    zone = ZoneInfo(tz)
    start = datetime.combine(day, time(0), tzinfo=zone)
    end = datetime.combine(day + timedelta(days=1), time(0), tzinfo=zone)
    return start.astimezone(UTC), end.astimezone(UTC)


def local_day(moment: datetime, tz: str) -> date:
    """The calendar day of an aware datetime in timezone `tz`."""
    return moment.astimezone(ZoneInfo(tz)).date()


def day_tally(fills: Iterable[FillFacts]) -> DayTally:
    """Count, win/loss over closing fills (realized ≠ 0), fees and Σ realized of one day's fills."""
    trades = winning = losing = 0
    fees = pnl = ZERO
    for fill in fills:
        trades += 1
        fees += fill.fee
        pnl += fill.realized_pnl
        if fill.realized_pnl > 0:
            winning += 1
        elif fill.realized_pnl < 0:
            losing += 1
    closing = winning + losing
    win_rate = Decimal(winning) * HUNDRED / Decimal(closing) if closing else None
    return DayTally(trades=trades, winning=winning, losing=losing, win_rate=win_rate, fees=fees, daily_pnl=pnl)


def percent_of(amount: Decimal, base: Decimal) -> Decimal | None:
    """amount as % of base; None when the base is not positive (a return on nothing is undefined)."""
    if base <= 0:
        return None
    return amount * HUNDRED / base


def return_window(returns: dict[date, Decimal | None], *, day: date, first_day: date) -> list[Decimal]:
    """The daily returns of the 30 days ending at `day`, from `first_day` (the strategy's first row) on.

    A day without a value (no row, or no return because the base was 0) counts as 0.
    """
    start = max(first_day, day - timedelta(days=WINDOW_DAYS - 1))
    values = []
    current = start
    while current <= day:
        value = returns.get(current)
        values.append(ZERO if value is None else value)
        current += timedelta(days=1)
    return values


def mean(values: Sequence[Decimal]) -> Decimal:
    return sum(values, ZERO) / Decimal(len(values))


def sample_std(values: Sequence[Decimal]) -> Decimal | None:
    """Sample standard deviation (n − 1); None below 2 values."""
    if len(values) < 2:
        return None
    m = mean(values)
    variance = sum(((v - m) ** 2 for v in values), ZERO) / Decimal(len(values) - 1)
    return variance.sqrt()


def risk_figures(returns: Sequence[Decimal]) -> RiskFigures:
    """Volatility = sample std; Sharpe = mean / std; Sortino = mean / std of the negative returns.

    Each is None below 2 values (2 negative values for Sortino) or when its std is 0; the
    annualized forms are × √365.
    """
    std = sample_std(returns)
    if std is None:
        return RiskFigures(None, None, None, None, None)
    m = mean(returns)
    sharpe = m / std if std > 0 else None
    downside = sample_std([r for r in returns if r < 0])
    sortino = m / downside if downside else None
    return RiskFigures(
        volatility=std,
        sharpe=sharpe,
        sortino=sortino,
        sharpe_annualized=None if sharpe is None else sharpe * SQRT_YEAR,
        sortino_annualized=None if sortino is None else sortino * SQRT_YEAR,
    )


def max_drawdown(cumulative: Iterable[Decimal]) -> Drawdown:
    """Largest fall of cumulative PnL from a running peak that starts at 0 (nothing earned yet).

    The % is of the peak that largest fall started from, 0 when that peak ≤ 0; on equal
    falls the first one counts.
    """
    peak = ZERO
    worst = ZERO
    worst_peak = ZERO
    for value in cumulative:
        if value > peak:
            peak = value
        fall = peak - value
        if fall > worst:
            worst, worst_peak = fall, peak
    pct = worst * HUNDRED / worst_peak if worst_peak > 0 else ZERO
    return Drawdown(amount=worst, pct=pct)
