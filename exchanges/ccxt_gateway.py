"""The gateway protocol over real ccxt for Binance (spot, USDⓈ-M) and Bybit v5 (spot, linear); sole ccxt importer."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from http.cookiejar import DefaultCookiePolicy
from typing import Any, TypedDict, TypeVar, cast
from urllib.parse import urlsplit

import ccxt
import requests
from django.conf import settings
from requests.adapters import HTTPAdapter

from core.money import COLUMN_LIMIT, ZERO
from core.pgpool import connection_release
from core.scrub import scrub, secret_register
from exchanges import gateway as gw
from exchanges.gateway import (
    AssetBalance,
    Balance,
    MarketRule,
    MarketType,
    OrderRequest,
    OrderState,
    OrderStatus,
    OrderType,
    Side,
    call_policy,
    call_policy_current,
)
from exchanges.ratelimit import in_flight_limits, rate_budget, retry_after_seconds

logger = logging.getLogger(__name__)

T = TypeVar("T")

# --- Error mapping (SPEC §5) --------------------------------------------------------------

# Codes an exchange uses for "this client order id exists already". Binance −4116 is
# DUPLICATED_CLIENT_ORDER_ID on USDⓈ-M, −2010 "Duplicate order sent." on spot; Bybit 110072
# "OrderLinkedID is duplicate". ccxt raises InvalidOrder for them on the real hosts, but a
# generic ExchangeError where its per-market table is not consulted, so the code is read
# from the message for both.
_DUPLICATE_PATTERNS = (
    re.compile(r'"code"\s*:\s*-4116\b'),
    re.compile(r"Duplicate order sent", re.IGNORECASE),
    re.compile(r'"retCode"\s*:\s*110072\b'),
    re.compile(r"OrderLinkedID is duplicate", re.IGNORECASE),
    re.compile(r'"code"\s*:\s*-20132\b'),  # USDⓈ-M algo endpoints: "The client algo id is duplicated"
)
# Rate-limit refusals that concern one account (its order count), not the IP: Binance -1015 "Too
# many new orders", Bybit 10006 (per-UID limit). Their Retry-After blocks that account only.
ACCOUNT_LIMIT_CODES = frozenset({"-1015", "10006"})
_CODE_PATTERN = re.compile(r'"(?:code|retCode)"\s*:\s*"?(-?\d+)')


def _error_code(text: str) -> str | None:
    match = _CODE_PATTERN.search(text)
    return match.group(1) if match else None


class _ErrorKwargs(TypedDict):
    code: str | None
    exchange: str


def _header(client: Any, name: str) -> str | None:
    headers = getattr(client, "last_response_headers", None) or {}
    for key, value in headers.items():
        if str(key).lower() == name:
            return str(value)
    return None


def _retry_after(client: Any, exc: BaseException) -> float:
    """Seconds a 429/418 asks us to wait: its Retry-After header, else 1 s (60 s for a 418 ban)."""
    return retry_after_seconds(_header(client, "retry-after"), banned="418" in str(exc))


def _used_weight(client: Any) -> int | None:
    """Binance's X-MBX-USED-WEIGHT-1M of the instance's last reply (None when absent)."""
    value = _header(client, "x-mbx-used-weight-1m")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def map_ccxt_error(exc: BaseException, *, exchange: str = "") -> gw.GatewayError:
    """Translate a ccxt exception into the typed gateway error, most specific first; text scrubbed.

    ccxt's hierarchy decides the order: OrderNotFound and DuplicateOrderId are InvalidOrder;
    OnMaintenance is an ExchangeNotAvailable is a NetworkError, as are RateLimitExceeded,
    DDoSProtection and RequestTimeout; InsufficientFunds and AuthenticationError are
    ExchangeErrors. A non-ccxt exception is returned as ExchangeError.
    """
    text = scrub(str(exc))
    code = _error_code(text)
    kwargs: _ErrorKwargs = {"code": code, "exchange": exchange}
    if isinstance(exc, ccxt.OrderNotFound):
        return gw.NotFound(text, **kwargs)
    if isinstance(exc, ccxt.DuplicateOrderId):
        return gw.DuplicateClientId(text, **kwargs)
    if isinstance(exc, ccxt.ExchangeError) and any(p.search(text) for p in _DUPLICATE_PATTERNS):
        return gw.DuplicateClientId(text, **kwargs)
    if isinstance(exc, ccxt.ExchangeNotAvailable):  # includes OnMaintenance
        return gw.Maintenance(text, **kwargs)
    if isinstance(exc, ccxt.RateLimitExceeded | ccxt.DDoSProtection):
        return gw.RateLimited(text, **kwargs)
    if isinstance(exc, ccxt.NetworkError):  # includes RequestTimeout and InvalidNonce
        return gw.Network(text, **kwargs)
    if isinstance(exc, ccxt.AuthenticationError):
        return gw.Auth(text, **kwargs)
    if isinstance(exc, ccxt.InsufficientFunds):
        return gw.InsufficientFunds(text, **kwargs)
    if isinstance(exc, ccxt.InvalidOrder | ccxt.BadSymbol):
        return gw.Rejected(text, **kwargs)
    if isinstance(exc, ccxt.BadRequest):
        # Beyond SPEC's table: a request the exchange refuses as malformed (Binance −1013
        # filter failures, −1102 bad parameters) fails the same way when sent again.
        return gw.Rejected(text, **kwargs)
    return gw.ExchangeError(text, **kwargs)


# --- Instances and markets, shared for the process lifetime ------------------------------

_CLASSES: dict[tuple[str, MarketType], str] = {
    ("binance", MarketType.SPOT): "binance",
    ("binance", MarketType.FUTURES): "binanceusdm",
    ("bybit", MarketType.SPOT): "bybit",
    ("bybit", MarketType.FUTURES): "bybit",
}

_instances: dict[tuple[str, str, MarketType], Any] = {}
_instances_lock = threading.Lock()
# (exchange, market type, testnet) → a key-less instance: it loads the public market list once, and
# every account's instance of that kind shares its markets and its read-only describe() tables.
_templates: dict[tuple[str, MarketType, bool], Any] = {}
_templates_lock = threading.Lock()
_markets_lock = threading.Lock()

# Tables ccxt copies out of describe() into every instance (deep_extend) and only reads afterwards:
# about 0.24 of the 0.26 MB an instance costs (`api` alone ~0.2 MB for Binance). Every instance of
# one (exchange, market type, testnet) holds the same values, so it takes the template's objects.
# `options` is not among them (ccxt writes its top-level keys at run time): each instance gets its
# own top-level dict over the template's nested values. Markets are shared by set_markets_from_exchange.
_SHARED_TABLES = (
    "api",
    "exceptions",
    "has",
    "features",
    "fees",
    "httpExceptions",
    "ecdsaCurves",
    "ecdsaPrehashedAlgorithms",
    "timeframes",
    "requiredCredentials",
    "commonCurrencies",
    "status",
    "limits",
    "precision",
    "urls",
)


def _options(family: str, market_type: MarketType) -> dict[str, Any]:
    """ccxt options so that only the endpoints the jobs need are called."""
    if family == "binance":
        types = ["spot"] if market_type == MarketType.SPOT else ["linear"]
        return {
            "fetchMarkets": {"types": types, "loadAllOptions": False},
            "fetchCurrencies": False,  # sapi capital/config: needs keys, not needed
            "fetchMargins": False,  # no margin pair endpoints
            "warnOnFetchOpenOrdersWithoutSymbol": False,
            "fetchOpenOrders": {"warnWithoutSymbol": False},
            "adjustForTimeDifference": False,
            "defaultType": "spot" if market_type == MarketType.SPOT else "swap",
            "defaultSubType": None if market_type == MarketType.SPOT else "linear",
        }
    return {
        "fetchMarkets": {
            "types": ["spot"] if market_type == MarketType.SPOT else ["linear"],
            "loadAllOptions": False,
            "loadExpiredOptions": False,
        },
        # Known unified trading account: skips the two account-info calls ccxt makes to find out.
        "enableUnifiedAccount": True,
        "enableUnifiedMargin": False,
        "unifiedMarginStatus": 6,
        "adjustForTimeDifference": False,
        "defaultType": "spot" if market_type == MarketType.SPOT else "swap",
        "defaultSubType": "linear",
        "defaultSettle": "USDT",
    }


def _url_overrides() -> dict[str, str]:
    raw = getattr(settings, "EXCHANGE_URL_OVERRIDES", None) or {}
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError:
            logger.error("EXCHANGE_URL_OVERRIDES is not valid JSON; ignored")
            return {}
    return {str(k).lower(): str(v).rstrip("/") for k, v in raw.items()}


def _rewrite_urls(urls: Any, base: str) -> Any:
    """Every URL under `urls` aimed at `base`, keeping its path (/api/v3, /fapi/v1, …)."""
    if isinstance(urls, dict):
        return {key: _rewrite_urls(value, base) for key, value in urls.items()}
    if isinstance(urls, str) and "://" in urls:
        path = urlsplit(urls.replace("{hostname}", "host")).path
        return base + path
    return urls


def _apply_override(exchange: Any, family: str, market_type: MarketType) -> None:
    overrides = _url_overrides()
    base = overrides.get(exchange.id) or overrides.get(family)
    if not base:
        return
    exchange.urls["api"] = _rewrite_urls(exchange.urls["api"], base)
    if family == "binance":
        # ccxt picks Binance's per-market error table (−4116 DUPLICATED_CLIENT_ORDER_ID,
        # −2019 margin insufficient, …) by the real hostnames only; fold it in so the
        # overridden host raises the same classes.
        section = "spot" if market_type == MarketType.SPOT else "linear"
        table = exchange.exceptions.get(section, {})
        exchange.exceptions["exact"] = {**exchange.exceptions.get("exact", {}), **table.get("exact", {})}
        exchange.exceptions["broad"] = {**exchange.exceptions.get("broad", {}), **table.get("broad", {})}
    # Once per template at INFO; every account's instance repeats it at DEBUG.
    level = logging.INFO if not exchange.apiKey else logging.DEBUG
    logger.log(level, "exchange %s %s aimed at %s", exchange.id, market_type, base)


_policed: dict[type, type] = {}


def _policed_class(cls: type[Any]) -> type[Any]:
    """`cls` whose `timeout` (read by ccxt at every request) yields to the calling thread's CallPolicy.

    One instance serves every thread of the process (its markets, nonce and rate limiter are
    shared), so a job that needs short timeouts cannot set the attribute; it sets a context
    variable instead, and only its own requests see the shorter value.
    """
    policed = _policed.get(cls)
    if policed is None:

        def timeout_get(self: Any) -> int:
            own = self.__dict__.get("_own_timeout", cls.timeout)
            short = call_policy_current().timeout_ms
            return min(own, short) if short is not None else own

        def timeout_set(self: Any, value: int) -> None:
            self.__dict__["_own_timeout"] = value

        policed = type(cls.__name__, (cls,), {"timeout": property(timeout_get, timeout_set)})
        _policed[cls] = policed
    return policed


class _SourceAddressAdapter(HTTPAdapter):
    """requests' adapter whose connections leave from one local address (EXCHANGE_SOURCE_ADDRESS)."""

    def __init__(self, source: str, **kwargs: Any):
        self.source = source
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source, 0)
        super().init_poolmanager(*args, **kwargs)


