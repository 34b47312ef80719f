"""The PAPER gateway and the dialect server (real ccxt) agree on one scripted scenario (SPEC §5).

The same steps run once in-process through PaperGateway and once through CcxtGateway against
the HTTP server, on separate engine exchange names. After every step each order of the
scenario is read back with fetch_order and reduced to what the application acts on (status,
cumulative fill, average price, type, conditional flag, trigger linkage); exchange ids are
replaced by labels. Create replies are not compared: Bybit acknowledges a create with ids
only, as the real API does, so its reply cannot carry a fill.

Prices are scripted and constant between steps, and every step that should fill forces one
matching step, so lazy matching on reads (at most once a second) cannot add fills: nothing
crosses except right after a price change that the step itself makes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import pytest

from exchanges.gateway import ExchangeGateway, MarketType, OrderRequest, OrderState, OrderType, Side
from exchanges.paper import PaperGateway
from exchanges.simulator.engine import default_engine
from tests.exchanges import ccxt_sim_support

sim_server = ccxt_sim_support.sim_server
sim_urls = ccxt_sim_support.sim_urls
make_gateway = ccxt_sim_support.make_gateway

SYMBOL = "BTC/USDT"  # liquidity 0.5 per matching step in both market types


def _text(value: Decimal | None) -> str | None:
    return None if value is None else f"{value.normalize():f}"


@dataclass
class Run:
    """One pass of the scenario: the gateway, the engine exchange it lands on, and what it saw."""

    gateway: ExchangeGateway
    exchange: str
    market_type: MarketType
    orders: dict[str, tuple[str, bool]] = field(default_factory=dict)  # label → (exchange id, conditional)
    steps: list[tuple[str, dict[str, tuple]]] = field(default_factory=list)

    def price(self, value: str) -> None:
        default_engine.price_script(self.exchange, SYMBOL, [value])

    def match(self) -> None:
        default_engine.match(self.exchange, force=True)

    def create(self, label: str, side: str, order_type: str, quantity: str, *, price=None, stop=None) -> None:  # noqa: ANN001
        state = self.gateway.create_order(
            OrderRequest(
                symbol=SYMBOL,
                market_type=self.market_type,
                side=Side(side),
                order_type=OrderType(order_type),
                quantity=Decimal(quantity),
                price=Decimal(price) if price else None,
                stop_price=Decimal(stop) if stop else None,
                client_order_id=f"agree-{label}",
            )
        )
        assert state.exchange_order_id
        self.orders[label] = (state.exchange_order_id, OrderType(order_type).is_conditional)

    def cancel(self, label: str) -> None:
        exchange_order_id, conditional = self.orders[label]
        self.gateway.cancel_order(
            symbol=SYMBOL, market_type=self.market_type, exchange_order_id=exchange_order_id, conditional=conditional
        )

    def _fetch(self, exchange_order_id: str, conditional: bool) -> OrderState:
        return self.gateway.fetch_order(
            symbol=SYMBOL, market_type=self.market_type, exchange_order_id=exchange_order_id, conditional=conditional
        )

    def snapshot(self, step: str) -> None:
        seen: dict[str, tuple] = {}
        for label, (exchange_order_id, conditional) in self.orders.items():
            state = self._fetch(exchange_order_id, conditional)
            seen[label] = _normal(state)
            if state.spawned_order_id:
                # Linkage: the order a trigger spawned, however the exchange numbers it (Binance
                # USDⓈ-M a new id, Bybit the stop's own id, the engine a new row).
                seen[f"{label}>spawned"] = _normal(self._fetch(state.spawned_order_id, False))
        self.steps.append((step, seen))


def _normal(state: OrderState) -> tuple:
    return (
        state.status.value,
        state.side.value,
        state.order_type.value,
        state.conditional,
        _text(state.quantity),
        _text(state.filled_quantity),
        _text(state.average_price),
        _text(state.price),
        _text(state.stop_price),
        state.spawned_order_id is not None,
    )


def scenario(run: Run) -> list[tuple[str, dict[str, tuple]]]:
    run.price("60000")
    run.create("rest", "BUY", "LIMIT", "0.01", price="59000")
    run.snapshot("limit rests below the market")
    # Marketable: one liquidity slice (0.5) fills at once as taker; then the market moves away.
    run.create("partial", "BUY", "LIMIT", "1.2", price="60500")
    run.price("61000")
    run.snapshot("marketable limit partially filled")
    run.create("sell", "SELL", "LIMIT", "0.02", price="61500")
    run.create("stop", "BUY", "STOP_MARKET", "0.01", stop="62000")
    run.snapshot("sell limit and stop resting")
    run.cancel("rest")
    run.snapshot("resting limit cancelled")
    run.price("62100")
    run.match()
    run.snapshot("sell limit filled on cross, stop triggered")
    run.cancel("partial")
    run.snapshot("partially filled limit cancelled")
    return run.steps


EXPECTED_FINAL = {
    "rest": ("CANCELED", "BUY", "LIMIT", False, "0.01", "0", None, "59000", None, False),
    "partial": ("CANCELED", "BUY", "LIMIT", False, "1.2", "0.5", "60000", "60500", None, False),
    "sell": ("FILLED", "SELL", "LIMIT", False, "0.02", "0.02", "61500", "61500", None, False),
    "stop": ("TRIGGERED", "BUY", "STOP_MARKET", True, "0.01", "0", None, None, "62000", True),
    "stop>spawned": ("FILLED", "BUY", "MARKET", False, "0.01", "0.01", "62100", None, None, False),
}


@pytest.mark.parametrize(
    ("exchange", "market_type"),
    [
        ("binance", MarketType.FUTURES),
        ("bybit", MarketType.FUTURES),
        ("binance", MarketType.SPOT),
        ("bybit", MarketType.SPOT),
    ],
)
def test_paper_and_dialect_server_agree(make_gateway: Callable, exchange: str, market_type: MarketType) -> None:
    paper = scenario(Run(PaperGateway("agree", exchange="PAPER"), "PAPER", market_type))
    assert paper[-1][1] == EXPECTED_FINAL  # the scenario does what it says, before comparing faces
    served = scenario(Run(make_gateway(exchange, market_type), exchange.upper(), market_type))
    for (step, on_paper), (_, on_server) in zip(paper, served, strict=True):
        assert on_server == on_paper, f"{exchange} {market_type} disagrees with PAPER after: {step}"
