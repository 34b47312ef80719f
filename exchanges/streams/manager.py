"""The leader's UserStreamManager: one asyncio loop, one websocket task per streamed account (SPEC §2.4, §4.6).

Transport only: which accounts stream and what an order update does come from a StreamHandler
given at construction (orders.streams), so this layer imports no account or order.

Why the `websockets` client rather than ccxt.pro: the manager must see pongs, listen-key
keepalives and the moment a socket dies to apply SPEC §4.6's health rule and its single-flight
backoff; ccxt.pro reconnects on its own terms and hides all three.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any, Protocol

import aiohttp
from django.conf import settings
from django.db import close_old_connections
from django.utils import timezone
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

# The module, not the function: alert_raise is looked up at each alert (tests replace it).
import notifications.services
from core.scrub import scrub, secret_register
from exchanges.ccxt_gateway import _url_overrides
from exchanges.gateway import MarketType
from exchanges.models import StreamState
from exchanges.ratelimit import rate_budget, retry_after_seconds
from exchanges.streams import services
from exchanges.streams.messages import (
    StreamUpdate,
    alert_due,
    backoff_delay,
    binance_futures_updates,
    bybit_auth_args,
    bybit_order_updates,
    stream_alive,
)
from exchanges.streams.pool import KeyedSerialPool
from exchanges.streams.services import StreamAccount

logger = logging.getLogger(__name__)

State = StreamState.State


class CatchUpReport(Protocol):
    """What a REST catch-up did, for the manager's log line."""

    @property
    def orders(self) -> int: ...

    @property
    def fills(self) -> int: ...

    @property
    def filled(self) -> int: ...

    @property
    def cancelled(self) -> int: ...


class StreamHandler(Protocol):
    """What the manager needs from the layers that own accounts and orders (orders.streams provides it).

    Each method runs in one of the manager's worker threads (never on the event loop), with
    close_old_connections around it: `accounts` and `update_apply` in the database pool, keyed per
    account so one account's updates apply in order; `reconcile` (REST) in a pool of its own.
    """

    def accounts(self) -> list[StreamAccount]:
        """The accounts that should have a stream now; equal values keep a running stream."""
        ...

    def update_apply(self, *, account_id: int, update: StreamUpdate, now: datetime) -> str:
        """Apply one order update idempotently; returns what happened ("unknown" for orders not ours)."""
        ...

    def reconcile(self, *, account_id: int, now: datetime) -> CatchUpReport:
        """The REST catch-up after a (re)connect: what the poll would record now for this account."""
        ...


