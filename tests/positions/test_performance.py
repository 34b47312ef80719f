"""Daily performance (SPEC §4.10): hand-computed metrics, KST day boundaries, re-runs, catch-up, backfill."""

from __future__ import annotations

import io
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.core.management import CommandError, call_command

from accounts.models import StrategyCapital
from positions.jobs import calculate_daily_performance
from positions.models import Fill, StrategyDailyPerformance
from positions.performance import (
    FillFacts,
    day_bounds,
    day_tally,
    max_drawdown,
    percent_of,
    return_window,
    risk_figures,
)
from scheduler.models import JobRun, Leadership
from scheduler.services import catch_up_run
from tests.orders.factories import StrategyAccountFactory, StrategyFactory

D = Decimal
KST = ZoneInfo("Asia/Seoul")
SQRT_365 = 19.1049731745428


def kst(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0, us: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, second, us, tzinfo=KST)


def close(value: Decimal | None, expected: float, tol: float = 1e-9) -> bool:
    return value is not None and abs(float(value) - expected) <= tol * max(1.0, abs(expected))


# --- pure functions ------------------------------------------------------------------------


def test_day_bounds_are_the_kst_calendar_day_in_utc():
    start, end = day_bounds(date(2025, 3, 1), "Asia/Seoul")
    assert start == datetime(2025, 2, 28, 15, 0, tzinfo=UTC)
    assert end == datetime(2025, 3, 1, 15, 0, tzinfo=UTC)


def test_day_tally_counts_closing_fills_only():
    tally = day_tally(
        [FillFacts(D("30"), D("1")), FillFacts(D("-10"), D("1")), FillFacts(D("0"), D("0.5"))],
    )
    assert (tally.trades, tally.winning, tally.losing) == (3, 1, 1)
    assert tally.win_rate == D("50")
    assert tally.fees == D("2.5")
    assert tally.daily_pnl == D("20")
    empty = day_tally([])
    assert empty.win_rate is None and empty.daily_pnl == 0 and empty.trades == 0


def test_percent_of_needs_a_positive_base():
    assert percent_of(D("20"), D("1000")) == D("2")
    assert percent_of(D("20"), D("0")) is None


def test_risk_figures_hand_computed():
    # returns 2, -5, -1, 0, 5.5 (%): mean 0.3; Σ(x−m)² = 59.8, /4 = 14.95, std = √14.95
    figures = risk_figures([D("2"), D("-5"), D("-1"), D("0"), D("5.5")])
    assert close(figures.volatility, 3.8665229858362413)
    assert close(figures.sharpe, 0.3 / 3.8665229858362413)
    # negative returns −5, −1: std √8
    assert close(figures.sortino, 0.3 / 2.8284271247461903)
    assert close(figures.sharpe_annualized, 0.07758909001678074 * SQRT_365)
    assert close(figures.sortino_annualized, 0.10606601717798211 * SQRT_365)


def test_risk_figures_none_below_two_values():
    assert risk_figures([D("2")]).volatility is None
    one_negative = risk_figures([D("2"), D("-5")])
    assert close(one_negative.volatility, 4.949747468305833)
    assert one_negative.sortino is None and one_negative.sortino_annualized is None
    flat = risk_figures([D("0"), D("0"), D("0")])
    assert flat.volatility == 0 and flat.sharpe is None


def test_return_window_is_thirty_days_and_fills_gaps_with_zero():
    day = date(2025, 4, 30)
    returns = {day - timedelta(days=n): D(n + 1) for n in range(40)}
    del returns[day - timedelta(days=3)]
    window = return_window(returns, day=day, first_day=date(2025, 1, 1))
    assert len(window) == 30
    assert window[0] == D("30") and window[-1] == D("1") and window[-4] == 0
    assert return_window(returns, day=day, first_day=day - timedelta(days=1)) == [D("2"), D("1")]


def test_max_drawdown_from_a_peak_starting_at_zero():
    dd = max_drawdown([D("20"), D("-30"), D("-40"), D("-40"), D("15")])
    assert dd.amount == D("60") and dd.pct == D("300")
    below_zero = max_drawdown([D("-10"), D("-25")])
    assert below_zero.amount == D("25") and below_zero.pct == 0
    assert max_drawdown([D("5"), D("10")]).amount == 0


