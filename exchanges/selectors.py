"""Exchange readers: price quotes with freshness limits, market rules, and the work lists of the jobs."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.core.cache import cache

from accounts.models import Account, StrategyAccount
from core.counters import counter_add
from exchanges.gateway import MarketRule, MarketType
from exchanges.models import MarketInfo, PriceQuote
from positions.models import Position

logger = logging.getLogger(__name__)

# The embedded default exchange always has its market rules refreshed, so a fresh install has markets to trade.
EMBEDDED_TARGETS: tuple[tuple[str, MarketType], ...] = (("PAPER", MarketType.SPOT), ("PAPER", MarketType.FUTURES))


@dataclass(frozen=True)
class Quote:
    price: Decimal
    as_of: datetime


def price_cache_key(*, exchange: str, market_type: str, symbol: str) -> str:
    return f"price:{exchange}:{market_type}:{symbol}".replace(" ", "_")


@dataclass(frozen=True)
class PriceTargets:
    """What update_price_cache refreshes (SPEC §4.4), one bulk call per pair.

    `in_use`: (exchange, market_type) pairs of active crypto accounts trading through an
    active StrategyAccount of an active Strategy (the market type is the strategy's).
    `positions_only`: pairs holding open positions (quantity ≠ 0) but used by no active
    account — refreshed too, so PnL of a paused account keeps its prices.
    """

    in_use: list[tuple[str, MarketType]]
    positions_only: list[tuple[str, MarketType]]

    @property
    def pairs(self) -> list[tuple[str, MarketType, str]]:
        """Every pair once, with the reason it is refreshed ("accounts" or "positions")."""
        return [(e, m, "accounts") for e, m in self.in_use] + [(e, m, "positions") for e, m in self.positions_only]


def _pairs(rows: Iterable[tuple[str, str]]) -> set[tuple[str, MarketType]]:
    return {(str(exchange).upper(), MarketType(market_type)) for exchange, market_type in rows}


def price_targets() -> PriceTargets:
    """The (exchange, market_type) pairs whose prices are refreshed: used by active accounts, plus pairs
    that only positions need. Two DISTINCT queries; no exchange calls."""
    crypto = Account.AccountType.CRYPTO
    in_use = _pairs(
        StrategyAccount.objects.filter(
            is_active=True, strategy__is_active=True, account__is_active=True, account__account_type=crypto
        )
        .values_list("account__exchange", "strategy__market_type")
        .distinct()
    )
    held = _pairs(
        Position.objects.exclude(quantity=0)
        .filter(strategy_account__account__account_type=crypto)
        .values_list("strategy_account__account__exchange", "market_type")
        .distinct()
    )
    return PriceTargets(in_use=sorted(in_use), positions_only=sorted(held - in_use))


def market_targets() -> list[tuple[str, MarketType]]:
    """(exchange, market_type) pairs whose market rules are refreshed: every pair known to MarketInfo, the
    pairs prices are refreshed for, and the embedded PAPER exchange (so a fresh install has markets)."""
    known = _pairs(MarketInfo.objects.values_list("exchange", "market_type").distinct())
    targets = price_targets()
    return sorted(known | set(targets.in_use) | set(targets.positions_only) | set(EMBEDDED_TARGETS))


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
        price_precision=row.price_precision,
        amount_precision=row.amount_precision,
        active=row.active,
    )
