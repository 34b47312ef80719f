"""ccxt gateways of many accounts: shared markets and tables, each account's own key, and the in-flight cap."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import aiohttp
import pytest
from aiohttp import web

from exchanges import ccxt_gateway
from exchanges import gateway as gw
from exchanges.ccxt_gateway import CcxtGateway
from exchanges.gateway import MarketType
from exchanges.ratelimit import in_flight_limits, max_in_flight_parse, rate_budget_reset
from tests.exchanges import ccxt_sim_support
from tests.exchanges.ccxt_sim_support import API_KEY, API_SECRET

sim_server = ccxt_sim_support.sim_server

FUTURES = MarketType.FUTURES


@dataclass
class Seen:
    path: str
    api_key: str
    query: str = ""
    peer: int = 0  # the client's port: one per TCP connection
    cookie: str | None = None


@dataclass
class SlowProxy:
    """A local HTTP server in front of the dialect server: holds each request `delay` seconds, records
    its path and API key, and counts how many requests it is serving at once (`peak`)."""

    target: str
    delay: float = 0.0
    seen: list[Seen] = field(default_factory=list)
    current: int = 0
    peak: int = 0
    base_url: str = ""

    def reset(self) -> None:
        self.seen.clear()
        self.current = self.peak = 0

    async def handle(self, request: web.Request) -> web.Response:
        key = request.headers.get("X-MBX-APIKEY") or request.headers.get("X-BAPI-API-KEY") or ""
        peer = request.transport.get_extra_info("peername")[1] if request.transport else 0
        self.seen.append(Seen(request.path, key, request.query_string, peer, request.headers.get("Cookie")))
        self.current += 1
        self.peak = max(self.peak, self.current)
        try:
            if self.delay and "exchangeInfo" not in request.path and "instruments-info" not in request.path:
                await asyncio.sleep(self.delay)
            headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
            async with (
                aiohttp.ClientSession() as session,
                session.request(
                    request.method,
                    self.target + request.path_qs,
                    headers=headers,
                    data=await request.read(),
                ) as reply,
            ):
                body = await reply.read()
                hop = ("content-length", "transfer-encoding")
                keep = {k: v for k, v in reply.headers.items() if k.lower() not in hop}
                # As a CDN in front of an exchange does: a cookie no account may carry to another.
                keep["Set-Cookie"] = f"edge=seen-{key or 'public'}; Path=/"
                return web.Response(status=reply.status, body=body, headers=keep)
        finally:
            self.current -= 1


@pytest.fixture
def proxy(sim_server, settings, transactional_db) -> Iterator[SlowProxy]:  # noqa: ANN001
    server = SlowProxy(target=sim_server.base_url)
    loop = asyncio.new_event_loop()
    started = threading.Event()
    runner: dict[str, web.AppRunner] = {}

    async def start() -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", server.handle)
        runner["r"] = web.AppRunner(app)
        await runner["r"].setup()
        site = web.TCPSite(runner["r"], "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        server.base_url = f"http://127.0.0.1:{port}"
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert started.wait(10)
    settings.EXCHANGE_URL_OVERRIDES = {"BINANCE": server.base_url, "BYBIT": server.base_url}
    settings.EXCHANGE_HTTP_TIMEOUT_MS = 5000
    ccxt_gateway.caches_clear()
    yield server
    ccxt_gateway.caches_clear()
    asyncio.run_coroutine_threadsafe(runner["r"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)


def gateway(account: str, *, key: str = API_KEY, secret: str = API_SECRET, exchange: str = "binance") -> CcxtGateway:
    return CcxtGateway(exchange, FUTURES, key, secret, account_key=account, retries=0, backoff_seconds=0.01)


@pytest.mark.parametrize("exchange", ["binance", "bybit"])
def test_accounts_share_markets_and_tables_but_sign_with_their_own_keys(proxy, exchange):
    accounts = [gateway(f"acct-{i}", key=f"{API_KEY}-{i}", exchange=exchange) for i in range(5)]
    accounts.append(gateway("acct-real", exchange=exchange))
    clients = [g._client(FUTURES) for g in accounts]
    loads = [s for s in proxy.seen if "exchangeInfo" in s.path or "instruments-info" in s.path]
    # One public load for every account (Bybit's is two requests: listed and pre-launch).
    assert loads and len({(s.path, s.query) for s in loads}) == len(loads)
    assert all(s.api_key == "" for s in loads)
    first = clients[0]
    for client in clients[1:]:
        assert client is not first
        assert client.markets is first.markets and client.markets_by_id is first.markets_by_id
        assert client.api is first.api and client.exceptions is first.exceptions and client.urls is first.urls
        assert client.options is not first.options  # ccxt writes its top level per instance
    assert [c.apiKey for c in clients] == [*(f"{API_KEY}-{i}" for i in range(5)), API_KEY]

    proxy.reset()
    outcomes = []
    for g in accounts:
        try:
            g.fetch_balance(FUTURES)
            outcomes.append("ok")
        except gw.Auth:
            outcomes.append("auth")
    # Each request carried its own account's key: the server knows only API_KEY's.
    assert [s.api_key for s in proxy.seen] == [c.apiKey for c in clients]
    assert outcomes == ["auth"] * 5 + ["ok"]


def test_changed_credentials_get_a_new_instance(proxy):
    before = gateway("acct-1", key="old-key")._client(FUTURES)
    after = gateway("acct-1", key=API_KEY)._client(FUTURES)
    assert after is not before and after.apiKey == API_KEY and after.markets is before.markets
    assert gateway("acct-1", key=API_KEY)._client(FUTURES) is after


def test_max_in_flight_parse():
    assert max_in_flight_parse("") == {"DEFAULT": 32}
    assert max_in_flight_parse("4") == {"DEFAULT": 4}
    assert max_in_flight_parse('{"default": 8, "binance": 2}') == {"DEFAULT": 8, "BINANCE": 2}
    with pytest.raises(ValueError, match="BYBIT"):
        max_in_flight_parse({"BYBIT": -1})
    with pytest.raises(ValueError, match="whole number"):
        max_in_flight_parse({"BYBIT": "many"})


def test_in_flight_cap_holds_six_concurrent_calls_to_two_at_the_server(proxy, settings):
    settings.EXCHANGE_MAX_IN_FLIGHT = {"BINANCE": 2}
    settings.EXCHANGE_RATE_WAIT_MAX = 10.0
    rate_budget_reset()
    accounts = [gateway(f"acct-{i}") for i in range(6)]
    for g in accounts:
        g._client(FUTURES)  # markets loaded before the measured calls
    proxy.reset()
    proxy.delay = 0.4
    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        balances = list(pool.map(lambda g: g.fetch_balance(FUTURES), accounts))
    elapsed = time.monotonic() - started
    print(f"6 calls of 0.4 s with a cap of 2: {elapsed:.2f} s, peak {proxy.peak} at the server")
    assert len(balances) == 6 and all(b.free("USDT") > 0 for b in balances)
    assert len(proxy.seen) == 6
    assert proxy.peak == 2  # capped, and the cap was reached
    assert in_flight_limits().peak["BINANCE"] == 2 and in_flight_limits().in_flight("BINANCE") == 0


def test_in_flight_cap_fails_as_rate_limited_without_reaching_the_exchange(proxy, settings):
    settings.EXCHANGE_MAX_IN_FLIGHT = '{"default": 1}'
    settings.EXCHANGE_RATE_WAIT_MAX = 0.2
    rate_budget_reset()
    slow, refused = gateway("acct-slow"), gateway("acct-refused")
    slow._client(FUTURES)
    refused._client(FUTURES)
    proxy.reset()
    proxy.delay = 1.5
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(slow.fetch_balance, FUTURES)
        while not proxy.seen:
            time.sleep(0.01)
        with pytest.raises(gw.RateLimited, match="in flight") as failure:
            refused.fetch_balance(FUTURES)
        assert failure.value.code == "in_flight"
        assert len(proxy.seen) == 1  # the refused call never left the process
        assert pending.result(10).free("USDT") > 0
    assert in_flight_limits().in_flight("BINANCE") == 0


def test_accounts_share_the_processs_http_connections_and_carry_no_cookies(proxy):
    """One connection pool for every account's instance: sequential calls of six accounts reuse one
    connection (no handshake per follower), and a cookie set in one account's reply never goes out."""
    accounts = [gateway(f"acct-{i}", key=f"{API_KEY}-{i}") for i in range(5)] + [gateway("acct-real")]
    for g in accounts:
        g._client(FUTURES)
    proxy.reset()
    for g in accounts:
        with contextlib.suppress(gw.Auth):
            g.fetch_balance(FUTURES)
    assert [s.api_key for s in proxy.seen] == [f"{API_KEY}-{i}" for i in range(5)] + [API_KEY]
    assert len({s.peer for s in proxy.seen}) == 1, [s.peer for s in proxy.seen]
    assert all(s.cookie is None for s in proxy.seen)
    clients = [g._client(FUTURES) for g in accounts]
    assert all(c.session is clients[0].session for c in clients)
    clients[0].close()  # what ccxt does when an instance is dropped: the others keep the pool
    accounts[-1].fetch_balance(FUTURES)
    assert proxy.seen[-1].peer == proxy.seen[0].peer
