"""Exchange readers: price quotes with freshness limits, market rules, the pairs MarketInfo knows.

Which pairs the business trades or holds is decided above this layer (positions.selectors).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.core.cache import cache
from django.db.models import Max

from core.counters import counter_add
from exchanges.gateway import MarketRule, MarketType
from exchanges.models import MarketInfo, PriceQuote

logger = logging.getLogger(__name__)

# The embedded default exchange always has its market rules refreshed, so a fresh install has markets to trade.
EMBEDDED_TARGETS: tuple[tuple[str, MarketType], ...] = (("PAPER", MarketType.SPOT), ("PAPER", MarketType.FUTURES))
MARKET_INFO_MAX_AGE = timedelta(hours=24)


@dataclass(frozen=True)
class Quote:
    price: Decimal
    as_of: datetime


def price_cache_key(*, exchange: str, market_type: str, symbol: str) -> str:
    return f"price:{exchange}:{market_type}:{symbol}".replace(" ", "_")


def exchange_pairs(rows: Iterable[tuple[str, str]]) -> set[tuple[str, MarketType]]:
    """(exchange, market_type) rows as normalized pairs: the exchange upper-cased, the market type typed."""
    return {(str(exchange).upper(), MarketType(market_type)) for exchange, market_type in rows}


def market_pairs_known() -> set[tuple[str, MarketType]]:
    """Every (exchange, market_type) pair MarketInfo holds rules for. One DISTINCT query."""
    return exchange_pairs(MarketInfo.objects.values_list("exchange", "market_type").distinct())


def market_info_is_stale(*, now: datetime) -> bool:
    """Whether MarketInfo is empty or its newest row is older than MARKET_INFO_MAX_AGE.

    The leader catch-up condition of precision_cache_update (SPEC §2.2, scheduler registry).
    """
    newest = MarketInfo.objects.aggregate(newest=Max("updated_at"))["newest"]
    return newest is None or now - newest > MARKET_INFO_MAX_AGE


def quote_get(*, exchange: str, market_type: str, symbol: str) -> Quote | None:
    """The last stored quote: Django's cache first, then the PriceQuote table (shared by every process)."""
    cached = cache.get(price_cache_key(exchange=exchange, market_type=market_type, symbol=symbol))
    if cached is not None:
        price, as_of = cached
        return Quote(price=Decimal(price), as_of=as_of)
    row = (
        PriceQuote.objects.filter(exchange=exchange, market_type=market_type, symbol=symbol)
        .values_list("price", "as_of")
        .first()
    )
    return Quote(price=row[0], as_of=row[1]) if row else None


def _fresh_price(
    *, exchange: str, market_type: str, symbol: str, now: datetime, max_age: int, use: str
) -> Decimal | None:

    quote = quote_get(exchange=exchange, market_type=market_type, symbol=symbol)
    if quote is None:
        logger.info("no price for %s %s %s (%s)", exchange, market_type, symbol, use)
        counter_add(name="stale_prices", labels=f"exchange={exchange},use={use}", now=now)
        return None
    age = now - quote.as_of
    if age > timedelta(seconds=max_age):
        logger.info(
            "stale price for %s %s %s (%s): %d s old, limit %d s",
            exchange,
            market_type,
            symbol,
            use,
            age.total_seconds(),
            max_age,
        )
        counter_add(name="stale_prices", labels=f"exchange={exchange},use={use}", now=now)
        return None
    return quote.price


def price_for_trading(*, exchange: str, market_type: str, symbol: str, now: datetime) -> Decimal | None:
    """The last price if younger than PRICE_MAX_AGE_TRADE (sizing, validation); else None, logged and counted."""
    return _fresh_price(
        exchange=exchange,
        market_type=market_type,
        symbol=symbol,
        now=now,
        max_age=settings.PRICE_MAX_AGE_TRADE,
        use="trade",
    )


def price_for_valuation(*, exchange: str, market_type: str, symbol: str, now: datetime) -> Decimal | None:
    """The last price if younger than PRICE_MAX_AGE_VALUE (PnL); else None, logged and counted."""
    return _fresh_price(
        exchange=exchange,
        market_type=market_type,
        symbol=symbol,
        now=now,
        max_age=settings.PRICE_MAX_AGE_VALUE,
        use="value",
    )


def market_rule_get(*, exchange: str, market_type: str, symbol: str) -> MarketRule | None:
    """The stored rules of an active symbol, or None when unknown or delisted."""
    rule = market_rule_any(exchange=exchange, market_type=market_type, symbol=symbol)
    return rule if rule is not None and rule.active else None


def market_rule_any(*, exchange: str, market_type: str, symbol: str) -> MarketRule | None:
    """The stored rules of a symbol, active or delisted (`active` tells which); None when unknown."""
    row = MarketInfo.objects.filter(exchange=exchange, market_type=market_type, symbol=symbol).first()
    if row is None:
        return None
    base, _, quote = symbol.partition("/")
    return MarketRule(
        symbol=row.symbol,
        market_type=MarketType(row.market_type),
        base=base,
        quote=quote,
        tick_size=row.tick_size,
        step_size=row.step_size,
        min_qty=row.min_qty,
        max_qty=row.max_qty,
        min_notional=row.min_notional,
        max_price=row.max_price,
        price_precision=row.price_precision,
        amount_precision=row.amount_precision,
        active=row.active,
    )
