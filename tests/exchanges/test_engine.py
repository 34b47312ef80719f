"""The simulator engine: fills, partial fills, stops, fees, balances, caps, rejections, faults."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from exchanges.gateway import (
    DuplicateClientId,
    ExchangeError,
    ExchangeGateway,
    InsufficientFunds,
    Maintenance,
    MarketType,
    Network,
    NotFound,
    OrderStatus,
    OrderType,
    RateLimited,
    Rejected,
    call_policy,
)
from exchanges.models import SimFault, SimFill, SimOrder
from exchanges.paper import PaperGateway
from exchanges.simulator.engine import walk_price
from tests.exchanges.conftest import order

pytestmark = pytest.mark.django_db

EX, ACC = "PAPER", "acct-1"
D = Decimal


def test_limit_buy_rests_then_fills_when_the_price_crosses(engine, clock):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    placed = engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "1", price="2900", client_order_id="c1"))
    assert placed.status == OrderStatus.NEW
    balance = engine.balance_get(EX, ACC, MarketType.SPOT)
    assert balance.used("USDT") == D("2902.9")  # 1 × 2900 × (1 + 0.1 % fee)
    assert balance.free("USDT") == D("100000") - D("2902.9")

    clock.advance()
    assert engine.order_get(EX, ACC, symbol="ETH/USDT", market_type=MarketType.SPOT, client_order_id="c1").status == (
        OrderStatus.NEW
    )

    engine.price_script(EX, "ETH/USDT", ["2850"])
    clock.advance()
    engine.match(EX)
    filled = engine.order_get(EX, ACC, symbol="ETH/USDT", market_type=MarketType.SPOT, client_order_id="c1")
    assert filled.status == OrderStatus.FILLED
    assert filled.filled_quantity == D("1")
    assert filled.average_price == D("2900")  # a resting limit fills at its own price
    assert filled.fee == D("2.9") and filled.fee_currency == "USDT"
    balance = engine.balance_get(EX, ACC, MarketType.SPOT)
    assert balance.used("USDT") == 0
    assert balance.free("USDT") == D("100000") - D("2900") - D("2.9")
    assert balance.free("ETH") == D("11")


def test_market_sell_fills_at_once_with_taker_fee(engine):
    engine.price_script(EX, "BTC/USDT", ["60000"])
    state = engine.order_create(EX, ACC, order("BTC/USDT", "SELL", "MARKET", "0.5"))
    assert state.status == OrderStatus.FILLED
    assert state.average_price == D("60000")
    assert state.fee == D("30")
    balance = engine.balance_get(EX, ACC, MarketType.SPOT)
    assert balance.free("BTC") == D("0.5")
    assert balance.free("USDT") == D("100000") + D("30000") - D("30")


def test_large_order_fills_in_steps(engine, clock):
    engine.price_script(EX, "SOL/USDT", ["150"])
    engine.order_create(EX, ACC, order("SOL/USDT", "BUY", "LIMIT", "250", price="140", client_order_id="big"))
    engine.price_script(EX, "SOL/USDT", ["130"])
    seen = []
    for _ in range(3):
        clock.advance()
        engine.match(EX)
        state = engine.order_get(EX, ACC, symbol="SOL/USDT", market_type=MarketType.SPOT, client_order_id="big")
        seen.append((state.status, state.filled_quantity))
    assert seen == [
        (OrderStatus.PARTIALLY_FILLED, D("100")),  # SOL liquidity: 100 per matching step
        (OrderStatus.PARTIALLY_FILLED, D("200")),
        (OrderStatus.FILLED, D("250")),
    ]
    assert SimFill.objects.filter(order__client_order_id="big").count() == 3
    balance = engine.balance_get(EX, ACC, MarketType.SPOT)
    assert balance.used("USDT") == 0
    assert balance.free("SOL") == D("250")


def test_matching_runs_at_most_once_a_second(engine, clock):
    engine.price_script(EX, "SOL/USDT", ["150"])
    engine.order_create(EX, ACC, order("SOL/USDT", "BUY", "LIMIT", "250", price="140", client_order_id="big"))
    engine.price_script(EX, "SOL/USDT", ["130"])
    clock.advance(1)
    assert engine.match(EX).fills == 1
    assert engine.match(EX).ran is False  # same instant: hammering calls does not fill faster


def test_stop_limit_triggers_and_spawns_a_linked_limit_order(engine, clock):
    engine.price_script(EX, "BTC/USDT", ["65000"])
    stop = engine.order_create(
        EX, ACC, order("BTC/USDT", "SELL", "STOP_LIMIT", "0.1", price="60100", stop_price="60000", client_order_id="s1")
    )
    assert stop.conditional and stop.status == OrderStatus.NEW
    assert [o.client_order_id for o in engine.order_list_open(EX, ACC, MarketType.SPOT, conditional=True)] == ["s1"]
    assert engine.order_list_open(EX, ACC, MarketType.SPOT) == []

    engine.price_script(EX, "BTC/USDT", ["59950"])
    clock.advance()
    assert engine.match(EX).triggers == 1
    triggered = engine.order_get(
        EX, ACC, symbol="BTC/USDT", market_type=MarketType.SPOT, client_order_id="s1", conditional=True
    )
    assert triggered.status == OrderStatus.TRIGGERED
    assert triggered.filled_quantity == 0  # triggered is never a fill
    assert triggered.spawned_order_id and triggered.spawned_client_order_id
    spawned = engine.order_get(
        EX, ACC, symbol="BTC/USDT", market_type=MarketType.SPOT, exchange_order_id=triggered.spawned_order_id
    )
    assert spawned.order_type == OrderType.LIMIT and spawned.price == D("60100")
    assert spawned.status == OrderStatus.NEW  # resting: 59950 < 60100
    assert spawned.client_order_id == triggered.spawned_client_order_id
    assert engine.order_list_open(EX, ACC, MarketType.SPOT, conditional=True) == []
    open_regular = engine.order_list_open(EX, ACC, MarketType.SPOT)
    assert [o.exchange_order_id for o in open_regular] == [spawned.exchange_order_id]
    assert SimOrder.objects.get(pk=int(spawned.exchange_order_id)).parent_id == int(triggered.exchange_order_id)


def test_stop_market_triggers_and_its_market_order_fills_at_once(engine, clock):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "STOP_MARKET", "2", stop_price="3100", client_order_id="sm"))
    engine.price_script(EX, "ETH/USDT", ["3150"])
    clock.advance()
    engine.match(EX)
    triggered = engine.order_get(
        EX, ACC, symbol="ETH/USDT", market_type=MarketType.SPOT, client_order_id="sm", conditional=True
    )
    assert triggered.status == OrderStatus.TRIGGERED
    spawned = engine.order_get(
        EX, ACC, symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=triggered.spawned_order_id
    )
    assert spawned.order_type == OrderType.MARKET
    assert spawned.status == OrderStatus.FILLED
    assert spawned.filled_quantity == D("2") and spawned.average_price == D("3150")


def test_stop_that_would_trigger_immediately_is_rejected(engine):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    with pytest.raises(Rejected, match="immediately trigger"):
        engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "STOP_MARKET", "1", stop_price="2900"))


def test_open_order_cap_per_symbol(engine):
    engine.exchange_configure(EX, open_order_cap=2)
    engine.price_script(EX, "ETH/USDT", ["3000"])
    first = engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2000"))
    engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2001"))
    with pytest.raises(Rejected, match="MAX_NUM_ORDERS"):
        engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2002"))
    # Another symbol, and another account, have their own slots.
    engine.order_create(EX, ACC, order("BTC/USDT", "BUY", "LIMIT", "0.001", price="50000"))
    engine.order_create(EX, "acct-2", order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2002"))
    cancelled = engine.order_cancel(
        EX, ACC, symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=first.exchange_order_id
    )
    assert cancelled.status == OrderStatus.CANCELED
    engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2002"))
    with pytest.raises(NotFound):  # cancelling a cancelled order: unknown order
        engine.order_cancel(
            EX, ACC, symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=first.exchange_order_id
        )


def test_cancel_releases_the_reservation(engine):
    engine.price_script(EX, "BTC/USDT", ["60000"])
    placed = engine.order_create(EX, ACC, order("BTC/USDT", "SELL", "LIMIT", "0.4", price="70000"))
    assert engine.balance_get(EX, ACC, MarketType.SPOT).used("BTC") == D("0.4")
    engine.order_cancel(EX, ACC, symbol="BTC/USDT", market_type=MarketType.SPOT, client_order_id=placed.client_order_id)
    balance = engine.balance_get(EX, ACC, MarketType.SPOT)
    assert balance.used("BTC") == 0 and balance.free("BTC") == D("1")


def test_duplicate_client_order_id(engine):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2000", client_order_id="dup"))
    with pytest.raises(DuplicateClientId):
        engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.2", price="2000", client_order_id="dup"))
    assert SimOrder.objects.filter(client_order_id="dup").count() == 1
    # The same client id is free on another account.
    engine.order_create(EX, "acct-2", order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2000", client_order_id="dup"))


@pytest.mark.parametrize(
    ("request_kwargs", "error", "text"),
    [
        ({"symbol": "NOPE/USDT", "quantity": "1", "price": "1"}, Rejected, "Invalid symbol"),
        ({"symbol": "ETH/USDT", "quantity": "0.00001", "price": "3000"}, Rejected, "LOT_SIZE"),
        ({"symbol": "ETH/USDT", "quantity": "0.00015", "price": "3000"}, Rejected, "LOT_SIZE"),  # not a step multiple
        ({"symbol": "ETH/USDT", "quantity": "0.001", "price": "3000"}, Rejected, "NOTIONAL"),  # 3 USDT < 5
        ({"symbol": "ETH/USDT", "quantity": "1", "price": "3000.001"}, Rejected, "PRICE_FILTER"),
        ({"symbol": "ETH/USDT", "quantity": "100", "price": "3000"}, InsufficientFunds, "insufficient balance"),
    ],
)
def test_rejections(engine, request_kwargs, error, text):
    engine.price_script(EX, "ETH/USDT", ["3100"])
    with pytest.raises(error, match=text):
        engine.order_create(
            EX,
            ACC,
            order(request_kwargs["symbol"], "BUY", "LIMIT", request_kwargs["quantity"], price=request_kwargs["price"]),
        )
    assert SimOrder.objects.count() == 0


def test_balance_set_replaces_the_default_funding(engine):
    engine.balance_set(EX, ACC, MarketType.SPOT, "USDT", free=D("100"))
    engine.price_script(EX, "ETH/USDT", ["3000"])
    with pytest.raises(InsufficientFunds):
        engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "MARKET", "0.1"))
    assert engine.balance_get(EX, ACC, MarketType.SPOT).assets.keys() == {"USDT"}


def test_futures_position_realizes_pnl(engine, clock):
    engine.price_script(EX, "BTC/USDT", ["60000"])
    engine.order_create(EX, ACC, order("BTC/USDT", "BUY", "MARKET", "0.01", market_type=MarketType.FUTURES))
    engine.price_script(EX, "BTC/USDT", ["61000"])
    clock.advance()
    engine.order_create(EX, ACC, order("BTC/USDT", "SELL", "MARKET", "0.01", market_type=MarketType.FUTURES))
    # +10 realized, fees 0.6 + 0.61
    assert engine.balance_get(EX, ACC, MarketType.FUTURES).free("USDT") == D("100000") + D("10") - D("1.21")
    assert engine.position_list(EX, ACC) == []


def test_order_updates_since_cursor(engine, clock):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    updates, cursor = engine.order_updates_since(EX, ACC, 0)
    assert updates == []
    placed = engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "1", price="2900"))
    updates, cursor = engine.order_updates_since(EX, ACC, cursor)
    assert [(u.exchange_order_id, u.status) for u in updates] == [(placed.exchange_order_id, OrderStatus.NEW)]
    assert engine.order_updates_since(EX, ACC, cursor) == ([], cursor)
    engine.price_script(EX, "ETH/USDT", ["2800"])
    clock.advance()
    updates, cursor = engine.order_updates_since(EX, ACC, cursor)
    assert [(u.exchange_order_id, u.status) for u in updates] == [(placed.exchange_order_id, OrderStatus.FILLED)]
    assert engine.order_updates_since(EX, "someone-else", 0) == ([], 0)


def test_walk_price_is_deterministic_and_bounded():
    at = datetime(2025, 1, 1, tzinfo=UTC)
    base = D("100")
    first = walk_price(symbol="BTC/USDT", seed=1, at=at, base_price=base)
    assert first == walk_price(symbol="BTC/USDT", seed=1, at=at, base_price=base)
    assert first != walk_price(symbol="BTC/USDT", seed=2, at=at, base_price=base)
    assert first != walk_price(symbol="ETH/USDT", seed=1, at=at, base_price=base)
    times = [at + timedelta(seconds=17 * i) for i in range(500)]
    prices = [walk_price(symbol="BTC/USDT", seed=1, at=t, base_price=base) for t in times]
    assert all(D("94") < p < D("106") for p in prices)
    assert len(set(prices)) > 400  # it moves
    steps = [abs(b - a) for a, b in zip(prices, prices[1:], strict=False)]
    assert max(steps) < D("1")  # continuous: interpolated, no jumps


def test_engine_uses_the_walk_without_a_script(engine, clock):
    a = engine.price_get(EX, MarketType.SPOT, "BTC/USDT")
    assert engine.price_get(EX, MarketType.SPOT, "BTC/USDT") == a
    assert D("60000") < a < D("70000")
    assert a == a.quantize(D("0.01"))  # on the tick
    clock.advance(3600)
    assert engine.price_get(EX, MarketType.SPOT, "BTC/USDT") != a


# --- PAPER gateway and faults -----------------------------------------------------------


@pytest.fixture
def gateway(engine):
    engine.price_script(EX, "ETH/USDT", ["3000"])
    return PaperGateway(ACC, engine=engine)


def test_paper_gateway_satisfies_the_protocol(gateway):
    assert isinstance(gateway, ExchangeGateway)
    assert {m.symbol for m in gateway.load_markets(MarketType.SPOT)} >= {"BTC/USDT", "ETH/USDT", "DOGE/USDT"}
    assert gateway.fetch_last_prices(MarketType.SPOT, ["ETH/USDT"]) == {"ETH/USDT": D("3000")}


def test_create_reply_lost_after_commit_is_found_by_client_id(gateway, engine):
    engine.fault_add(SimFault.Kind.TIMEOUT, exchange=EX, endpoint="create_order", phase=SimFault.Phase.AFTER)
    with pytest.raises(Network):
        gateway.create_order(order("ETH/USDT", "BUY", "LIMIT", "1", price="2900", client_order_id="lost-1"))
    found = gateway.fetch_order(symbol="ETH/USDT", market_type=MarketType.SPOT, client_order_id="lost-1")
    assert found.status == OrderStatus.NEW and found.quantity == D("1")
    with pytest.raises(DuplicateClientId):  # a blind retry would be refused, never doubled
        gateway.create_order(order("ETH/USDT", "BUY", "LIMIT", "1", price="2900", client_order_id="lost-1"))


@pytest.mark.parametrize(
    ("kind", "error"),
    [
        (SimFault.Kind.TIMEOUT, Network),
        (SimFault.Kind.HTTP_5XX, ExchangeError),
        (SimFault.Kind.HTTP_429, RateLimited),
        (SimFault.Kind.MAINTENANCE, Maintenance),
    ],
)
def test_fault_kinds_raise_typed_errors_before_anything_happens(gateway, engine, kind, error):
    engine.fault_add(kind, exchange=EX, endpoint="create_order", account=ACC, remaining=1)
    with pytest.raises(error):
        gateway.create_order(order("ETH/USDT", "BUY", "LIMIT", "1", price="2900", client_order_id="f1"))
    assert SimOrder.objects.count() == 0
    assert SimFault.objects.get().remaining == 0
    # Consumed: the next call goes through.
    assert gateway.create_order(order("ETH/USDT", "BUY", "LIMIT", "1", price="2900", client_order_id="f1")).status == (
        OrderStatus.NEW
    )


def test_fault_scope_matches_exchange_endpoint_and_account(gateway, engine):
    engine.fault_add(SimFault.Kind.HTTP_429, exchange="BINANCE", remaining=None)
    engine.fault_add(SimFault.Kind.HTTP_429, endpoint="fetch_balance", remaining=None)
    engine.fault_add(SimFault.Kind.HTTP_429, account="other", remaining=None)
    gateway.fetch_open_orders(MarketType.SPOT)  # none of them match
    with pytest.raises(RateLimited):
        gateway.fetch_balance(MarketType.SPOT)


def test_latency_fault_sleeps_and_succeeds(gateway, engine, sleeps):
    engine.fault_add(SimFault.Kind.LATENCY, endpoint="fetch_balance", latency_ms=1500, remaining=2)
    gateway.fetch_balance(MarketType.SPOT)
    gateway.fetch_balance(MarketType.SPOT)
    gateway.fetch_balance(MarketType.SPOT)
    assert sleeps == [1.5, 1.5]


def test_a_callers_call_policy_cuts_a_slow_reply_short_like_a_real_client(gateway, engine, sleeps):
    # PAPER runs in the caller's thread, so the queue's short timeout applies here as it does to ccxt.
    engine.fault_add(SimFault.Kind.LATENCY, endpoint="create_order", phase="after", latency_ms=3000)
    with call_policy(timeout_ms=500), pytest.raises(Network, match="timed out after 500 ms"):
        gateway.create_order(order("ETH/USDT", "BUY", "LIMIT", "1", price="2900", client_order_id="slow1"))
    assert sleeps == [0.5]
    assert SimOrder.objects.filter(client_order_id="slow1").count() == 1  # it was placed; the reply was lost
    engine.fault_add(SimFault.Kind.LATENCY, endpoint="fetch_balance", latency_ms=300)
    with call_policy(timeout_ms=500):
        gateway.fetch_balance(MarketType.SPOT)  # within the limit: slow, and fine
    assert sleeps == [0.5, 0.3]


def test_a_calls_before_lookup_consumes_only_a_before_fault_and_says_whether_an_after_fault_is_armed(engine):
    assert engine.fault_take_before(EX, "create_order", "acct") == (None, False)

    after = engine.fault_add(SimFault.Kind.TIMEOUT, exchange=EX, endpoint="create_order", phase=SimFault.Phase.AFTER)
    assert engine.fault_take_before(EX, "create_order", "acct") == (None, True)
    assert engine.fault_take_before(EX, "cancel_order", "acct") == (None, False)  # out of its scope

    before = engine.fault_add(SimFault.Kind.HTTP_5XX, exchange=EX, endpoint="create_order")
    hit, armed = engine.fault_take_before(EX, "create_order", "acct")
    assert (hit.fault_id, hit.kind, armed) == (before, SimFault.Kind.HTTP_5XX, True)
    assert dict(SimFault.objects.values_list("id", "remaining")) == {after: 1, before: 0}  # the after one waits
    assert engine.fault_take(EX, "create_order", "acct", phase=SimFault.Phase.AFTER).fault_id == after


def test_probability_fault(engine):
    engine.fault_add(SimFault.Kind.MAINTENANCE, remaining=None, probability=D("0"))
    engine.fault_check(EX, "fetch_balance", ACC)  # probability 0 never fires
    engine.fault_add(SimFault.Kind.MAINTENANCE, remaining=None, probability=D("1"))
    with pytest.raises(Maintenance):
        engine.fault_check(EX, "fetch_balance", ACC)


def test_ws_faults_are_separate_from_rest_faults(engine):
    engine.fault_add(SimFault.Kind.WS_DROP, exchange=EX, account=ACC)
    engine.fault_check(EX, "fetch_balance", ACC)  # a ws fault never breaks REST
    assert engine.fault_ws_take(EX, ACC) == "ws_drop"
    assert engine.fault_ws_take(EX, ACC) is None


def test_error_messages_carry_no_secrets(engine):
    secret_account = "apikey-SECRET-abcdef123456"
    engine.fault_add(SimFault.Kind.TIMEOUT, account=secret_account)
    with pytest.raises(Network) as caught:
        PaperGateway(secret_account, engine=engine).fetch_balance(MarketType.SPOT)
    assert secret_account not in str(caught.value)


def test_synthetic_symbols_extend_both_catalogs(engine, settings):
    from exchanges.simulator.catalog import FUTURES_MARKETS, SPOT_MARKETS

    settings.SIMULATOR_SYNTHETIC_SYMBOLS = 25
    spot = [rule.symbol for rule in engine.market_list(EX, MarketType.SPOT)]
    assert len(spot) == len(SPOT_MARKETS) + 25 and spot[-1] == "SYN0025/USDT"
    assert len(engine.market_list(EX, MarketType.FUTURES)) == len(FUTURES_MARKETS) + 25
    prices = engine.prices_last(EX, MarketType.FUTURES)
    assert len(prices) == len(FUTURES_MARKETS) + 25 and prices["SYN0007/USDT"] > 0
    state = engine.order_create(EX, ACC, order("SYN0007/USDT", "BUY", "MARKET", "10", market_type=MarketType.FUTURES))
    assert state.status == OrderStatus.FILLED
    settings.SIMULATOR_SYNTHETIC_SYMBOLS = 0
    assert len(engine.market_list(EX, MarketType.SPOT)) == len(SPOT_MARKETS)


def test_open_order_cap_counts_what_the_accounts_own_step_just_filled(engine, clock):
    engine.exchange_configure(EX, open_order_cap=2)
    engine.price_script(EX, "ETH/USDT", ["3000"])
    engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2900"))
    engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2950"))
    clock.advance()  # the next create runs the account's step first: nothing due, both still open
    with pytest.raises(Rejected, match="MAX_NUM_ORDERS"):
        engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2800"))

    engine.price_script(EX, "ETH/USDT", ["2925"])
    clock.advance()  # the step inside this create fills the 2950 order first, freeing its slot
    placed = engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2800", client_order_id="c3"))
    assert placed.status == OrderStatus.NEW
    statuses = sorted(SimOrder.objects.filter(exchange=EX, account=ACC).values_list("price", "status"))
    assert statuses == [(D("2800"), "NEW"), (D("2900"), "NEW"), (D("2950"), "FILLED")]
    assert SimFill.objects.filter(order__price=D("2950")).count() == 1


def test_a_market_create_reads_and_writes_each_row_once(engine):
    """The account's books: one insert of the order (with its final state), one write per changed balance,
    the new position inserted at once, no savepoint of its own."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    engine.price_script(EX, "ETH/USDT", ["3000"])
    engine.balance_get(EX, ACC, MarketType.FUTURES)  # the exchange's row exists and its step at `now` is done
    engine.match(EX)
    request = order("ETH/USDT", "BUY", "MARKET", "0.05", market_type=MarketType.FUTURES, client_order_id="m1")
    with CaptureQueriesContext(connection) as queries:
        placed = engine.order_create(EX, "new-acct", request)
    assert placed.status == OrderStatus.FILLED
    statements = [q["sql"] for q in queries.captured_queries]

    def count(prefix: str, table: str) -> int:
        return sum(1 for sql in statements if sql.startswith(prefix) and f'"exchanges_{table}"' in sql.split("(")[0])

    assert count("INSERT", "simorder") == 1 and count("UPDATE", "simorder") == 0
    assert count("INSERT", "simfill") == 1
    assert count("UPDATE", "simbalance") == 1  # reserve, release and settle of the USDT margin: one write
    assert count("INSERT", "simposition") == 1 and count("UPDATE", "simposition") == 0
    assert count("UPDATE", "simaccount") == 1
    # The test's own transaction turns the engine's into one savepoint: no other.
    assert sum(1 for sql in statements if sql.startswith("SAVEPOINT")) <= 1, "\n".join(statements)
    assert len(statements) <= 18, "\n".join(statements)
    balance = engine.balance_get(EX, "new-acct", MarketType.FUTURES)
    assert balance.free("USDT") == D("100000") - D("0.15") and balance.used("USDT") == 0  # the taker fee
    assert [(p.symbol, p.quantity, p.entry_price) for p in engine.position_list(EX, "new-acct")] == [
        ("ETH/USDT", D("0.05"), D("3000"))
    ]


