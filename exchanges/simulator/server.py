"""The simulator's HTTP+WS dialect server: Binance and Bybit APIs on one port over the DB-backed engine.

Why aiohttp: it is already installed as a ccxt dependency (pinned in requirements.txt), serves
plain HTTP and websockets on one port from one asyncio loop, and needs no ASGI server or
Django URL routing; a Django ASGI app under daphne would drag the middleware stack and
channels routing into what is a small protocol adapter. Engine calls are synchronous ORM
work, so every one runs in a worker thread bracketed by close_old_connections.

Routes (real API paths, so ccxt with EXCHANGE_URL_OVERRIDES talks to it unchanged): see the dialect
modules' `register` and the README's "Simulated exchange: endpoints served" table.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from django.db import close_old_connections

from core.executors import DbExecutor
from exchanges.gateway import MarketType
from exchanges.models import SimFault
from exchanges.simulator.engine import FaultHit, SimEngine, default_engine

logger = logging.getLogger(__name__)

# How long a "timeout" fault holds the reply when the fault names no latency: longer than
# ccxt's default 10 s request timeout.
DEFAULT_TIMEOUT_HOLD = 15.0
WS_POLL_SECONDS = 0.25


@dataclass(frozen=True)
class RateLimitConfig:
    """The limits the server enforces; the defaults are the ones the real exchanges publish.

    Binance counts request weight per IP per minute (spot, USDⓈ-M and /sapi separately) and
    new orders per account (spot: 10 s and day; USDⓈ-M: 10 s and minute); a client that keeps
    calling after its 429s is banned with HTTP 418 after `binance_ban_after` refusals in a row.
    Bybit counts per UID, per endpoint, per second (orders and queries), and 600 requests per
    IP per 5 s.
    """

    enabled: bool = True
    binance_spot_weight_per_minute: int = 6000
    binance_futures_weight_per_minute: int = 2400
    binance_sapi_weight_per_minute: int = 12000
    binance_spot_orders_per_10s: int = 100
    binance_spot_orders_per_day: int = 200_000
    binance_futures_orders_per_10s: int = 300
    binance_futures_orders_per_minute: int = 1200
    binance_ban_after: int | None = 10
    binance_ban_seconds: float = 120.0
    bybit_orders_per_second: int = 10  # /v5/order/create, cancel, cancel-all: linear
    bybit_spot_orders_per_second: int = 20  # the same endpoints with category=spot
    bybit_queries_per_second: int = 50  # order, position, execution and wallet queries
    bybit_ip_per_5s: int = 600


@dataclass
class ServerConfig:
    """Credentials the server accepts (one key pair per server), engine exchange names and limits."""

    api_key: str
    api_secret: str
    binance_exchange: str = "BINANCE"
    bybit_exchange: str = "BYBIT"
    timeout_hold: float = DEFAULT_TIMEOUT_HOLD
    listen_keys: dict[str, str] = field(default_factory=dict)  # listen key → account (USDⓈ-M and spot)
    listen_key_markets: dict[str, MarketType] = field(default_factory=dict)  # listen key → its market
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)


async def db_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run synchronous ORM/engine work in a worker thread with fresh-connection hygiene."""

    def run() -> Any:
        close_old_connections()
        try:
            return fn(*args, **kwargs)
        finally:
            close_old_connections()

    return await asyncio.to_thread(run)


class Faults:
    """REST fault injection around one handler: the dialect shapes the error reply."""

    def __init__(self, engine: SimEngine, config: ServerConfig):
        self.engine = engine
        self.config = config

    async def take(self, exchange: str, endpoint: str | None, account: str, phase: str) -> FaultHit | None:
        if not endpoint:
            return None
        hit = await db_call(self.engine.fault_take, exchange, endpoint, account, phase=phase)
        if hit is not None:
            logger.info("sim server fault %s on %s %s (%s)", hit.kind, exchange, endpoint, phase)
        return hit

    async def apply(
        self,
        hit: FaultHit | None,
        error_reply: Callable[[str], web.StreamResponse],
    ) -> web.StreamResponse | None:
        """Sleep for latency; for the others return the reply to send (a timeout holds first)."""
        if hit is None:
            return None
        if hit.kind == SimFault.Kind.LATENCY:
            await asyncio.sleep(hit.latency_ms / 1000)
            return None
        if hit.kind == SimFault.Kind.TIMEOUT:
            await asyncio.sleep(hit.latency_ms / 1000 if hit.latency_ms else self.config.timeout_hold)
            return web.Response(status=504, text="Gateway Timeout")
        return error_reply(hit.kind)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LIMITERS = web.AppKey("limiters", tuple)  # the app's rate limiters (Binance, Bybit)


def build_app(config: ServerConfig, engine: SimEngine | None = None) -> web.Application:
    """The aiohttp application serving both dialects over `engine`."""
    from exchanges.simulator.dialects import binance, bybit
    from exchanges.simulator.ratelimit import RateLimiter

    engine = engine or default_engine
    app = web.Application()
    faults = Faults(engine, config)
    limits = config.rate_limits
    # Binance and Bybit are different hosts: each has its own counters.
    binance_limiter = RateLimiter(ban_after=limits.binance_ban_after, ban_seconds=limits.binance_ban_seconds)
    bybit_limiter = RateLimiter()
    binance.BinanceDialect(engine, config, faults, binance_limiter).register(app)
    bybit.BybitDialect(engine, config, faults, bybit_limiter).register(app)
    app[LIMITERS] = (binance_limiter, bybit_limiter)
    return app


class ServerThread:
    """The dialect server on 127.0.0.1 in a background thread (tests, drills); `port` 0 picks a free one."""

    def __init__(
        self, config: ServerConfig, *, engine: SimEngine | None = None, host: str = "127.0.0.1", port: int = 0
    ):
        self.config = config
        self.engine = engine
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._executor = DbExecutor(8, thread_name_prefix="sim-db")
        self.app: web.Application | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self._run, name="sim-dialect-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10) or self._error is not None:
            raise RuntimeError(f"dialect server did not start: {self._error}")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.set_default_executor(self._executor)
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:  # reported to start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.run_until_complete(self._runner.cleanup())  # type: ignore[union-attr]
        # The worker threads' database connections outlive the threads unless closed by them:
        # close them so a test database can be dropped once the server has stopped.
        self._executor.close()
        loop.close()

    async def _start(self) -> None:
        app = self.app = build_app(self.config, self.engine)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1]
        logger.info("sim dialect server listening on %s", self.base_url)

    def rate_limits_reset(self) -> None:
        """Forget every request counted and every ban (tests)."""
        if self.app is not None:
            for limiter in self.app[LIMITERS]:
                limiter.reset()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def serve_forever(config: ServerConfig, *, host: str, port: int, engine: SimEngine | None = None) -> None:
    """Run the server in the foreground until interrupted (the management command)."""
    web.run_app(build_app(config, engine), host=host, port=port, print=None, handle_signals=True)


def now_ms() -> int:
    return int(time.time() * 1000)
