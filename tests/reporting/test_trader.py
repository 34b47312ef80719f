"""The trader dashboard: its selectors (rank and slot, PnL series, scope), the page, and the `ws/trader/` feed."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from accounts.models import CapitalSnapshot, StrategyCapital
from orders.models import OrderEvent
from positions.models import Fill, StrategyDailyPerformance, Trade
from reporting.consumers import CLOSE_FORBIDDEN, TraderFeedConsumer, trader_feed_poll, trader_feed_start
from reporting.trader_selectors import (
    TraderScope,
    drawdown_series,
    trader_balances,
    trader_fills_recent,
    trader_orders,
    trader_performance,
    trader_positions,
    trader_signals,
)
from tests.orders.factories import (
    AccountFactory,
    MarketInfoFactory,
    OpenOrderFactory,
    PendingOrderFactory,
    PositionFactory,
    PriceQuoteFactory,
    StrategyAccountFactory,
    StrategyFactory,
    UserFactory,
)
from tests.scheduler.test_live_feed import ORIGIN, receive_until, session_headers
from tradingsite.asgi import application

D = Decimal
NOW = datetime(2026, 12, 4, 6, 0, tzinfo=UTC)  # 15:00 in Seoul


@pytest.fixture
def book(db):  # noqa: ANN001
    """Alice (not staff) trades ETH on one account; Bob's account is somebody else's."""
    alice = UserFactory(username="alice")
    alice.set_password("alice-pass-123")
    alice.save()
    bob = UserFactory(username="bob")
    strategy = StrategyFactory(group_name="eth-trend", name="ETH trend", market_type="SPOT")
    mine = StrategyAccountFactory(strategy=strategy, account=AccountFactory(user=alice, name="alice-spot"))
    theirs = StrategyAccountFactory(
        strategy=StrategyFactory(group_name="bob-only", market_type="SPOT"), account=AccountFactory(user=bob)
    )
    MarketInfoFactory(
        symbol="ETH/USDT", tick_size=D("0.01"), step_size=D("0.001"), price_precision=2, amount_precision=3
    )
    return {"alice": alice, "bob": bob, "mine": mine, "theirs": theirs, "strategy": strategy}


def fill(sa, *, qty: str, price: str, realized: str = "0", at: datetime = NOW, symbol: str = "ETH/USDT") -> Fill:  # noqa: ANN001
    trade = Trade.objects.create(
        strategy_account=sa,
        account=sa.account,
        exchange_order_id=f"x-{uuid.uuid4().hex[:8]}",
        order_key=uuid.uuid4(),
        symbol=symbol,
        market_type=sa.strategy.market_type,
        side="BUY" if D(qty) > 0 else "SELL",
        cumulative_filled=abs(D(qty)),
        average_price=D(price),
    )
    return Fill.objects.create(
        trade=trade,
        strategy_account=sa,
        symbol=symbol,
        cum_filled_after=abs(D(qty)),
        delta_qty=D(qty),
        price=D(price),
        fee=D("0.1"),
        fee_currency="USDT",
        realized_pnl=D(realized),
        filled_at=at,
        source="REST",
    )


# --- orders: rank, slot and why an order waits -----------------------------------------------------


def test_orders_are_ranked_per_bucket_with_their_slot_and_reason(book, settings):  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    sa = book["mine"]
    live_100 = OpenOrderFactory(strategy_account=sa, price=D("100"))
    live_99 = OpenOrderFactory(strategy_account=sa, price=D("99"))
    queued_101 = PendingOrderFactory(strategy_account=sa, price=D("101"))
    queued_98 = PendingOrderFactory(strategy_account=sa, price=D("98"), quantity=D("0.5"))
    PendingOrderFactory(strategy_account=sa, side="SELL", price=D("120"))
    market = PendingOrderFactory(strategy_account=sa, order_type="MARKET", price=None)  # the express lane
    OpenOrderFactory(strategy_account=book["theirs"], price=D("100"))  # Bob's: not Alice's business

    data = trader_orders(scope=TraderScope.for_user(book["alice"]), now=NOW)
    buckets = {b["bucket"]: b for b in data["buckets"]}
    assert set(buckets) == {"LIMIT-BUY", "LIMIT-SELL"}
    buy = buckets["LIMIT-BUY"]
    assert (buy["account"], buy["symbol"], buy["slots"], buy["live"]) == (sa.account_id, "ETH/USDT", 2, 2)
    ranked = [(o["order_key"], o["location"], o["rank"]) for o in buy["orders"]]
    assert ranked == [
        (str(queued_101.order_key), "queued", 1),
        (str(live_100.order_key), "live", 2),
        (str(live_99.order_key), "live", 3),
        (str(queued_98.order_key), "queued", 4),
        (str(market.order_key), "queued", None),  # outside the ranking, as in the queue
    ]
    assert buy["orders"][4]["reason"] == "MARKET order: placed within about a second, outside the slots"
    reasons = [o["reason"] for o in buy["orders"]]
    assert reasons[0] == "next to be placed (rank 1 of 4, 2 slots)"
    assert reasons[1] == "live (rank 2 of 4, 2 slots)"
    assert reasons[3] == "waits for a slot: rank 4 of 4, 2 slots held by better-ranked orders"
    # Numbers to the market's precision: price to the tick (2 decimals), quantity to the step (3).
    assert (buy["orders"][3]["price"], buy["orders"][3]["quantity"]) == ("98.00", "0.500")
    assert buckets["LIMIT-SELL"]["orders"][0]["reason"] == "next to be placed (rank 1 of 1, 2 slots)"

    everything = trader_orders(scope=TraderScope(user_id=0, everything=True), now=NOW)
    assert {b["account"] for b in everything["buckets"]} == {sa.account_id, book["theirs"].account_id}


def test_a_queued_order_in_backoff_says_when_it_retries(book):  # noqa: ANN001
    PendingOrderFactory(
        strategy_account=book["mine"], next_attempt_at=NOW + timedelta(seconds=8), last_error_kind="temporary"
    )
    [bucket] = trader_orders(scope=TraderScope.for_user(book["alice"]), now=NOW)["buckets"]
    assert bucket["orders"][0]["reason"] == "placement failed (temporary); retry at 15:00:08"  # Seoul time


# --- positions, fills, balances ------------------------------------------------------------------------


def test_positions_are_marked_to_the_stored_price_and_scoped(book):  # noqa: ANN001
    PositionFactory(strategy_account=book["mine"], quantity=D("2"), average_entry=D("3000"))
    PositionFactory(strategy_account=book["theirs"], quantity=D("1"), average_entry=D("3000"))
    PriceQuoteFactory(symbol="ETH/USDT", price=D("3012.5"), as_of=NOW - timedelta(seconds=20))
    [row] = trader_positions(scope=TraderScope.for_user(book["alice"]), now=NOW)
    assert (row["account"], row["strategy"], row["side"]) == (book["mine"].account_id, "eth-trend", "LONG")
    assert (row["quantity"], row["average_entry"], row["mark_price"]) == ("2.000", "3000.00", "3012.50")
    assert row["unrealized_pnl"] == "25.00"
    assert row["marked_at"] == "2026-12-04T14:59:40+09:00"
    assert len(trader_positions(scope=TraderScope(user_id=0, everything=True), now=NOW)) == 2


def test_fills_and_balances_are_scoped_and_formatted(book):  # noqa: ANN001
    mine = fill(book["mine"], qty="-0.25", price="3100", realized="25.123456")
    fill(book["theirs"], qty="1", price="3000")
    CapitalSnapshot.objects.create(
        account=book["mine"].account, market_type="SPOT", total=D("1000"), source="LIVE", taken_at=NOW
    )
    CapitalSnapshot.objects.create(
        account=book["mine"].account, market_type="SPOT", total=D("1010.5"), source="LIVE", taken_at=NOW
    )
    StrategyCapital.objects.create(strategy_account=book["mine"], allocated_capital=D("600"), current_pnl=D("-3.2"))
    scope = TraderScope.for_user(book["alice"])

    [row] = trader_fills_recent(scope=scope)
    assert row["id"] == mine.pk
    assert (row["side"], row["quantity"], row["price"], row["realized_pnl"]) == ("SELL", "0.250", "3100.00", "25.12")
    assert row["filled_at"] == "2026-12-04T15:00:00+09:00"

    [balance] = trader_balances(scope=scope)
    assert (balance["account"], balance["market_type"], balance["total"]) == (
        book["mine"].account_id,
        "SPOT",
        "1010.50",
    )
    assert balance["strategies"] == [{"strategy": "eth-trend", "allocated": "600.00", "unrealized_pnl": "-3.20"}]


# --- PnL series -------------------------------------------------------------------------------------------


def test_drawdown_is_the_distance_below_the_running_peak():
    assert drawdown_series([D(5), D(8), D(3), D(10), D(-2)]) == [D(0), D(0), D(-5), D(0), D(-12)]
    assert drawdown_series([D(-4), D(-1)]) == [D(-4), D(-1)]  # the peak starts at 0 (no PnL yet)


def _daily(strategy, day: date, pnl: str, cumulative: str) -> None:  # noqa: ANN001
    StrategyDailyPerformance.objects.create(
        strategy=strategy,
        day=day,
        capital_base=D("1000"),
        daily_pnl=D(pnl),
        cumulative_pnl=D(cumulative),
        computed_at=NOW,
    )


def test_performance_joins_stored_days_and_todays_fills(book):  # noqa: ANN001
    strategy = book["strategy"]
    _daily(strategy, date(2026, 12, 2), "10", "10")
    _daily(strategy, date(2026, 12, 3), "-4", "6")
    fill(book["mine"], qty="1", price="3000", at=NOW - timedelta(hours=2))
    fill(book["mine"], qty="-1", price="3007.5", realized="7.5", at=NOW - timedelta(hours=1))
    # A fill inside a stored day is already in its row: not counted twice.
    fill(book["mine"], qty="1", price="3000", realized="99", at=datetime(2026, 12, 3, 3, 0, tzinfo=UTC))

    everything = trader_performance(scope=TraderScope(user_id=0, everything=True), now=NOW)
    assert [p["strategy"] for p in everything] == ["bob-only", "eth-trend"]
    perf = everything[1]
    # No data yet: the curve is one point, today at zero.
    assert everything[0]["days"] == [{"day": "2026-12-04", "daily_pnl": "0", "cumulative_pnl": "0", "drawdown": "0"}]
    assert perf["days"] == [
        {"day": "2026-12-02", "daily_pnl": "10", "cumulative_pnl": "10", "drawdown": "0"},
        {"day": "2026-12-03", "daily_pnl": "-4", "cumulative_pnl": "6", "drawdown": "-4"},
        {"day": "2026-12-04", "daily_pnl": "7.5", "cumulative_pnl": "13.5", "drawdown": "0"},
    ]
    assert (perf["cumulative_pnl"], perf["today_pnl"], perf["max_drawdown"]) == ("13.50", "7.50", "4.00")
    assert [p["value"] for p in perf["intraday"]] == ["0", "7.5"]
    assert perf["intraday"][1]["at"] == "2026-12-04T14:00:00+09:00"


def test_performance_of_a_shared_strategy_comes_from_the_users_own_fills(book):  # noqa: ANN001
    strategy = book["strategy"]
    StrategyAccountFactory(strategy=strategy, account=book["theirs"].account)  # Bob trades it too
    _daily(strategy, date(2026, 12, 3), "500", "500")  # both accounts' PnL: not Alice's to see
    fill(book["mine"], qty="-1", price="3000", realized="-2", at=NOW - timedelta(hours=1))
    [perf] = trader_performance(scope=TraderScope.for_user(book["alice"]), now=NOW)
    assert perf["days"] == [{"day": "2026-12-04", "daily_pnl": "-2", "cumulative_pnl": "-2", "drawdown": "-2"}]


# --- the page -------------------------------------------------------------------------------------------


def test_trader_page_renders_the_users_own_snapshot(book, client):  # noqa: ANN001
    fill(book["mine"], qty="0.5", price="3000")
    fill(book["theirs"], qty="7", price="3000")
    assert client.get("/trader/").url == "/login/?next=/trader/"
    client.force_login(book["alice"])
    response = client.get("/trader/")
    assert response.status_code == 200
    html = response.content.decode()
    snapshot = json.loads(
        re.search(r'<script id="trader-snapshot" type="application/json">(.*?)</script>', html, re.S)[1]
    )
    assert [f["account"] for f in snapshot["fills"]] == [book["mine"].account_id]
    assert [p["strategy"] for p in snapshot["performance"]] == ["eth-trend"]
    assert "your accounts" in html
    assert "/static/vendor/lightweight-charts/lightweight-charts.standalone.production.js" in html


def test_login_page_signs_in_a_user_who_is_not_staff(book):  # noqa: ANN001
    client = Client()
    response = client.post("/login/", {"username": "alice", "password": "alice-pass-123", "next": "/trader/"})
    assert response.status_code == 302 and response.url == "/trader/"
    assert client.get("/trader/").status_code == 200


# --- the feed -------------------------------------------------------------------------------------------


def test_feed_poll_sends_new_fills_once_and_changed_panels(book):  # noqa: ANN001
    scope = TraderScope.for_user(book["alice"])
    now = timezone.now()
    _, cursor = trader_feed_start(scope=scope, now=now)
    assert trader_feed_poll(cursor, now=now, clock=0.0) == []

    new = fill(book["mine"], qty="0.5", price="3000", at=now)
    fill(book["theirs"], qty="1", price="3000", at=now)  # Bob's fill never reaches Alice
    messages = trader_feed_poll(cursor, now=now, clock=1.0)
    assert [(m["type"], m.get("id")) for m in messages if m["type"] == "fill"] == [("fill", new.pk)]
    # A fill changes the PnL panel (today's point) and it is sent; nothing else changed.
    assert {m["type"] for m in messages} == {"fill", "performance"}
    assert trader_feed_poll(cursor, now=now, clock=2.0) == []

    OrderEvent.objects.create(order_key=uuid.uuid4(), kind="queued", account=book["mine"].account, symbol="ETH/USDT")
    PendingOrderFactory(strategy_account=book["mine"], price=D("2900"))
    [orders] = trader_feed_poll(cursor, now=now, clock=3.0)
    assert orders["type"] == "orders" and orders["data"]["buckets"][0]["orders"][0]["price"] == "2900.00"


@pytest.mark.django_db(transaction=True)
def test_feed_streams_a_fill_inserted_after_connect(monkeypatch):  # noqa: ANN001
    monkeypatch.setattr(TraderFeedConsumer, "poll_interval", 0.1)
    user = UserFactory(username="carol")
    sa = StrategyAccountFactory(account=AccountFactory(user=user))
    headers = session_headers(user)

    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, "/ws/trader/", headers=headers)
        assert (await communicator.connect(timeout=5))[0]
        snapshot = await communicator.receive_json_from(timeout=5)
        assert snapshot["type"] == "snapshot" and snapshot["fills"] == []
        assert set(snapshot) >= {"performance", "positions", "orders", "balances", "display_timezone"}
        row = await database_sync_to_async(fill)(sa, qty="2", price="150", at=timezone.now())
        started = time.monotonic()
        message, _ = await receive_until(communicator, lambda m: m["type"] == "fill", timeout=5)
        assert time.monotonic() - started < 3
        assert (message["id"], message["side"], message["symbol"]) == (row.pk, "BUY", "ETH/USDT")
        assert message["filled_at"].endswith("+09:00")
        await communicator.disconnect()

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_anonymous_trader_feed_is_closed_with_4403():
    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, "/ws/trader/", headers=[ORIGIN])
        assert (await communicator.connect(timeout=5))[0]
        assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": CLOSE_FORBIDDEN}
        await communicator.disconnect(code=CLOSE_FORBIDDEN)

    async_to_sync(scenario)()


def test_idle_feed_poll_is_two_queries(book, django_assert_num_queries):  # noqa: ANN001
    cursor = trader_feed_start(scope=TraderScope.for_user(book["alice"]), now=NOW)[1]
    # New fills by cursor, and the newest order event; the slow panels wait for their turn.
    with django_assert_num_queries(2):
        assert trader_feed_poll(cursor, now=NOW, clock=cursor.slow_due - 1) == []


def _signal_with_a_fill(sa, *, fill_price: str) -> int:  # noqa: ANN001
    """A webhook signal with one LIMIT BUY at 3000 that was placed and filled at `fill_price`."""
    from orders.services import OrderSpec, SignalSource, orders_enqueue, signal_record

    spec = OrderSpec(
        strategy_account_id=sa.pk,
        account_id=sa.account_id,
        symbol="ETH/USDT",
        market_type="SPOT",
        side="BUY",
        order_type="LIMIT",
        quantity=D("1"),
        price=D("3000"),
        reference_price=D("3000"),
    )
    orders = orders_enqueue(specs=[spec], signal_at=NOW, now=NOW)
    signal = signal_record(
        source=SignalSource(
            source="webhook", strategy_id=sa.strategy_id, symbol="ETH/USDT", side="BUY", order_type="LIMIT"
        ),
        orders=orders,
        specs=[spec],
        now=NOW,
    )
    key = orders[0].order_key
    for kind in ("submitting", "placed", "filled"):
        OrderEvent.objects.create(order_key=key, kind=kind, account=sa.account, symbol="ETH/USDT")
    Trade.objects.create(
        strategy_account=sa,
        account=sa.account,
        exchange_order_id=f"sig-{signal.pk}",
        order_key=key,
        symbol="ETH/USDT",
        market_type="SPOT",
        side="BUY",
        cumulative_filled=D("1"),
        average_price=D(fill_price),
    )
    orders[0].delete()
    return signal.pk


def test_signals_panel_reports_execution_per_signal_and_is_scoped(book):  # noqa: ANN001
    mine = _signal_with_a_fill(book["mine"], fill_price="3003")
    theirs = _signal_with_a_fill(book["theirs"], fill_price="3000")
    [row] = trader_signals(scope=TraderScope.for_user(book["alice"]))
    assert (row["id"], row["strategy"], row["symbol"], row["side"]) == (mine, "eth-trend", "ETH/USDT", "BUY")
    assert (row["followers"], row["by_outcome"]) == (1, {"filled": 1})
    assert (row["slippage_avg_bps"], row["slippage_worst_bps"]) == ("10.0", "10.0")  # paid 3003 for 3000
    assert row["failures"] == []
    everything = trader_signals(scope=TraderScope(user_id=0, everything=True))
    assert {r["id"] for r in everything} == {mine, theirs}


def test_feed_resends_the_signals_panel_when_an_order_event_lands(book):  # noqa: ANN001
    scope = TraderScope.for_user(book["alice"])
    _, cursor = trader_feed_start(scope=scope, now=NOW)
    assert cursor.panels["signals"] == []
    signal_id = _signal_with_a_fill(book["mine"], fill_price="3000")
    messages = {m["type"]: m for m in trader_feed_poll(cursor, now=NOW, clock=cursor.slow_due - 1)}
    assert [s["id"] for s in messages["signals"]["data"]] == [signal_id]
