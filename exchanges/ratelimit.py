"""Request budgets modelled on the exchanges' own limits, kept per process (one egress IP).

Binance counts request weight per IP per minute (spot and USDⓈ-M futures separately) and orders
per account per 10 s (futures also per minute); Bybit limits order endpoints per UID per second.
A call first reserves its weight and order count here: within budget it goes at once; short of
budget it waits (up to the caller's patience) or fails as RateLimited without reaching the
exchange. A 429/418 reply blocks the scope until its Retry-After; the exchange's own used-weight
header (X-MBX-USED-WEIGHT-1M) raises the local count when the exchange counted more. Beside the
budgets, InFlightLimits caps how many calls to one exchange run at once from this process
(EXCHANGE_MAX_IN_FLIGHT), so a burst of pool workers never opens more connections than that.

RateBudget is pure arithmetic over an injected monotonic clock (no network, no database).
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from exchanges.gateway import MarketType


@dataclass(frozen=True)
class RateLimit:
    """At most `limit` units of `unit` ("weight" or "orders") per `seconds`, counted per `scope`
    ("ip": the exchange market seen from this process; "account": one API key)."""

    scope: str
    unit: str
    limit: int
    seconds: float

    def __post_init__(self) -> None:
        if self.scope not in ("ip", "account") or self.unit not in ("weight", "orders"):
            raise ValueError(
                f"rate limit scope/unit must be ip|account and weight|orders, not {self.scope}/{self.unit}"
            )
        if self.limit <= 0 or self.seconds <= 0:
            raise ValueError(f"rate limit needs a positive limit and window, not {self.limit} per {self.seconds} s")


# The exchanges' published limits (Binance: exchangeInfo rateLimits; Bybit: v5 rate limit table).
DEFAULT_LIMITS: dict[str, list[RateLimit]] = {
    "BINANCE:SPOT": [RateLimit("ip", "weight", 6000, 60), RateLimit("account", "orders", 50, 10)],
    "BINANCE:FUTURES": [
        RateLimit("ip", "weight", 2400, 60),
        RateLimit("account", "orders", 300, 10),
        RateLimit("account", "orders", 1200, 60),
    ],
    "BYBIT:SPOT": [RateLimit("account", "orders", 20, 1)],
    "BYBIT:FUTURES": [RateLimit("account", "orders", 10, 1)],
}

# endpoint → (request weight, orders counted). Binance's weights (spot / USDⓈ-M differ); Bybit
# counts only orders here. Unknown endpoints weigh 1.
ENDPOINT_COSTS: dict[tuple[str, str], dict[str, tuple[int, int]]] = {
    ("BINANCE", MarketType.SPOT.value): {
        "create_order": (1, 1),
        "cancel_order": (1, 0),
        "fetch_order": (4, 0),
        "fetch_open_orders": (6, 0),
        "fetch_open_orders_all": (80, 0),
        "fetch_last_prices": (4, 0),
        "fetch_balance": (20, 0),
        "load_markets": (20, 0),
    },
    ("BINANCE", MarketType.FUTURES.value): {
        "create_order": (1, 1),
        "cancel_order": (1, 0),
        "fetch_order": (1, 0),
        "fetch_open_orders": (1, 0),
        "fetch_open_orders_all": (40, 0),
        "fetch_last_prices": (2, 0),
        "fetch_balance": (5, 0),
        "load_markets": (1, 0),
    },
    ("BYBIT", MarketType.SPOT.value): {"create_order": (1, 1), "cancel_order": (1, 1)},
    ("BYBIT", MarketType.FUTURES.value): {"create_order": (1, 1), "cancel_order": (1, 1)},
}


def endpoint_cost(*, exchange: str, market_type: str, endpoint: str) -> tuple[int, int]:
    """(weight, orders) of one call."""
    return ENDPOINT_COSTS.get((exchange.upper(), str(market_type)), {}).get(endpoint, (1, 0))


def retry_after_seconds(header: str | None, *, banned: bool) -> float:
    """Seconds a 429/418 reply asks us to wait: its Retry-After header, else 1 s (60 s for a 418 ban)."""
    try:
        if header is not None:
            return max(0.0, float(header))
    except ValueError:
        pass
    return 60.0 if banned else 1.0


def limits_parse(raw: str | dict | None) -> dict[str, list[RateLimit]]:
    """EXCHANGE_RATE_LIMITS: JSON {"BINANCE:FUTURES": [{"scope": "ip", "unit": "weight", "limit": 2400,
    "seconds": 60}, …]} replacing the defaults per exchange market; [] turns budgets off there.
    Raises ValueError naming the key and the problem."""
    limits = dict(DEFAULT_LIMITS)
    if not raw:
        return limits
    data = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(data, dict):
        raise ValueError("EXCHANGE_RATE_LIMITS must be a JSON object of EXCHANGE:MARKET → list of limits")
    for key, rows in data.items():
        if not isinstance(rows, list):
            raise ValueError(f"EXCHANGE_RATE_LIMITS[{key!r}] must be a list of limits")
        try:
            limits[str(key).upper()] = [
                RateLimit(str(r["scope"]), str(r["unit"]), int(r["limit"]), float(r["seconds"])) for r in rows
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"EXCHANGE_RATE_LIMITS[{key!r}]: {exc}") from None
    return limits


class _Window:
    """Units spent within the last `seconds` (a deque of (time, units))."""

    __slots__ = ("spent", "total")

    def __init__(self) -> None:
        self.spent: deque[tuple[float, int]] = deque()
        self.total = 0

    def trim(self, now: float, seconds: float) -> None:
        while self.spent and self.spent[0][0] <= now - seconds:
            self.total -= self.spent.popleft()[1]

    def wait_for(self, now: float, seconds: float, limit: int, units: int) -> float:
        """Seconds until `units` more fit under `limit` (0: now)."""
        if self.total + units <= limit:
            return 0.0
        excess = self.total + units - limit
        for at, spent in self.spent:
            excess -= spent
            if excess <= 0:
                return max(0.0, at + seconds - now)
        return seconds  # more than the whole window: wait it out


class RateBudget:
    """Thread-safe budgets for one process. `reserve` either books a call or says how long to wait."""

    def __init__(
        self, limits: dict[str, list[RateLimit]] | None = None, *, clock: Callable[[], float] = time.monotonic
    ):
        self.limits = DEFAULT_LIMITS if limits is None else limits
        self.clock = clock
        self._windows: dict[tuple, _Window] = {}
        self._blocked: dict[tuple[str, str], float] = {}  # (exchange market, account or "") → until
        self._lock = threading.Lock()

    def _scopes(self, market: str, account_key: str) -> list[tuple[RateLimit, tuple]]:
        out = []
        for limit in self.limits.get(market, []):
            owner = "" if limit.scope == "ip" else account_key
            out.append((limit, (market, owner, limit.unit, limit.limit, limit.seconds)))
        return out

    def reserve(self, *, exchange: str, market_type: str, account_key: str, endpoint: str) -> float:
        """Book one call of `endpoint` if every budget allows it now and return 0; else book nothing
        and return the seconds until it would fit (or a block from a 429/418 ends)."""
        market = f"{exchange.upper()}:{market_type}"
        weight, orders = endpoint_cost(exchange=exchange, market_type=market_type, endpoint=endpoint)
        now = self.clock()
        with self._lock:
            wait = max(
                self._blocked.get((market, ""), 0.0) - now, self._blocked.get((market, account_key), 0.0) - now, 0.0
            )
            scopes = self._scopes(market, account_key)
            for limit, key in scopes:
                units = weight if limit.unit == "weight" else orders
                if not units:
                    continue
                window = self._windows.setdefault(key, _Window())
                window.trim(now, limit.seconds)
                wait = max(wait, window.wait_for(now, limit.seconds, limit.limit, units))
            if wait > 0:
                return wait
            for limit, key in scopes:
                units = weight if limit.unit == "weight" else orders
                if units:
                    window = self._windows[key]
                    window.spent.append((now, units))
                    window.total += units
            return 0.0

    def block(self, *, exchange: str, market_type: str, seconds: float, account_key: str = "") -> None:
        """No call to the exchange market (or, with `account_key`, that account) for `seconds` (Retry-After)."""
        market = f"{exchange.upper()}:{market_type}"
        until = self.clock() + max(0.0, seconds)
        with self._lock:
            key = (market, account_key)
            self._blocked[key] = max(self._blocked.get(key, 0.0), until)

    def observe_used_weight(self, *, exchange: str, market_type: str, used: int) -> None:
        """The exchange reported `used` weight in its current minute: count at least that much here."""
        market = f"{exchange.upper()}:{market_type}"
        now = self.clock()
        with self._lock:
            for limit, key in self._scopes(market, ""):
                if limit.unit != "weight" or limit.scope != "ip":
                    continue
                window = self._windows.setdefault(key, _Window())
                window.trim(now, limit.seconds)
                if used > window.total:
                    window.spent.append((now, used - window.total))
                    window.total = used


_budget: RateBudget | None = None
_budget_lock = threading.Lock()


def rate_budget() -> RateBudget:
    """The process's budget, built once from settings.EXCHANGE_RATE_LIMITS."""
    global _budget
    with _budget_lock:
        if _budget is None:
            _budget = RateBudget(limits_parse(getattr(settings, "EXCHANGE_RATE_LIMITS", None)))
        return _budget