class _SharedSession(requests.Session):
    """The process's HTTP connections to the exchanges, shared by every account's ccxt instance.

    Each instance would otherwise hold a session of its own, so a fan-out's first call of every
    follower opened a new connection (a TCP and TLS handshake to a real exchange: a round trip or
    two before the order is even sent). Shared, the connections stay open between signals and any
    worker takes one that is free. Nothing of an account lives in it: ccxt signs each request
    itself, and cookies are refused (ccxt clears the jar before every request anyway). ccxt closes
    an instance's session when the instance is dropped; the shared one stays open (`pool_close`).
    """

    def close(self) -> None:
        """Kept open for the other instances (ccxt calls this when one instance is dropped)."""

    def pool_close(self) -> None:
        super().close()


_sessions: dict[str, _SharedSession] = {}
_sessions_lock = threading.Lock()
# Connections kept per exchange host beyond the pools' workers: user-stream listen keys, the client
# warmer, the price and market jobs.
HTTP_POOL_SPARE = 16


def _http_session() -> _SharedSession:
    """The shared session of the process's egress address (EXCHANGE_SOURCE_ADDRESS; "" the default route)."""
    source = settings.EXCHANGE_SOURCE_ADDRESS
    with _sessions_lock:
        session = _sessions.get(source)
        if session is None:
            session = _SharedSession()
            session.trust_env = ccxt.Exchange.requests_trust_env
            session.cookies.set_policy(DefaultCookiePolicy(allowed_domains=[]))
            size = int(settings.EXECUTION_WORKERS) + int(settings.RECONCILE_WORKERS) + HTTP_POOL_SPARE
            adapter = (
                _SourceAddressAdapter(source, pool_connections=8, pool_maxsize=size)
                if source
                else HTTPAdapter(pool_connections=8, pool_maxsize=size)
            )
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            _sessions[source] = session
        return session


