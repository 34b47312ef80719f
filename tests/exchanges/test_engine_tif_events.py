"""The engine's time in force, quote-sized market orders, and the per-state event log the user streams read."""

from __future__ import annotations

from decimal import Decimal

import pytest

from exchanges.gateway import MarketType, OrderStatus, Rejected
from exchanges.models import SimOrder
from exchanges.simulator.engine import StreamCursor, TimeInForce
from tests.exchanges.conftest import order

pytestmark = pytest.mark.django_db

EX, ACC = "PAPER", "acct-tif"
D = Decimal


def test_ioc_far_from_the_market_expires_and_releases_its_funds(engine):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    state = engine.order_create(
        EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "1", price="2000"), time_in_force=TimeInForce.IOC
    )
    assert state.status == OrderStatus.EXPIRED and state.filled_quantity == 0
    row = SimOrder.objects.get(pk=int(state.exchange_order_id))
    assert row.time_in_force == "IOC" and row.reserved == 0
    assert engine.balance_get(EX, ACC, MarketType.SPOT).used("USDT") == 0


def test_ioc_takes_one_liquidity_slice_then_expires_the_rest(engine):
    engine.price_script(EX, "BTC/USDT", ["60000"])  # BTC liquidity: 0.5 per step
    state = engine.order_create(
        EX, ACC, order("BTC/USDT", "BUY", "LIMIT", "0.8", price="61000"), time_in_force=TimeInForce.IOC
    )
    assert state.status == OrderStatus.EXPIRED and state.filled_quantity == D("0.5")
    assert engine.balance_get(EX, ACC, MarketType.SPOT).used("USDT") == 0


def test_fok_fills_whole_or_expires_without_a_fill(engine):
    engine.price_script(EX, "BTC/USDT", ["60000"])
    too_big = engine.order_create(
        EX, ACC, order("BTC/USDT", "BUY", "LIMIT", "0.8", price="61000"), time_in_force=TimeInForce.FOK
    )
    assert too_big.status == OrderStatus.EXPIRED and too_big.filled_quantity == 0
    fits = engine.order_create(
        EX, ACC, order("BTC/USDT", "BUY", "LIMIT", "0.4", price="61000"), time_in_force=TimeInForce.FOK
    )
    assert fits.status == OrderStatus.FILLED and fits.filled_quantity == D("0.4")


def test_post_only_that_would_take_is_rejected_and_not_kept(engine):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    with pytest.raises(Rejected) as caught:
        engine.order_create(
            EX,
            ACC,
            order("ETH/USDT", "BUY", "LIMIT", "1", price="3100", client_order_id="po-1"),
            time_in_force=TimeInForce.POST_ONLY,
        )
    assert caught.value.code == "-5022"
    assert not SimOrder.objects.filter(client_order_id="po-1").exists()
    resting = engine.order_create(
        EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "1", price="2900"), time_in_force=TimeInForce.POST_ONLY
    )
    assert resting.status == OrderStatus.NEW


def test_post_only_expire_keeps_the_order_as_expired(engine):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    state = engine.order_create(
        EX, ACC, order("ETH/USDT", "SELL", "LIMIT", "1", price="2900"), time_in_force=TimeInForce.POST_ONLY_EXPIRE
    )
    assert state.status == OrderStatus.EXPIRED and state.filled_quantity == 0
    assert SimOrder.objects.get(pk=int(state.exchange_order_id)).reject_reason


def test_quote_sized_market_buy_spends_the_quote_amount(engine):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    state = engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "MARKET", "150"), quote_order=True)
    assert state.status == OrderStatus.FILLED and state.quantity == D("0.05")  # 150 USDT / 3000, floored to step
    row = SimOrder.objects.get(pk=int(state.exchange_order_id))
    assert row.quote_quantity == D("150") and row.cost == D("150")


def test_events_report_every_state_in_order_even_between_two_polls(engine, clock):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    cursor = engine.stream_cursor(EX, ACC)
    resting = engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "1", price="2900", client_order_id="e1"))
    engine.order_cancel(
        EX, ACC, symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=resting.exchange_order_id
    )
    engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "MARKET", "0.1", client_order_id="e2"))
    events, cursor = engine.order_events_since(EX, ACC, cursor)
    assert [(e.order.client_order_id, e.kind, e.order.status) for e in events] == [
        ("e1", "NEW", "NEW"),
        ("e1", "CANCELED", "CANCELED"),
        ("e2", "NEW", "NEW"),
        ("e2", "TRADE", "FILLED"),
    ]
    assert events[2].order.filled_quantity == 0 and events[3].fill is not None
    assert events[3].order.filled_quantity == D("0.1") and events[3].fill.quantity == D("0.1")
    # Nothing twice; a partial fill later is one TRADE, no second NEW.
    assert engine.order_events_since(EX, ACC, cursor)[0] == []
    engine.price_script(EX, "BTC/USDT", ["60000"])
    big = engine.order_create(EX, ACC, order("BTC/USDT", "BUY", "LIMIT", "0.8", price="59000", client_order_id="e3"))
    events, cursor = engine.order_events_since(EX, ACC, cursor)
    assert [(e.kind, e.order.status) for e in events] == [("NEW", "NEW")]
    engine.price_script(EX, "BTC/USDT", ["58000"])
    clock.advance()
    events, cursor = engine.order_events_since(EX, ACC, cursor)
    assert [(e.kind, e.order.status, e.order.filled_quantity) for e in events] == [
        ("TRADE", "PARTIALLY_FILLED", D("0.5"))
    ]
    assert big.client_order_id == "e3"


def test_stream_cursor_starts_after_existing_history(engine):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "MARKET", "0.1"))
    cursor = engine.stream_cursor(EX, ACC)
    assert cursor != StreamCursor() and cursor.fill_id > 0
    assert engine.order_events_since(EX, ACC, cursor)[0] == []


def test_bybit_has_one_wallet_for_spot_and_futures(engine):
    engine.price_script("BYBIT", "ETH/USDT", ["3000"])
    spot_before = engine.balance_get("BYBIT", ACC, MarketType.SPOT)
    assert engine.balance_get("BYBIT", ACC, MarketType.FUTURES).assets == spot_before.assets  # same wallet
    engine.order_create(
        "BYBIT", ACC, order("ETH/USDT", "BUY", "LIMIT", "1", price="2000", market_type=MarketType.FUTURES)
    )
    # The futures order's margin is held in the wallet spot trades use.
    assert engine.balance_get("BYBIT", ACC, MarketType.SPOT).used("USDT") > 0
    assert engine.balance_get("BINANCE", ACC, MarketType.SPOT).used("USDT") == 0  # Binance keeps two wallets
