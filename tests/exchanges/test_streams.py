"""User-data streams against the dialect server: fills once, single-flight reconnects with backoff, health job."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from exchanges.gateway import MarketType, OrderRequest, OrderStatus, OrderType, Side
from exchanges.models import StreamState
from exchanges.services import gateway_for
from exchanges.simulator.engine import default_engine
from exchanges.streams import StreamClock, StreamConfig, UserStreamManager
from exchanges.streams.messages import (
    alert_due,
    backoff_delay,
    binance_futures_updates,
    bybit_auth_args,
    bybit_order_updates,
    stream_alive,
)
from orders.jobs import check_websocket_health, update_open_orders
from orders.models import OpenOrder, OrderEvent
from orders.streams import stream_account_list, stream_health_check, user_stream_manager
from positions.fills import position_matches_fills
from positions.models import Fill, Position
from scheduler.models import JobRun
from scheduler.registry import interval, registry_spec
from scheduler.runner import LEADER_THREADS
from tests.exchanges import ccxt_sim_support
from tests.exchanges.ccxt_sim_support import API_KEY, API_SECRET
from tests.orders.factories import AccountFactory, OpenOrderFactory, StrategyAccountFactory

sim_server = ccxt_sim_support.sim_server
sim_urls = ccxt_sim_support.sim_urls

D = Decimal
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
# Seconds instead of minutes: a ping every 0.5 s (dead after 1 s of silence), a connection
# counts as stable after 5 s, accounts and health flags re-read several times a second.
FAST = StreamConfig(
    ping_interval=0.5,
    stable_after=5.0,
    connect_timeout=3.0,
    accounts_every=0.3,
    flags_every=0.2,
)


class RecordingClock(StreamClock):
    """Records every backoff sleep; while `gate` is clear the sleep holds (an outage of any length)."""

    def __init__(self, *, hold: bool = False):
        self.sleeps: list[float] = []
        self.gate = threading.Event()
        if not hold:
            self.gate.set()

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        while not self.gate.is_set():
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.01)


def wait_for(predicate: Callable[[], object], *, timeout: float = 15.0, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def state_of(account) -> StreamState | None:  # noqa: ANN001
    return StreamState.objects.filter(account=account).first()


def is_open(manager: UserStreamManager, account) -> bool:  # noqa: ANN001
    stream = manager.stream(account.pk)
    return bool(stream and stream.state == StreamState.State.OPEN and stream.last_pong_at is not None)


@pytest.fixture
def start_manager(sim_urls):
    managers: list[UserStreamManager] = []

    def start(*, clock: StreamClock | None = None, **config) -> UserStreamManager:  # noqa: ANN003
        manager = user_stream_manager(None, config=dataclasses.replace(FAST, **config), clock=clock or RecordingClock())
        manager.start()
        managers.append(manager)
        return manager

    yield start
    for manager in managers:
        manager.stop()
    assert position_matches_fills() == []
    default_engine.price_script_clear("BINANCE")
    default_engine.price_script_clear("BYBIT")


def futures_account(exchange: str, *, secret: str = API_SECRET):  # noqa: ANN201
    return StrategyAccountFactory(
        account__exchange=exchange,
        account__api_key=API_KEY,
        account__api_secret=secret,
        strategy__market_type="FUTURES",
    )


def place(sa, *, side: str = "BUY", qty: str = "12", price: str = "2900") -> OpenOrder:  # noqa: ANN001
    """A resting LIMIT order on the simulated exchange and the OpenOrder row the queue would have made."""
    row = OpenOrderFactory.build(
        strategy_account=sa,
        account=sa.account,
        market_type="FUTURES",
        symbol="ETH/USDT",
        side=side,
        order_type="LIMIT",
        price=D(price),
        quantity=D(qty),
    )
    state = gateway_for(sa.account).create_order(
        OrderRequest(
            symbol="ETH/USDT",
            market_type=MarketType.FUTURES,
            side=Side(side),
            order_type=OrderType.LIMIT,
            quantity=D(qty),
            price=D(price),
            client_order_id=row.client_order_id,
        )
    )
    assert state.status == OrderStatus.NEW
    row.exchange_order_id = state.exchange_order_id
    row.save()
    return row


def price(exchange: str, value: str) -> None:
    default_engine.price_script(exchange, "ETH/USDT", [value])


# --- pure parts ---------------------------------------------------------------------------


def test_backoff_doubles_from_one_second_to_sixty():
    assert [backoff_delay(n) for n in range(0, 10)] == [0, 1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_alive_by_message_or_pong_within_twice_the_ping_interval():
    kw = {"now": T0, "ping_interval": 20.0, "connected_at": T0 - timedelta(hours=1), "last_message_at": None}
    assert stream_alive(**kw, last_pong_at=T0 - timedelta(seconds=39))  # idle, pongs flowing
    assert not stream_alive(**kw, last_pong_at=T0 - timedelta(seconds=41))
    assert stream_alive(**{**kw, "last_message_at": T0 - timedelta(seconds=5)}, last_pong_at=None)
    assert not stream_alive(**kw, last_pong_at=T0, listen_key_ok=False)  # Binance keepalive failed
    assert stream_alive(**{**kw, "connected_at": T0 - timedelta(seconds=1)}, last_pong_at=None)  # just opened


def test_alert_on_tenth_failure_then_every_tenth():
    assert [n for n in range(1, 31) if alert_due(n, alert_after=10)] == [10, 20, 30]


def test_bybit_auth_signature():
    key, expires, signature = bybit_auth_args(api_key="k", api_secret="s", expires_ms=1700000000000)
    assert (key, expires) == ("k", 1700000000000)
    assert signature == hmac.new(b"s", b"GET/realtime1700000000000", hashlib.sha256).hexdigest()


def test_binance_messages():
    trade = {
        "e": "ORDER_TRADE_UPDATE",
        "E": 1,
        "o": {"s": "ETHUSDT", "c": "cid", "S": "BUY", "o": "LIMIT", "q": "12", "p": "2900", "ap": "2900",
              "X": "PARTIALLY_FILLED", "i": 7, "z": "5", "n": "1.45", "N": "USDT", "T": 1700000000000},
    }  # fmt: skip
    [update] = binance_futures_updates(trade, now=T0)
    state = update.regular
    assert update.fee_is_last_trade and update.conditional is None
    assert (state.exchange_order_id, state.symbol, state.status) == ("7", "ETH/USDT", OrderStatus.PARTIALLY_FILLED)
    assert (state.filled_quantity, state.average_price, state.fee) == (D("5"), D("2900"), D("1.45"))
    algo = {"e": "ALGO_UPDATE", "T": 1, "o": {"aid": 9, "caid": "c9", "o": "STOP_MARKET", "s": "ETHUSDT", "S": "SELL",
                                              "q": "1", "X": "TRIGGERED", "ai": "11", "tp": "2500"}}  # fmt: skip
    [update] = binance_futures_updates(algo, now=T0)
    assert update.conditional.status == OrderStatus.TRIGGERED and update.conditional.spawned_order_id == "11"
    algo["o"]["ai"] = ""
    assert binance_futures_updates(algo, now=T0)[0].conditional.status == OrderStatus.NEW  # fired, not placed
    assert binance_futures_updates({"e": "ACCOUNT_UPDATE"}, now=T0) == []


def test_bybit_messages_stop_keeps_its_id():
    def item(status, filled="0", **extra):  # noqa: ANN001, ANN003, ANN202
        return {"orderId": "5", "orderLinkId": "c5", "symbol": "ETHUSDT", "side": "Sell", "orderStatus": status,
                "qty": "1", "cumExecQty": filled, "avgPrice": "2500" if filled != "0" else "0", "cumExecFee": "0.1",
                "orderType": "Market", "category": "linear", "updatedTime": "1700000000000", **extra}  # fmt: skip

    stop = {"stopOrderType": "Stop", "triggerPrice": "2500"}
    [plain] = bybit_order_updates({"topic": "order", "data": [item("Filled", "1")]}, now=T0)
    assert plain.conditional is None and plain.regular.status == OrderStatus.FILLED
    assert plain.regular.fee == D("0.1") and plain.market_type == MarketType.FUTURES
    [waiting] = bybit_order_updates({"topic": "order", "data": [item("Untriggered", **stop)]}, now=T0)
    assert waiting.conditional.status == OrderStatus.NEW and waiting.regular is None
    [fired] = bybit_order_updates({"topic": "order", "data": [item("Filled", "1", **stop)]}, now=T0)
    assert fired.conditional.status == OrderStatus.TRIGGERED and fired.conditional.spawned_order_id == "5"
    assert fired.regular.status == OrderStatus.FILLED and fired.regular.filled_quantity == D("1")
    [cancelled] = bybit_order_updates({"topic": "order", "data": [item("Deactivated", **stop)]}, now=T0)
    assert cancelled.conditional.status == OrderStatus.CANCELED
    assert bybit_order_updates({"topic": "order", "data": [{**item("New"), "category": "inverse"}]}, now=T0) == []


def test_registered_per_spec_and_started_as_leader_thread():
    spec = registry_spec("check_websocket_health")
    assert (spec.name, spec.trigger, spec.grace, spec.budget) == (
        "Check Websocket Health",
        interval(seconds=60),
        60,
        20,
    )
    assert spec.func == "orders.jobs:check_websocket_health"
    assert "orders.streams:user_stream_manager" in LEADER_THREADS


# --- accounts -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_stream_accounts_binance_futures_and_bybit_only():
    binance_futures = futures_account("BINANCE").account
    StrategyAccountFactory(account__exchange="BINANCE", account__api_key="k" * 10, account__api_secret="s" * 10)
    bybit = StrategyAccountFactory(account__exchange="BYBIT", account__api_key="k" * 10, account__api_secret="s" * 10)
    AccountFactory(exchange="BYBIT", api_key="k" * 10, api_secret="s" * 10, is_active=False)
    AccountFactory(exchange="BYBIT")  # no credentials
    futures_account("PAPER")
    assert sorted(a.account_id for a in stream_account_list()) == sorted([binance_futures.pk, bybit.account_id])


# --- against the dialect server -------------------------------------------------------------


@pytest.mark.parametrize("exchange", ["BINANCE", "BYBIT"])
def test_fill_event_updates_the_position_once_even_when_the_rest_poll_sees_it(start_manager, exchange):
    sa = futures_account(exchange)
    price(exchange, "3000")
    manager = start_manager()
    wait_for(lambda: is_open(manager, sa.account), what="stream open")
    # The stream alone: three increments (ETH liquidity 5 per match step), one Fill each.
    bought = place(sa, qty="12", price="2900")
    price(exchange, "2800")
    wait_for(lambda: not OpenOrder.objects.filter(pk=bought.pk).exists(), what="buy filled from the stream")
    fills = list(Fill.objects.filter(strategy_account=sa).order_by("cum_filled_after"))
    assert [(f.cum_filled_after, f.delta_qty, f.source) for f in fills] == [
        (D("5"), D("5"), Fill.Source.STREAM),
        (D("10"), D("5"), Fill.Source.STREAM),
        (D("12"), D("2"), Fill.Source.STREAM),
    ]
    update_open_orders()  # the REST poll sees the same order filled: nothing changes
    update_open_orders()
    assert Fill.objects.filter(strategy_account=sa).count() == 3
    assert Position.objects.get(strategy_account=sa, symbol="ETH/USDT").quantity == D("12")

    # The stream and the 29 s poll racing over the same increments of a second order.
    sold = place(sa, side="SELL", qty="7", price="2900")
    price(exchange, "3000")

    def rest_poll_until_done() -> bool:
        update_open_orders()
        return not OpenOrder.objects.filter(pk=sold.pk).exists()

    wait_for(rest_poll_until_done, what="sell filled")
    time.sleep(0.6)  # the stream's reports of the same fills arrive after the poll's
    update_open_orders()
    sells = Fill.objects.filter(strategy_account=sa, delta_qty__lt=0).order_by("cum_filled_after")
    assert [(f.cum_filled_after, f.delta_qty) for f in sells] == [(D("5"), D("-5")), (D("7"), D("-2"))]
    position = Position.objects.get(strategy_account=sa, symbol="ETH/USDT")
    all_fills = Fill.objects.filter(strategy_account=sa)
    assert position.quantity == sum(f.delta_qty for f in all_fills) == D("5")
    for order in (bought, sold):
        assert OrderEvent.objects.filter(order_key=order.order_key, kind=OrderEvent.Kind.FILLED).count() == 1
    stream = manager.stream(sa.account_id)
    assert stream.apply_errors == 0 and stream.applied.get("fill", 0) + stream.applied.get("filled", 0) >= 3


def test_dropped_connection_reconnects_once_with_backoff_across_health_checks(start_manager):
    sa = futures_account("BINANCE")
    clock = RecordingClock(hold=True)
    manager = start_manager(clock=clock)
    wait_for(lambda: is_open(manager, sa.account), what="stream open")
    default_engine.fault_add("ws_drop", exchange="BINANCE", endpoint="ws", account=API_KEY)
    wait_for(lambda: clock.sleeps, what="the drop noticed")
    summaries = []
    for _ in range(4):  # the outage outlasts several health checks
        check_websocket_health()
        summaries.append(JobRun.objects.filter(job_id="check_websocket_health").latest("pk").summary)
        time.sleep(0.3)
    assert all(s.startswith("1 streams: 0 alive, 1 reconnecting") for s in summaries), summaries
    row = state_of(sa.account)
    assert (row.state, row.reconnects, row.consecutive_failures) == ("dead", 1, 1)
    assert row.reconnect_requested_at is None and row.next_reconnect_at is not None
    clock.gate.set()
    wait_for(lambda: manager.stream(sa.account_id).sessions == 2 and is_open(manager, sa.account), what="reconnect")
    time.sleep(1.0)
    check_websocket_health()
    assert (
        JobRun.objects.filter(job_id="check_websocket_health")
        .latest("pk")
        .summary.startswith("1 streams: 1 alive, 0 reconnecting")
    )
    assert clock.sleeps == [1.0]
    assert state_of(sa.account).reconnects == 1 and manager.stream(sa.account_id).sessions == 2


@pytest.mark.parametrize("exchange", ["BINANCE", "BYBIT"])
def test_repeated_drops_back_off_1_2_4_8(start_manager, exchange):
    sa = futures_account(exchange)
    clock = RecordingClock()
    manager = start_manager(clock=clock)
    wait_for(lambda: is_open(manager, sa.account), what="stream open")
    default_engine.fault_add("ws_drop", exchange=exchange, endpoint="ws", account=API_KEY, remaining=4)
    wait_for(lambda: manager.stream(sa.account_id).sessions == 5 and is_open(manager, sa.account), what="5th session")
    assert clock.sleeps == [1.0, 2.0, 4.0, 8.0]
    row = state_of(sa.account)
    assert (row.state, row.reconnects) == ("open", 4)


def test_silent_bybit_stream_without_pongs_is_replaced(start_manager):
    sa = futures_account("BYBIT")
    clock = RecordingClock()
    manager = start_manager(clock=clock)
    wait_for(lambda: is_open(manager, sa.account), what="stream open")
    default_engine.fault_add("ws_silent", exchange="BYBIT", endpoint="ws", account=API_KEY)
    wait_for(lambda: manager.stream(sa.account_id).sessions == 2 and is_open(manager, sa.account), what="replaced")
    assert clock.sleeps == [1.0]
    row = state_of(sa.account)
    assert row.reconnects == 1 and row.state == "open"
    assert "no message or pong" in manager.stream(sa.account_id).last_error


def test_idle_healthy_stream_is_left_alone(start_manager):
    sa = futures_account("BYBIT")
    clock = RecordingClock()
    manager = start_manager(clock=clock)
    wait_for(lambda: is_open(manager, sa.account), what="stream open")
    pongs = []
    for _ in range(5):  # 3 s: six ping intervals, three times the dead threshold, no order message
        time.sleep(0.6)
        check_websocket_health()
        assert JobRun.objects.filter(job_id="check_websocket_health").latest("pk").summary == (
            "1 streams: 1 alive, 0 reconnecting"
        )
        pongs.append(state_of(sa.account).last_pong_at)
    row = state_of(sa.account)
    assert row.last_message_at is None  # no order message at all: alive by its pongs alone
    assert len(set(pongs)) == len(pongs)  # pongs keep flowing
    assert (row.reconnects, clock.sleeps, manager.stream(sa.account_id).sessions) == (0, [], 1)


def test_open_orders_reconciled_over_rest_after_reconnect(start_manager):
    sa = futures_account("BINANCE")
    price("BINANCE", "3000")
    clock = RecordingClock(hold=True)
    manager = start_manager(clock=clock)
    wait_for(lambda: is_open(manager, sa.account), what="stream open")
    wait_for(lambda: manager.stream(sa.account_id).reconciles == 1, what="catch-up after the first connect")
    row = place(sa, qty="3", price="2900")
    default_engine.fault_add("ws_drop", exchange="BINANCE", endpoint="ws", account=API_KEY)
    wait_for(lambda: clock.sleeps, what="the drop noticed")
    price("BINANCE", "2800")
    default_engine.match("BINANCE", force=True)  # fills while no stream listens
    assert Fill.objects.count() == 0
    clock.gate.set()
    wait_for(lambda: not OpenOrder.objects.filter(pk=row.pk).exists(), what="catch-up after the reconnect")
    fill = Fill.objects.get(strategy_account=sa)
    assert (fill.delta_qty, fill.source) == (D("3"), Fill.Source.REST)
    assert Position.objects.get(strategy_account=sa).quantity == D("3")
    # The catch-up counts itself once its last account market is written, a moment after the row goes.
    wait_for(lambda: manager.stream(sa.account_id).reconciles == 2, what="the catch-up counted")


def test_health_check_flags_stale_open_row_once_and_leaves_reconnecting_rows(transactional_db):
    now = T0
    stale = futures_account("BYBIT").account
    waiting = futures_account("BINANCE").account
    StreamState.objects.create(
        account=stale, exchange="BYBIT", state="open", ping_interval=20, connected_at=now - timedelta(minutes=5),
        last_pong_at=now - timedelta(seconds=45), updated_at=now,
    )  # fmt: skip
    StreamState.objects.create(
        account=waiting, exchange="BINANCE", state="dead", consecutive_failures=3, reconnects=3,
        next_reconnect_at=now + timedelta(seconds=4), updated_at=now,
    )  # fmt: skip
    first = stream_health_check(now=now)
    assert first.summary().startswith("2 streams: 0 alive, 1 reconnecting, 1 dead (1 reconnects requested now)")
    assert StreamState.objects.get(account=stale).reconnect_requested_at == now
    again = stream_health_check(now=now + timedelta(seconds=60))
    assert (again.dead, again.requested, again.reconnecting) == (1, 0, 1)  # already asked: not asked twice
    assert StreamState.objects.get(account=stale).reconnect_requested_at == now
    assert StreamState.objects.get(account=waiting).reconnect_requested_at is None


def test_manager_replaces_a_flagged_open_stream_once(start_manager):
    sa = futures_account("BYBIT")
    clock = RecordingClock()
    manager = start_manager(clock=clock)
    wait_for(lambda: is_open(manager, sa.account), what="stream open")
    StreamState.objects.filter(account=sa.account).update(reconnect_requested_at=T0)  # as the health job does
    wait_for(lambda: manager.stream(sa.account_id).sessions == 2 and is_open(manager, sa.account), what="replaced")
    time.sleep(0.6)  # several flag polls later
    assert state_of(sa.account).reconnect_requested_at is None
    assert (state_of(sa.account).reconnects, clock.sleeps, manager.stream(sa.account_id).sessions) == (1, [1.0], 2)


def test_stop_closes_streams_promptly(start_manager, sim_urls):
    binance = futures_account("BINANCE")
    bybit = futures_account("BYBIT")
    manager = start_manager()
    wait_for(lambda: is_open(manager, binance.account) and is_open(manager, bybit.account), what="both open")
    streams = [manager.stream(binance.account_id), manager.stream(bybit.account_id)]
    started = time.monotonic()
    manager.stop()
    elapsed = time.monotonic() - started
    print(f"streams stopped in {elapsed:.2f} s")
    assert elapsed < 3.0 and not manager.is_alive()
    assert [s.state for s in streams] == ["stopped", "stopped"]
    assert set(StreamState.objects.values_list("state", flat=True)) == {"stopped"}


def test_ten_failures_in_a_row_alert_once(start_manager, monkeypatch):
    sa = futures_account("BYBIT", secret="not-the-secret-of-the-server")
    alerts = []
    import notifications.services

    real = notifications.services.alert_raise
    monkeypatch.setattr(notifications.services, "alert_raise", lambda **kw: alerts.append(kw) or real(**kw))
    clock = RecordingClock()
    manager = start_manager(clock=clock)
    wait_for(lambda: manager.stream(sa.account_id) and manager.stream(sa.account_id).failures >= 14, what="failures")
    assert [a["key"] for a in alerts] == [f"stream:{sa.account_id}"]
    assert "failed 10 times in a row" in alerts[0]["text"] and "auth refused" in alerts[0]["text"]
    assert clock.sleeps[:9] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    row = state_of(sa.account)
    assert row.consecutive_failures >= 13 and row.state in ("dead", "connecting")


def test_binance_listen_key_kept_alive_and_a_failed_keepalive_replaces_the_stream(start_manager, sim_urls):
    sa = futures_account("BINANCE")
    clock = RecordingClock()
    manager = start_manager(clock=clock, listen_key_keepalive=0.4)
    wait_for(lambda: is_open(manager, sa.account), what="stream open")
    first = wait_for(lambda: state_of(sa.account).listen_key_refreshed_at, what="listen key refreshed")
    wait_for(lambda: state_of(sa.account).listen_key_refreshed_at > first, what="a keepalive PUT")
    assert manager.stream(sa.account_id).sessions == 1 and clock.sleeps == []
    sim_urls.config.listen_keys.clear()  # the exchange forgot the key: the next PUT fails with -1125
    wait_for(lambda: manager.stream(sa.account_id).sessions == 2 and is_open(manager, sa.account), what="new key")
    assert "listen key keepalive failed" in manager.stream(sa.account_id).last_error
    assert clock.sleeps == [1.0] and state_of(sa.account).reconnects == 1


def test_binance_listen_key_calls_book_the_request_budget_and_wait_for_none_beyond_it(start_manager, sim_urls):
    """The listen key POST is a REST call like the gateway's: it books weight in the process's budget, and
    with the budget spent it is not sent (the stream fails and backs off) rather than overrun the IP's limit."""
    from exchanges.ratelimit import RateBudget, limits_parse, rate_budget, rate_budget_reset

    tiny = {"BINANCE:FUTURES": [{"scope": "ip", "unit": "weight", "limit": 1, "seconds": 60}]}
    rate_budget_reset(RateBudget(limits_parse(tiny)))
    try:
        assert rate_budget().reserve(exchange="BINANCE", market_type="FUTURES", account_key="x", endpoint="x") == 0
        sim_urls.config.listen_keys.clear()
        sa = futures_account("BINANCE")
        clock = RecordingClock()
        manager = start_manager(clock=clock)
        wait_for(lambda: manager.stream(sa.account_id) and manager.stream(sa.account_id).failures >= 1, what="failure")
        assert "listenKey POST: request budget spent here" in manager.stream(sa.account_id).last_error
        assert sim_urls.config.listen_keys == {}, "a listen key was requested beyond the budget"

        rate_budget_reset(RateBudget(limits_parse(None)))  # the minute has passed: the next attempt opens it
        wait_for(lambda: is_open(manager, sa.account), what="stream open")
        assert len(sim_urls.config.listen_keys) == 1
    finally:
        rate_budget_reset()
