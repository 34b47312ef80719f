"""The clients people already use, unchanged but for the base URL, against a `runsimexchange` process.

Plain ccxt with default options (binanceusdm, binance, bybit), Binance's official futures and spot
connectors, python-binance and pybit: each runs what a user would, and every test asserts what
the exchange did (order states, fills, positions, leverage, stream events), not only that the
call returned. One server process (SQLite file, real rate limits) serves the module; the tests
use distinct symbols or client order ids so they do not see each other's orders.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

import ccxt
import pytest
import requests

from tests import procs

API_KEY = "clients-sim-key-0123456789"
API_SECRET = "clients-sim-secret-abcdefghijklmnop"


@pytest.fixture(scope="module")
def sim(proc_sqlite_template, tmp_path_factory):  # noqa: ANN001
    db = procs.sqlite_db(proc_sqlite_template, tmp_path_factory.mktemp("sim-clients"))
    port = procs.free_port()
    base = f"http://127.0.0.1:{port}"
    proc = procs.spawn(
        db, "runsimexchange", "--port", str(port), "--api-key", API_KEY, "--api-secret", API_SECRET, name="sim"
    )

    def serving() -> bool:
        try:
            return proc.popen.poll() is not None or requests.get(f"{base}/api/v3/ping", timeout=1).ok
        except requests.RequestException:
            return False

    try:
        procs.wait_for(serving, timeout=60, what="runsimexchange")
        assert proc.popen.poll() is None, proc.log()
        yield base
    finally:
        proc.stop()
    assert API_SECRET not in proc.log()


def _cid(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def _aimed(exchange: Any, base: str) -> Any:
    """A default ccxt instance with every API URL moved to the simulator (the only change a user makes)."""

    def rewrite(urls: Any) -> Any:
        if isinstance(urls, dict):
            return {k: rewrite(v) for k, v in urls.items()}
        if isinstance(urls, str) and "://" in urls:
            return base + urlsplit(urls.replace("{hostname}", "host")).path
        return urls

    exchange.urls["api"] = rewrite(exchange.urls["api"])
    return exchange


def _wait(predicate: Any, timeout: float = 10.0) -> Any:
    return procs.wait_for(predicate, timeout=timeout, interval=0.2, what="the simulated exchange")


# --- plain ccxt, default options ----------------------------------------------------------------


def test_default_ccxt_binanceusdm(sim):
    ex = _aimed(ccxt.binanceusdm({"apiKey": API_KEY, "secret": API_SECRET}), sim)
    symbol = "ETH/USDT:USDT"
    ex.load_markets()  # currencies (sapi), margin pairs, spot/linear/inverse catalogues: all served
    ticker = ex.fetch_ticker(symbol)
    assert ticker["last"] > 0 and ticker["open"] > 0 and ex.fetch_tickers([symbol])[symbol]["last"] > 0
    assert ex.set_leverage(7, symbol)["leverage"] == 7

    bought = ex.create_order(symbol, "market", "buy", 0.05)
    # USDⓈ-M replies NEW with nothing executed; the fill shows on lookup.
    assert (bought["info"]["status"], bought["filled"]) == ("NEW", 0.0)
    filled = _wait(lambda: (o := ex.fetch_order(bought["id"], symbol))["status"] == "closed" and o)
    assert filled["filled"] == 0.05
    [position] = [p for p in ex.fetch_positions([symbol]) if p["contracts"]]
    assert (position["side"], position["contracts"], position["leverage"]) == ("long", 0.05, 7)
    assert bought["id"] in {t["order"] for t in ex.fetch_my_trades(symbol)}

    last = Decimal(str(ticker["last"]))
    far, crossing = (
        float((last * Decimal("0.5")).quantize(Decimal("0.01"))),
        float((last * Decimal("1.2")).quantize(Decimal("0.01"))),
    )
    ioc = ex.fetch_order(ex.create_order(symbol, "limit", "buy", 0.05, far, {"timeInForce": "IOC"})["id"], symbol)
    assert (ioc["status"], ioc["info"]["timeInForce"], ioc["filled"]) == ("expired", "IOC", 0.0)
    with pytest.raises(ccxt.InvalidOrder, match="-5022"):  # GTX that would take: rejected, not kept
        ex.create_order(symbol, "limit", "buy", 0.05, crossing, {"timeInForce": "GTX"})
    resting = ex.create_order(symbol, "limit", "buy", 0.05, far, {"postOnly": True})
    assert ex.fetch_order(resting["id"], symbol)["info"]["timeInForce"] == "GTX"
    ex.cancel_all_orders(symbol)
    assert ex.fetch_open_orders(symbol) == []
    assert ex.fetch_order(resting["id"], symbol)["status"] == "canceled"
    with pytest.raises(ccxt.BaseError) as unknown:
        ex.cancel_order("987654321", symbol)
    assert '"code":-2011' in str(unknown.value).replace(" ", "")


def test_default_ccxt_binance_spot(sim):
    ex = _aimed(ccxt.binance({"apiKey": API_KEY, "secret": API_SECRET}), sim)
    symbol = "SOL/USDT"
    last = Decimal(str(ex.fetch_ticker(symbol)["last"]))
    far, crossing = float(last * Decimal("0.5") // 1), float((last * Decimal("1.2")).quantize(Decimal("0.01")))
    ioc = ex.create_order(symbol, "limit", "buy", 1, far, {"timeInForce": "IOC"})
    assert (ioc["status"], ioc["info"]["status"], ioc["info"]["timeInForce"]) == ("expired", "EXPIRED", "IOC")
    with pytest.raises(ccxt.InvalidOrder):  # LIMIT_MAKER that would take: −2010, nothing kept
        ex.create_order(symbol, "limit", "buy", 1, crossing, {"postOnly": True})
    maker = ex.create_order(symbol, "limit", "buy", 1, far, {"postOnly": True})
    assert maker["info"]["type"] == "LIMIT_MAKER" and maker["status"] == "open"
    bought = ex.create_order(symbol, "market", "buy", 1)
    assert bought["status"] == "closed" and bought["info"]["fills"]
    assert bought["id"] in {t["order"] for t in ex.fetch_my_trades(symbol)}
    cancelled = ex.cancel_all_orders(symbol)
    assert [o["id"] for o in cancelled] == [maker["id"]]
    with pytest.raises(ccxt.OrderNotFound):  # −2011 for an id that never existed
        ex.cancel_order("987654321", symbol)


def test_default_ccxt_bybit(sim):
    ex = _aimed(ccxt.bybit({"apiKey": API_KEY, "secret": API_SECRET}), sim)
    ex.load_markets()  # coin info, account detection (query-api, account/info), every category
    balance = ex.fetch_balance()
    assert Decimal(balance["info"]["result"]["list"][0]["totalEquity"]) > 0
    swap = "LINK/USDT:USDT" if "LINK/USDT:USDT" in ex.markets else "SOL/USDT:USDT"
    assert ex.fetch_ticker(swap)["symbol"] == swap
    ex.set_leverage(5, swap)
    bought = ex.create_order(swap, "market", "buy", 1)
    position = _wait(lambda: [p for p in ex.fetch_positions([swap]) if p["contracts"]])[0]
    assert (position["side"], position["contracts"], position["leverage"]) == ("long", 1.0, 5)
    assert bought["id"] in {t["order"] for t in ex.fetch_my_trades(swap)}

    spot = "ETH/USDT"
    last = Decimal(str(ex.fetch_ticker(spot)["last"]))
    far = float((last * Decimal("0.5")).quantize(Decimal("0.01")))
    crossing = float((last * Decimal("1.2")).quantize(Decimal("0.01")))
    ioc = ex.create_order(spot, "limit", "buy", 0.01, far, {"timeInForce": "IOC"})
    post = ex.create_order(spot, "limit", "buy", 0.01, crossing, {"postOnly": True})
    closed = {o["id"]: o for o in ex.fetch_canceled_orders(spot)}
    assert (closed[ioc["id"]]["status"], closed[ioc["id"]]["info"]["timeInForce"]) == ("canceled", "IOC")
    assert (closed[post["id"]]["status"], closed[post["id"]]["filled"]) == ("canceled", 0.0)
    resting = ex.create_order(spot, "limit", "buy", 0.01, far)
    ex.cancel_all_orders(spot)
    assert resting["id"] not in {o["id"] for o in ex.fetch_open_orders(spot)}


# --- Binance's official connectors ---------------------------------------------------------------


def test_binance_futures_connector_rest_and_user_stream(sim):
    from binance.error import ClientError  # type: ignore[import-untyped]
    from binance.um_futures import UMFutures  # type: ignore[import-untyped]
    from binance.websocket.um_futures.websocket_client import UMFuturesWebsocketClient  # type: ignore[import-untyped]

    client = UMFutures(key=API_KEY, secret=API_SECRET, base_url=sim)
    listen_key = client.new_listen_key()["listenKey"]
    received: list[dict[str, Any]] = []
    lock = threading.Lock()

    def on_message(_: Any, message: str) -> None:
        with lock:
            received.append(json.loads(message))

    # The connector opens /ws and sends SUBSCRIBE [listenKey], as it does against the real stream.
    stream = UMFuturesWebsocketClient(stream_url=sim.replace("http", "ws"), on_message=on_message)
    try:
        stream.user_data(listen_key=listen_key)
        _wait(lambda: any(m.get("result", 1) is None for m in received))  # the SUBSCRIBE reply
        cid = _cid("fc")
        reply = client.new_order(symbol="BNBUSDT", side="BUY", type="MARKET", quantity=1, newClientOrderId=cid)
        assert (reply["status"], reply["executedQty"]) == ("NEW", "0")

        def mine() -> list[tuple[str, str]]:
            with lock:
                events = list(received)
            seen = []
            for m in events:
                if m.get("e") == "ORDER_TRADE_UPDATE" and m["o"]["c"] == cid:
                    seen.append((m["o"]["x"], m["o"]["X"]))
                elif m.get("e") == "ACCOUNT_UPDATE" and seen:
                    seen.append(("ACCOUNT_UPDATE", m["a"]["m"]))
            return seen

        assert _wait(lambda: len(mine()) >= 3 and mine()) == [
            ("NEW", "NEW"),
            ("TRADE", "FILLED"),
            ("ACCOUNT_UPDATE", "ORDER"),
        ]
    finally:
        stream.stop()
    assert client.query_order(symbol="BNBUSDT", origClientOrderId=cid)["status"] == "FILLED"
    assert client.change_leverage(symbol="BNBUSDT", leverage=3)["leverage"] == 3
    [risk] = client.get_position_risk(symbol="BNBUSDT")
    assert Decimal(risk["positionAmt"]) >= 1 and risk["leverage"] == "3"
    assert cid in {o["clientOrderId"] for o in client.get_all_orders(symbol="BNBUSDT")} and client.get_account_trades(
        symbol="BNBUSDT"
    )
    with pytest.raises(ClientError) as unknown:
        client.cancel_order(symbol="BNBUSDT", orderId=987654321)
    assert unknown.value.error_code == -2011


def test_binance_spot_connector(sim):
    from binance.error import ClientError  # type: ignore[import-untyped]
    from binance.spot import Spot  # type: ignore[import-untyped]

    client = Spot(api_key=API_KEY, api_secret=API_SECRET, base_url=sim)
    price = Decimal(client.ticker_price("BNBUSDT")["price"])
    far = str((price * Decimal("0.5")).quantize(Decimal("0.01")))
    ioc = client.new_order(symbol="BNBUSDT", side="BUY", type="LIMIT", timeInForce="IOC", quantity=1, price=far)
    assert (ioc["status"], ioc["timeInForce"]) == ("EXPIRED", "IOC")
    with pytest.raises(ClientError) as taker:
        client.new_order(
            symbol="BNBUSDT",
            side="BUY",
            type="LIMIT_MAKER",
            quantity=1,
            price=str((price * Decimal("1.2")).quantize(Decimal("0.01"))),
        )
    assert taker.value.error_code == -2010
    bought = client.new_order(symbol="BNBUSDT", side="BUY", type="MARKET", quoteOrderQty=100)
    assert bought["status"] == "FILLED" and Decimal(bought["origQuoteOrderQty"]) == 100
    assert Decimal(bought["cummulativeQuoteQty"]) <= 100 and Decimal(bought["executedQty"]) > 0
    assert bought["orderId"] in {t["orderId"] for t in client.my_trades("BNBUSDT")}
    assert client.new_listen_key()["listenKey"]
    resting = client.new_order(symbol="BNBUSDT", side="BUY", type="LIMIT", timeInForce="GTC", quantity=1, price=far)
    assert [o["orderId"] for o in client.cancel_open_orders("BNBUSDT")] == [resting["orderId"]]


def test_python_binance(sim):
    from binance.client import Client  # type: ignore[import-untyped]

    client = Client(API_KEY, API_SECRET, ping=False)
    client.API_URL, client.FUTURES_URL = f"{sim}/api", f"{sim}/fapi"
    cid = _cid("pb")
    created = client.futures_create_order(
        symbol="XRPUSDT", side="BUY", type="MARKET", quantity=20, newClientOrderId=cid
    )
    assert created["status"] == "NEW"
    order = _wait(
        lambda: (
            (o := client.futures_get_order(symbol="XRPUSDT", orderId=created["orderId"]))["status"] == "FILLED" and o
        )
    )
    assert Decimal(order["executedQty"]) == 20
    positions = client.futures_position_information(symbol="XRPUSDT")
    assert Decimal(positions[0]["positionAmt"]) >= 20
    assert client.get_account()["balances"]


def test_pybit_spot_market_buy_is_in_quote_coin(sim):
    from pybit.unified_trading import HTTP  # type: ignore[import-untyped]

    session = HTTP(api_key=API_KEY, api_secret=API_SECRET)
    session.endpoint = sim  # the only change: where to send requests
    cid = _cid("pybit")
    session.place_order(category="spot", symbol="ETHUSDT", side="Buy", orderType="Market", qty="100", orderLinkId=cid)
    [order] = session.get_order_history(category="spot", orderLinkId=cid)["result"]["list"]
    # No marketUnit: a spot market Buy's qty is quote coin, as on Bybit: 100 USDT spent, not 100 ETH.
    assert (order["orderStatus"], order["marketUnit"], order["qty"]) == ("Filled", "quoteCoin", "100")
    assert Decimal("99") < Decimal(order["cumExecValue"]) <= 100 and Decimal(order["cumExecQty"]) < 1
    executions = session.get_executions(category="spot", orderId=order["orderId"])["result"]["list"]
    assert sum(Decimal(e["execQty"]) for e in executions) == Decimal(order["cumExecQty"])
    wallet = session.get_wallet_balance(accountType="UNIFIED")["result"]["list"][0]
    assert Decimal(wallet["totalEquity"]) > 0
    session.place_order(category="linear", symbol="DOGEUSDT", side="Sell", orderType="Market", qty="100")
    [position] = session.get_positions(category="linear", symbol="DOGEUSDT")["result"]["list"]
    assert (position["side"], position["size"]) == ("Sell", "100")


def test_no_endpoint_used_above_is_missing(sim):
    """A guard against silent 404s: every path the clients above call is routed (the server logs them)."""
    for path in (
        "/fapi/v1/ticker/24hr",
        "/api/v3/ticker/24hr",
        "/fapi/v2/positionRisk",
        "/fapi/v1/openOrder",
        "/api/v3/myTrades",
        "/api/v3/userDataStream",
        "/v5/user/query-api",
        "/v5/asset/coin/query-info",
        "/v5/position/list",
        "/v5/execution/list",
        "/v5/account/info",
    ):
        status = requests.get(f"{sim}{path}", timeout=5).status_code
        assert status != 404, path
    time.sleep(0)  # keep the module's server alive until here
