"""PaperGateway: the gateway protocol served in-process by the simulator engine (the embedded default)."""

from __future__ import annotations

import logging
from decimal import Decimal

from exchanges.gateway import Balance, MarketRule, MarketType, OrderRequest, OrderState
from exchanges.simulator.engine import SimEngine, default_engine

logger = logging.getLogger(__name__)


class PaperGateway:
    """One simulated account on one simulated exchange. Faults are checked before the call
    (nothing happens) and after it (the engine committed, then the reply is "lost")."""

    def __init__(self, account_key: str, exchange: str = "PAPER", *, engine: SimEngine | None = None):
        self.account_key = account_key
        self.exchange = exchange
        self.engine = engine or default_engine

    def _before(self, endpoint: str) -> None:
        self.engine.fault_check(self.exchange, endpoint, self.account_key, phase="before")

    def _after(self, endpoint: str) -> None:
        self.engine.fault_check(self.exchange, endpoint, self.account_key, phase="after")

    def load_markets(self, market_type: MarketType) -> list[MarketRule]:
        self._before("load_markets")
        markets = self.engine.market_list(self.exchange, market_type)
        self._after("load_markets")
        return markets

    def fetch_last_prices(self, market_type: MarketType, symbols: list[str] | None = None) -> dict[str, Decimal]:
        self._before("fetch_last_prices")
        prices = self.engine.prices_last(self.exchange, market_type, symbols)
        self._after("fetch_last_prices")
        return prices

    def fetch_balance(self, market_type: MarketType) -> Balance:
        self._before("fetch_balance")
        balance = self.engine.balance_get(self.exchange, self.account_key, market_type)
        self._after("fetch_balance")
        return balance

    def create_order(self, request: OrderRequest) -> OrderState:
        """Place an order; a Network error may come after it was stored: look it up by client id."""
        self._before("create_order")
        state = self.engine.order_create(self.exchange, self.account_key, request)
        self._after("create_order")
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
        self._before("cancel_order")
        state = self.engine.order_cancel(
            self.exchange,
            self.account_key,
            symbol=symbol,
            market_type=market_type,
            exchange_order_id=exchange_order_id,
            client_order_id=client_order_id,
            conditional=conditional,
        )
        self._after("cancel_order")
        return state

    def fetch_order(
        self,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None = None,
        client_order_id: str | None = None,
        conditional: bool = False,
    ) -> OrderState:
        self._before("fetch_order")
        state = self.engine.order_get(
            self.exchange,
            self.account_key,
            symbol=symbol,
            market_type=market_type,
            exchange_order_id=exchange_order_id,
            client_order_id=client_order_id,
            conditional=conditional,
        )
        self._after("fetch_order")
        return state

    def fetch_open_orders(
        self, market_type: MarketType, *, conditional: bool = False, symbol: str | None = None
    ) -> list[OrderState]:
        self._before("fetch_open_orders")
        orders = self.engine.order_list_open(
            self.exchange, self.account_key, market_type, conditional=conditional, symbol=symbol
        )
        self._after("fetch_open_orders")
        return orders
