"""Request budgets (exchanges.ratelimit) and the ccxt gateway honouring them: orders per account per
window, IP weight, Retry-After blocks, the exchange's used-weight header, settings validation."""

from __future__ import annotations

from typing import Any

import ccxt
import pytest

from exchanges import gateway as gw
from exchanges.ccxt_gateway import CcxtGateway
from exchanges.gateway import MarketType, call_policy
from exchanges.ratelimit import DEFAULT_LIMITS, RateBudget, RateLimit, limits_parse, rate_budget_reset


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_orders_per_account_per_window_then_the_oldest_leaves_the_window():
    clock = Clock()
    budget = RateBudget({"BINANCE:SPOT": [RateLimit("account", "orders", 3, 10)]}, clock=clock)
    for _ in range(3):
        assert budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="a", endpoint="create_order") == 0
        clock.now += 1
    # The fourth order must wait until the first (at t=1000) leaves the 10 s window: t=1010.
    assert budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="a", endpoint="create_order") == 7
    # Another account has its own order budget; reads cost no orders.
    assert budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="b", endpoint="create_order") == 0
    assert budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="a", endpoint="fetch_order") == 0
    clock.now = 1010.0
    assert budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="a", endpoint="create_order") == 0


def test_ip_weight_is_shared_by_every_account_and_a_refused_call_books_nothing():
    clock = Clock()
    budget = RateBudget({"BINANCE:SPOT": [RateLimit("ip", "weight", 100, 60)]}, clock=clock)
    # GET /api/v3/openOrders without a symbol weighs 80 on spot.
    assert (
        budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="a", endpoint="fetch_open_orders_all") == 0
    )
    wait = budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="b", endpoint="fetch_open_orders_all")
    assert wait == 60
    # The refused call booked nothing: 20 weight is still free.
    assert budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="b", endpoint="fetch_balance") == 0
    assert budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="b", endpoint="create_order") > 0


def test_a_retry_after_block_and_the_exchanges_used_weight_count_here_too():
    clock = Clock()
    budget = RateBudget({"BINANCE:FUTURES": [RateLimit("ip", "weight", 2400, 60)]}, clock=clock)
    budget.block(exchange="BINANCE", market_type="FUTURES", seconds=5)
    assert budget.reserve(exchange="BINANCE", market_type="FUTURES", account_key="a", endpoint="fetch_order") == 5
    assert budget.reserve(exchange="BINANCE", market_type="SPOT", account_key="a", endpoint="fetch_order") == 0
    clock.now += 5
    budget.observe_used_weight(exchange="BINANCE", market_type="FUTURES", used=2400)
    assert budget.reserve(exchange="BINANCE", market_type="FUTURES", account_key="a", endpoint="fetch_order") == 60


def test_settings_replace_defaults_per_market_and_bad_ones_name_the_key():
    limits = limits_parse('{"bybit:futures": [{"scope": "account", "unit": "orders", "limit": 5, "seconds": 1}]}')
    assert limits["BYBIT:FUTURES"] == [RateLimit("account", "orders", 5, 1.0)]
    assert limits["BINANCE:SPOT"] == DEFAULT_LIMITS["BINANCE:SPOT"]
    with pytest.raises(ValueError, match="BINANCE:SPOT"):
        limits_parse('{"BINANCE:SPOT": [{"scope": "galaxy", "unit": "orders", "limit": 5, "seconds": 1}]}')
    with pytest.raises(ValueError, match="BYBIT:SPOT"):
        limits_parse('{"BYBIT:SPOT": [{"scope": "ip", "unit": "weight", "limit": 0, "seconds": 1}]}')


# --- the gateway -----------------------------------------------------------------------------


class FakeClient:
    """Stands in for a ccxt instance's reply headers."""

    def __init__(self, headers: dict[str, str]):
        self.last_response_headers = headers


def _gateway(slept: list[float]) -> CcxtGateway:
    return CcxtGateway(
        "binance", MarketType.FUTURES, "k" * 16, "s" * 16, account_key="acct-rl", retries=0, sleep=slept.append
    )