# --- the job -------------------------------------------------------------------------------


def fill(sa, at: datetime, realized: str, *, fee: str = "0", fee_currency: str = "USDT") -> Fill:  # noqa: ANN001
    return Fill.objects.create(
        trade=None,
        strategy_account=sa,
        symbol="BTC/USDT",
        cum_filled_after=0,
        delta_qty=D("-1") if D(realized) else D("1"),
        price=D("100"),
        fee=D(fee),
        fee_currency=fee_currency,
        realized_pnl=D(realized),
        filled_at=at,
        source=Fill.Source.ADJUSTMENT,
    )


@pytest.fixture
def strategy(db):  # noqa: ANN001
    strategy = StrategyFactory()
    sa1 = StrategyAccountFactory(strategy=strategy)
    sa2 = StrategyAccountFactory(strategy=strategy)
    StrategyCapital.objects.create(strategy_account=sa1, allocated_capital=D("600"))
    StrategyCapital.objects.create(strategy_account=sa2, allocated_capital=D("400"))
    strategy.sas = (sa1, sa2)
    return strategy


@pytest.fixture
def series(strategy):  # noqa: ANN001
    """Five KST days: +20, −50, −10, nothing, +55 on a capital of 1000."""
    sa1, sa2 = strategy.sas
    fill(sa1, kst(2025, 3, 1, 9), "30", fee="1")
    fill(sa2, kst(2025, 3, 1, 10), "-10", fee="1")
    fill(sa1, kst(2025, 3, 1, 11), "0", fee="0.5")  # opening fill: not a closing fill
    fill(sa1, kst(2025, 3, 2, 12), "-50", fee="1")
    fill(sa2, kst(2025, 3, 3, 1), "-10", fee="0.2")
    fill(sa1, kst(2025, 3, 5, 8), "40", fee="0.4")
    fill(sa1, kst(2025, 3, 5, 9), "20", fee="0.3", fee_currency="BNB")  # not in the quote: left out
    fill(sa2, kst(2025, 3, 5, 23, 30), "-5")
    other = StrategyAccountFactory()  # another strategy's fill never counts
    fill(other, kst(2025, 3, 5, 12), "999")
    return strategy


def rows(strategy) -> dict[date, StrategyDailyPerformance]:  # noqa: ANN001
    return {row.day: row for row in StrategyDailyPerformance.objects.filter(strategy=strategy)}


def test_hand_computed_series(series):  # noqa: ANN001
    with time_machine.travel(kst(2025, 3, 6, 0, 0, 13), tick=False):
        calculate_daily_performance()
    got = rows(series)
    assert sorted(got) == [date(2025, 3, d) for d in range(1, 6)]
    assert {row.capital_base for row in got.values()} == {D("1000")}

    expected = {
        # day: daily_pnl, cumulative_pnl, daily_return, cumulative_return, trades, winning, losing, win_rate, fees
        1: ("20", "20", "2", "2", 3, 1, 1, "50", "2.5"),
        2: ("-50", "-30", "-5", "-3", 1, 0, 1, "0", "1"),
        3: ("-10", "-40", "-1", "-4", 1, 0, 1, "0", "0.2"),
        4: ("0", "-40", "0", "-4", 0, 0, 0, None, "0"),
        5: ("55", "15", "5.5", "1.5", 3, 2, 1, "66.666666666667", "0.4"),
    }
    for day, (pnl, cum, ret, cum_ret, trades, win, lose, rate, fees) in expected.items():
        row = got[date(2025, 3, day)]
        assert row.daily_pnl == D(pnl), day
        assert row.cumulative_pnl == D(cum), day
        assert row.daily_return == D(ret), day
        assert row.cumulative_return == D(cum_ret), day
        assert (row.trades, row.winning, row.losing) == (trades, win, lose), day
        assert row.win_rate == (None if rate is None else D(rate)), day
        assert row.fees == D(fees), day

    # Risk figures over the returns so far (%): day 1 has one value, day 2 one negative.
    assert got[date(2025, 3, 1)].volatility is None and got[date(2025, 3, 1)].sharpe is None
    day2 = got[date(2025, 3, 2)]
    assert close(day2.volatility, 4.949747468305833)
    assert close(day2.sharpe, -0.30304576336566325)
    assert close(day2.sharpe_annualized, -5.7896811797598415)
    assert day2.sortino is None
    day3 = got[date(2025, 3, 3)]
    assert close(day3.volatility, 3.5118845842842465)
    assert close(day3.sortino, -0.4714045207910316)
    day5 = got[date(2025, 3, 5)]
    assert close(day5.volatility, 3.8665229858362413)
    assert close(day5.sharpe, 0.07758909001678074)
    assert close(day5.sortino, 0.10606601717798211)
    assert close(day5.sharpe_annualized, 1.4823374834077825)
    assert close(day5.sortino_annualized, 2.026388412915944)

    # Drawdown: peak 20 on day 1, trough −40 on day 3: 60 quote, 300 % of the peak.
    assert (got[date(2025, 3, 1)].max_drawdown, got[date(2025, 3, 1)].max_drawdown_pct) == (0, 0)
    assert (got[date(2025, 3, 2)].max_drawdown, got[date(2025, 3, 2)].max_drawdown_pct) == (D("50"), D("250"))
    assert (got[date(2025, 3, 5)].max_drawdown, got[date(2025, 3, 5)].max_drawdown_pct) == (D("60"), D("300"))