def _make_exchange(family: str, market_type: MarketType, api_key: str, api_secret: str, testnet: bool) -> Any:
    cls = _policed_class(getattr(ccxt, _CLASSES[(family, market_type)]))
    exchange = cls(
        {
            "apiKey": api_key,
            "secret": api_secret,
            "enableRateLimit": True,
            "timeout": int(getattr(settings, "EXCHANGE_HTTP_TIMEOUT_MS", 10_000)),
            "options": _options(family, market_type),
            "has": {"fetchCurrencies": False},
            "session": _http_session(),
        }
    )
    if testnet:
        if exchange.id == "binanceusdm":
            exchange.enable_demo_trading(True)  # the USDⓈ-M sandbox is retired in favour of demo trading
        else:
            exchange.set_sandbox_mode(True)
    _apply_override(exchange, family, market_type)
    exchange.tradingsite_testnet = testnet
    return exchange


def _same_account(exchange: Any, api_key: str, api_secret: str, testnet: bool) -> bool:
    return (exchange.apiKey, exchange.secret, exchange.tradingsite_testnet) == (api_key, api_secret, testnet)


def _template(family: str, market_type: MarketType, testnet: bool) -> Any:
    """The key-less instance of (exchange, market type, testnet) whose tables and markets accounts share."""
    key = (family, market_type, testnet)
    with _templates_lock:
        template = _templates.get(key)
        if template is None:
            template = _make_exchange(family, market_type, "", "", testnet)
            _templates[key] = template
        return template


def _share_tables(exchange: Any, template: Any) -> None:
    """Point `exchange`'s read-only describe() tables at the template's (equal values, one copy)."""
    for name in _SHARED_TABLES:
        if name in vars(exchange) and name in vars(template):
            setattr(exchange, name, getattr(template, name))
    exchange.options = dict(exchange.options)  # own top level, shared nested tables


def instance_for(
    family: str, account_key: str, market_type: MarketType, api_key: str, api_secret: str, testnet: bool = False
) -> Any:
    """The one ccxt instance of (exchange, account, market type) for the process lifetime.

    Its credentials are its own; its describe() tables and (once loaded) markets are the
    template's. An account whose key or secret changed gets a new instance.
    """
    key = (family, str(account_key), market_type)
    with _instances_lock:
        exchange = _instances.get(key)
        if exchange is not None and _same_account(exchange, api_key, api_secret, testnet):
            return exchange
    template = _template(family, market_type, testnet)
    fresh = _make_exchange(family, market_type, api_key, api_secret, testnet)
    _share_tables(fresh, template)
    with _instances_lock:
        exchange = _instances.get(key)
        if exchange is None or not _same_account(exchange, api_key, api_secret, testnet):
            _instances[key] = exchange = fresh
        return exchange


def caches_clear() -> None:
    """Forget every ccxt instance, template and shared market table (tests; after a URL override change)."""
    with _instances_lock:
        _instances.clear()
    with _templates_lock:
        _templates.clear()
    with _sessions_lock:
        sessions = list(_sessions.values())
        _sessions.clear()
    for session in sessions:
        session.pool_close()


