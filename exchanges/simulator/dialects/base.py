"""What every wire dialect shares: the request pipeline, signatures, rate limits, faults, clock, cursors, numbers.

A dialect subclasses `Dialect` and overrides the hooks (authenticate, error shapes, fault and
rate-limit replies, the engine-error table); the pipeline in `route` is the same for all:

    parse → authenticate → rate limit → fault (before) → handler → fault (after) → JSON reply

Every reply, errors included, carries the dialect's rate-limit headers, as the real APIs do.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from abc import ABC, ABCMeta, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from aiohttp import web

from exchanges.gateway import GatewayError, MarketType, OrderStatus
from exchanges.models import SimFault, SimOrder
from exchanges.simulator.engine import OrderEvent, SimEngine, StreamCursor
from exchanges.simulator.ratelimit import Charge, RateLimiter, Verdict
from exchanges.simulator.wire import WS_POLL_SECONDS, Faults, ServerConfig, db_call

logger = logging.getLogger(__name__)


def decimal_text(value: Decimal | None) -> str:
    """A decimal as the exchanges print it: plain notation, no exponent, no trailing zeros; None → "0"."""
    if value is None:
        return "0"
    return format(value.normalize(), "f")


def hmac_sha256(secret: str, payload: str) -> str:
    return hmac.new(secret.encode(), payload.encode(), hashlib.sha256).hexdigest()


def signature_ok(secret: str, payload: str, signature: str) -> bool:
    return hmac.compare_digest(hmac_sha256(secret, payload), signature)


def ms(moment: Any) -> int:
    """An aware datetime as epoch milliseconds."""
    return int(moment.timestamp() * 1000)


@dataclass(frozen=True)
class MarkedPosition:
    symbol: str
    quantity: Decimal  # signed
    entry_price: Decimal
    mark_price: Decimal

    @property
    def unrealized(self) -> Decimal:
        return self.quantity * (self.mark_price - self.entry_price)


class DialectError(Exception, metaclass=ABCMeta):
    """An error reply in a dialect's own shape; subclasses render it."""

    @abstractmethod
    def response(self) -> web.Response:
        """The HTTP reply carrying this error."""


@dataclass
class Call:
    """One REST request as a handler sees it."""

    request: web.Request
    params: dict[str, Any]
    account: str  # the API key ("" on public endpoints)
    market_type: MarketType | None
    route: Route


@dataclass(frozen=True)
class Route:
    """How one path is served: its fault endpoint name, whether it is signed, and what it costs."""

    endpoint: str | None  # engine fault endpoint (ENDPOINTS), None: never faulted
    auth: str = "none"  # none | key (API key only) | signed
    market_type: MarketType | None = None
    weight: int = 1  # the dialect's unit of request cost (Binance request weight)
    extra: dict[str, Any] = field(default_factory=dict)  # dialect-specific (order counting, weight rules)


Handler = Callable[[Call], Awaitable[Any]]


