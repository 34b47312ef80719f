"""The simulated exchanges' default market catalog: symbols, rules, base prices and liquidity."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from typing import cast

from django.conf import settings

from exchanges.gateway import MarketRule, MarketType


@dataclass(frozen=True)
class CatalogMarket:
    """One listed symbol: its rules, the centre of its price walk and the quantity one match step fills."""

    symbol: str
    tick_size: Decimal
    step_size: Decimal
    min_qty: Decimal
    max_qty: Decimal
    min_notional: Decimal
    base_price: Decimal
    liquidity: Decimal  # most quantity one resting order fills per match step (partial fills)
    # The highest price an order may carry (Binance's PRICE_FILTER maxPrice, Bybit's priceFilter.maxPrice).
    max_price: Decimal = Decimal("10000000")

    @property
    def base(self) -> str:
        return self.symbol.split("/")[0]

    @property
    def quote(self) -> str:
        return self.symbol.split("/")[1]

    def rule(self, market_type: MarketType) -> MarketRule:
        return MarketRule(
            symbol=self.symbol,
            market_type=market_type,
            base=self.base,
            quote=self.quote,
            tick_size=self.tick_size,
            step_size=self.step_size,
            min_qty=self.min_qty,
            max_qty=self.max_qty,
            min_notional=self.min_notional,
            max_price=self.max_price,
            price_precision=_decimals(self.tick_size),
            amount_precision=_decimals(self.step_size),
            active=True,
        )


def _m(symbol: str, *numbers: str) -> CatalogMarket:
    return CatalogMarket(symbol, *(Decimal(n) for n in numbers))


def _decimals(step: Decimal) -> int:
    return max(0, -cast(int, step.normalize().as_tuple().exponent))  # a finite step: int exponent


# Steps written the way Binance reports them ("0.00100000"), on purpose: rounding must not
# depend on the string's trailing zeros.
SPOT_MARKETS: tuple[CatalogMarket, ...] = (
    _m("BTC/USDT", "0.01000000", "0.00001000", "0.00001000", "9000", "5", "65000", "0.5"),
    _m("ETH/USDT", "0.01000000", "0.00010000", "0.00010000", "9000", "5", "3200", "5"),
    _m("SOL/USDT", "0.01000000", "0.00100000", "0.00100000", "90000", "5", "150", "100"),
    _m("XRP/USDT", "0.00010000", "1.00000000", "1.00000000", "9000000", "5", "0.55", "20000"),
    _m("DOGE/USDT", "0.00001000", "1.00000000", "1.00000000", "9000000", "5", "0.15", "100000"),
    _m("BNB/USDT", "0.01000000", "0.00100000", "0.00100000", "9000", "5", "580", "20"),
    _m("ADA/USDT", "0.00010000", "0.10000000", "0.10000000", "9000000", "5", "0.45", "20000"),
    _m("LINK/USDT", "0.01000000", "0.01000000", "0.01000000", "90000", "5", "14", "500"),
)

FUTURES_MARKETS: tuple[CatalogMarket, ...] = (
    _m("BTC/USDT", "0.10", "0.001", "0.001", "1000", "100", "65000", "0.5"),
    _m("ETH/USDT", "0.01", "0.001", "0.001", "10000", "20", "3200", "5"),
    _m("SOL/USDT", "0.0100", "1", "1", "1000000", "5", "150", "100"),
    _m("XRP/USDT", "0.0001", "0.1", "0.1", "10000000", "5", "0.55", "20000"),
    _m("DOGE/USDT", "0.000010", "1", "1", "50000000", "5", "0.15", "100000"),
    _m("BNB/USDT", "0.010", "0.01", "0.01", "10000", "5", "580", "20"),
    # A non-power-of-ten step and tick, as some contracts have.
    _m("1000PEPE/USDT", "0.0000005", "25", "25", "100000000", "5", "0.012", "500000"),
)

# What a new simulated account holds per market type until a test or operator sets it.
DEFAULT_BALANCES: dict[MarketType, dict[str, Decimal]] = {
    MarketType.SPOT: {"USDT": Decimal("100000"), "BTC": Decimal("1"), "ETH": Decimal("10")},
    MarketType.FUTURES: {"USDT": Decimal("100000")},
}


def synthetic_market(index: int) -> CatalogMarket:
    """Generated symbol number `index` (from 1): SYN0001/USDT, … with plain rules and a spread of base prices.

    Listed in both market types when SIMULATOR_SYNTHETIC_SYMBOLS is set, so benchmarks can run
    thousands of symbols through the engine and the dialect server like the real catalog.
    """
    base_price = Decimal(1 + (index * 7919) % 5000) / 10  # 0.1 … 500.0, deterministic
    return CatalogMarket(
        symbol=f"SYN{index:04d}/USDT",
        tick_size=Decimal("0.0001"),
        step_size=Decimal("0.1"),
        min_qty=Decimal("0.1"),
        max_qty=Decimal("9000000"),
        min_notional=Decimal("5"),
        base_price=base_price,
        liquidity=Decimal("1000"),
    )


@lru_cache(maxsize=8)
def _catalog(market_type: MarketType, synthetic: int) -> tuple[tuple[CatalogMarket, ...], dict[str, CatalogMarket]]:
    listed = SPOT_MARKETS if market_type == MarketType.SPOT else FUTURES_MARKETS
    markets = listed + tuple(synthetic_market(i) for i in range(1, synthetic + 1))
    return markets, {m.symbol: m for m in markets}


def _synthetic_count() -> int:
    return int(getattr(settings, "SIMULATOR_SYNTHETIC_SYMBOLS", 0) or 0)


def catalog_markets(market_type: MarketType) -> tuple[CatalogMarket, ...]:
    return _catalog(MarketType(market_type), _synthetic_count())[0]


def catalog_market(market_type: MarketType, symbol: str) -> CatalogMarket | None:
    return _catalog(MarketType(market_type), _synthetic_count())[1].get(symbol)