def _decimal(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def _upper_limit(value: Any) -> Decimal | None:
    """A market's maximum (amount or price), or None for no limit: absent, 0 (Binance's "disabled"),
    not finite, or too large for a money column (no order can reach it anyway)."""
    limit = _decimal(value)
    if limit is None or not limit.is_finite() or limit <= 0 or limit >= COLUMN_LIMIT:
        return None
    return limit


def _decimals_of(step: Decimal | None) -> int:
    if step is None or step <= 0:
        return 8
    return max(0, -cast(int, step.normalize().as_tuple().exponent))  # a finite step: int exponent


def _ms_to_datetime(ms: Any) -> datetime:
    try:
        return datetime.fromtimestamp(int(ms) / 1000, tz=UTC)
    except (TypeError, ValueError):
        return datetime.now(tz=UTC)


# Raw statuses of conditional orders before they fire (Binance algo, Bybit) and after.
_ALGO_STATUS = {
    "NEW": OrderStatus.NEW,
    "TRIGGERING": OrderStatus.NEW,
    "CANCELED": OrderStatus.CANCELED,
    "CANCELLED": OrderStatus.CANCELED,
    "REJECTED": OrderStatus.REJECTED,
    "EXPIRED": OrderStatus.EXPIRED,
    "TRIGGERED": OrderStatus.TRIGGERED,
    "FINISHED": OrderStatus.TRIGGERED,
}
_BYBIT_STATUS = {
    "Created": OrderStatus.NEW,
    "New": OrderStatus.NEW,
    "Untriggered": OrderStatus.NEW,
    "PartiallyFilled": OrderStatus.PARTIALLY_FILLED,
    "Filled": OrderStatus.FILLED,
    "Cancelled": OrderStatus.CANCELED,
    "PartiallyFilledCanceled": OrderStatus.CANCELED,
    "Deactivated": OrderStatus.CANCELED,
    "Rejected": OrderStatus.REJECTED,
    "Triggered": OrderStatus.TRIGGERED,
}
_BINANCE_STATUS = {
    "NEW": OrderStatus.NEW,
    "PARTIALLY_FILLED": OrderStatus.PARTIALLY_FILLED,
    "FILLED": OrderStatus.FILLED,
    "CANCELED": OrderStatus.CANCELED,
    "PENDING_CANCEL": OrderStatus.NEW,
    "REJECTED": OrderStatus.REJECTED,
    "EXPIRED": OrderStatus.EXPIRED,
    "EXPIRED_IN_MATCH": OrderStatus.EXPIRED,
}
_UNIFIED_STATUS = {
    "open": OrderStatus.NEW,
    "closed": OrderStatus.FILLED,
    "canceled": OrderStatus.CANCELED,
    "rejected": OrderStatus.REJECTED,
    "expired": OrderStatus.EXPIRED,
}
_BINANCE_CONDITIONAL_TYPES = {
    "STOP_LOSS": OrderType.STOP_MARKET,
    "STOP_LOSS_LIMIT": OrderType.STOP_LIMIT,
    "TAKE_PROFIT": OrderType.STOP_MARKET,
    "TAKE_PROFIT_LIMIT": OrderType.STOP_LIMIT,
    "STOP": OrderType.STOP_LIMIT,
    "STOP_MARKET": OrderType.STOP_MARKET,
    "TAKE_PROFIT_MARKET": OrderType.STOP_MARKET,
}


class CcxtGateway:
    """ExchangeGateway over ccxt for one account of Binance or Bybit; calls name their own market type.

    Instances of ccxt are shared per (exchange, account, market type) and markets per
    (exchange, market type). Reads retry Network and RateLimited with exponential backoff;
    create_order never retries (an unknown outcome is resolved by client order id lookup).
    """

    def __init__(
        self,
        exchange_id: str,
        market_type: MarketType | str,
        api_key: str,
        api_secret: str,
        *,
        testnet: bool = False,
        account_key: str,
        retries: int | None = None,
        backoff_seconds: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        family = exchange_id.lower()
        if family not in ("binance", "bybit"):
            raise ValueError(f"CcxtGateway supports binance and bybit, not {exchange_id!r}")
        secret_register(api_key)
        secret_register(api_secret)
        self.family = family
        self.exchange = family.upper()
        self.market_type = MarketType(market_type)
        self.account_key = str(account_key)
        self.testnet = testnet
        self._api_key = api_key
        self._api_secret = api_secret
        self.retries = int(getattr(settings, "EXCHANGE_RETRIES", 2)) if retries is None else retries
        self.backoff_seconds = (
            float(getattr(settings, "EXCHANGE_RETRY_BACKOFF", 0.5)) if backoff_seconds is None else backoff_seconds
        )
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"CcxtGateway({self.exchange}, {self.market_type}, account={self.account_key})"

    # --- plumbing -----------------------------------------------------------------------

    def _client(self, market_type: MarketType) -> Any:
        exchange = instance_for(
            self.family, self.account_key, MarketType(market_type), self._api_key, self._api_secret, self.testnet
        )
        if not exchange.markets:
            exchange.set_markets_from_exchange(self._loaded_template(MarketType(market_type)))
        return exchange

    def prepare(self, market_type: MarketType) -> None:
        """Build this account's client of `market_type` now (markets shared; at most one public load per
        process), so that its first order does not pay for it."""
        self._client(MarketType(market_type))

    def _loaded_template(self, market_type: MarketType) -> Any:
        """The template of this market type with its markets loaded (one public load per process)."""
        template = _template(self.family, market_type, self.testnet)
        if template.markets:
            return template
        with _markets_lock:
            if not template.markets:
                with call_policy():  # a one-off load for the process, not the caller's call: own timeout, retries
                    self._call(
                        lambda: template.load_markets(),
                        retry=True,
                        endpoint="load_markets",
                        client=template,
                        market_type=market_type,
                    )
                logger.info("loaded %d %s %s markets", len(template.markets), self.exchange, market_type)
        return template

    def _call(
        self,
        fn: Callable[[], T],
        *,
        retry: bool,
        endpoint: str,
        client: Any = None,
        market_type: MarketType | None = None,
    ) -> T:
        """Run one ccxt call within the process's rate budget (exchanges.ratelimit), mapping its errors.

        Short of budget the call waits (at most EXCHANGE_RATE_WAIT_MAX, or the caller's shorter
        call-policy timeout) or fails as RateLimited without reaching the exchange; the same holds
        when EXCHANGE_MAX_IN_FLIGHT calls to the exchange are running already. A 429/418
        reply blocks the exchange market for its Retry-After; the used-weight header keeps the
        local count at least the exchange's. Reads are retried on Network and RateLimited.

        `market_type`: the market of the call (its weights and limits; a gateway serves both), the
        gateway's own by default. A refusal that names the account (Binance -1015 too many orders,
        Bybit 10006 per-UID limit) blocks that account only, not every account of the exchange.
        """
        policy = call_policy_current()
        retries = self.retries if policy.retries is None else min(policy.retries, self.retries)
        patience = float(getattr(settings, "EXCHANGE_RATE_WAIT_MAX", 2.0))
        if policy.timeout_ms is not None:
            patience = min(patience, policy.timeout_ms / 1000)
        budget = rate_budget()
        slots = in_flight_limits()
        market = MarketType(market_type or self.market_type).value
        # An engine worker holds no database connection while it waits on the exchange (the house
        # rule keeps calls out of transactions, so there is none open here to keep).
        connection_release()
        attempt = 0
        while True:
            wait = budget.reserve(
                exchange=self.exchange, market_type=market, account_key=self.account_key, endpoint=endpoint
            )
            if wait > 0:
                if wait > patience:
                    raise gw.RateLimited(
                        f"{self.exchange} {market} {endpoint}: request budget spent here; next call in {wait:.2f} s",
                        code="budget",
                        exchange=self.exchange,
                    )
                self._sleep(wait)
                continue
            # The slot is taken after the budget (never held over a budget wait) and only around
            # the request itself (never over a retry's backoff sleep).
            if not slots.acquire(self.exchange, timeout=patience):
                raise gw.RateLimited(
                    f"{self.exchange} {market} {endpoint}: {slots.cap(self.exchange)} calls in flight here already; "
                    f"none finished within {patience:.2f} s",
                    code="in_flight",
                    exchange=self.exchange,
                )
            failure: ccxt.BaseError | None = None
            try:
                result = fn()
            except ccxt.BaseError as exc:
                failure = exc
            finally:
                slots.release(self.exchange)
            if failure is not None:
                error = map_ccxt_error(failure, exchange=self.exchange)
                if isinstance(error, gw.RateLimited):
                    block = _retry_after(client, failure)
                    account = self.account_key if error.code in ACCOUNT_LIMIT_CODES else ""
                    budget.block(exchange=self.exchange, market_type=market, seconds=block, account_key=account)
                    logger.warning(
                        "%s %s%s rate limited: no calls for %.1f s",
                        self.exchange,
                        market,
                        f" account {account}" if account else "",
                        block,
                    )
                if retry and isinstance(error, gw.Network | gw.RateLimited) and attempt < retries:
                    delay = self.backoff_seconds * (2**attempt)
                    attempt += 1
                    logger.warning(
                        "%s %s: %s, retry %d in %.2fs",
                        self.exchange,
                        self.account_key,
                        type(error).__name__,
                        attempt,
                        delay,
                    )
                    self._sleep(delay)
                    continue
                raise error from None
            used = _used_weight(client)
            if used is not None:
                budget.observe_used_weight(exchange=self.exchange, market_type=market, used=used)
            return result

    def _ccxt_symbol(self, symbol: str, market_type: MarketType) -> str:
        if market_type == MarketType.FUTURES and ":" not in symbol:
            return f"{symbol}:{symbol.split('/')[1]}"
        return symbol

    @staticmethod
    def _canonical(symbol: str | None) -> str:
        return (symbol or "").split(":")[0]

    # --- protocol -----------------------------------------------------------------------

    def load_markets(self, market_type: MarketType) -> list[MarketRule]:
        """Rules of every spot pair or USDT-margined perpetual; one fetch per (exchange, market type) per process."""
        market_type = MarketType(market_type)
        markets = self._client(market_type).markets
        rules: list[MarketRule] = []
        for market in markets.values():
            if market_type == MarketType.SPOT and not market.get("spot"):
                continue
            if market_type == MarketType.FUTURES and not (
                market.get("swap") and market.get("linear") and market.get("settle") == market.get("quote")
            ):
                continue
            precision = market.get("precision") or {}
            limits = market.get("limits") or {}
            tick = _decimal(precision.get("price")) or Decimal("0.00000001")
            step = _decimal(precision.get("amount")) or Decimal("0.00000001")
            rules.append(
                MarketRule(
                    symbol=f"{market['base']}/{market['quote']}",
                    market_type=market_type,
                    base=market["base"],
                    quote=market["quote"],
                    tick_size=tick,
                    step_size=step,
                    min_qty=_decimal((limits.get("amount") or {}).get("min")) or step,
                    max_qty=_upper_limit((limits.get("amount") or {}).get("max")),
                    min_notional=_decimal((limits.get("cost") or {}).get("min")),
                    max_price=_upper_limit((limits.get("price") or {}).get("max")),
                    price_precision=_decimals_of(tick),
                    amount_precision=_decimals_of(step),
                    active=market.get("active") is not False,
                )
            )
        return rules

    def fetch_last_prices(self, market_type: MarketType, symbols: list[str] | None = None) -> dict[str, Decimal]:
        """Last prices in one call (Binance ticker/price, Bybit tickers); retried on Network/RateLimited."""
        market_type = MarketType(market_type)
        client = self._client(market_type)
        if self.family == "binance":
            raw = self._call(
                lambda: client.fetch_last_prices(), retry=True, endpoint="fetch_last_prices", client=client
            )
            pairs = {sym: entry.get("price") for sym, entry in raw.items()}
        else:
            raw = self._call(
                lambda: client.fetch_tickers(),
                retry=True,
                endpoint="fetch_last_prices",
                client=client,
                market_type=market_type,
            )
            pairs = {sym: entry.get("last") for sym, entry in raw.items()}
        wanted = set(symbols) if symbols is not None else None
        prices: dict[str, Decimal] = {}
        for sym, value in pairs.items():
            market = client.markets.get(sym)
            if market is None or (market_type == MarketType.SPOT) != bool(market.get("spot")):
                continue
            canonical = self._canonical(sym)
            price = _decimal(value)
            if price is None or price <= 0 or (wanted is not None and canonical not in wanted):
                continue
            prices[canonical] = price
        return prices

    def fetch_balance(self, market_type: MarketType) -> Balance:
        """Free and used per currency of the market type's wallet; retried on Network/RateLimited."""
        market_type = MarketType(market_type)
        client = self._client(market_type)
        raw = self._call(
            lambda: client.fetch_balance(), retry=True, endpoint="fetch_balance", client=client, market_type=market_type
        )
        assets: dict[str, AssetBalance] = {}
        for currency, entry in raw.items():
            if currency in ("info", "free", "used", "total", "timestamp", "datetime", "debt") or not isinstance(
                entry, dict
            ):
                continue
            free = _decimal(entry.get("free"))
            used = _decimal(entry.get("used"))
            total = _decimal(entry.get("total"))
            if free is None and total is not None:
                free = total - (used or ZERO)
            if used is None and total is not None and free is not None:
                used = total - free
            assets[currency] = AssetBalance(currency=currency, free=free or ZERO, used=used or ZERO)
        return Balance(market_type=market_type, assets=assets)

    def create_order(self, request: OrderRequest) -> OrderState:
        """Place one order with its client order id; NEVER retried here.

        Network / RateLimited / Maintenance mean the outcome is unknown and DuplicateClientId
        that it exists: the caller resolves either by fetch_order(client_order_id=…).
        """
        market_type = MarketType(request.market_type)
        client = self._client(market_type)
        symbol = self._ccxt_symbol(request.symbol, market_type)
        is_market = request.order_type in (OrderType.MARKET, OrderType.STOP_MARKET)
        params: dict[str, Any] = {}
        if request.client_order_id:
            params["clientOrderId"] = request.client_order_id
        if request.reduce_only and market_type == MarketType.FUTURES:
            params["reduceOnly"] = True
        if request.conditional:
            # Binance: triggerPrice makes ccxt build STOP/STOP_MARKET (USDⓈ-M, via the algo
            # endpoint) or STOP_LOSS_LIMIT (spot). Bybit: triggerPrice with a direction on
            # linear — a BUY stop fires on a rise, a SELL stop on a fall.
            params["triggerPrice"] = str(request.stop_price)
            if self.family == "bybit" and market_type == MarketType.FUTURES:
                params["triggerDirection"] = "ascending" if request.side == Side.BUY else "descending"
        price = None if is_market else float(request.price)  # type: ignore[arg-type]
        raw = self._call(
            lambda: client.create_order(
                symbol, "market" if is_market else "limit", request.side.lower(), float(request.quantity), price, params
            ),
            retry=False,
            endpoint="create_order",
            client=client,
            market_type=market_type,
        )
        state = self._to_state(raw, market_type, conditional=request.conditional, request=request)
        logger.info(
            "%s %s created %s %s %s cid=%s id=%s",
            self.exchange,
            self.account_key,
            request.side,
            request.order_type,
            request.symbol,
            request.client_order_id,
            state.exchange_order_id,
        )
        return state

    def cancel_order(
        self,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None = None,
        client_order_id: str | None = None,
        conditional: bool = False,
    ) -> OrderState:
        """Cancel a live order in the given market (regular or conditional endpoint); not retried.

        NotFound when the exchange no longer has it open; a cancel with unknown outcome raises
        Network and is resolved by fetch_order.
        """
        market_type = MarketType(market_type)
        client = self._client(market_type)
        ccxt_symbol = self._ccxt_symbol(symbol, market_type)
        params = self._lookup_params(conditional, None if exchange_order_id else client_order_id)
        if self.family == "bybit" and "clientOrderId" in params:
            params["orderLinkId"] = params.pop("clientOrderId")  # ccxt's Bybit cancel reads only orderLinkId
        order_ref = exchange_order_id or (None if self.family == "bybit" else "")
        raw = self._call(
            lambda: client.cancel_order(order_ref, ccxt_symbol, params),
            retry=False,
            endpoint="cancel_order",
            client=client,
            market_type=market_type,
        )
        if raw.get("amount") is None:
            # Bybit and the USDⓈ-M algo endpoint acknowledge with ids only: read the order back.
            order_id = str(raw.get("id") or exchange_order_id or "") or None
            try:
                return self.fetch_order(
                    symbol=symbol,
                    market_type=market_type,
                    exchange_order_id=order_id,
                    client_order_id=None if order_id else client_order_id,
                    conditional=conditional,
                )
            except gw.GatewayError as exc:
                logger.warning("%s cancel of %s acknowledged, read-back failed: %s", self.exchange, order_id, exc)
                return _replace(self._to_state(raw, market_type, conditional=conditional), status=OrderStatus.CANCELED)
        return self._to_state(raw, market_type, conditional=conditional)

    def fetch_order(
        self,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None = None,
        client_order_id: str | None = None,
        conditional: bool = False,
    ) -> OrderState:
        """One order by exchange id or client id from open and closed/history; NotFound if neither knows it.

        Read-only and idempotent; retried on Network/RateLimited.
        """
        if not exchange_order_id and not client_order_id:
            raise ValueError("fetch_order needs exchange_order_id or client_order_id")
        market_type = MarketType(market_type)
        client = self._client(market_type)
        ccxt_symbol = self._ccxt_symbol(symbol, market_type)
        if self.family == "binance":
            # Binance's order query answers for open and closed orders alike.
            params = self._lookup_params(conditional, client_order_id)
            raw = self._call(
                lambda: client.fetch_order(exchange_order_id or "", ccxt_symbol, params),
                retry=True,
                endpoint="fetch_order",
                client=client,
                market_type=market_type,
            )
            return self._to_state(raw, market_type, conditional=conditional)
        filter_params: dict[str, Any] = {"orderFilter": "StopOrder" if conditional else "Order"}
        if exchange_order_id:
            filter_params["orderId"] = exchange_order_id
        else:
            filter_params["orderLinkId"] = client_order_id
        for fetch in (client.fetch_open_orders, client.fetch_canceled_and_closed_orders):

            def fetch_orders(fetch: Callable[..., Any] = fetch) -> Any:
                return fetch(ccxt_symbol, None, None, dict(filter_params))

            found = self._call(fetch_orders, retry=True, endpoint="fetch_order", client=client, market_type=market_type)
            for raw in found:
                if (exchange_order_id and str(raw.get("id")) == str(exchange_order_id)) or (
                    client_order_id and raw.get("clientOrderId") == client_order_id
                ):
                    return self._to_state(raw, market_type, conditional=conditional)
        raise gw.NotFound(
            f"{self.exchange} order id={exchange_order_id} cid={client_order_id} not found in open or history",
            exchange=self.exchange,
        )

    def fetch_open_orders(
        self, market_type: MarketType, *, conditional: bool = False, symbol: str | None = None
    ) -> list[OrderState]:
        """Live regular orders, or live untriggered conditional orders; one call, retried on Network/RateLimited."""
        market_type = MarketType(market_type)
        client = self._client(market_type)
        ccxt_symbol = self._ccxt_symbol(symbol, market_type) if symbol else None
        params: dict[str, Any]
        if self.family == "binance":
            params = {"trigger": True} if conditional and market_type == MarketType.FUTURES else {}
        else:
            params = {"orderFilter": "StopOrder" if conditional else "Order"}
        raw_orders = self._call(
            lambda: client.fetch_open_orders(ccxt_symbol, None, None, params),
            retry=True,
            endpoint="fetch_open_orders" if ccxt_symbol else "fetch_open_orders_all",
            client=client,
            market_type=market_type,
        )
        states = [self._to_state(raw, market_type, conditional=conditional) for raw in raw_orders]
        if self.family == "binance" and market_type == MarketType.SPOT:
            # Binance spot lists stop orders among regular ones: untriggered stops are the
            # conditional list; a triggered stop is a working order in the regular list.
            if conditional:
                return [s for s in states if s.conditional and s.status == OrderStatus.NEW]
            return [s for s in states if not s.conditional and s.is_open]
        return [s for s in states if s.is_open]

    # --- conversion ---------------------------------------------------------------------

    def _lookup_params(self, conditional: bool, client_order_id: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if client_order_id:
            params["clientOrderId"] = client_order_id
        if conditional:
            if self.family == "bybit":
                params["orderFilter"] = "StopOrder"
            else:
                params["trigger"] = True
        return params

    def _to_state(
        self,
        raw: dict[str, Any],
        market_type: MarketType,
        *,
        conditional: bool,
        request: OrderRequest | None = None,
    ) -> OrderState:
        info = raw.get("info") or {}
        side_raw = (raw.get("side") or (request.side if request else "buy")).upper()
        quantity = _decimal(raw.get("amount")) or (request.quantity if request else ZERO)
        filled = _decimal(raw.get("filled")) or ZERO
        price = _decimal(raw.get("price")) or (request.price if request else None)
        stop_price = _decimal(raw.get("triggerPrice")) or (request.stop_price if request else None)
        average = _decimal(raw.get("average"))
        if average is None and filled > 0:
            cost = _decimal(raw.get("cost"))
            average = (cost / filled) if cost else None
        fee, fee_currency = self._fee(raw)
        order_type, is_conditional = self._order_type(raw, info, request)
        status, spawned_id = self._status(raw, info, filled, quantity, conditional, is_conditional)
        # A triggered stop viewed as the regular order it became (Binance spot, Bybit keep its id).
        as_regular = is_conditional and not conditional and self._same_id_trigger(market_type) and self._fired(info)
        if as_regular:
            order_type = OrderType.LIMIT if order_type == OrderType.STOP_LIMIT else OrderType.MARKET
            is_conditional = False
        if status == OrderStatus.TRIGGERED:
            # A trigger is never a fill (gateway protocol): where the exchange keeps one id for
            # the stop and the order it became (Binance spot, Bybit), the fills belong to the
            # spawned view of that id, as they do on every other face.
            filled, average, fee = ZERO, None, ZERO
        timestamp = raw.get("lastUpdateTimestamp") or raw.get("timestamp")
        return OrderState(
            exchange_order_id=str(raw.get("id") or ""),
            client_order_id=raw.get("clientOrderId") or (request.client_order_id if request else ""),
            symbol=self._canonical(raw.get("symbol")) or (request.symbol if request else ""),
            market_type=market_type,
            side=Side(side_raw),
            order_type=order_type,
            status=status,
            quantity=quantity,
            filled_quantity=filled,
            average_price=average,
            price=price if order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else None,
            stop_price=stop_price if is_conditional else None,
            fee=fee,
            fee_currency=fee_currency,
            updated_at=_ms_to_datetime(timestamp) if timestamp else datetime.now(tz=UTC),
            conditional=is_conditional,
            spawned_order_id=spawned_id,
            # Same-id triggers keep the client id; a USDⓈ-M algo reply names only the spawned order id.
            spawned_client_order_id=(raw.get("clientOrderId") or None)
            if spawned_id and spawned_id == str(raw.get("id"))
            else None,
        )

    def _fired(self, info: dict[str, Any]) -> bool:
        """Whether a same-id stop has triggered: Binance spot isWorking, Bybit past Untriggered."""
        if self.family == "binance":
            return info.get("isWorking") is True
        return str(info.get("orderStatus", "")) not in ("Untriggered", "Deactivated", "Rejected", "")

    def _same_id_trigger(self, market_type: MarketType) -> bool:
        """Binance spot and Bybit keep a triggered stop's id; Binance USDⓈ-M spawns a new order."""
        return not (self.family == "binance" and market_type == MarketType.FUTURES)

    @staticmethod
    def _fee(raw: dict[str, Any]) -> tuple[Decimal, str]:
        fee = raw.get("fee") or {}
        cost = _decimal(fee.get("cost"))
        if cost is not None:
            return cost, fee.get("currency") or ""
        info = raw.get("info") or {}
        if info.get("cumExecFee") not in (None, ""):
            return _decimal(info["cumExecFee"]) or ZERO, ""
        total, currency = ZERO, ""
        for trade in raw.get("trades") or []:
            trade_fee = trade.get("fee") or {}
            total += _decimal(trade_fee.get("cost")) or ZERO
            currency = trade_fee.get("currency") or currency
        return total, currency

    def _order_type(
        self, raw: dict[str, Any], info: dict[str, Any], request: OrderRequest | None
    ) -> tuple[OrderType, bool]:
        if request is not None:
            return request.order_type, request.conditional
        if self.family == "binance":
            raw_type = str(info.get("orderType") or info.get("origType") or info.get("type") or "").upper()
            if "algoId" in info or raw_type in _BINANCE_CONDITIONAL_TYPES:
                return _BINANCE_CONDITIONAL_TYPES.get(raw_type, OrderType.STOP_MARKET), True
        else:
            trigger = _decimal(info.get("triggerPrice"))
            if (trigger is not None and trigger > 0) or info.get("stopOrderType") not in (None, "", "UNKNOWN"):
                is_limit = str(info.get("orderType", "")).lower() == "limit"
                return (OrderType.STOP_LIMIT if is_limit else OrderType.STOP_MARKET), True
        return (OrderType.LIMIT if raw.get("type") == "limit" else OrderType.MARKET), False

    def _status(
        self,
        raw: dict[str, Any],
        info: dict[str, Any],
        filled: Decimal,
        quantity: Decimal,
        conditional_view: bool,
        is_conditional: bool,
    ) -> tuple[OrderStatus, str | None]:
        """The order's status; for a conditional order TRIGGERED (never FILLED) once its stop fired."""
        status: OrderStatus | None
        if self.family == "binance" and "algoStatus" in info:
            status = _ALGO_STATUS.get(str(info["algoStatus"]).upper(), OrderStatus.NEW)
            spawned = str(info.get("actualOrderId") or "") or None
            if status == OrderStatus.TRIGGERED and spawned is None:
                status = OrderStatus.NEW  # fired but the regular order is not placed yet
            return status, spawned if status == OrderStatus.TRIGGERED else None
        if self.family == "binance":
            status = _BINANCE_STATUS.get(str(info.get("status", "")).upper())
            if is_conditional and conditional_view and info.get("isWorking") is True:
                return OrderStatus.TRIGGERED, str(raw.get("id"))
        else:
            raw_status = str(info.get("orderStatus", ""))
            status = _BYBIT_STATUS.get(raw_status)
            if is_conditional and conditional_view and raw_status not in ("Untriggered", "Deactivated", "Rejected", ""):
                return OrderStatus.TRIGGERED, str(raw.get("id"))
            if status == OrderStatus.TRIGGERED and not conditional_view:
                status = OrderStatus.NEW
        if status is None:
            status = _UNIFIED_STATUS.get(raw.get("status") or "open", OrderStatus.NEW)
        if status == OrderStatus.NEW and filled > 0:
            status = OrderStatus.PARTIALLY_FILLED
        return status, None


def _replace(state: OrderState, **changes: Any) -> OrderState:
    return dataclasses.replace(state, **changes)


def ccxt_gateway_factory(account_like: Any) -> CcxtGateway:
    """A CcxtGateway for anything with `.exchange` and optional `.api_key`, `.api_secret`, `.is_testnet`.

    `account_key` (or `account-<pk>`) keys the ccxt instance cache; calls name their own market
    type, so the instance's default market type (SPOT) never decides where an order goes.
    """
    key = getattr(account_like, "account_key", None) or f"account-{getattr(account_like, 'pk', 'public')}"
    return CcxtGateway(
        str(account_like.exchange),
        MarketType.SPOT,
        str(getattr(account_like, "api_key", "") or ""),
        str(getattr(account_like, "api_secret", "") or ""),
        testnet=bool(getattr(account_like, "is_testnet", False)),
        account_key=str(key),
    )
