"""Request-rate limits of the simulated exchanges: fixed-window counters per key, with an optional ban.

One `RateLimiter` counts any number of keys ("ip:127.0.0.1:fapi", "account:KEY:orders", ...) in
windows aligned to the epoch, the way Binance counts its intervals (a request at 00:01:23
counts toward the 00:01:00 minute). A request is a list of `Charge`s checked together: if any
window would go over its limit none is charged and the verdict says how long to wait.
Refusals are strikes against the keys that were over; `ban_after` strikes in a row (no
allowed request between) ban those keys for `ban_seconds` (Binance's HTTP 418).

The dialects use it for Binance's per-IP request weight and per-account order counts and for
Bybit's per-UID, per-endpoint limits; it knows nothing of HTTP, so other callers (an
execution engine's own pacing, say) can use it as is.

    limiter = RateLimiter(ban_after=5, ban_seconds=120)
    minute = Window("REQUEST_WEIGHT", limit=2400, seconds=60)
    verdict = limiter.charge([Charge("ip:127.0.0.1:fapi", minute, 5)])
    verdict.allowed, verdict.retry_after, verdict.usage_of(minute).used
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One limit: at most `limit` units per `seconds`-long window."""

    name: str
    limit: int
    seconds: int


@dataclass(frozen=True)
class Charge:
    """`cost` units of `window` for `key` (a cost of 0 reports usage without spending)."""

    key: str
    window: Window
    cost: int


@dataclass(frozen=True)
class Usage:
    key: str
    window: Window
    used: int  # units counted in the current window, this request included when it was allowed
    reset_at: float  # epoch seconds at which the window rolls over

    @property
    def remaining(self) -> int:
        return max(self.window.limit - self.used, 0)


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    usages: tuple[Usage, ...]
    retry_after: float = 0.0  # seconds until every refused window rolled over (or the ban ends)
    banned_until: float | None = None  # epoch seconds, when a ban refused the request
    over: Window | None = None  # the first window that refused it

    def usage_of(self, window: Window) -> Usage | None:
        return next((u for u in self.usages if u.window == window), None)


class RateLimiter:
    """Thread-safe fixed-window counters; in memory, so per server process (like one exchange host)."""

    def __init__(
        self,
        *,
        ban_after: int | None = None,
        ban_seconds: float = 120.0,
        clock: Callable[[], float] = time.time,
    ):
        self.ban_after = ban_after
        self.ban_seconds = ban_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str, int, int], int] = {}  # (key, window name, seconds, start) → units
        self._strikes: dict[str, int] = {}
        self._banned: dict[str, float] = {}

    def charge(self, charges: Sequence[Charge], *, now: float | None = None) -> Verdict:
        """Spend every charge, or none when one window (or a ban) refuses; the verdict reports usage."""
        now = self.clock() if now is None else now
        with self._lock:
            self._forget(now)
            bans = [self._banned[c.key] for c in charges if self._banned.get(c.key, 0) > now]
            if bans:
                until = max(bans)
                return Verdict(False, self._usages(charges, now, 0), until - now, banned_until=until)
            over = [c for c in charges if c.cost and self._used(c, now) + c.cost > c.window.limit]
            if over:
                retry = max(self._start(c.window, now) + c.window.seconds - now for c in over)
                banned_until = self._strike({c.key for c in over}, now)
                if banned_until is not None:
                    retry = banned_until - now
                usages = self._usages(charges, now, 0)
                return Verdict(False, usages, retry, banned_until=banned_until, over=over[0].window)
            for c in charges:
                if c.cost:
                    slot = (c.key, c.window.name, c.window.seconds, self._start(c.window, now))
                    self._counts[slot] = self._counts.get(slot, 0) + c.cost
                self._strikes.pop(c.key, None)
            return Verdict(True, self._usages(charges, now, 0))

    def reset(self) -> None:
        with self._lock:
            self._counts.clear()
            self._strikes.clear()
            self._banned.clear()

    # --- internals (lock held) ------------------------------------------------------------

    @staticmethod
    def _start(window: Window, now: float) -> int:
        return int(math.floor(now / window.seconds) * window.seconds)

    def _used(self, charge: Charge, now: float) -> int:
        slot = (charge.key, charge.window.name, charge.window.seconds, self._start(charge.window, now))
        return self._counts.get(slot, 0)

    def _usages(self, charges: Sequence[Charge], now: float, extra: int) -> tuple[Usage, ...]:
        return tuple(
            Usage(c.key, c.window, self._used(c, now) + extra, self._start(c.window, now) + c.window.seconds)
            for c in charges
        )

    def _strike(self, keys: set[str], now: float) -> float | None:
        if self.ban_after is None:
            return None
        banned_until = None
        for key in keys:
            self._strikes[key] = self._strikes.get(key, 0) + 1
            if self._strikes[key] >= self.ban_after:
                self._banned[key] = banned_until = now + self.ban_seconds
                self._strikes.pop(key)
        return banned_until

    def _forget(self, now: float) -> None:
        """Drop windows that rolled over, so memory stays bounded by the keys seen in the last window."""
        if len(self._counts) < 4096:
            return
        self._counts = {s: n for s, n in self._counts.items() if s[3] + s[2] > now}
        self._banned = {k: t for k, t in self._banned.items() if t > now}
