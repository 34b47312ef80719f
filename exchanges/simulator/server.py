"""The simulator's HTTP+WS dialect server: Binance and Bybit APIs on one port over the DB-backed engine.

Why aiohttp: it is already installed as a ccxt dependency (pinned in requirements.txt), serves
plain HTTP and websockets on one port from one asyncio loop, and needs no ASGI server or
Django URL routing; a Django ASGI app under daphne would drag the middleware stack and
channels routing into what is a small protocol adapter. Engine calls are synchronous ORM
work, so every one runs in a worker thread bracketed by close_old_connections.

Routes (real API paths, so ccxt with EXCHANGE_URL_OVERRIDES talks to it unchanged):
  Binance spot     /api/v3/{ping,time,exchangeInfo,ticker/price,account,order,openOrders,allOrders}
  Binance USDⓈ-M   /fapi/v1/{ping,time,exchangeInfo,ticker/price,order,openOrders,allOrders,algoOrder,
                   openAlgoOrders,allAlgoOrders,listenKey}, /fapi/v2/{ticker/price,account,balance},
                   /fapi/v3/{account,balance}, WS /ws/<listenKey>
  Bybit v5         /v5/market/{time,instruments-info,tickers}, /v5/account/wallet-balance,
                   /v5/order/{create,cancel,realtime,history}, WS /v5/private
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
from exchanges.models import SimFault
from exchanges.simulator.engine import FaultHit, SimEngine, default_engine

logger = logging.getLogger(__name__)

# How long a "timeout" fault holds the reply when the fault names no latency: longer than
# ccxt's default 10 s request timeout.
DEFAULT_TIMEOUT_HOLD = 15.0
WS_POLL_SECONDS = 0.25


@dataclass
class ServerConfig:
    """Credentials the server accepts (one key pair per server) and engine exchange names."""

    api_key: str
    api_secret: str
    binance_exchange: str = "BINANCE"
    bybit_exchange: str = "BYBIT"
    timeout_hold: float = DEFAULT_TIMEOUT_HOLD
    listen_keys: dict[str, str] = field(default_factory=dict)  # listen key → account


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


def build_app(config: ServerConfig, engine: SimEngine | None = None) -> web.Application:
    """The aiohttp application serving both dialects over `engine`."""
    from exchanges.simulator.dialects import binance, bybit

    engine = engine or default_engine
    app = web.Application()
    faults = Faults(engine, config)
    binance.BinanceDialect(engine, config, faults).register(app)
    bybit.BybitDialect(engine, config, faults).register(app)
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
        app = build_app(self.config, self.engine)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets  # type: ignore[union-attr]
        self.port = sockets[0].getsockname()[1]
        logger.info("sim dialect server listening on %s", self.base_url)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


def serve_forever(config: ServerConfig, *, host: str, port: int, engine: SimEngine | None = None) -> None:
    """Run the server in the foreground until interrupted (the management command)."""
    web.run_app(build_app(config, engine), host=host, port=port, print=None, handle_signals=True)


def now_ms() -> int:
    return int(time.time() * 1000)
