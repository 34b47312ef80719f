"""capital_base is the allocated capital at the day's start (SPEC §4.10), with hourly compounding (§4.11):
day by day, on a strategy's first day, after a three-day outage, and across a reallocation."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

import pytest
import time_machine

from accounts.models import CapitalSnapshot, StrategyCapital
from positions.jobs import calculate_daily_performance
from positions.models import StrategyDailyPerformance
from positions.services import performance_capital_at
from reporting.allocation import capital_allocate_or_compound
from tests.orders.factories import StrategyAccountFactory, StrategyFactory
from tests.positions.test_performance import fill, kst

D = Decimal
PCT = Decimal("1e-12")


@pytest.fixture
def sa(db):  # noqa: ANN001
    return StrategyAccountFactory(strategy=StrategyFactory(market_type="FUTURES"))


def allocate(sa, at: datetime, total: str) -> None:  # noqa: ANN001
    """The hourly job's allocation of `total` at `at` (a LIVE snapshot read then)."""
    snapshot = CapitalSnapshot.objects.create(
        account=sa.account, market_type="FUTURES", total=D(total), source=CapitalSnapshot.Source.LIVE, taken_at=at
    )
    with time_machine.travel(at, tick=False):
        rebalanced, *_ = capital_allocate_or_compound(
            account=sa.account, market_type="FUTURES", snapshot=snapshot, now=at
        )
    assert rebalanced


def compound(sa, at: datetime) -> None:  # noqa: ANN001
    """The hourly job without a usable total: realized PnL up to at − 5 min is compounded."""
    with time_machine.travel(at, tick=False):
        capital_allocate_or_compound(account=sa.account, market_type="FUTURES", snapshot=None, now=at)


def perf(at: datetime) -> None:
    with time_machine.travel(at, tick=False):
        calculate_daily_performance()


def row(sa, day: date) -> StrategyDailyPerformance:  # noqa: ANN001
    return StrategyDailyPerformance.objects.get(strategy=sa.strategy, day=day)


def allocated(sa) -> Decimal:  # noqa: ANN001
    return StrategyCapital.objects.get(strategy_account=sa).allocated_capital


def pct(pnl: str, base: str) -> Decimal:
    return (D(pnl) * 100 / D(base)).quantize(PCT)


def test_first_day_and_the_next_use_the_capital_at_the_day_start(sa):  # noqa: ANN001
    allocate(sa, kst(2025, 3, 1, 9, 17), "1000")
    fill(sa, kst(2025, 3, 1, 12), "10")
    compound(sa, kst(2025, 3, 1, 23, 17))
    assert allocated(sa) == D("1010")  # the day's PnL is already in the capital at run time
    fill(sa, kst(2025, 3, 1, 23, 30), "5")  # after the last compounding of the day
    perf(kst(2025, 3, 2, 0, 0, 13))
    first = row(sa, date(2025, 3, 1))
    assert first.capital_base == D("1000")
    assert first.daily_return == D("1.5")  # 15 / 1000, not 15 / 1010
    assert first.next_capital_base == D("1015")

    compound(sa, kst(2025, 3, 2, 0, 17))
    fill(sa, kst(2025, 3, 2, 10), "-20")
    compound(sa, kst(2025, 3, 2, 11, 17))
    assert allocated(sa) == D("995")
    perf(kst(2025, 3, 3, 0, 0, 13))
    second = row(sa, date(2025, 3, 2))
    assert second.capital_base == D("1015")
    assert second.daily_return == pct("-20", "1015")
    assert second.cumulative_return == pct("-5", "1015")
    assert second.next_capital_base == D("995")


@pytest.mark.parametrize("compounded_before_catch_up", [True, False])
def test_three_day_outage_catch_up_uses_each_day_start(sa, compounded_before_catch_up):  # noqa: ANN001
    allocate(sa, kst(2025, 2, 28, 20, 17), "1000")
    fill(sa, kst(2025, 3, 1, 12), "10")
    compound(sa, kst(2025, 3, 1, 23, 17))
    perf(kst(2025, 3, 2, 0, 0, 13))
    assert row(sa, date(2025, 3, 1)).capital_base == D("1000")
    # The leader is down from 3/2 00:01 to 3/5 10:00: no compounding, no performance runs.
    fill(sa, kst(2025, 3, 2, 12), "20")
    fill(sa, kst(2025, 3, 3, 12), "-15")
    fill(sa, kst(2025, 3, 4, 9), "7")
    if compounded_before_catch_up:
        compound(sa, kst(2025, 3, 5, 10))
        assert allocated(sa) == D("1022")
    perf(kst(2025, 3, 5, 10, 0, 30))
    expected = {
        date(2025, 3, 2): ("1010", "20", "1030"),
        date(2025, 3, 3): ("1030", "-15", "1015"),
        date(2025, 3, 4): ("1015", "7", "1022"),
    }
    for day, (base, pnl, next_base) in expected.items():
        got = row(sa, day)
        assert got.capital_base == D(base), day
        assert got.daily_return == pct(pnl, base), day
        assert got.next_capital_base == D(next_base), day


def test_a_reallocation_after_the_day_start_does_not_change_that_day(sa):  # noqa: ANN001
    allocate(sa, kst(2025, 2, 28, 20, 17), "1000")
    fill(sa, kst(2025, 3, 1, 12), "10")
    compound(sa, kst(2025, 3, 1, 23, 17))
    allocate(sa, kst(2025, 3, 2, 15, 17), "2000")  # the account was topped up
    fill(sa, kst(2025, 3, 2, 18), "30")
    # No row yet for this strategy: the first run computes from its first fill's day.
    perf(kst(2025, 3, 3, 0, 0, 13))
    assert row(sa, date(2025, 3, 1)).capital_base == D("1000")
    assert row(sa, date(2025, 3, 1)).next_capital_base == D("1010")
    assert row(sa, date(2025, 3, 2)).capital_base == D("1010")
    assert row(sa, date(2025, 3, 2)).next_capital_base == D("2030")
    # The reconstruction itself, at moments around the reallocation.
    assert performance_capital_at(strategy=sa.strategy, at=kst(2025, 3, 2, 15)) == D("1010")
    assert performance_capital_at(strategy=sa.strategy, at=kst(2025, 3, 2, 16)) == D("2000")
    assert performance_capital_at(strategy=sa.strategy, at=kst(2025, 2, 28, 12)) == D("1000")