def rate_budget_reset(budget: RateBudget | None = None) -> None:
    """Replace the process's budget (tests; settings changed); without one, the in-flight caps are rebuilt too."""
    global _budget, _in_flight
    with _budget_lock:
        _budget = budget
        if budget is None:
            _in_flight = None


# --- Calls in flight per exchange ------------------------------------------------------------

DEFAULT_MAX_IN_FLIGHT = 32


def max_in_flight_parse(raw: str | int | dict | None) -> dict[str, int]:
    """EXCHANGE_MAX_IN_FLIGHT: a number for every exchange, or JSON {"default": 32, "BINANCE": 48};
    0 means no cap. Raises ValueError naming the key and the problem."""
    if raw is None or raw == "":
        return {"DEFAULT": DEFAULT_MAX_IN_FLIGHT}
    data: Any = raw
    if isinstance(raw, str):
        text = raw.strip()
        data = json.loads(text) if text.startswith("{") else text
    if not isinstance(data, dict):
        data = {"default": data}
    caps = {"DEFAULT": DEFAULT_MAX_IN_FLIGHT}
    for key, value in data.items():
        try:
            cap = int(value)
        except (TypeError, ValueError):
            raise ValueError(f"EXCHANGE_MAX_IN_FLIGHT[{key!r}]: expected a whole number, got {value!r}") from None
        if cap < 0:
            raise ValueError(f"EXCHANGE_MAX_IN_FLIGHT[{key!r}] must be 0 (no cap) or more, not {cap}")
        caps[str(key).upper()] = cap
    return caps