def test_a_429_blocks_the_exchange_market_for_its_retry_after_without_calling_again():
    clock = Clock()
    rate_budget_reset(RateBudget({"BINANCE:FUTURES": [RateLimit("ip", "weight", 2400, 60)]}, clock=clock))
    slept: list[float] = []
    gateway = _gateway(slept)
    calls: list[str] = []

    def limited() -> Any:
        calls.append("x")
        raise ccxt.RateLimitExceeded('binanceusdm 429 {"code":-1003,"msg":"Too many requests"}')

    client = FakeClient({"Retry-After": "7", "X-MBX-USED-WEIGHT-1M": "2399"})
    with pytest.raises(gw.RateLimited):
        gateway._call(limited, retry=False, endpoint="create_order", client=client)
    assert calls == ["x"]
    # Within the block: refused here, the exchange is not called, nobody waits longer than allowed.
    with pytest.raises(gw.RateLimited, match="request budget spent here; next call in 7.00 s"):
        gateway._call(limited, retry=False, endpoint="create_order", client=client)
    assert calls == ["x"] and slept == []
    clock.now += 7
    assert gateway._call(lambda: "ok", retry=False, endpoint="create_order", client=FakeClient({})) == "ok"


def test_a_short_wait_is_slept_and_a_call_policy_caps_the_patience():
    clock = Clock()
    rate_budget_reset(RateBudget({"BINANCE:FUTURES": [RateLimit("account", "orders", 1, 10)]}, clock=clock))
    slept: list[float] = []
    gateway = _gateway(slept)

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    gateway._sleep = sleep
    assert gateway._call(lambda: 1, retry=False, endpoint="create_order") == 1
    clock.now += 9  # the next order fits in 1 s: within EXCHANGE_RATE_WAIT_MAX (2 s), so it waits
    assert gateway._call(lambda: 2, retry=False, endpoint="create_order") == 2
    assert slept == [1.0]
    clock.now += 9.5  # 0.5 s to wait, but the caller's policy allows 0.3 s: refused at once
    with call_policy(timeout_ms=300, retries=0), pytest.raises(gw.RateLimited):
        gateway._call(lambda: 3, retry=False, endpoint="create_order")
    assert slept == [1.0]


def test_a_call_is_booked_on_its_own_market_and_an_accounts_order_limit_blocks_that_account_only():
    clock = Clock()
    rate_budget_reset(
        RateBudget(
            {
                "BINANCE:SPOT": [RateLimit("account", "orders", 1, 10)],
                "BINANCE:FUTURES": [RateLimit("account", "orders", 1, 10)],
            },
            clock=clock,
        )
    )
    slept: list[float] = []
    # A gateway built for SPOT serves the account's FUTURES calls too: each is booked on its market.
    spot = CcxtGateway("binance", MarketType.SPOT, "k" * 16, "s" * 16, account_key="a", retries=0, sleep=slept.append)
    assert spot._call(lambda: 1, retry=False, endpoint="create_order", market_type=MarketType.FUTURES) == 1
    assert spot._call(lambda: 2, retry=False, endpoint="create_order", market_type=MarketType.SPOT) == 2
    with pytest.raises(gw.RateLimited, match="BINANCE FUTURES create_order: request budget spent"):
        spot._call(lambda: 3, retry=False, endpoint="create_order", market_type=MarketType.FUTURES)

    # -1015 (too many orders of this account): its Retry-After blocks this account, not the exchange.
    clock.now += 60
    other = CcxtGateway("binance", MarketType.FUTURES, "k" * 16, "s" * 16, account_key="b", retries=0)

    def too_many() -> Any:
        raise ccxt.RateLimitExceeded('binanceusdm 429 {"code":-1015,"msg":"Too many new orders."}')

    with pytest.raises(gw.RateLimited):
        spot._call(too_many, retry=False, endpoint="fetch_order", client=FakeClient({"Retry-After": "30"}))
    with pytest.raises(gw.RateLimited, match="next call in 30.00 s") as refused:
        spot._call(lambda: 4, retry=False, endpoint="fetch_order")
    assert gw.not_sent(refused.value)
    assert other._call(lambda: 5, retry=False, endpoint="fetch_order") == 5
