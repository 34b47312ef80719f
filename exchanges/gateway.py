"""The one exchange gateway protocol with its DTOs and typed errors (SPEC §5); imports no Django app."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from enum import StrEnum
from typing import Protocol, runtime_checkable

from core.money import ZERO


class MarketType(StrEnum):
    SPOT = "SPOT"
    FUTURES = "FUTURES"


class Side(StrEnum):
    BUY = "BUY"
    SELL = "SELL"


class OrderType(StrEnum):
    MARKET = "MARKET"
    LIMIT = "LIMIT"
    STOP_LIMIT = "STOP_LIMIT"
    STOP_MARKET = "STOP_MARKET"

    @property
    def is_conditional(self) -> bool:
        return self in (OrderType.STOP_LIMIT, OrderType.STOP_MARKET)


class OrderStatus(StrEnum):
    NEW = "NEW"
    PARTIALLY_FILLED = "PARTIALLY_FILLED"
    FILLED = "FILLED"
    CANCELED = "CANCELED"
    REJECTED = "REJECTED"
    EXPIRED = "EXPIRED"
    # A conditional order whose stop fired: it spawned a regular order and is no longer
    # live itself. Never a fill: the spawned order carries the fills.
    TRIGGERED = "TRIGGERED"


OPEN_STATUSES = frozenset({OrderStatus.NEW, OrderStatus.PARTIALLY_FILLED})
FINAL_STATUSES = frozenset(
    {OrderStatus.FILLED, OrderStatus.CANCELED, OrderStatus.REJECTED, OrderStatus.EXPIRED, OrderStatus.TRIGGERED}
)


# --- DTOs -----------------------------------------------------------------------------


@dataclass(frozen=True)
class MarketRule:
    """Trading rules of one symbol in one market type; None where the exchange sets no limit."""

    symbol: str  # canonical "BASE/QUOTE", also for futures
    market_type: MarketType
    base: str
    quote: str
    tick_size: Decimal
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal | None = None
    min_notional: Decimal | None = None
    max_price: Decimal | None = None
    price_precision: int = 8
    amount_precision: int = 8
    active: bool = True


@dataclass(frozen=True)
class AssetBalance:
    currency: str
    free: Decimal
    used: Decimal

    @property
    def total(self) -> Decimal:
        return self.free + self.used


@dataclass(frozen=True)
class Balance:
    """Balances of one account in one market type; `used` is what open orders reserve."""

    market_type: MarketType
    assets: Mapping[str, AssetBalance] = field(default_factory=dict)

    def free(self, currency: str) -> Decimal:
        asset = self.assets.get(currency)
        return asset.free if asset else ZERO

    def used(self, currency: str) -> Decimal:
        asset = self.assets.get(currency)
        return asset.used if asset else ZERO

    def total(self, currency: str) -> Decimal:
        return self.free(currency) + self.used(currency)


@dataclass(frozen=True)
class OrderRequest:
    """One order to place. `client_order_id` is the idempotency key (≤ 32 characters)."""

    symbol: str
    market_type: MarketType
    side: Side
    order_type: OrderType
    quantity: Decimal
    price: Decimal | None = None
    stop_price: Decimal | None = None
    client_order_id: str = ""
    reduce_only: bool = False

    def __post_init__(self) -> None:
        # Programming errors, caught before any exchange call.
        if self.quantity <= 0:
            raise ValueError(f"quantity must be positive, got {self.quantity}")
        if self.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) and (self.price is None or self.price <= 0):
            raise ValueError(f"{self.order_type} needs a positive price")
        if self.order_type.is_conditional and (self.stop_price is None or self.stop_price <= 0):
            raise ValueError(f"{self.order_type} needs a positive stop_price")
        if len(self.client_order_id) > 36:
            raise ValueError("client_order_id is longer than 36 characters")

    @property
    def conditional(self) -> bool:
        return self.order_type.is_conditional


@dataclass(frozen=True)
class OrderState:
    """An order as the exchange reports it; quantities are cumulative, never deltas."""

    exchange_order_id: str
    client_order_id: str
    symbol: str
    market_type: MarketType
    side: Side
    order_type: OrderType
    status: OrderStatus
    quantity: Decimal
    filled_quantity: Decimal
    average_price: Decimal | None
    price: Decimal | None
    stop_price: Decimal | None
    fee: Decimal
    fee_currency: str
    updated_at: datetime
    conditional: bool = False
    spawned_order_id: str | None = None
    spawned_client_order_id: str | None = None

    @property
    def is_open(self) -> bool:
        if self.conditional:
            return self.status == OrderStatus.NEW
        return self.status in OPEN_STATUSES

    @property
    def remaining_quantity(self) -> Decimal:
        return self.quantity - self.filled_quantity


# --- Errors -----------------------------------------------------------------------------


class GatewayError(Exception):
    """Base of every gateway error. Messages never carry credentials or signed URLs.

    `retryable` says whether the same call may be repeated later as is (never blindly
    for create_order: resolve by client order id first). `code` is the exchange's code.
    """

    retryable = False

    def __init__(self, message: str = "", *, code: str | None = None, exchange: str = ""):
        super().__init__(message)
        self.code = code
        self.exchange = exchange


class NotFound(GatewayError):
    """The exchange does not know the order (in the place that was asked)."""


class DuplicateClientId(GatewayError):
    """An order with this client order id exists already: resolve it by lookup, never end it."""


class Maintenance(GatewayError):
    """The exchange is in maintenance or not available."""

    retryable = True


class RateLimited(GatewayError):
    """Too many requests (HTTP 429/418), or refused here before sending (`code` in LOCAL_REFUSAL_CODES)."""

    retryable = True


# RateLimited codes of a call our own client refused before it left the process (exchanges.ratelimit:
# the request budget is spent, or EXCHANGE_MAX_IN_FLIGHT calls are running): the exchange never saw it.
LOCAL_REFUSAL_CODES = frozenset({"budget", "in_flight"})


def not_sent(exc: BaseException) -> bool:
    """Whether a failed call is known never to have reached the exchange (a local refusal)."""
    return isinstance(exc, RateLimited) and exc.code in LOCAL_REFUSAL_CODES


class Network(GatewayError):
    """Timeout or connection failure: the outcome of the call is unknown."""

    retryable = True


class Auth(GatewayError):
    """Credentials refused or lacking permission."""


class InsufficientFunds(GatewayError):
    """Not enough free balance for the order."""


class Rejected(GatewayError):
    """The order broke a rule (unknown symbol, filters, open-order cap, bad parameters)."""


class ExchangeError(GatewayError):
    """Any other exchange-side error."""


# --- Call policy ------------------------------------------------------------------------


@dataclass(frozen=True)
class CallPolicy:
    """How the calling thread's exchange calls may behave: a shorter per-request timeout, fewer retries.

    None leaves the gateway's own setting. A job with a tight cadence (the 1 s order queue) bounds
    its calls this way; the gateway's instances stay shared with every other thread, which keep theirs.
    """

    timeout_ms: int | None = None
    retries: int | None = None


_NO_POLICY = CallPolicy()  # frozen: safe to share as the default
_call_policy: ContextVar[CallPolicy] = ContextVar("exchange_call_policy", default=_NO_POLICY)


def call_policy_current() -> CallPolicy:
    return _call_policy.get()


@contextmanager
def call_policy(*, timeout_ms: int | None = None, retries: int | None = None) -> Iterator[CallPolicy]:
    """Within the block, this thread's exchange calls use `timeout_ms` (if shorter) and `retries`."""
    if timeout_ms is not None and timeout_ms <= 0:
        raise ValueError(f"call_policy timeout_ms must be positive, not {timeout_ms}")
    if retries is not None and retries < 0:
        raise ValueError(f"call_policy retries must be 0 or more, not {retries}")
    policy = CallPolicy(timeout_ms=timeout_ms, retries=retries)
    token = _call_policy.set(policy)
    try:
        yield policy
    finally:
        _call_policy.reset(token)


