"""CcxtGateway: error mapping, and every method through real ccxt against the dialect server."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import ccxt
import pytest

from core.scrub import scrub
from exchanges import ccxt_gateway
from exchanges import gateway as gw
from exchanges.ccxt_gateway import _rewrite_urls, map_ccxt_error
from exchanges.gateway import CallPolicy, MarketType, OrderRequest, OrderStatus, OrderType, Side, call_policy
from exchanges.models import SimFault, SimOrder
from exchanges.simulator.engine import default_engine
from tests.exchanges import ccxt_sim_support
from tests.exchanges.ccxt_sim_support import API_KEY, API_SECRET

# The dialect-server fixtures, shared with the other real-ccxt test module.
sim_server = ccxt_sim_support.sim_server
sim_urls = ccxt_sim_support.sim_urls
make_gateway = ccxt_sim_support.make_gateway

COMBOS = [
    ("binance", MarketType.SPOT),
    ("binance", MarketType.FUTURES),
    ("bybit", MarketType.SPOT),
    ("bybit", MarketType.FUTURES),
]


# --- error mapping, one test per row (SPEC §5) ------------------------------------------


def test_map_order_not_found():
    assert isinstance(map_ccxt_error(ccxt.OrderNotFound("binance -2013")), gw.NotFound)


def test_map_duplicate_order_id():
    assert isinstance(map_ccxt_error(ccxt.DuplicateOrderId("dup")), gw.DuplicateClientId)


@pytest.mark.parametrize(
    "exc",
    [
        ccxt.InvalidOrder('binanceusdm {"code":-4116,"msg":"ClientOrderId is duplicated."}'),
        ccxt.InvalidOrder('binance {"code":-2010,"msg":"Duplicate order sent."}'),
        ccxt.InvalidOrder('bybit {"retCode":110072,"retMsg":"OrderLinkedID is duplicate"}'),
        ccxt.ExchangeError('binanceusdm {"code":-4116,"msg":"ClientOrderId is duplicated."}'),
    ],
)
def test_map_invalid_order_with_duplicate_code(exc):
    error = map_ccxt_error(exc)
    assert isinstance(error, gw.DuplicateClientId) and not isinstance(error, gw.Rejected)


@pytest.mark.parametrize("cls", [ccxt.OnMaintenance, ccxt.ExchangeNotAvailable])
def test_map_maintenance(cls):
    assert isinstance(map_ccxt_error(cls("down")), gw.Maintenance)


@pytest.mark.parametrize("cls", [ccxt.RateLimitExceeded, ccxt.DDoSProtection])
def test_map_rate_limited(cls):
    assert isinstance(map_ccxt_error(cls("slow down")), gw.RateLimited)


@pytest.mark.parametrize("cls", [ccxt.RequestTimeout, ccxt.NetworkError, ccxt.InvalidNonce])
def test_map_network(cls):
    assert isinstance(map_ccxt_error(cls("timeout")), gw.Network)


@pytest.mark.parametrize("cls", [ccxt.AuthenticationError, ccxt.PermissionDenied])
def test_map_auth(cls):
    assert isinstance(map_ccxt_error(cls("bad key")), gw.Auth)


def test_map_insufficient_funds():
    assert isinstance(map_ccxt_error(ccxt.InsufficientFunds("-2019")), gw.InsufficientFunds)


@pytest.mark.parametrize("cls", [ccxt.InvalidOrder, ccxt.BadSymbol, ccxt.OrderImmediatelyFillable, ccxt.BadRequest])
def test_map_rejected(cls):
    assert isinstance(map_ccxt_error(cls("no")), gw.Rejected)


@pytest.mark.parametrize("cls", [ccxt.ExchangeError, ccxt.OperationRejected, ccxt.OperationFailed])
def test_map_other_exchange_error(cls):
    error = map_ccxt_error(cls("boom"))
    assert type(error) is gw.ExchangeError


def test_map_scrubs_secrets():
    ccxt_gateway.secret_register("verysecretvalue123")
    signature = "9f2c" * 16  # HMAC-SHA256 hex, as Binance and Bybit sign
    error = map_ccxt_error(ccxt.ExchangeError(f"GET https://x/api?signature={signature}&k=verysecretvalue123"))
    assert "verysecretvalue123" not in str(error) and signature not in str(error)


def test_rewrite_urls_keeps_paths():
    urls = {
        "public": "https://api.binance.com/api/v3",
        "fapiPrivateV2": "https://fapi.binance.com/fapi/v2",
        "nested": {"private": "https://api.{hostname}"},
    }
    assert _rewrite_urls(urls, "http://127.0.0.1:9") == {
        "public": "http://127.0.0.1:9/api/v3",
        "fapiPrivateV2": "http://127.0.0.1:9/fapi/v2",
        "nested": {"private": "http://127.0.0.1:9"},
    }


# --- through real ccxt -------------------------------------------------------------------


def _limit_buy(gateway, market_type, cid, *, factor="0.8", symbol="BTC/USDT"):
    price = gateway.fetch_last_prices(market_type, [symbol])[symbol]
    tick = Decimal("0.1")
    return OrderRequest(
        symbol=symbol,
        market_type=market_type,
        side=Side.BUY,
        order_type=OrderType.LIMIT,
        quantity=Decimal("0.01"),
        price=(price * Decimal(factor)).quantize(tick),
        client_order_id=cid,
    )


@pytest.mark.parametrize(("exchange", "market_type"), COMBOS)
def test_markets_prices_balance(make_gateway, exchange, market_type):
    gateway = make_gateway(exchange, market_type)
    rules = {r.symbol: r for r in gateway.load_markets(market_type)}
    assert "BTC/USDT" in rules and rules["BTC/USDT"].market_type == market_type
    assert rules["BTC/USDT"].tick_size > 0 and rules["BTC/USDT"].step_size > 0
    # ccxt's limits.amount.max and limits.price.max, as the dialect server reports them.
    assert rules["BTC/USDT"].max_qty == (Decimal("9000") if market_type == MarketType.SPOT else Decimal("1000"))
    # ccxt reads no price maximum for Bybit spot (its real priceFilter has none there): no limit, not a guess.
    no_max_price = exchange == "bybit" and market_type == MarketType.SPOT
    assert rules["BTC/USDT"].max_price == (None if no_max_price else Decimal("10000000"))
    prices = gateway.fetch_last_prices(market_type)
    assert set(prices) == set(rules) and all(p > 0 for p in prices.values())
    assert gateway.fetch_last_prices(market_type, ["ETH/USDT"]).keys() == {"ETH/USDT"}
    balance = gateway.fetch_balance(market_type)
    assert balance.free("USDT") >= Decimal("100000")


def test_markets_loaded_once_and_shared(make_gateway, monkeypatch):
    calls = []
    original = ccxt.binanceusdm.fetch_markets
    monkeypatch.setattr(ccxt.binanceusdm, "fetch_markets", lambda self, params={}: calls.append(1) or original(self))
    first = make_gateway("binance", MarketType.FUTURES, account="a1")
    second = make_gateway("binance", MarketType.FUTURES, account="a2")
    first.load_markets(MarketType.FUTURES)
    second.fetch_balance(MarketType.FUTURES)
    second.load_markets(MarketType.FUTURES)
    c1 = first._client(MarketType.FUTURES)
    c2 = second._client(MarketType.FUTURES)
    assert len(calls) == 1  # one exchangeInfo per (exchange, market type) for every account
    assert c1 is not c2  # one instance per account
    assert c1 is first._client(MarketType.FUTURES)  # kept for the process lifetime
    assert set(c1.markets) == set(c2.markets) and "BTC/USDT:USDT" in c1.markets and c1.id == "binanceusdm"


@pytest.mark.parametrize(("exchange", "market_type"), COMBOS)
def test_order_lifecycle(make_gateway, exchange, market_type):
    gateway = make_gateway(exchange, market_type)
    cid = f"life-{exchange[:2]}-{market_type[:2]}"
    created = gateway.create_order(_limit_buy(gateway, market_type, cid))
    assert created.client_order_id == cid and created.status == OrderStatus.NEW and created.exchange_order_id
    live = gateway.fetch_open_orders(market_type)
    assert [o.client_order_id for o in live] == [cid]
    assert gateway.fetch_open_orders(market_type, conditional=True) == []
    by_cid = gateway.fetch_order(symbol="BTC/USDT", market_type=market_type, client_order_id=cid)
    by_id = gateway.fetch_order(symbol="BTC/USDT", market_type=market_type, exchange_order_id=created.exchange_order_id)
    assert by_cid.exchange_order_id == by_id.exchange_order_id == created.exchange_order_id
    assert by_id.symbol == "BTC/USDT" and by_id.quantity == Decimal("0.01") and by_id.order_type == OrderType.LIMIT
    cancelled = gateway.cancel_order(
        symbol="BTC/USDT", market_type=market_type, exchange_order_id=created.exchange_order_id
    )
    assert cancelled.status == OrderStatus.CANCELED and cancelled.quantity == Decimal("0.01")
    # History: a cancelled order is still found by client id, and no longer open.
    assert gateway.fetch_order(symbol="BTC/USDT", market_type=market_type, client_order_id=cid).status == (
        OrderStatus.CANCELED
    )
    assert gateway.fetch_open_orders(market_type) == []
    with pytest.raises(gw.NotFound):
        gateway.cancel_order(symbol="BTC/USDT", market_type=market_type, exchange_order_id=created.exchange_order_id)
    with pytest.raises(gw.NotFound):
        gateway.fetch_order(symbol="BTC/USDT", market_type=market_type, client_order_id="never-placed")


@pytest.mark.parametrize(("exchange", "market_type"), COMBOS)
def test_market_order_fills(make_gateway, exchange, market_type):
    gateway = make_gateway(exchange, market_type)
    request = OrderRequest(
        symbol="ETH/USDT",
        market_type=market_type,
        side=Side.BUY,
        order_type=OrderType.MARKET,
        quantity=Decimal("0.1"),
        client_order_id=f"mkt-{exchange}-{market_type}",
    )
    gateway.create_order(request)
    state = gateway.fetch_order(symbol="ETH/USDT", market_type=market_type, client_order_id=request.client_order_id)
    assert state.status == OrderStatus.FILLED and state.filled_quantity == Decimal("0.1")
    assert state.average_price and state.average_price > 0


@pytest.mark.parametrize(("exchange", "market_type"), COMBOS)
def test_duplicate_client_id_is_not_rejected(make_gateway, exchange, market_type):
    gateway = make_gateway(exchange, market_type)
    request = _limit_buy(gateway, market_type, f"dup-{exchange}-{market_type}")
    gateway.create_order(request)
    with pytest.raises(gw.DuplicateClientId):
        gateway.create_order(request)


@pytest.mark.parametrize(("exchange", "market_type"), COMBOS)
def test_insufficient_funds(make_gateway, exchange, market_type):
    gateway = make_gateway(exchange, market_type)
    request = OrderRequest(
        symbol="BTC/USDT",
        market_type=market_type,
        side=Side.BUY,
        order_type=OrderType.LIMIT,
        quantity=Decimal("900"),
        price=Decimal("60000"),
        client_order_id="too-big",
    )
    with pytest.raises(gw.InsufficientFunds):
        gateway.create_order(request)


@pytest.mark.parametrize("exchange", ["binance", "bybit"])
def test_bad_signature_is_auth(make_gateway, exchange):
    gateway = make_gateway(exchange, MarketType.SPOT, secret="wrong-secret-000000")
    with pytest.raises(gw.Auth) as info:
        gateway.fetch_balance(MarketType.SPOT)
    assert "wrong-secret-000000" not in str(info.value)


FAULTS = [
    (SimFault.Kind.HTTP_429, gw.RateLimited),
    (SimFault.Kind.MAINTENANCE, gw.Maintenance),
    (SimFault.Kind.HTTP_5XX, gw.ExchangeError),
    (SimFault.Kind.TIMEOUT, gw.Network),
]


@pytest.mark.parametrize(("exchange", "market_type"), [COMBOS[1], COMBOS[2]])
@pytest.mark.parametrize(("kind", "error"), FAULTS)
def test_injected_faults_raise_typed_errors(make_gateway, exchange, market_type, kind, error):
    gateway = make_gateway(exchange, market_type)
    default_engine.fault_add(kind, exchange=exchange.upper(), endpoint="fetch_balance", remaining=1)
    with pytest.raises(error):
        gateway.fetch_balance(market_type)
    assert gateway.fetch_balance(market_type).free("USDT") > 0  # consumed: the next call passes


@pytest.mark.parametrize("kind", [SimFault.Kind.HTTP_429, SimFault.Kind.TIMEOUT])
def test_reads_retry_network_and_rate_limit(make_gateway, kind):
    gateway = make_gateway("binance", MarketType.SPOT, retries=2)
    gateway.load_markets(MarketType.SPOT)
    default_engine.fault_add(kind, exchange="BINANCE", endpoint="fetch_open_orders", remaining=2)
    assert gateway.fetch_open_orders(MarketType.SPOT) == []
    assert SimFault.objects.get().fired == 2


def test_reads_do_not_retry_maintenance(make_gateway):
    gateway = make_gateway("bybit", MarketType.SPOT, retries=3)
    gateway.load_markets(MarketType.SPOT)
    default_engine.fault_add(SimFault.Kind.MAINTENANCE, exchange="BYBIT", endpoint="fetch_open_orders", remaining=5)
    with pytest.raises(gw.Maintenance):
        gateway.fetch_open_orders(MarketType.SPOT)
    assert SimFault.objects.get().fired == 1


@pytest.mark.parametrize(("exchange", "market_type"), COMBOS)
def test_create_timeout_is_not_retried_and_found_by_client_id(make_gateway, exchange, market_type):
    gateway = make_gateway(exchange, market_type, retries=3)
    request = _limit_buy(gateway, market_type, f"to-{exchange}-{market_type}")
    default_engine.fault_add(
        SimFault.Kind.TIMEOUT, exchange=exchange.upper(), endpoint="create_order", phase=SimFault.Phase.AFTER
    )
    with pytest.raises(gw.Network):
        gateway.create_order(request)
    assert SimOrder.objects.filter(client_order_id=request.client_order_id).count() == 1  # sent once
    found = gateway.fetch_order(symbol="BTC/USDT", market_type=market_type, client_order_id=request.client_order_id)
    assert found.status == OrderStatus.NEW and found.client_order_id == request.client_order_id


def test_a_call_policy_shortens_only_its_own_threads_timeout_and_drops_retries(make_gateway):
    # The 1 s queue bounds its calls this way while reconcile, prices etc. share the same ccxt instance.
    gateway = make_gateway("binance", MarketType.SPOT, retries=3)
    gateway.load_markets(MarketType.SPOT)
    client = gateway._client(MarketType.SPOT)
    assert client.timeout == 1500  # sim_urls' EXCHANGE_HTTP_TIMEOUT_MS
    default_engine.fault_add(SimFault.Kind.TIMEOUT, exchange="BINANCE", endpoint="fetch_order", remaining=5)
    seen_elsewhere: list[int] = []
    with call_policy(timeout_ms=300, retries=0) as policy:
        assert policy == CallPolicy(timeout_ms=300, retries=0) and client.timeout == 300
        other = threading.Thread(target=lambda: seen_elsewhere.append(client.timeout))
        other.start()
        other.join()
        started = time.monotonic()
        with pytest.raises(gw.Network):
            gateway.fetch_order(symbol="BTC/USDT", market_type=MarketType.SPOT, client_order_id="held-reply")
        took = time.monotonic() - started
    print(f"fetch_order under a 300 ms policy against a held reply: {took:.2f} s")
    assert seen_elsewhere == [1500]  # another thread, same instance, inside the block: its own timeout
    assert took < 1.2  # the reply is held 3 s and the instance's own timeout is 1.5 s
    assert SimFault.objects.get().fired == 1  # not retried, although the gateway retries reads 3 times
    assert client.timeout == 1500


def test_a_call_policy_never_lengthens_the_timeout_and_rejects_nonsense(make_gateway):
    client = make_gateway("bybit", MarketType.SPOT)._client(MarketType.SPOT)
    with call_policy(timeout_ms=60_000):
        assert client.timeout == 1500
    with pytest.raises(ValueError, match="timeout_ms must be positive"), call_policy(timeout_ms=0):
        pass
    with pytest.raises(ValueError, match="retries must be 0 or more"), call_policy(retries=-1):
        pass


def _stop_request(gateway, market_type, cid, order_type=OrderType.STOP_LIMIT):
    price = gateway.fetch_last_prices(market_type, ["BTC/USDT"])["BTC/USDT"]
    stop = (price * Decimal("1.01")).quantize(Decimal("0.1"))
    return OrderRequest(
        symbol="BTC/USDT",
        market_type=market_type,
        side=Side.BUY,
        order_type=order_type,
        quantity=Decimal("0.01"),
        price=(stop * Decimal("1.01")).quantize(Decimal("0.1")) if order_type == OrderType.STOP_LIMIT else None,
        stop_price=stop,
        client_order_id=cid,
    ), stop


def _push_price_over(exchange, stop):
    default_engine.price_script(exchange, "BTC/USDT", [stop * Decimal("1.001")])
    time.sleep(1.1)  # past the engine's match interval


@pytest.mark.parametrize(("exchange", "market_type"), COMBOS)
def test_conditional_order_listed_triggered_and_linked(make_gateway, exchange, market_type):
    gateway = make_gateway(exchange, market_type)
    request, stop = _stop_request(gateway, market_type, f"stop-{exchange}-{market_type}")
    created = gateway.create_order(request)
    assert created.conditional and created.status == OrderStatus.NEW
    conditional = gateway.fetch_open_orders(market_type, conditional=True)
    assert [o.client_order_id for o in conditional] == [request.client_order_id]
    assert conditional[0].stop_price == stop and conditional[0].order_type == OrderType.STOP_LIMIT
    assert gateway.fetch_open_orders(market_type) == []
    _push_price_over(exchange.upper(), stop)
    assert gateway.fetch_open_orders(market_type, conditional=True) == []
    fired = gateway.fetch_order(
        symbol="BTC/USDT", market_type=market_type, exchange_order_id=created.exchange_order_id, conditional=True
    )
    assert fired.status == OrderStatus.TRIGGERED and fired.status != OrderStatus.FILLED
    assert fired.spawned_order_id
    spawned = gateway.fetch_order(symbol="BTC/USDT", market_type=market_type, exchange_order_id=fired.spawned_order_id)
    assert not spawned.conditional and spawned.order_type == OrderType.LIMIT
    assert spawned.side == Side.BUY and spawned.quantity == Decimal("0.01")
    assert [o.exchange_order_id for o in gateway.fetch_open_orders(market_type)] in ([fired.spawned_order_id], [])


def test_binance_usdm_stop_goes_through_algo_endpoints(make_gateway):
    gateway = make_gateway("binance", MarketType.FUTURES)
    request, stop = _stop_request(gateway, MarketType.FUTURES, "algo-1", OrderType.STOP_MARKET)
    client = gateway._client(MarketType.FUTURES)
    created = gateway.create_order(request)
    assert "/fapi/v1/algoOrder" in client.last_request_url
    listed = gateway.fetch_open_orders(MarketType.FUTURES, conditional=True)
    assert [o.exchange_order_id for o in listed] == [created.exchange_order_id]
    assert "/fapi/v1/openAlgoOrders" in client.last_request_url
    _push_price_over("BINANCE", stop)
    fired = gateway.fetch_order(
        symbol="BTC/USDT", market_type=MarketType.FUTURES, client_order_id="algo-1", conditional=True
    )
    assert fired.status == OrderStatus.TRIGGERED and fired.filled_quantity == 0
    child = gateway.fetch_order(
        symbol="BTC/USDT", market_type=MarketType.FUTURES, exchange_order_id=fired.spawned_order_id
    )
    assert child.status == OrderStatus.FILLED and child.order_type == OrderType.MARKET
    assert child.exchange_order_id != created.exchange_order_id


@pytest.mark.parametrize(("exchange", "market_type"), COMBOS)
def test_cancel_conditional(make_gateway, exchange, market_type):
    gateway = make_gateway(exchange, market_type)
    request, _ = _stop_request(gateway, market_type, f"cstop-{exchange}-{market_type}")
    created = gateway.create_order(request)
    cancelled = gateway.cancel_order(
        symbol="BTC/USDT", market_type=market_type, client_order_id=request.client_order_id, conditional=True
    )
    assert cancelled.status == OrderStatus.CANCELED and cancelled.exchange_order_id == created.exchange_order_id
    assert gateway.fetch_open_orders(market_type, conditional=True) == []


def test_secrets_never_in_errors(make_gateway):
    gateway = make_gateway("binance", MarketType.SPOT)
    default_engine.fault_add(SimFault.Kind.HTTP_5XX, exchange="BINANCE", endpoint="fetch_balance")
    with pytest.raises(gw.ExchangeError) as info:
        gateway.fetch_balance(MarketType.SPOT)
    assert API_KEY not in str(info.value) and API_SECRET not in str(info.value)
    assert scrub(API_KEY) == "***"


def test_gateway_for_builds_ccxt_gateway(sim_urls):
    from exchanges.services import gateway_for

    account = type("Acct", (), {"exchange": "BYBIT", "pk": 7, "api_key": API_KEY, "api_secret": API_SECRET})()
    gateway = gateway_for(account)
    assert isinstance(gateway, ccxt_gateway.CcxtGateway) and gateway.account_key == "account-7"
    assert gateway.fetch_balance(MarketType.FUTURES).free("USDT") > 0