class Dialect(ABC):
    """A wire dialect over the engine. Subclasses set `exchange` and implement the hooks below."""

    exchange: str = ""

    def __init__(self, engine: SimEngine, config: ServerConfig, faults: Faults, limiter: RateLimiter):
        self.engine = engine
        self.config = config
        self.faults = faults
        self.limiter = limiter
        self.limits_on = config.rate_limits.enabled

    # --- hooks ---------------------------------------------------------------------------

    @abstractmethod
    def register(self, app: web.Application) -> None:
        """Add the dialect's routes to `app`."""

    @abstractmethod
    async def parse(self, request: web.Request, body: str) -> dict[str, Any]:
        """The request's parameters (query string and body, as the exchange reads them)."""

    @abstractmethod
    def authenticate(self, request: web.Request, body: str, route: Route) -> str:
        """The account (API key) of a request whose route needs one; raises the dialect's auth error."""

    @abstractmethod
    def fault_reply(self, kind: str) -> web.StreamResponse:
        """The reply an injected REST fault of `kind` sends."""

    @abstractmethod
    def engine_error(self, exc: GatewayError, call: Call) -> DialectError:
        """The engine's typed error in the dialect's shape."""

    def rate_charges(self, call: Call) -> list[Charge]:
        """What this request costs against the limiter (nothing by default)."""
        return []

    @abstractmethod
    def rate_refused(self, verdict: Verdict, call: Call) -> web.StreamResponse:
        """The reply to a request the limiter refused (the dialect's 429/418 shape)."""

    def rate_headers(self, verdict: Verdict | None, call: Call) -> dict[str, str]:
        return {}

    def market_type_of(self, call: Call) -> MarketType | None:
        return call.route.market_type

    def fault_endpoint(self, call: Call) -> str | None:
        return call.route.endpoint

    def reply(self, result: Any) -> web.StreamResponse:
        return web.json_response(result)

    # --- the pipeline ---------------------------------------------------------------------

    def route(self, fn: Handler, endpoint: str | None, **options: Any) -> Callable[[web.Request], Awaitable[Any]]:
        """The aiohttp handler running `fn` through the shared pipeline."""
        route = Route(endpoint=endpoint, **options)

        async def handler(request: web.Request) -> web.StreamResponse:
            call = Call(request=request, params={}, account="", market_type=route.market_type, route=route)
            verdict: Verdict | None = None
            try:
                body = await request.text()
                call.params = await self.parse(request, body)
                call.market_type = self.market_type_of(call)
                if route.auth != "none":
                    call.account = self.authenticate(request, body, route)
                if self.limits_on:
                    verdict = self.limiter.charge(self.rate_charges(call))
                if verdict is not None and not verdict.allowed:
                    response = self.rate_refused(verdict, call)
                    # One line per refusal, by status: the drill counts the 429s and 418s it caused.
                    logger.info(
                        "sim %s rate limit: %s refused with HTTP %s (%s)",
                        self.exchange,
                        request.path,
                        response.status,
                        "ban" if verdict.banned_until is not None else verdict.over.name if verdict.over else "-",
                    )
                else:
                    response = await self._serve(call, fn)
            except DialectError as exc:
                response = exc.response()
            except GatewayError as exc:
                response = self.engine_error(exc, call).response()
            if verdict is None and self.limits_on:  # refused before charging: report usage as it stands
                verdict = self.limiter.charge([Charge(c.key, c.window, 0) for c in self.rate_charges(call)])
            for name, value in self.rate_headers(verdict, call).items():
                response.headers.setdefault(name, value)
            return response

        return handler

    async def _serve(self, call: Call, fn: Handler) -> web.StreamResponse:
        """Faults around the handler: before (nothing done), after (done and committed, reply lost)."""
        endpoint = self.fault_endpoint(call)
        hit, after_armed = await self.faults.take_before(self.exchange, endpoint, call.account)
        reply = await self.faults.apply(hit, self.fault_reply)
        if reply is not None:
            return reply
        result = await fn(call)
        # An "after" fault is taken when one was armed as the call began (one added meanwhile applies
        # to the calls that begin after it): a fault-free call costs one lookup, not two.
        if after_armed:
            hit = await self.faults.take(self.exchange, endpoint, call.account, SimFault.Phase.AFTER)
            reply = await self.faults.apply(hit, self.fault_reply)
            if reply is not None:
                return reply
        return result if isinstance(result, web.StreamResponse) else self.reply(result)

    # --- shared views -------------------------------------------------------------------------

    def marked_positions(self, account: str, symbols: list[str] | None = None) -> list[MarkedPosition]:
        """Futures positions marked at the last price: the held ones, or every listed symbol in `symbols`
        (None: every catalogue symbol), flat ones with quantity 0. Synchronous: call it in db_call."""
        held = {p.symbol: p for p in self.engine.position_list(self.exchange, account)}
        marks = self.engine.prices_last(self.exchange, MarketType.FUTURES, symbols)
        return [
            MarkedPosition(
                symbol=symbol,
                quantity=held[symbol].quantity if symbol in held else Decimal(0),
                entry_price=held[symbol].entry_price if symbol in held else Decimal(0),
                mark_price=mark,
            )
            for symbol, mark in marks.items()
        ]

    @staticmethod
    def child_of(order: SimOrder) -> SimOrder | None:
        """The regular order a triggered conditional order spawned, if any."""
        return SimOrder.objects.filter(parent_id=order.pk).first() if order.conditional else None

    def cancel_as_shown(self, account: str, market_type: MarketType, order: SimOrder) -> None:
        """Cancel the order a client sees under this id: a triggered conditional's spawned order, else itself.

        Raises NotFound when it is no longer open. Synchronous: call it in db_call.
        """
        target = order
        if order.conditional and order.status == OrderStatus.TRIGGERED:
            target = self.child_of(order) or order
        self.engine.order_cancel(
            self.exchange,
            account,
            symbol=order.symbol,
            market_type=market_type,
            exchange_order_id=str(target.pk),
            conditional=target.conditional,
        )

    async def listed_coins(self) -> list[str]:
        """Every coin of a listed spot market (the currencies endpoints)."""
        rules = await db_call(self.engine.market_list, self.exchange, MarketType.SPOT)
        return sorted({c for rule in rules for c in (rule.base, rule.quote)})

    def held_symbols(self, account: str) -> list[str]:
        return [p.symbol for p in self.engine.position_list(self.exchange, account)]

    # --- streams ---------------------------------------------------------------------------

    async def stream_cursor(self, account: str) -> StreamCursor:
        return await db_call(self.engine.stream_cursor, self.exchange, account)

    async def stream_faulted(self, account: str) -> str | None:
        """The websocket fault for this poll: "ws_drop", "ws_silent" or None (consumed)."""
        return await db_call(self.engine.fault_ws_take, self.exchange, account)

    async def order_events(
        self, account: str, cursor: StreamCursor, market_type: MarketType | None = None
    ) -> tuple[list[OrderEvent], StreamCursor]:
        return await db_call(self.engine.order_events_since, self.exchange, account, cursor, market_type=market_type)

    @staticmethod
    async def poll_pause() -> None:
        await asyncio.sleep(WS_POLL_SECONDS)