# --- Protocol ---------------------------------------------------------------------------


@runtime_checkable
class ExchangeGateway(Protocol):
    """What the application asks of an exchange. Every method may raise a GatewayError subclass."""

    exchange: str

    def load_markets(self, market_type: MarketType) -> list[MarketRule]:
        """Every tradable symbol of the market type with its rules (delisted ones absent or inactive)."""
        ...

    def fetch_last_prices(self, market_type: MarketType, symbols: list[str] | None = None) -> dict[str, Decimal]:
        """Last prices in one call, keyed by canonical symbol; all symbols when `symbols` is None."""
        ...

    def fetch_balance(self, market_type: MarketType) -> Balance: ...

    def create_order(self, request: OrderRequest) -> OrderState:
        """Place an order. Network means "unknown": look it up by client order id before retrying."""
        ...

    def cancel_order(
        self,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None = None,
        client_order_id: str | None = None,
        conditional: bool = False,
    ) -> OrderState:
        """Cancel a live order; NotFound when the exchange no longer has it open."""
        ...

    def fetch_order(
        self,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None = None,
        client_order_id: str | None = None,
        conditional: bool = False,
    ) -> OrderState:
        """One order by exchange id or client id, looked up in open and closed/history; else NotFound."""
        ...

    def fetch_open_orders(
        self, market_type: MarketType, *, conditional: bool = False, symbol: str | None = None
    ) -> list[OrderState]:
        """Live regular orders, or live (untriggered) conditional orders when `conditional`."""
        ...
