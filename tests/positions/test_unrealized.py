"""calculate_unrealized_pnl: long and short valuation, stale prices skipped and counted, capital roll-up."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.core.cache import cache

from accounts.models import StrategyCapital
from exchanges.gateway import MarketType
from exchanges.services import price_quotes_store
from positions.fills import position_matches_fills
from positions.jobs import calculate_unrealized_pnl
from positions.models import Fill, Position
from scheduler.models import JobRun
from tests.orders.factories import StrategyAccountFactory

pytestmark = pytest.mark.django_db

D = Decimal
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _clean_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture(autouse=True)
def _ledger_invariant():
    yield
    assert position_matches_fills() == []


def held(sa, symbol: str, quantity: str, entry: str, *, unrealized: str = "0") -> Position:  # noqa: ANN001
    """A position with the ledger fill that explains it (so Position.quantity equals its fills)."""
    Fill.objects.create(
        trade=None,
        strategy_account=sa,
        symbol=symbol,
        cum_filled_after=0,
        delta_qty=D(quantity),
        price=D(entry),
        filled_at=T0,
        source=Fill.Source.ADJUSTMENT,
    )
    return Position.objects.create(
        strategy_account=sa,
        symbol=symbol,
        market_type=sa.strategy.market_type,
        quantity=D(quantity),
        average_entry=D(entry),
        unrealized_pnl=D(unrealized),
    )


def test_long_and_short_are_valued_at_the_strategy_market_price_and_rolled_into_capital():
    futures = StrategyAccountFactory(strategy__market_type="FUTURES")
    long_eth = held(futures, "ETH/USDT", "2", "3000")
    short_btc = held(futures, "BTC/USDT", "-0.5", "60000")
    price_quotes_store(
        exchange="PAPER", market_type=MarketType.FUTURES, now=T0, prices={"ETH/USDT": D("3100"), "BTC/USDT": D("58000")}
    )
    # A spot quote for the same symbol must not be used for a futures strategy.
    price_quotes_store(exchange="PAPER", market_type=MarketType.SPOT, now=T0, prices={"ETH/USDT": D("1")})

    with time_machine.travel(T0 + timedelta(minutes=5), tick=False):
        result = calculate_unrealized_pnl()

    long_eth.refresh_from_db()
    short_btc.refresh_from_db()
    assert long_eth.unrealized_pnl == D("200")  # 2 × (3100 − 3000)
    assert short_btc.unrealized_pnl == D("1000")  # 0.5 × (60000 − 58000)
    assert long_eth.unrealized_updated_at == T0 + timedelta(minutes=5)
    assert long_eth.quantity == D("2")  # only the unrealized columns are written
    capital = StrategyCapital.objects.get(strategy_account=futures)  # created when missing
    assert capital.current_pnl == D("1200") and capital.allocated_capital == 0
    assert result.summary.startswith("2 positions valued, 0 flat reset, 0 skipped")
    assert JobRun.objects.get(job_id="calculate_unrealized_pnl").outcome == JobRun.Outcome.OK


def test_stale_or_missing_prices_are_skipped_and_counted_and_keep_their_last_value():
    spot = StrategyAccountFactory(strategy__market_type="SPOT")
    StrategyCapital.objects.create(strategy_account=spot, allocated_capital=D("10000"), current_pnl=D("5"))
    fresh = held(spot, "ETH/USDT", "1", "3000")
    stale = held(spot, "SOL/USDT", "10", "150", unrealized="7")
    missing = held(spot, "XRP/USDT", "100", "0.5", unrealized="3")
    price_quotes_store(
        exchange="PAPER", market_type=MarketType.SPOT, now=T0 - timedelta(hours=2), prices={"SOL/USDT": D("160")}
    )
    price_quotes_store(exchange="PAPER", market_type=MarketType.SPOT, now=T0, prices={"ETH/USDT": D("2900")})

    with time_machine.travel(T0, tick=False):
        result = calculate_unrealized_pnl()

    assert "1 positions valued" in result.summary and "2 skipped (no fresh price)" in result.summary
    assert "PAPER:SPOT:SOL/USDT" in result.summary and "PAPER:SPOT:XRP/USDT" in result.summary
    fresh.refresh_from_db()
    stale.refresh_from_db()
    missing.refresh_from_db()
    assert fresh.unrealized_pnl == D("-100")
    assert (stale.unrealized_pnl, stale.unrealized_updated_at) == (D("7"), None)
    assert missing.unrealized_pnl == D("3")
    capital = StrategyCapital.objects.get(strategy_account=spot)
    assert capital.current_pnl == D("-90") and capital.allocated_capital == D("10000")


def test_a_flat_position_is_reset_to_zero_and_no_positions_is_a_noop():
    sa = StrategyAccountFactory()
    with time_machine.travel(T0, tick=False):
        calculate_unrealized_pnl()
    assert JobRun.objects.get(job_id="calculate_unrealized_pnl").outcome == JobRun.Outcome.NOOP

    flat = Position.objects.create(strategy_account=sa, symbol="ETH/USDT", market_type="SPOT", unrealized_pnl=D("12"))
    with time_machine.travel(T0 + timedelta(seconds=307), tick=False):
        result = calculate_unrealized_pnl()
    flat.refresh_from_db()
    assert flat.unrealized_pnl == 0 and "1 flat reset" in result.summary
    assert StrategyCapital.objects.get(strategy_account=sa).current_pnl == 0
