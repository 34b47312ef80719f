"""The simulator's HTTP+WS dialect server: Binance and Bybit APIs on one port over the DB-backed engine.

Why aiohttp: it is already installed as a ccxt dependency (pinned in requirements.txt), serves
plain HTTP and websockets on one port from one asyncio loop, and needs no ASGI server or
Django URL routing; a Django ASGI app under daphne would drag the middleware stack and
channels routing into what is a small protocol adapter. Engine calls are synchronous ORM
work, so every one runs in a worker thread bracketed by close_old_connections: the event
loop's default executor is a DbExecutor of `db_threads` threads (DEFAULT_DB_THREADS), which
bounds how many engine calls run at once and how many database connections the server holds.

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
EXECUTOR = web.AppKey("executor", DbExecutor)
# Engine calls in flight at once, one database connection each. The engine locks per account, so
# creates of different accounts proceed side by side up to this many; asyncio's own default
# (cpu count + 4, 6 on two cores) would cap them below a fan-out's burst. 16 leaves room in
# PostgreSQL's default 100 connections for the schedulers and the web process (the drill runs all).
DEFAULT_DB_THREADS = 16


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
        self,
        config: ServerConfig,
        *,
        engine: SimEngine | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        db_threads: int = DEFAULT_DB_THREADS,
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
        self._executor = DbExecutor(db_threads, thread_name_prefix="sim-db")
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


def executor_install(app: web.Application, db_threads: int) -> None:
    """Run the app's engine calls (db_call) on a DbExecutor of `db_threads` threads, closed on cleanup."""

    async def install(app: web.Application) -> None:
        app[EXECUTOR] = DbExecutor(db_threads, thread_name_prefix="sim-db")
        asyncio.get_running_loop().set_default_executor(app[EXECUTOR])

    async def close(app: web.Application) -> None:
        # Waits for calls still running, then closes their connections (blocking: the loop is stopping).
        app[EXECUTOR].close()

    app.on_startup.append(install)
    app.on_cleanup.append(close)


def commits_unflushed() -> bool:
    """Let this process's PostgreSQL transactions commit without waiting for their WAL flush
    (synchronous_commit=off on every connection it opens from now on). False on other databases.

    For the runsimexchange process only, which is the simulated exchange and nothing else: every
    call commits, and a burst of calls from many accounts otherwise waits on disk flushes (and a
    fault row every call updates stays locked through each one). It costs nothing in consistency,
    only durability on a PostgreSQL crash (its last fraction of a second of simulated exchange
    state); a killed connection or a restarted scheduler loses nothing. The platform's own
    processes keep synchronous commits: they hold the real orders. `--synchronous-commit on`
    turns it off.
    """
    from django.db import connections

    wrapper = connections["default"]
    if wrapper.vendor != "postgresql":
        return False
    options = wrapper.settings_dict.setdefault("OPTIONS", {})
    options["options"] = f"{options.get('options', '')} -c synchronous_commit=off".strip()
    wrapper.close()  # a connection opened before this (the --seed configuration) reopens with it
    return True


def serve_forever(
    config: ServerConfig,
    *,
    host: str,
    port: int,
    engine: SimEngine | None = None,
    db_threads: int = DEFAULT_DB_THREADS,
) -> None:
    """Run the server in the foreground until interrupted (the management command)."""
    app = build_app(config, engine)
    executor_install(app, db_threads)
    web.run_app(app, host=host, port=port, print=None, handle_signals=True)
