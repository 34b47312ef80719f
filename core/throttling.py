"""DRF throttles on the shared "throttle" cache (Redis, else the database cache table): one budget per
user, IP or strategy for every web process, not one per process. Over the limit: 429 with Retry-After."""

from __future__ import annotations

from typing import Any

from django.core.cache import BaseCache, caches
from rest_framework.exceptions import Throttled
from rest_framework.permissions import SAFE_METHODS
from rest_framework.request import Request
from rest_framework.settings import api_settings
from rest_framework.throttling import SimpleRateThrottle
from rest_framework.views import APIView


class SharedRateThrottle(SimpleRateThrottle):
    """SimpleRateThrottle with its history in caches["throttle"] and its rate read from
    REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"][scope] when built (None: off).

    DRF's read-modify-write of the history is not atomic: requests racing in the same instant may
    each see the last free slot, so a burst can exceed the rate by the number of concurrent
    workers. That bounds abuse, which is the point; it is not an exact quota.
    """

    num_requests: int | None
    duration: int | None

    def __init__(self) -> None:
        # Looked up per instance (one per request): tests and settings changes get the current cache.
        self.cache: BaseCache = caches["throttle"]
        super().__init__()

    def get_rate(self) -> str | None:
        rates: dict[str, Any] = api_settings.DEFAULT_THROTTLE_RATES or {}  # type: ignore[assignment]
        return rates.get(self.scope or "")

    def key_for(self, ident: object) -> str:
        return self.cache_format % {"scope": self.scope, "ident": ident}

    def spent(self, key: str) -> bool:
        """Load `key`'s history (dropping entries older than the window); True when the budget is spent."""
        self.key = key
        self.history = self.cache.get(key, [])
        self.now = self.timer()
        while self.history and self.history[-1] <= self.now - (self.duration or 0):
            self.history.pop()
        return len(self.history) >= (self.num_requests or 0)

    def hit(self, key: str) -> bool:
        """Count one request under `key`; False (and no count) when the budget is spent."""
        if self.rate is None:
            return True
        if self.spent(key):
            return self.throttle_failure()
        return self.throttle_success()

    def raise_throttled(self) -> None:
        raise Throttled(wait=self.wait())


class UserWriteThrottle(SharedRateThrottle):
    """Per authenticated user, writes only (POST, DELETE, …); reads pass."""

    def allow_request(self, request: Request, view: APIView) -> bool:
        if request.method in SAFE_METHODS:
            return True
        return super().allow_request(request, view)

    def get_cache_key(self, request: Request, view: APIView) -> str | None:
        if not (request.user and request.user.is_authenticated):
            return None  # refused by authentication before any throttle; nothing to count
        return self.key_for(request.user.pk)


class IpThrottle(SharedRateThrottle):
    """Per client address (REMOTE_ADDR, or X-Forwarded-For behind REST_FRAMEWORK["NUM_PROXIES"] proxies)."""

    def get_cache_key(self, request: Request, view: APIView) -> str | None:
        return self.key_for(self.get_ident(request))


class IpFailureThrottle(SharedRateThrottle):
    """Per client address, counting only failures the view reports with `failure_record` (e.g. a wrong
    token). Once the budget is spent every request from that address is refused until the oldest
    failure leaves the window; successes never count."""

    def allow_request(self, request: Request, view: APIView) -> bool:
        if self.rate is None:
            return True
        return not self.spent(self.key_for(self.get_ident(request)))

    def failure_record(self, request: Request) -> None:
        if self.rate is None:
            return
        self.hit(self.key_for(self.get_ident(request)))


def throttle_check(throttle: SharedRateThrottle, *, ident: Any) -> None:
    """Count one request against `throttle` for `ident`; raise Throttled (429 + Retry-After) when spent."""
    if not throttle.hit(throttle.key_for(ident)):
        throttle.raise_throttled()
