"""The dialect server on the wire: signature checks with the real error codes, and both user streams."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from decimal import Decimal

import pytest
import requests
import websockets

from exchanges import gateway as gw
from exchanges.ccxt_gateway import CcxtGateway
from exchanges.gateway import MarketType, OrderRequest, OrderType, Side
from exchanges.models import SimOrder
from exchanges.simulator.engine import default_engine
from tests.exchanges import ccxt_sim_support
from tests.exchanges.ccxt_sim_support import API_KEY, API_SECRET, OTHER_KEY, OTHER_SECRET

# The dialect-server fixtures, shared with the other real-ccxt test module.
sim_server = ccxt_sim_support.sim_server
sim_urls = ccxt_sim_support.sim_urls
make_gateway = ccxt_sim_support.make_gateway


def _place(exchange, symbol, market_type, side, order_type, quantity, client_order_id, price=None):  # noqa: ANN001, ANN202
    """An order straight into the engine, as another client of the same exchange would place it."""
    return default_engine.order_create(
        exchange,
        API_KEY,
        OrderRequest(
            symbol=symbol,
            market_type=market_type,
            side=side,
            order_type=order_type,
            quantity=Decimal(quantity),
            price=Decimal(price) if price else None,
            client_order_id=client_order_id,
        ),
    )


def _binance_signed(base, path, params, secret=API_SECRET, method="GET"):
    query = "&".join(f"{k}={v}" for k, v in {**params, "timestamp": int(time.time() * 1000)}.items())
    signature = hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest()
    return requests.request(
        method, f"{base}{path}?{query}&signature={signature}", headers={"X-MBX-APIKEY": API_KEY}, timeout=5
    )


def test_binance_signature_checked(sim_urls):
    good = _binance_signed(sim_urls.base_url, "/api/v3/account", {})
    assert good.status_code == 200 and "balances" in good.json()
    bad = _binance_signed(sim_urls.base_url, "/api/v3/account", {}, secret="not-the-secret")
    assert bad.status_code == 400 and bad.json()["code"] == -1022
    no_key = requests.get(f"{sim_urls.base_url}/fapi/v3/account?timestamp=1&signature=x", timeout=5)
    assert no_key.status_code == 401 and no_key.json()["code"] == -2015


def test_bybit_signature_checked(sim_urls):
    query = "accountType=UNIFIED"
    ts, window = str(int(time.time() * 1000)), "5000"

    def call(secret):
        sign = hmac.new(secret.encode(), f"{ts}{API_KEY}{window}{query}".encode(), hashlib.sha256).hexdigest()
        headers = {"X-BAPI-API-KEY": API_KEY, "X-BAPI-TIMESTAMP": ts, "X-BAPI-RECV-WINDOW": window, "X-BAPI-SIGN": sign}
        return requests.get(f"{sim_urls.base_url}/v5/account/wallet-balance?{query}", headers=headers, timeout=5)

    assert call(API_SECRET).json()["retCode"] == 0
    bad = call("not-the-secret")
    assert bad.status_code == 200 and bad.json()["retCode"] == 10004


def test_binance_listen_key_stream_sends_order_updates(sim_urls):
    base = sim_urls.base_url
    key = requests.post(f"{base}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": API_KEY}, timeout=5).json()["listenKey"]
    assert requests.put(f"{base}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": API_KEY}, timeout=5).json() == {}

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{sim_urls.port}/ws/{key}") as ws:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(
                _place, "BINANCE", "ETH/USDT", MarketType.FUTURES, Side.BUY, OrderType.MARKET, "0.1", "ws-1"
            )
            return [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]

    new, trade, account = asyncio.run(run())
    # Like the real stream: NEW first, then the fill (TRADE), then the balance and position it changed.
    assert new["e"] == "ORDER_TRADE_UPDATE" and new["o"]["c"] == "ws-1"
    assert (new["o"]["x"], new["o"]["X"], new["o"]["z"]) == ("NEW", "NEW", "0")
    assert (trade["o"]["x"], trade["o"]["X"], trade["o"]["z"], trade["o"]["l"]) == ("TRADE", "FILLED", "0.1", "0.1")
    assert account["e"] == "ACCOUNT_UPDATE" and account["a"]["m"] == "ORDER"
    assert [(p["s"], p["pa"]) for p in account["a"]["P"]] == [("ETHUSDT", "0.1")]


def test_bybit_private_stream_auth_ping_and_orders(sim_urls):
    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{sim_urls.port}/v5/private") as ws:
            expires = int(time.time() * 1000) + 10_000
            sign = hmac.new(API_SECRET.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
            await ws.send(json.dumps({"op": "auth", "args": [API_KEY, expires, sign]}))
            auth = json.loads(await ws.recv())
            await ws.send(json.dumps({"op": "subscribe", "args": ["order", "execution"]}))
            subscribed = json.loads(await ws.recv())
            await ws.send(json.dumps({"op": "ping"}))
            pong = json.loads(await ws.recv())
            await asyncio.to_thread(
                _place, "BYBIT", "ETH/USDT", MarketType.SPOT, Side.BUY, OrderType.MARKET, "0.1", "ws-2"
            )
            pushes = [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]
            return auth, subscribed, pong, pushes

    auth, subscribed, pong, pushes = asyncio.run(run())
    assert auth["success"] is True and subscribed["success"] is True and pong["op"] == "pong"
    assert [p["topic"] for p in pushes] == ["order", "order", "execution"]
    assert {p["data"][0]["orderLinkId"] for p in pushes} == {"ws-2"}
    # Every state in order: New, then Filled (a market order fills at once, still reported New first),
    # then the fill itself on the execution topic.
    assert [p["data"][0].get("orderStatus") for p in pushes[:2]] == ["New", "Filled"]
    assert (pushes[2]["data"][0]["execQty"], pushes[2]["data"][0]["execType"]) == ("0.1", "Trade")


def test_bybit_private_stream_rejects_bad_auth(sim_urls):
    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{sim_urls.port}/v5/private") as ws:
            await ws.send(json.dumps({"op": "auth", "args": [API_KEY, int(time.time() * 1000) + 10_000, "bad"]}))
            return json.loads(await ws.recv())

    assert asyncio.run(run())["success"] is False


def test_ws_drop_fault_closes_stream(sim_urls):
    default_engine.fault_add("ws_drop", exchange="BYBIT", endpoint="ws", account=API_KEY)

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{sim_urls.port}/v5/private") as ws:
            expires = int(time.time() * 1000) + 10_000
            sign = hmac.new(API_SECRET.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
            await ws.send(json.dumps({"op": "auth", "args": [API_KEY, expires, sign]}))
            await ws.recv()
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except websockets.ConnectionClosed:
                return "closed"
            return "open"

    assert asyncio.run(run()) == "closed"


def test_no_api_secret_in_simulator_tables(make_gateway):
    """The server keys simulator accounts by API key; the secret only verifies signatures, never stored."""
    from django.apps import apps
    from django.core import serializers

    for exchange, market_type in (("binance", MarketType.FUTURES), ("bybit", MarketType.SPOT)):
        gateway = make_gateway(exchange, market_type)
        price = gateway.fetch_last_prices(market_type, ["ETH/USDT"])["ETH/USDT"]
        request = OrderRequest(
            symbol="ETH/USDT",
            market_type=market_type,
            side=Side.BUY,
            order_type=OrderType.LIMIT,
            quantity=Decimal("0.1"),
            price=(price * Decimal("1.01")).quantize(Decimal("0.01")),
            client_order_id=f"nosecret-{exchange}",
        )
        gateway.create_order(request)  # marketable: order, fill, balances and (futures) a position
        gateway.fetch_balance(market_type)
    sim_models = [m for m in apps.get_app_config("exchanges").get_models() if m.__name__.startswith("Sim")]
    rows = {m.__name__: list(m.objects.all()) for m in sim_models}
    assert rows["SimOrder"] and rows["SimFill"] and rows["SimBalance"] and rows["SimPosition"]
    dumped = serializers.serialize("json", [row for model_rows in rows.values() for row in model_rows])
    assert API_KEY in dumped  # the account key: the server's own, public half of the pair
    assert API_SECRET not in dumped


def _bybit_auth_frame() -> str:
    expires = int(time.time() * 1000) + 10_000
    sign = hmac.new(API_SECRET.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
    return json.dumps({"op": "auth", "args": [API_KEY, expires, sign]})


def test_bybit_stream_shows_new_for_an_order_cancelled_inside_one_poll(sim_urls):
    def create_and_cancel() -> None:
        default_engine.price_script("BYBIT", "ETH/USDT", ["3000"])
        state = _place("BYBIT", "ETH/USDT", MarketType.FUTURES, Side.BUY, OrderType.LIMIT, "0.1", "ws-quick", "2500")
        default_engine.order_cancel(
            "BYBIT",
            API_KEY,
            symbol="ETH/USDT",
            market_type=MarketType.FUTURES,
            exchange_order_id=state.exchange_order_id,
        )

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{sim_urls.port}/v5/private") as ws:
            await ws.send(_bybit_auth_frame())
            await ws.recv()
            await ws.send(json.dumps({"op": "subscribe", "args": ["order"]}))
            await ws.recv()
            await asyncio.to_thread(create_and_cancel)  # both well inside one 250 ms poll
            return [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]

    pushes = asyncio.run(run())
    assert [(p["data"][0]["orderLinkId"], p["data"][0]["orderStatus"]) for p in pushes] == [
        ("ws-quick", "New"),
        ("ws-quick", "Cancelled"),
    ]
    assert pushes[0]["data"][0]["category"] == "linear" and pushes[0]["data"][0]["cumExecQty"] == "0"


def test_binance_spot_user_stream_on_the_combined_path(sim_urls):
    base = sim_urls.base_url
    headers = {"X-MBX-APIKEY": API_KEY}
    key = requests.post(f"{base}/api/v3/userDataStream", headers=headers, timeout=5).json()["listenKey"]
    futures_key = requests.post(f"{base}/fapi/v1/listenKey", headers=headers, timeout=5).json()["listenKey"]
    assert key != futures_key  # spot and USDⓈ-M streams are separate

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{sim_urls.port}/stream?streams={key}") as ws:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(
                _place, "BINANCE", "ETH/USDT", MarketType.SPOT, Side.BUY, OrderType.MARKET, "0.1", "ws-spot"
            )
            return [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(3)]

    messages = asyncio.run(run())
    assert {m["stream"] for m in messages} == {key}
    new, trade, account = (m["data"] for m in messages)
    assert (new["e"], new["c"], new["x"], new["X"]) == ("executionReport", "ws-spot", "NEW", "NEW")
    assert (trade["x"], trade["X"], trade["l"], trade["z"]) == ("TRADE", "FILLED", "0.1", "0.1")
    assert account["e"] == "outboundAccountPosition" and {b["a"] for b in account["B"]} >= {"ETH", "USDT"}


def test_binance_ws_subscribe_by_listen_key(sim_urls):
    base = sim_urls.base_url
    key = requests.post(f"{base}/fapi/v1/listenKey", headers={"X-MBX-APIKEY": API_KEY}, timeout=5).json()["listenKey"]

    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{sim_urls.port}/ws") as ws:
            await ws.send(json.dumps({"method": "SUBSCRIBE", "params": [key], "id": 7}))
            reply = json.loads(await ws.recv())
            await ws.send(json.dumps({"method": "LIST_SUBSCRIPTIONS", "id": 8}))
            listing = json.loads(await ws.recv())
            await asyncio.to_thread(
                _place, "BINANCE", "ETH/USDT", MarketType.FUTURES, Side.SELL, OrderType.MARKET, "0.1", "ws-sub"
            )
            return reply, listing, json.loads(await asyncio.wait_for(ws.recv(), 5))

    reply, listing, event = asyncio.run(run())
    assert reply == {"result": None, "id": 7} and listing == {"result": [key], "id": 8}
    assert (event["e"], event["o"]["c"], event["o"]["x"]) == ("ORDER_TRADE_UPDATE", "ws-sub", "NEW")


def test_bybit_stream_position_and_wallet_after_a_fill(sim_urls):
    async def run():
        async with websockets.connect(f"ws://127.0.0.1:{sim_urls.port}/v5/private") as ws:
            await ws.send(_bybit_auth_frame())
            await ws.recv()
            await ws.send(json.dumps({"op": "subscribe", "args": ["position", "wallet"]}))
            await ws.recv()
            await asyncio.to_thread(
                _place, "BYBIT", "SOL/USDT", MarketType.FUTURES, Side.SELL, OrderType.MARKET, "2", "ws-pos"
            )
            return [json.loads(await asyncio.wait_for(ws.recv(), 5)) for _ in range(2)]

    position, wallet = asyncio.run(run())
    assert position["topic"] == "position"
    assert [(p["symbol"], p["side"], p["size"], p["category"]) for p in position["data"]] == [
        ("SOLUSDT", "Sell", "2", "linear")
    ]
    assert wallet["topic"] == "wallet" and wallet["data"][0]["accountType"] == "UNIFIED"
    assert Decimal(wallet["data"][0]["totalEquity"]) > 0


# --- many accounts: each API key is an engine account with its own secret (runsimexchange --keys) ---


def _gateway(exchange: str, key: str, secret: str) -> CcxtGateway:
    return CcxtGateway(exchange, MarketType.FUTURES, key, secret, account_key=f"{exchange}-{key}", retries=0)


@pytest.mark.parametrize("exchange", ["binance", "bybit"])
def test_two_keys_are_two_accounts(sim_urls, exchange):
    first, other = _gateway(exchange, API_KEY, API_SECRET), _gateway(exchange, OTHER_KEY, OTHER_SECRET)
    engine_exchange = exchange.upper()
    # Another test may have left orders or positions on the first account: compare against them.
    first_open = {o.client_order_id for o in first.fetch_open_orders(MarketType.FUTURES)}
    price = default_engine.price_get(engine_exchange, MarketType.FUTURES, "BTC/USDT")
    resting = first.create_order(
        OrderRequest(
            symbol="BTC/USDT",
            market_type=MarketType.FUTURES,
            side=Side.BUY,
            order_type=OrderType.LIMIT,
            quantity=Decimal("0.01"),
            price=(price * Decimal("0.7")).quantize(Decimal("0.1")),
            client_order_id=f"acct-a-{exchange}",
        )
    )
    other.create_order(
        OrderRequest(
            symbol="ETH/USDT",
            market_type=MarketType.FUTURES,
            side=Side.SELL,
            order_type=OrderType.MARKET,
            quantity=Decimal("0.5"),
            client_order_id=f"acct-b-{exchange}",
        )
    )
    # Orders: each key lists only its own; a key cannot see (nor cancel) the other's order.
    assert {o.client_order_id for o in first.fetch_open_orders(MarketType.FUTURES)} == first_open | {
        f"acct-a-{exchange}"
    }
    assert f"acct-a-{exchange}" not in {o.client_order_id for o in other.fetch_open_orders(MarketType.FUTURES)}
    with pytest.raises(gw.NotFound):
        other.cancel_order(
            symbol="BTC/USDT", market_type=MarketType.FUTURES, exchange_order_id=resting.exchange_order_id
        )
    # Positions and balances: the other account's fill moved its own books, not the first's.
    positions = {
        key: {p.symbol.split(":")[0]: p.quantity for p in default_engine.position_list(engine_exchange, key)}
        for key in (API_KEY, OTHER_KEY)
    }
    assert positions[OTHER_KEY].get("ETH/USDT") == Decimal("-0.5")
    assert default_engine.balance_get(engine_exchange, OTHER_KEY, MarketType.FUTURES) != default_engine.balance_get(
        engine_exchange, API_KEY, MarketType.FUTURES
    )
    rows = SimOrder.objects.filter(
        exchange=engine_exchange, client_order_id__in=[f"acct-a-{exchange}", f"acct-b-{exchange}"]
    )
    assert dict(rows.values_list("client_order_id", "account")) == {
        f"acct-a-{exchange}": API_KEY,
        f"acct-b-{exchange}": OTHER_KEY,
    }
    first.cancel_order(symbol="BTC/USDT", market_type=MarketType.FUTURES, exchange_order_id=resting.exchange_order_id)


def test_binance_key_signed_with_another_keys_secret_is_refused(sim_urls):
    def account(key: str, secret: str) -> requests.Response:
        query = f"timestamp={int(time.time() * 1000)}"
        signature = hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest()
        return requests.get(
            f"{sim_urls.base_url}/fapi/v2/account?{query}&signature={signature}",
            headers={"X-MBX-APIKEY": key},
            timeout=5,
        )

    assert account(OTHER_KEY, OTHER_SECRET).status_code == 200
    wrong = account(OTHER_KEY, API_SECRET)  # the first account's secret
    assert (wrong.status_code, wrong.json()["code"]) == (400, -1022)
    unknown = account("sim-test-key-unknown-000", OTHER_SECRET)
    assert (unknown.status_code, unknown.json()["code"]) == (401, -2015)
    # ccxt maps both to an authentication error.
    with pytest.raises(gw.Auth):
        _gateway("binance", OTHER_KEY, API_SECRET).fetch_balance(MarketType.FUTURES)
    with pytest.raises(gw.Auth):
        _gateway("binance", "sim-test-key-unknown-000", OTHER_SECRET).fetch_balance(MarketType.FUTURES)


def test_bybit_key_signed_with_another_keys_secret_is_refused(sim_urls):
    query = "accountType=UNIFIED"

    def wallet(key: str, secret: str) -> dict:
        ts, window = str(int(time.time() * 1000)), "5000"
        sign = hmac.new(secret.encode(), f"{ts}{key}{window}{query}".encode(), hashlib.sha256).hexdigest()
        headers = {"X-BAPI-API-KEY": key, "X-BAPI-TIMESTAMP": ts, "X-BAPI-RECV-WINDOW": window, "X-BAPI-SIGN": sign}
        return requests.get(f"{sim_urls.base_url}/v5/account/wallet-balance?{query}", headers=headers, timeout=5).json()

    assert wallet(OTHER_KEY, OTHER_SECRET)["retCode"] == 0
    assert wallet(OTHER_KEY, API_SECRET)["retCode"] == 10004
    assert wallet("sim-test-key-unknown-000", OTHER_SECRET)["retCode"] == 10003

    async def stream_auth(key: str, secret: str) -> bool:
        async with websockets.connect(f"ws://127.0.0.1:{sim_urls.port}/v5/private") as ws:
            expires = int(time.time() * 1000) + 10_000
            sign = hmac.new(secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256).hexdigest()
            await ws.send(json.dumps({"op": "auth", "args": [key, expires, sign]}))
            return bool(json.loads(await ws.recv())["success"])

    assert asyncio.run(stream_auth(OTHER_KEY, OTHER_SECRET)) is True
    assert asyncio.run(stream_auth(OTHER_KEY, API_SECRET)) is False
    assert asyncio.run(stream_auth("sim-test-key-unknown-000", OTHER_SECRET)) is False