def snapshot(strategy) -> list[tuple]:  # noqa: ANN001
    return list(StrategyDailyPerformance.objects.filter(strategy=strategy).order_by("day").values_list())


def test_rerun_gives_identical_rows_and_keeps_capital_base(series):  # noqa: ANN001
    with time_machine.travel(kst(2025, 3, 6, 0, 0, 13), tick=False):
        calculate_daily_performance()
    before = snapshot(series)
    StrategyCapital.objects.update(allocated_capital=D("5000"))  # capital moved since
    with time_machine.travel(kst(2025, 3, 6, 9), tick=False):
        calculate_daily_performance()  # nothing new to compute
        call_command("backfill_performance", "--since", "2025-03-01", stdout=io.StringIO())
    assert snapshot(series) == before
    run = JobRun.objects.filter(job_id="calculate_daily_performance").order_by("-pk").first()
    assert run.outcome == JobRun.Outcome.NOOP


def test_next_day_uses_capital_recorded_at_the_previous_run(strategy):  # noqa: ANN001
    sa1, _ = strategy.sas
    fill(sa1, kst(2025, 3, 1, 9), "10")
    with time_machine.travel(kst(2025, 3, 2, 0, 0, 13), tick=False):
        calculate_daily_performance()
    StrategyCapital.objects.filter(strategy_account=sa1).update(allocated_capital=D("1600"))  # a rebalance on 3/2
    with time_machine.travel(kst(2025, 3, 3, 0, 0, 13), tick=False):
        calculate_daily_performance()
    got = rows(strategy)
    assert got[date(2025, 3, 1)].capital_base == D("1000")
    assert got[date(2025, 3, 2)].capital_base == D("1000")  # Σ allocated at the start of 3/2
    assert got[date(2025, 3, 2)].next_capital_base == D("2000")
    assert got[date(2025, 3, 2)].cumulative_return == D("1")


def test_kst_day_boundary(strategy):  # noqa: ANN001
    sa1, _ = strategy.sas
    fill(sa1, kst(2025, 3, 1, 23, 59, 59, 999000), "7")
    fill(sa1, kst(2025, 3, 2, 0, 0, 0), "-3")
    with time_machine.travel(kst(2025, 3, 2, 23, 59, 59), tick=False):
        calculate_daily_performance()
    assert [(r.day, r.daily_pnl) for r in rows(strategy).values()] == [(date(2025, 3, 1), D("7"))]
    with time_machine.travel(kst(2025, 3, 3, 0, 0, 0), tick=False):
        calculate_daily_performance()
    got = rows(strategy)
    assert got[date(2025, 3, 2)].daily_pnl == D("-3")
    assert got[date(2025, 3, 2)].cumulative_pnl == D("4")


def test_strategy_without_fills_starts_yesterday_and_inactive_is_skipped(strategy):  # noqa: ANN001
    idle = StrategyFactory(is_active=False)
    with time_machine.travel(kst(2025, 3, 10, 0, 0, 13), tick=False):
        calculate_daily_performance()
    assert list(rows(strategy)) == [date(2025, 3, 9)]
    assert rows(strategy)[date(2025, 3, 9)].daily_return == 0
    assert not rows(idle)