def test_a_refused_create_keeps_what_the_accounts_step_matched_and_nothing_else(engine, clock):
    from exchanges.models import SimAccount, SimBalance

    engine.price_script(EX, "ETH/USDT", ["3000"])
    resting = engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2950"))
    clock.advance()
    assert engine.match(EX).ran  # the exchange's step at this time, with nothing due yet
    engine.price_script(EX, "ETH/USDT", ["2925"])
    with pytest.raises(Rejected, match="LOT_SIZE"):  # the account's own step fills the resting order first
        engine.order_create(EX, ACC, order("ETH/USDT", "BUY", "LIMIT", "0.00001", price="2900"))
    assert SimOrder.objects.get(pk=resting.exchange_order_id).status == "FILLED"
    assert SimFill.objects.filter(order_id=resting.exchange_order_id).count() == 1
    assert SimOrder.objects.filter(exchange=EX, account=ACC).count() == 1

    # A new account's refused first create leaves no row behind: no order, balance or account.
    with pytest.raises(InsufficientFunds):
        engine.order_create(EX, "acct-new", order("ETH/USDT", "BUY", "LIMIT", "1000", price="2900"))
    assert not SimOrder.objects.filter(account="acct-new").exists()
    assert not SimBalance.objects.filter(account="acct-new").exists()
    assert not SimAccount.objects.filter(account="acct-new").exists()
