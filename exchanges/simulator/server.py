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
from collections.abc import Awaitable, Callable

from aiohttp import web

from core.executors import DbExecutor
from exchanges.simulator.dialects import binance, bybit
from exchanges.simulator.engine import SimEngine, default_engine
from exchanges.simulator.ratelimit import RateLimiter
from exchanges.simulator.wire import (  # noqa: F401 - ServerConfig and RateLimitConfig are this module's API too
    DEFAULT_TIMEOUT_HOLD,
    WS_POLL_SECONDS,
    Faults,
    RateLimitConfig,
    ServerConfig,
    db_call,
    now_ms,
)

logger = logging.getLogger(__name__)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LIMITERS = web.AppKey("limiters", tuple)  # the app's rate limiters (Binance, Bybit)


def build_app(config: ServerConfig, engine: SimEngine | None = None) -> web.Application:
    """The aiohttp application serving both dialects over `engine`."""

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


# Engine work runs in these threads. With asyncio's default pool (min(32, CPUs + 4): 6 on two cores),
# a fan-out to many accounts queued lookups and fault checks behind creates waiting on the engine's
# lock. Each thread holds a database connection, hence not more.
SERVE_DB_THREADS = 10


def serve_forever(config: ServerConfig, *, host: str, port: int, engine: SimEngine | None = None) -> None:
    """Run the server in the foreground until interrupted (the management command)."""
    app = build_app(config, engine)
    executor = DbExecutor(SERVE_DB_THREADS, thread_name_prefix="sim-db")

    async def executor_start(app: web.Application) -> None:
        asyncio.get_running_loop().set_default_executor(executor)

    async def executor_stop(app: web.Application) -> None:
        executor.close()  # not in a worker of its own: it waits for them; the server is stopping anyway

    app.on_startup.append(executor_start)
    app.on_cleanup.append(executor_stop)
    web.run_app(app, host=host, port=port, print=None, handle_signals=True)