class InFlightLimits:
    """At most `cap` calls at once per exchange from this process (one semaphore per exchange name).

    `acquire` waits up to `timeout` seconds for a slot and says whether it got one; every
    successful acquire is followed by one `release`. `peak` records the most ever held at once.
    """

    def __init__(self, caps: dict[str, int] | None = None):
        self.caps = {"DEFAULT": DEFAULT_MAX_IN_FLIGHT} if caps is None else caps
        self._slots: dict[str, threading.BoundedSemaphore | None] = {}
        self._held: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self._lock = threading.Lock()

    def cap(self, exchange: str) -> int:
        name = exchange.upper()
        return self.caps.get(name, self.caps.get("DEFAULT", DEFAULT_MAX_IN_FLIGHT))

    def _semaphore(self, name: str) -> threading.BoundedSemaphore | None:
        with self._lock:
            if name not in self._slots:
                cap = self.cap(name)
                self._slots[name] = threading.BoundedSemaphore(cap) if cap > 0 else None
            return self._slots[name]

    def acquire(self, exchange: str, *, timeout: float) -> bool:
        name = exchange.upper()
        slots = self._semaphore(name)
        if slots is not None and not slots.acquire(timeout=max(0.0, timeout)):
            return False
        with self._lock:
            held = self._held.get(name, 0) + 1
            self._held[name] = held
            self.peak[name] = max(self.peak.get(name, 0), held)
        return True

    def release(self, exchange: str) -> None:
        name = exchange.upper()
        with self._lock:
            self._held[name] = self._held.get(name, 1) - 1
            slots = self._slots.get(name)
        if slots is not None:
            slots.release()

    def in_flight(self, exchange: str) -> int:
        with self._lock:
            return self._held.get(exchange.upper(), 0)


_in_flight: InFlightLimits | None = None


def in_flight_limits() -> InFlightLimits:
    """The process's in-flight caps, built once from settings.EXCHANGE_MAX_IN_FLIGHT."""
    global _in_flight
    with _budget_lock:
        if _in_flight is None:
            _in_flight = InFlightLimits(max_in_flight_parse(getattr(settings, "EXCHANGE_MAX_IN_FLIGHT", None)))
        return _in_flight


def in_flight_limits_reset(limits: InFlightLimits | None = None) -> None:
    """Replace the process's in-flight caps (tests; settings changed)."""
    global _in_flight
    with _budget_lock:
        _in_flight = limits
