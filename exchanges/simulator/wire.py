"""What the simulator's HTTP/WS server and its dialects share: configuration, fault checks, the DB-thread call, time.

Kept apart from server.py (which builds the app from the dialects) so that the dialects import
these without importing the server: no import cycle.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from core.executors import connections_checked
from exchanges.gateway import MarketType
from exchanges.models import SimFault
from exchanges.simulator.engine import FaultHit, SimEngine

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
    """Credentials the server accepts, engine exchange names and limits.

    Each API key is one engine account, as on a real exchange: `api_key`/`api_secret` is one pair
    and `keys` (key → secret) any number more. A request is signed with its own key's secret.
    """

    api_key: str
    api_secret: str
    binance_exchange: str = "BINANCE"
    bybit_exchange: str = "BYBIT"
    timeout_hold: float = DEFAULT_TIMEOUT_HOLD
    listen_keys: dict[str, str] = field(default_factory=dict)  # listen key → account (USDⓈ-M and spot)
    listen_key_markets: dict[str, MarketType] = field(default_factory=dict)  # listen key → its market
    rate_limits: RateLimitConfig = field(default_factory=RateLimitConfig)
    keys: dict[str, str] = field(default_factory=dict)  # API key → its secret (more accounts)

    def secret_of(self, key: str) -> str | None:
        """The secret of a registered API key; None for a key the exchange does not know."""
        if not key:
            return None
        if key == self.api_key:
            return self.api_secret
        return self.keys.get(key)


class KeysFileError(ValueError):
    """A keys file that cannot be read as API key pairs; the message names the line or entry."""


def keys_parse(text: str) -> dict[str, str]:
    """API key pairs from a keys file: JSON (a list of {"key", "secret"} or an object key → secret),
    else lines "key:secret" (blank lines and # comments skipped). Raises KeysFileError."""
    stripped = text.strip()
    keys: dict[str, str] = {}
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as exc:
            raise KeysFileError(f"not valid JSON: {exc}") from None
        pairs = list(data.items()) if isinstance(data, dict) else data
        for n, item in enumerate(pairs):
            if isinstance(item, dict):
                item = (item.get("key"), item.get("secret"))
            if not (isinstance(item, list | tuple) and len(item) == 2 and all(isinstance(v, str) for v in item)):
                raise KeysFileError(f'entry {n}: expected {{"key": ..., "secret": ...}}')
            _key_add(keys, item[0], item[1], where=f"entry {n}")
        return keys
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, secret = line.partition(":")
        if not sep:
            raise KeysFileError(f"line {n}: expected key:secret")
        _key_add(keys, key.strip(), secret.strip(), where=f"line {n}")
    return keys


def _key_add(keys: dict[str, str], key: str, secret: str, *, where: str) -> None:
    if not key or not secret or any(c.isspace() for c in key + secret):
        raise KeysFileError(f"{where}: key and secret must be non-empty, without spaces")
    if keys.get(key, secret) != secret:
        raise KeysFileError(f"{where}: key {key[:6]}… is listed twice with different secrets")
    keys[key] = secret


async def db_call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run synchronous ORM/engine work in a worker thread with connection hygiene (core.executors)."""

    # The worker threads are long-lived: their connections are checked every few seconds and after
    # a failure, not around every call (with CONN_HEALTH_CHECKS each check is a round trip).
    return await asyncio.to_thread(connections_checked, fn, *args, **kwargs)


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

    async def take_before(self, exchange: str, endpoint: str | None, account: str) -> tuple[FaultHit | None, bool]:
        """The "before" fault of a call, and whether an "after" one was armed for it (SimEngine.fault_take_before)."""
        if not endpoint:
            return None, False
        hit, after = await db_call(self.engine.fault_take_before, exchange, endpoint, account)
        if hit is not None:
            logger.info("sim server fault %s on %s %s (before)", hit.kind, exchange, endpoint)
        return hit, after

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


def now_ms() -> int:
    return int(time.time() * 1000)
