"""Exchange services: the gateway factory, price-cache refresh and market-rule refresh."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.cache import cache
from django.db import transaction

from core.counters import counter_add
from exchanges.ccxt_gateway import ccxt_gateway_factory
from exchanges.gateway import ExchangeGateway, MarketRule, MarketType
from exchanges.models import MarketInfo, PriceQuote
from exchanges.paper import PaperGateway
from exchanges.selectors import price_cache_key

logger = logging.getLogger(__name__)

UPSERT_CHUNK = 500  # rows per INSERT … ON CONFLICT; keeps SQLite under its bound-variable limit


class UnknownExchangeError(LookupError):
    """No gateway factory is registered for the exchange name."""


@dataclass(frozen=True)
class PublicAccess:
    """Stands in for an account when only public data is needed (prices, markets)."""

    exchange: str
    account_key: str = "public"


def _account_key(account_like: Any) -> str:
    key = getattr(account_like, "account_key", None)
    if key:
        return str(key)
    pk = getattr(account_like, "pk", None)
    if pk is None:
        raise ValueError(f"cannot derive an account key from {type(account_like).__name__}")
    return f"account-{pk}"


def _paper_factory(account_like: Any) -> ExchangeGateway:
    return PaperGateway(_account_key(account_like), exchange="PAPER")


# exchange name → factory(account_like) -> ExchangeGateway. The ccxt gateway registers
# BINANCE, BYBIT, … here (gateway_factory_register) when its module is imported.
GATEWAY_FACTORIES: dict[str, Callable[[Any], ExchangeGateway]] = {
    "PAPER": _paper_factory,
    "BINANCE": ccxt_gateway_factory,
    "BYBIT": ccxt_gateway_factory,
}  # noqa: E501


def gateway_factory_register(*, exchange: str, factory: Callable[[Any], ExchangeGateway]) -> None:
    GATEWAY_FACTORIES[exchange.upper()] = factory


def gateway_for(account_like: Any) -> ExchangeGateway:
    """The gateway for an account (anything with `.exchange` and `.account_key` or `.pk`).

    Raises UnknownExchangeError naming the exchange when no factory is registered for it.
    """
    exchange = str(account_like.exchange).upper()
    factory = GATEWAY_FACTORIES.get(exchange)
    if factory is None:
        raise UnknownExchangeError(
            f"no gateway for exchange {exchange!r}; registered: {', '.join(sorted(GATEWAY_FACTORIES))}"
        )
    return factory(account_like)


def _count_call(exchange: str) -> None:

    counter_add(name="exchange_calls", labels=f"exchange={exchange}")


def exchange_error_count(*, exchange: str) -> None:

    counter_add(name="exchange_errors", labels=f"exchange={exchange}")


def price_quotes_store(*, exchange: str, market_type: MarketType, prices: dict[str, Decimal], now: datetime) -> int:
    """Upsert quotes into PriceQuote (INSERT … ON CONFLICT in chunks, one transaction) and the cache."""
    rows = [
        PriceQuote(exchange=exchange, market_type=market_type, symbol=symbol, price=price, as_of=now)
        for symbol, price in sorted(prices.items())
    ]
    with transaction.atomic():
        PriceQuote.objects.bulk_create(
            rows,
            batch_size=UPSERT_CHUNK,
            update_conflicts=True,
            unique_fields=["exchange", "market_type", "symbol"],
            update_fields=["price", "as_of"],
        )
    cache.set_many(
        {
            price_cache_key(exchange=exchange, market_type=market_type, symbol=symbol): (str(price), now)
            for symbol, price in prices.items()
        },
        timeout=settings.PRICE_MAX_AGE_VALUE,
    )
    return len(rows)


def price_cache_refresh(*, exchange: str, market_type: MarketType, now: datetime) -> int:
    """One bulk last-prices call for (exchange, market_type), then one upsert; returns quotes stored.

    Gateway errors propagate to the caller (the job counts them per pair).
    """
    gateway = gateway_for(PublicAccess(exchange=exchange))
    _count_call(exchange)
    prices = gateway.fetch_last_prices(market_type)
    return price_quotes_store(exchange=exchange, market_type=market_type, prices=prices, now=now)


def markets_load(*, exchange: str, market_type: MarketType) -> list[MarketRule]:
    """Load markets once for (exchange, market_type); errors propagate and nothing is written."""
    gateway = gateway_for(PublicAccess(exchange=exchange))
    _count_call(exchange)
    return gateway.load_markets(market_type)


@dataclass(frozen=True)
class MarketRefresh:
    upserted: int
    added: int
    deactivated: int


def _rule_fields(rule: MarketRule) -> dict[str, Any]:
    return {
        "tick_size": rule.tick_size,
        "step_size": rule.step_size,
        "min_qty": rule.min_qty,
        "max_qty": rule.max_qty,
        "min_notional": rule.min_notional,
        "max_price": rule.max_price,
        "price_precision": rule.price_precision,
        "amount_precision": rule.amount_precision,
    }


NUMERIC_FIELDS = [
    "tick_size",
    "step_size",
    "min_qty",
    "max_qty",
    "min_notional",
    "max_price",
    "price_precision",
    "amount_precision",
]


def market_info_refresh(
    *, exchange: str, market_type: MarketType, rules: list[MarketRule], now: datetime, numeric: bool
) -> MarketRefresh:
    """Store a freshly loaded market list: listed symbols active, missing ones inactive (never deleted).

    numeric=True (precision_cache_update) rewrites every row's rules; numeric=False
    (symbol_validator_refresh) only flips `active` and inserts new symbols with their rules.
    Upserts run in chunks of UPSERT_CHUNK, all in one transaction.
    """
    listed = {rule.symbol: rule for rule in rules if rule.active}
    existing = set(
        MarketInfo.objects.filter(exchange=exchange, market_type=market_type).values_list("symbol", flat=True)
    )
    to_write = listed if numeric else {s: r for s, r in listed.items() if s not in existing}
    rows = [
        MarketInfo(
            exchange=exchange, market_type=market_type, symbol=symbol, active=True, updated_at=now, **_rule_fields(rule)
        )
        for symbol, rule in sorted(to_write.items())
    ]
    with transaction.atomic():
        MarketInfo.objects.bulk_create(
            rows,
            batch_size=UPSERT_CHUNK,
            update_conflicts=True,
            unique_fields=["exchange", "market_type", "symbol"],
            update_fields=[*NUMERIC_FIELDS, "active", "updated_at"],
        )
        reactivated = 0
        if not numeric:
            reactivated = MarketInfo.objects.filter(
                exchange=exchange, market_type=market_type, symbol__in=list(listed), active=False
            ).update(active=True, updated_at=now)
        deactivated = (
            MarketInfo.objects.filter(exchange=exchange, market_type=market_type, active=True)
            .exclude(symbol__in=list(listed))
            .update(active=False, updated_at=now)
        )
    added = len(set(listed) - existing)
    if deactivated:
        logger.warning("%s %s: %d symbols delisted, marked inactive", exchange, market_type, deactivated)
    return MarketRefresh(upserted=len(rows) + reactivated, added=added, deactivated=deactivated)