def test_three_missed_days_are_computed_by_the_leader_catch_up(series):  # noqa: ANN001
    with time_machine.travel(kst(2025, 3, 2, 0, 0, 13), tick=False):
        calculate_daily_performance()
    assert list(rows(series)) == [date(2025, 3, 1)]
    Leadership.objects.update_or_create(id=1, defaults={"term": 7})
    # The leader was down on 3/3, 3/4 and 3/5 at 00:00:13; a new one takes over later on 3/5.
    with time_machine.travel(kst(2025, 3, 5, 10, 30), tick=False):
        assert catch_up_run(host=SimpleNamespace(term=7), job_id="calculate_daily_performance") is True
    assert sorted(rows(series)) == [date(2025, 3, d) for d in range(1, 5)]
    assert rows(series)[date(2025, 3, 4)].cumulative_pnl == D("-40")
    run = JobRun.objects.get(job_id="calculate_daily_performance", kind=JobRun.Kind.CATCHUP)
    assert run.term == 7 and run.outcome == JobRun.Outcome.OK
    assert "3 days written" in run.summary


def test_catch_up_refused_for_a_stale_term(series):  # noqa: ANN001
    Leadership.objects.update_or_create(id=1, defaults={"term": 8})
    with time_machine.travel(kst(2025, 3, 5, 10, 30), tick=False):
        catch_up_run(host=SimpleNamespace(term=7), job_id="calculate_daily_performance")
    assert not rows(series)
    assert not JobRun.objects.filter(job_id="calculate_daily_performance").exists()


# --- backfill_performance ------------------------------------------------------------------


def test_backfill_writes_the_range_with_a_progress_bar(series):  # noqa: ANN001
    out = io.StringIO()
    with time_machine.travel(kst(2025, 3, 20, 12), tick=False):
        call_command("backfill_performance", "--since", "2025-03-02", "--until", "2025-03-04", stdout=out)
    assert sorted(rows(series)) == [date(2025, 3, 2), date(2025, 3, 3), date(2025, 3, 4)]
    # cumulative PnL comes from the ledger, so a range not starting at the first day is still right
    assert rows(series)[date(2025, 3, 2)].cumulative_pnl == D("-30")
    text = out.getvalue()
    # two active strategies (the series' and the one owning the foreign fill) × 3 days
    assert "[##############################] 6/6" in text
    assert "6 rows written, 0 unchanged (2 strategies" in text


def test_backfill_until_defaults_to_yesterday_and_filters_strategies(series):  # noqa: ANN001
    other = StrategyFactory()
    with time_machine.travel(kst(2025, 3, 5, 0, 30), tick=False):
        call_command(
            "backfill_performance", "--since", "2025-03-03", "--strategy", series.group_name, stdout=io.StringIO()
        )
    assert sorted(rows(series)) == [date(2025, 3, 3), date(2025, 3, 4)]
    assert not rows(other)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "2025-03-04", "--until", "2025-03-02"], "is before --since"),
        (["--since", "2025-03-10"], "not over yet"),
        (["--since", "2025-03-01", "--until", "2025-03-10"], "not over yet"),
        (["--since", "2025-03-01", "--until", "2025-03-09"], "not over yet"),  # today (KST) is not over
        (["--since", "2025-02-30"], "is not a date"),
        (["--since", "2025-03-01", "--strategy", "nope"], "no strategy with group_name nope"),
    ],
)
def test_backfill_refuses_bad_input(series, args, message):  # noqa: ANN001
    with time_machine.travel(kst(2025, 3, 9, 12), tick=False), pytest.raises(CommandError, match=message):
        call_command("backfill_performance", *args, stdout=io.StringIO())
    assert not rows(series)


def test_a_dust_capital_base_stores_no_return_instead_of_overflowing(strategy):  # noqa: ANN001
    sa1, _ = strategy.sas
    StrategyCapital.objects.update(allocated_capital=D("0.000000000001"))
    fill(sa1, kst(2025, 3, 1, 9), "100")
    with time_machine.travel(kst(2025, 3, 2, 0, 0, 13), tick=False):
        calculate_daily_performance()
    row = rows(strategy)[date(2025, 3, 1)]
    assert row.daily_pnl == D("100") and row.daily_return is None and row.cumulative_return is None