@dataclass(frozen=True)
class StreamConfig:
    """Timings of the streams; `settings.USER_STREAMS` (a dict of these names) overrides the defaults."""

    ping_interval: float = 20.0  # Bybit wants a ping every 20 s; Binance gets a websocket ping as often
    listen_key_keepalive: float = 1800.0  # Binance: PUT listenKey at most every 30 min (the key lives 60)
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    alert_after: int = 10  # failures in a row
    stable_after: float = 30.0  # open and alive this long: the failure streak (and backoff) starts over
    connect_timeout: float = 10.0
    accounts_every: float = 30.0  # how often the set of streamed accounts is re-read
    flags_every: float = 5.0  # how often reconnect requests from check_websocket_health are read
    db_workers: int = 4  # threads applying updates and writing health rows, keyed per account
    reconcile_workers: int = 4  # threads for the REST catch-ups after a (re)connect, keyed per account

    @classmethod
    def from_settings(cls) -> StreamConfig:
        overrides = dict(getattr(settings, "USER_STREAMS", None) or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            # A typo here must not keep the leader from starting: name it and use the defaults for it.
            logger.error("USER_STREAMS: unknown setting(s) %s ignored; known: %s", unknown, sorted(known))
        return cls(**{name: value for name, value in overrides.items() if name in known})

    @property
    def check_every(self) -> float:
        return min(1.0, self.ping_interval / 4)

    @property
    def flush_every(self) -> float:
        return min(5.0, self.ping_interval / 2)


class StreamClock:
    """Wall time and the backoff sleep; tests inject one that records (and may hold) the sleeps."""

    def now(self) -> datetime:
        return timezone.now()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class StreamEndpoints:
    ws_url: str  # Bybit: the private stream; Binance: the prefix the listen key is appended to
    rest_base: str  # Binance: where /fapi/v1/listenKey lives


def _as_ws(base: str) -> str:
    if base.startswith("https://"):
        return "wss://" + base[len("https://") :]
    if base.startswith("http://"):
        return "ws://" + base[len("http://") :]
    return base


def stream_endpoints(exchange: str, *, testnet: bool) -> StreamEndpoints:
    """Real hosts, or the base named by EXCHANGE_URL_OVERRIDES (http→ws) as the REST gateway uses it."""
    overrides = _url_overrides()
    if exchange == "BINANCE":
        base = overrides.get("binanceusdm") or overrides.get("binance")
        if base:
            return StreamEndpoints(ws_url=_as_ws(base) + "/ws/", rest_base=base)
        if testnet:  # USDⓈ-M demo trading, as the REST gateway uses it
            return StreamEndpoints("wss://fstream.binancefuture.com/ws/", "https://demo-fapi.binance.com")
        return StreamEndpoints("wss://fstream.binance.com/ws/", "https://fapi.binance.com")
    base = overrides.get("bybit")
    if base:
        return StreamEndpoints(ws_url=_as_ws(base) + "/v5/private", rest_base=base)
    host = "stream-testnet.bybit.com" if testnet else "stream.bybit.com"
    return StreamEndpoints(ws_url=f"wss://{host}/v5/private", rest_base="")


class StreamError(Exception):
    """A stream could not be opened (listen key refused, auth refused, no reply)."""


def _describe(exc: BaseException) -> str:
    return scrub(f"{type(exc).__name__}: {exc}")[:300]


class AccountStream:
    """One account's stream: a single task that connects, reads, pings, and reconnects with backoff.

    The task is the single flight: a reconnect is only ever started by this task, after the
    previous connection is closed, so neither the watchdog nor check_websocket_health can
    start a second one. Order updates go through a queue to a second task that applies them,
    so a slow database never delays reading pongs. Its database calls are keyed by this account
    in the manager's pool: an apply that takes seconds holds one worker and this account's later
    updates, never another account's (tests/exchanges/test_stream_isolation.py).
    """

    def __init__(self, manager: UserStreamManager, account: StreamAccount):
        self.manager = manager
        self.account = account
        self.config = manager.config
        self.clock = manager.clock
        self.endpoints = stream_endpoints(account.exchange, testnet=account.testnet)
        self.state = State.CONNECTING
        self.failures = 0
        self.sessions = 0
        self.reconciles = 0
        self.applied: dict[str, int] = {}
        self.apply_errors = 0
        self.connected_at: datetime | None = None
        self.last_message_at: datetime | None = None
        self.last_pong_at: datetime | None = None
        self.listen_key_refreshed_at: datetime | None = None
        self.last_error = ""
        self._key = ""
        self._reconnect_requested = asyncio.Event()
        self._updates: asyncio.Queue[list[StreamUpdate]] = asyncio.Queue()
        self._write_lock = asyncio.Lock()
        self._dirty = False
        self._last_flush = 0.0
        self._tasks: list[asyncio.Task] = []
        self._reconcile_task: asyncio.Task | None = None

    @property
    def label(self) -> str:
        return f"{self.account.exchange} account {self.account.account_id}"

    @property
    def is_binance(self) -> bool:
        return self.account.exchange == "BINANCE"

    def start(self) -> None:
        aid = self.account.account_id
        self._tasks = [
            asyncio.create_task(self._run(), name=f"stream-{aid}"),
            asyncio.create_task(self._apply_loop(), name=f"stream-{aid}-apply"),
        ]

    async def stop(self, timeout: float = 3.0) -> None:
        tasks = [t for t in (*self._tasks, self._reconcile_task) if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        self.state = State.STOPPED

    def request_reconnect(self) -> bool:
        """Tear the open connection down (the task then reconnects); False when a reconnect is in flight."""
        if self.state != State.OPEN:
            return False
        self._reconnect_requested.set()
        return True

    # --- the loop: connect, serve, back off ---------------------------------------------

    async def _run(self) -> None:
        first = True
        while True:
            if not first:
                delay = backoff_delay(self.failures, base=self.config.backoff_base, cap=self.config.backoff_max)
                self.state = State.DEAD
                await self._write(
                    state=State.DEAD,
                    next_reconnect_at=self.clock.now() + timedelta(seconds=delay),
                    consecutive_failures=self.failures,
                    last_error=self.last_error,
                    count_reconnect=True,
                )
                logger.warning(
                    "stream of %s down (%s); reconnect %d in %.0f s", self.label, self.last_error, self.failures, delay
                )
                await self.clock.sleep(delay)
            first = False
            self._reconnect_requested.clear()
            self.state = State.CONNECTING
            await self._write(state=State.CONNECTING, next_reconnect_at=None)
            self.last_error = await self._session()
            self.failures += 1
            if alert_due(self.failures, alert_after=self.config.alert_after):
                await self._alert(
                    f"User stream of {self.label} failed {self.failures} times in a row; last: {self.last_error}. "
                    f"Retrying with backoff up to {self.config.backoff_max:.0f} s."
                )

    async def _session(self) -> str:
        """One connection from open to end; returns why it ended (it always ends in a reconnect)."""
        self.sessions += 1
        try:
            ws = await asyncio.wait_for(self._open(), self.config.connect_timeout)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.debug("stream of %s: connect failed", self.label, exc_info=True)
            return f"connect failed: {_describe(exc)}"
        now = self.clock.now()
        self.connected_at, self.last_message_at, self.last_pong_at = now, None, None
        self.state = State.OPEN
        self._dirty, self._last_flush = False, time.monotonic()
        opened: dict[str, Any] = {"connected_at": now, "last_message_at": None, "last_pong_at": None}
        if self.is_binance:
            opened["listen_key_refreshed_at"] = self.listen_key_refreshed_at
        await self._write(
            state=State.OPEN, consecutive_failures=self.failures, last_error="", next_reconnect_at=None, **opened
        )
        logger.info("stream of %s open (session %d)", self.label, self.sessions)
        workers = [
            asyncio.create_task(self._read(ws)),
            asyncio.create_task(self._ping(ws)),
            asyncio.create_task(self._watch()),
        ]
        if self.is_binance:
            workers.append(asyncio.create_task(self._keepalive()))
        # After every (re)connect the REST poll's work is done at once for this account: fills
        # made while no stream listened are recorded now, not at the next 29 s run.
        self._reconcile_task = asyncio.create_task(self._reconcile(self._reconcile_task))
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
            reason = "ended"
            for task in done:
                if task.cancelled():
                    continue
                failure = task.exception()
                reason = _describe(failure) if failure is not None else str(task.result())
                break
            return reason
        finally:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
            if self.state == State.OPEN:
                self.state = State.DEAD

    async def _open(self) -> ClientConnection:
        if self.is_binance:
            key = await self._listen_key("POST")
            if not key:
                raise StreamError("listenKey POST returned no key")
            secret_register(key)
            self._key = key
            self.listen_key_refreshed_at = self.clock.now()
            return await connect(
                self.endpoints.ws_url + key, ping_interval=None, close_timeout=1, open_timeout=None, proxy=None
            )
        ws = await connect(self.endpoints.ws_url, ping_interval=None, close_timeout=1, open_timeout=None, proxy=None)
        try:
            expires = int(self.clock.now().timestamp() * 1000) + 10_000
            args = bybit_auth_args(api_key=self.account.api_key, api_secret=self.account.api_secret, expires_ms=expires)
            await ws.send(json.dumps({"req_id": "auth", "op": "auth", "args": args}))
            reply = await self._reply(ws, "auth")
            if not reply.get("success"):
                raise StreamError(f"auth refused: {reply.get('ret_msg') or reply}")
            await ws.send(json.dumps({"req_id": "subscribe", "op": "subscribe", "args": ["order"]}))
            reply = await self._reply(ws, "subscribe")
            if not reply.get("success"):
                raise StreamError(f"subscribe refused: {reply.get('ret_msg') or reply}")
        except BaseException:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 1.0)
            raise
        return ws

    @staticmethod
    async def _reply(ws: ClientConnection, op: str) -> dict[str, Any]:
        while True:
            message = json.loads(await ws.recv())
            if isinstance(message, dict) and message.get("op") == op:
                return message

    async def _listen_key(self, method: str) -> str:
        """POST (create or reuse) or PUT (keep alive) the USDⓈ-M listen key; API key only, no signature.

        Within the process's request budget, as every REST call (exchanges.ratelimit: weight 1 on
        Binance's per-IP minute): short of budget it waits, up to the connect timeout, or fails as a
        StreamError (the stream's backoff retries it); a 429/418 blocks the exchange market for its
        Retry-After, and the used-weight header keeps the local count at least the exchange's.
        """
        budget = rate_budget()
        market = MarketType.FUTURES.value
        key = f"account-{self.account.account_id}"
        deadline = time.monotonic() + self.config.connect_timeout
        while True:
            wait = budget.reserve(exchange="BINANCE", market_type=market, account_key=key, endpoint="listen_key")
            if wait <= 0:
                break
            if time.monotonic() + wait > deadline:
                raise StreamError(f"listenKey {method}: request budget spent here; next call in {wait:.2f} s")
            await asyncio.sleep(wait)
        url = f"{self.endpoints.rest_base}/fapi/v1/listenKey"
        timeout = aiohttp.ClientTimeout(total=self.config.connect_timeout)
        session = self.manager.http
        async with session.request(
            method, url, headers={"X-MBX-APIKEY": self.account.api_key}, timeout=timeout
        ) as response:
            used = response.headers.get("X-MBX-USED-WEIGHT-1M", "")
            if used.isdigit():
                budget.observe_used_weight(exchange="BINANCE", market_type=market, used=int(used))
            if response.status in (418, 429):
                seconds = retry_after_seconds(response.headers.get("Retry-After"), banned=response.status == 418)
                budget.block(exchange="BINANCE", market_type=market, seconds=seconds)
            try:
                body = await response.json(content_type=None)
            except (json.JSONDecodeError, aiohttp.ContentTypeError):
                body = {}
            if response.status != 200:
                body = body if isinstance(body, dict) else {}
                raise StreamError(
                    f"listenKey {method} HTTP {response.status} code {body.get('code')}: {body.get('msg', '')}"
                )
        return str((body or {}).get("listenKey") or "") if isinstance(body, dict) else ""

    # --- the connection's workers ---------------------------------------------------------

    async def _read(self, ws: ClientConnection) -> str:
        try:
            async for raw in ws:
                now = self.clock.now()
                try:
                    message = json.loads(raw)
                except (TypeError, ValueError):
                    self.last_message_at, self._dirty = now, True
                    continue
                if not isinstance(message, dict):
                    continue
                if self.is_binance:
                    self.last_message_at, self._dirty = now, True
                    if message.get("e") == "listenKeyExpired":
                        return "listen key expired"
                    updates = binance_futures_updates(message, now=now)
                else:
                    op = message.get("op")
                    if op == "pong" or (op == "ping" and message.get("ret_msg") == "pong"):
                        self.last_pong_at, self._dirty = now, True
                        continue
                    self.last_message_at, self._dirty = now, True
                    updates = bybit_order_updates(message, now=now)
                if updates:
                    self._updates.put_nowait(updates)
        except ConnectionClosed as exc:
            return f"connection lost: {_describe(exc)}"
        return f"closed by the exchange (code {ws.close_code})"

    async def _ping(self, ws: ClientConnection) -> str:
        interval = self.config.ping_interval
        count = 0
        while True:
            started = time.monotonic()
            if self.is_binance:
                # A websocket ping frame: the user stream itself only speaks when orders change.
                waiter = await ws.ping()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter, interval)
                    self.last_pong_at, self._dirty = self.clock.now(), True
            else:
                count += 1
                await ws.send(json.dumps({"req_id": f"ping-{count}", "op": "ping"}))
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _watch(self) -> str:
        """The manager's own health check of this connection, every second or faster."""
        while True:
            await asyncio.sleep(self.config.check_every)
            if self._reconnect_requested.is_set():
                return "replaced on request of check_websocket_health (open but stale)"
            now = self.clock.now()
            if not stream_alive(
                now=now,
                ping_interval=self.config.ping_interval,
                last_message_at=self.last_message_at,
                last_pong_at=self.last_pong_at,
                connected_at=self.connected_at,
            ):
                seen = max(t for t in (self.last_message_at, self.last_pong_at, self.connected_at) if t is not None)
                return f"no message or pong for {(now - seen).total_seconds():.1f} s"
            if (
                self.failures
                and self.connected_at is not None
                and (now - self.connected_at).total_seconds() >= self.config.stable_after
            ):
                logger.info("stream of %s stable again after %d failures", self.label, self.failures)
                self.failures, self._dirty = 0, True
            await self._flush()

    async def _keepalive(self) -> str:
        while True:
            await asyncio.sleep(self.config.listen_key_keepalive)
            try:
                await self._listen_key("PUT")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # The stream is dead by SPEC §4.6 without a kept-alive key: reconnect with a new one.
                return f"listen key keepalive failed: {_describe(exc)}"
            self.listen_key_refreshed_at, self._dirty = self.clock.now(), True
            await self._flush(force=True)

    # --- database work (in the manager's worker threads) -----------------------------------

    async def _flush(self, *, force: bool = False) -> None:
        if not self._dirty or (not force and time.monotonic() - self._last_flush < self.config.flush_every):
            return
        self._dirty, self._last_flush = False, time.monotonic()
        await self._write(
            last_message_at=self.last_message_at,
            last_pong_at=self.last_pong_at,
            listen_key_refreshed_at=self.listen_key_refreshed_at,
            consecutive_failures=self.failures,
        )

    async def _write(self, **fields: Any) -> None:
        async with self._write_lock:
            write = asyncio.ensure_future(
                self.manager.db(
                    ("state", self.account.account_id),
                    services.stream_state_write,
                    account_id=self.account.account_id,
                    exchange=self.account.exchange,
                    now=self.clock.now(),
                    ping_interval=self.config.ping_interval,
                    **fields,
                )
            )
            try:
                await asyncio.shield(write)
            except asyncio.CancelledError:
                # Stopping: let the row write in its thread finish first, so the manager's final
                # "stopped" write is never overtaken by an older state.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(write, 2.0)
                raise
            except Exception as exc:
                # The stream serves without its health row; the next write tries again.
                logger.warning("stream of %s: state not written: %s", self.label, _describe(exc))

    async def _alert(self, text: str) -> None:
        try:
            await self.manager.db(
                ("alert", self.account.account_id),
                notifications.services.alert_raise,
                key=f"stream:{self.account.account_id}",
                text=text,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.error("stream of %s: alert failed: %s; %s", self.label, _describe(exc), text)

    async def _apply_loop(self) -> None:
        while True:
            updates = await self._updates.get()
            for update in updates:
                try:
                    outcome = await self.manager.db(
                        ("apply", self.account.account_id),
                        self.manager.handler.update_apply,
                        account_id=self.account.account_id,
                        update=update,
                        now=self.clock.now(),
                    )
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    # Runs outside APScheduler: count, log and alert here; the REST poll repairs.
                    self.apply_errors += 1
                    logger.exception("stream of %s: update of order %s failed", self.label, update.exchange_order_id)
                    await self._alert(
                        f"User stream of {self.label}: applying order {update.exchange_order_id} failed: "
                        f"{_describe(exc)} ({self.apply_errors} errors since start)"
                    )
                else:
                    self.applied[outcome] = self.applied.get(outcome, 0) + 1
                    if outcome != "unknown":
                        logger.info("stream of %s: order %s %s", self.label, update.exchange_order_id, outcome)

    async def _reconcile(self, previous: asyncio.Task | None) -> None:
        if previous is not None and not previous.done():
            await asyncio.wait([previous])
        try:
            report = await self.manager.rest(
                self.account.account_id,
                self.manager.handler.reconcile,
                account_id=self.account.account_id,
                now=self.clock.now(),
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("stream of %s: REST catch-up failed (the 29 s poll retries): %s", self.label, _describe(exc))
            return
        self.reconciles += 1
        logger.info(
            "stream of %s: REST catch-up of %d orders: %d fills, %d filled, %d cancelled",
            self.label,
            report.orders,
            report.fills,
            report.filled,
            report.cancelled,
        )


class UserStreamManager:
    """Leader-only thread (SPEC §2.4): keeps one user-data stream per streamed account until stop().

    Construct with the scheduler host (unused beyond logging) and the handler that knows the
    accounts and applies order updates (orders.streams.user_stream_manager does both), then
    start(); stop() closes every socket and ends the loop within a few seconds. Accounts are
    re-read every `accounts_every` seconds; reconnect requests from check_websocket_health
    every `flags_every` seconds.
    """

    def __init__(
        self,
        host: Any = None,
        *,
        handler: StreamHandler,
        config: StreamConfig | None = None,
        clock: StreamClock | None = None,
    ):
        self.host = host
        self.handler = handler
        self.config = config or StreamConfig.from_settings()
        self.clock = clock or StreamClock()
        self.streams: dict[int, AccountStream] = {}
        self.http: aiohttp.ClientSession
        # Two pools, each keyed per account (one account's calls in order, accounts round-robin):
        # database work, and the REST catch-ups, which wait on the exchange for seconds and must
        # never queue in front of another account's order update.
        self._db_pool = KeyedSerialPool(max(1, self.config.db_workers), name="user-streams-db")
        self._rest_pool = KeyedSerialPool(max(1, self.config.reconcile_workers), name="user-streams-rest")
        self._thread = threading.Thread(target=self._thread_main, name="user-streams", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = threading.Event()
        self._wake: asyncio.Event | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Close every stream and end the thread (leadership lost, shutdown); waits up to `timeout`."""
        self._stopping.set()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed already
                loop.call_soon_threadsafe(self._poke)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("user stream manager did not stop within %.0f s", timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def stream(self, account_id: int) -> AccountStream | None:
        return self.streams.get(account_id)

    def _poke(self) -> None:
        if self._wake is not None:
            self._wake.set()

    async def db(self, key: Hashable, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run ORM work in a database worker thread, after the earlier calls of `key`, with
        close_old_connections around it (outside APScheduler). Keys name an account's kind of work
        (("apply", id), ("state", id), …): its updates stay in order, other accounts never wait on it."""
        return await asyncio.wrap_future(self._db_pool.submit(key, fn, *args, **kwargs))

    async def rest(self, account_id: int, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        """Run exchange (REST) work for an account in the REST pool, one call per account at a time."""
        return await asyncio.wrap_future(self._rest_pool.submit(account_id, fn, *args, **kwargs))

    # --- the thread ----------------------------------------------------------------------

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception:
            logger.exception("user stream manager failed; streams are down until the next leadership term")
            with contextlib.suppress(Exception):
                close_old_connections()
                notifications.services.alert_raise(
                    key="streams:manager", text="User stream manager failed; user streams are down"
                )
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            self._rest_pool.close()
            self._db_pool.close()
            loop.close()
            logger.info("user stream manager stopped")

    async def _main(self) -> None:
        self._wake = asyncio.Event()
        self.http = aiohttp.ClientSession()
        logger.info("user stream manager started")
        try:
            next_accounts = next_flags = 0.0
            while not self._stopping.is_set():
                mono = time.monotonic()
                if mono >= next_accounts:
                    await self._sync_accounts()
                    next_accounts = time.monotonic() + self.config.accounts_every
                if mono >= next_flags:
                    await self._take_flags()
                    next_flags = time.monotonic() + self.config.flags_every
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), min(next_accounts, next_flags) - time.monotonic())
        finally:
            await self._stop_all()
            await self.http.close()

    async def _sync_accounts(self) -> None:
        try:
            wanted = {a.account_id: a for a in await self.db(("manager",), self.handler.accounts)}
        except Exception as exc:
            logger.warning("user streams: accounts not read (retrying): %s", _describe(exc))
            return
        gone = [aid for aid, stream in self.streams.items() if wanted.get(aid) != stream.account]
        if gone:
            await asyncio.gather(*(self.streams.pop(aid).stop() for aid in gone))
            with contextlib.suppress(Exception):
                await self.db(("manager",), services.stream_state_stop, account_ids=gone, now=self.clock.now())
            logger.info("user streams stopped for accounts %s (deactivated or changed)", gone)
        for aid, account in wanted.items():
            if aid not in self.streams and not self._stopping.is_set():
                stream = AccountStream(self, account)
                self.streams[aid] = stream
                stream.start()
                logger.info("user stream for %s started", stream.label)

    async def _take_flags(self) -> None:
        if not self.streams:
            return
        try:
            flagged = await self.db(("manager",), services.stream_flags_take, account_ids=list(self.streams))
        except Exception as exc:
            logger.warning("user streams: reconnect requests not read: %s", _describe(exc))
            return
        for aid in flagged:
            stream = self.streams.get(aid)
            if stream is None:
                continue
            if stream.request_reconnect():
                logger.warning("stream of %s: check_websocket_health found it stale; replacing it", stream.label)
            else:
                logger.info("stream of %s: reconnect requested while one is in flight; ignored", stream.label)

    async def _stop_all(self) -> None:
        streams = list(self.streams.values())
        self.streams = {}
        if not streams:
            return
        await asyncio.gather(*(stream.stop() for stream in streams), return_exceptions=True)
        try:
            await asyncio.wait_for(
                self.db(
                    ("manager",),
                    services.stream_state_stop,
                    account_ids=[s.account.account_id for s in streams],
                    now=self.clock.now(),
                ),
                2.0,
            )
        except Exception as exc:
            logger.warning("user streams: stopped state not written: %s", _describe(exc))
