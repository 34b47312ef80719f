"""The dialect server's rate limits on the wire: Binance weight and order counts per window with their
headers, 429 then the 418 ban, and Bybit's per-UID limits (retCode 10006 with X-Bapi-Limit-* headers)."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

import ccxt
import pytest
import requests

from exchanges.simulator.server import RateLimitConfig, ServerConfig, ServerThread
from tests.exchanges.ccxt_sim_support import API_KEY, API_SECRET, OTHER_KEY, OTHER_SECRET

LIMITS = RateLimitConfig(
    binance_futures_weight_per_minute=12,
    binance_futures_orders_per_10s=2,
    binance_ban_after=3,
    binance_ban_seconds=30,
    bybit_orders_per_second=2,
)


@pytest.fixture(scope="module")
def limited(django_db_setup):  # noqa: ANN001
    server = ServerThread(
        ServerConfig(api_key=API_KEY, api_secret=API_SECRET, rate_limits=LIMITS, keys={OTHER_KEY: OTHER_SECRET})
    ).start()
    yield server
    server.stop()


@pytest.fixture
def base(limited, transactional_db):  # noqa: ANN001
    limited.rate_limits_reset()  # one test's ban must not leak into the next
    return limited.base_url


def _early_in(seconds: int, margin: float) -> None:
    """Wait until the current `seconds`-window has at least `margin` seconds left (fixed windows roll over)."""
    while time.time() % seconds > seconds - margin:
        time.sleep(0.05)


def _signed(
    base: str, method: str, path: str, *, key: str = API_KEY, secret: str = API_SECRET, **params: object
) -> requests.Response:
    query = "&".join(f"{k}={v}" for k, v in {**params, "timestamp": int(time.time() * 1000)}.items())
    signature = hmac.new(secret.encode(), query.encode(), hashlib.sha256).hexdigest()
    return requests.request(
        method, f"{base}{path}?{query}&signature={signature}", headers={"X-MBX-APIKEY": key}, timeout=5
    )


def test_binance_weight_429_with_retry_after_then_418_ban(base):
    _early_in(60, 15)
    used = [int(requests.get(f"{base}/fapi/v1/exchangeInfo", timeout=5).headers["X-MBX-USED-WEIGHT-1M"])]
    used.append(int(requests.get(f"{base}/fapi/v1/ticker/price", timeout=5).headers["X-MBX-USED-WEIGHT-1M"]))
    assert used == [1, 3]  # exchangeInfo weighs 1, all prices 2
    for _ in range(9):
        assert requests.get(f"{base}/fapi/v1/ping", timeout=5).status_code == 200
    refused = requests.get(f"{base}/fapi/v1/ticker/price", timeout=5)
    assert refused.status_code == 429 and refused.json()["code"] == -1003
    assert refused.headers["X-MBX-USED-WEIGHT-1M"] == "12" and 1 <= int(refused.headers["Retry-After"]) <= 60
    # Spot is another host with its own counter.
    assert requests.get(f"{base}/api/v3/ping", timeout=5).status_code == 200
    exchange = ccxt.binanceusdm({"enableRateLimit": False})
    exchange.urls["api"]["fapiPublic"] = f"{base}/fapi/v1"
    with pytest.raises(ccxt.DDoSProtection):  # ccxt's class for 429 and 418 (RateLimitExceeded is one)
        exchange.fapiPublicGetPing()
    banned = requests.get(f"{base}/fapi/v1/ping", timeout=5)  # the third refusal in a row: banned
    assert banned.status_code == 418 and banned.json()["code"] == -1003 and "banned until" in banned.json()["msg"]
    assert 25 <= int(banned.headers["Retry-After"]) <= 30


def test_binance_order_count_per_10s(base):
    _early_in(10, 4)
    counts = []
    for i in range(3):
        reply = _signed(
            base,
            "POST",
            "/fapi/v1/order",
            symbol="ETHUSDT",
            side="BUY",
            type="LIMIT",
            timeInForce="GTC",
            quantity="0.5",
            price="100",
            newClientOrderId=f"rl-{i}-{time.time_ns()}",
        )
        counts.append((reply.status_code, reply.headers.get("X-MBX-ORDER-COUNT-10S")))
        last = reply
    assert counts[:2] == [(200, "1"), (200, "2")]
    assert counts[2][0] == 429 and last.json()["code"] == -1015
    assert "2 orders per TEN_SECONDS" in last.json()["msg"] and last.headers["Retry-After"]


def test_binance_order_count_is_per_account_key(base, caplog):
    """Two keys are two accounts: one spending its 10 s order count leaves the other's untouched; each
    refusal is logged with its HTTP status (the drill counts them)."""
    _early_in(10, 4)

    def order(key: str, secret: str, n: int) -> requests.Response:
        return _signed(
            base,
            "POST",
            "/fapi/v1/order",
            key=key,
            secret=secret,
            symbol="ETHUSDT",
            side="BUY",
            type="LIMIT",
            timeInForce="GTC",
            quantity="0.5",
            price="100",
            newClientOrderId=f"rk-{n}-{time.time_ns()}",
        )

    caplog.set_level("INFO", logger="exchanges.simulator.dialects.base")
    first = [order(API_KEY, API_SECRET, n).status_code for n in range(3)]
    other = [order(OTHER_KEY, OTHER_SECRET, n) for n in range(2)]
    assert first == [200, 200, 429]
    assert [(r.status_code, r.headers["X-MBX-ORDER-COUNT-10S"]) for r in other] == [(200, "1"), (200, "2")]
    refusals = [r.getMessage() for r in caplog.records if "rate limit" in r.getMessage()]
    assert refusals == ["sim BINANCE rate limit: /fapi/v1/order refused with HTTP 429 (ORDERS)"]


def test_bybit_per_uid_endpoint_limit(base):
    while time.time() % 1 > 0.3:
        time.sleep(0.01)
    replies = []
    for _ in range(3):
        body = json.dumps({"category": "linear", "symbol": "ETHUSDT", "orderId": "987654321"})
        ts = str(int(time.time() * 1000))
        sign = hmac.new(API_SECRET.encode(), f"{ts}{API_KEY}5000{body}".encode(), hashlib.sha256).hexdigest()
        headers = {
            "X-BAPI-API-KEY": API_KEY,
            "X-BAPI-TIMESTAMP": ts,
            "X-BAPI-RECV-WINDOW": "5000",
            "X-BAPI-SIGN": sign,
            "Content-Type": "application/json",
        }
        replies.append(requests.post(f"{base}/v5/order/cancel", data=body, headers=headers, timeout=5))
    assert [r.json()["retCode"] for r in replies] == [110001, 110001, 10006]  # the third inside one second
    assert [r.headers["X-Bapi-Limit-Status"] for r in replies] == ["1", "0", "0"]
    assert {r.headers["X-Bapi-Limit"] for r in replies} == {"2"}
    assert int(replies[2].headers["X-Bapi-Limit-Reset-Timestamp"]) >= int(time.time()) * 1000
    # Public market data is only under the IP limit: no per-UID headers.
    assert "X-Bapi-Limit" not in requests.get(f"{base}/v5/market/time", timeout=5).headers
