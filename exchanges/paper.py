"""PaperGateway: the gateway protocol served in-process by the simulator engine (the embedded default)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from decimal import Decimal
from typing import Any, TypeVar

from exchanges.gateway import Balance, MarketRule, MarketType, OrderRequest, OrderState
from exchanges.simulator.engine import SimEngine, default_engine

logger = logging.getLogger(__name__)

T = TypeVar("T")


class PaperGateway:
    """One simulated account on one simulated exchange. Faults are checked before the call
    (nothing happens) and after it (the engine committed, then the reply is "lost")."""

    def __init__(self, account_key: str, exchange: str = "PAPER", *, engine: SimEngine | None = None):
        self.account_key = account_key
        self.exchange = exchange
        self.engine = engine or default_engine

    def _call(self, endpoint: str, operation: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one engine operation between the endpoint's "before" and "after" fault checks."""
        self.engine.fault_check(self.exchange, endpoint, self.account_key, phase="before")
        result = operation(*args, **kwargs)
        self.engine.fault_check(self.exchange, endpoint, self.account_key, phase="after")
        return result

    def load_markets(self, market_type: MarketType) -> list[MarketRule]:
        return self._call("load_markets", self.engine.market_list, self.exchange, market_type)

    def fetch_last_prices(self, market_type: MarketType, symbols: list[str] | None = None) -> dict[str, Decimal]:
        return self._call("fetch_last_prices", self.engine.prices_last, self.exchange, market_type, symbols)

    def fetch_balance(self, market_type: MarketType) -> Balance:
        return self._call("fetch_balance", self.engine.balance_get, self.exchange, self.account_key, market_type)

    def create_order(self, request: OrderRequest) -> OrderState:
        """Place an order; a Network error may come after it was stored: look it up by client id."""
        return self._call("create_order", self.engine.order_create, self.exchange, self.account_key, request)

    def cancel_order(
        self,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None = None,
        client_order_id: str | None = None,
        conditional: bool = False,
    ) -> OrderState:
        return self._call(
            "cancel_order",
            self.engine.order_cancel,
            self.exchange,
            self.account_key,
            symbol=symbol,
            market_type=market_type,
            exchange_order_id=exchange_order_id,
            client_order_id=client_order_id,
            conditional=conditional,
        )

    def fetch_order(
        self,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None = None,
        client_order_id: str | None = None,
        conditional: bool = False,
    ) -> OrderState:
        return self._call(
            "fetch_order",
            self.engine.order_get,
            self.exchange,
            self.account_key,
            symbol=symbol,
            market_type=market_type,
            exchange_order_id=exchange_order_id,
            client_order_id=client_order_id,
            conditional=conditional,
        )

    def fetch_open_orders(
        self, market_type: MarketType, *, conditional: bool = False, symbol: str | None = None
    ) -> list[OrderState]:
        return self._call(
            "fetch_open_orders",
            self.engine.order_list_open,
            self.exchange,
            self.account_key,
            market_type,
            conditional=conditional,
            symbol=symbol,
        )
