"""Fixtures for the exchanges tests: a fake clock and a simulator engine bound to it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from exchanges.gateway import MarketType, OrderRequest, OrderType, Side
from exchanges.simulator.engine import SimEngine


class FakeClock:
    def __init__(self, start: datetime):
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float = 2) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(datetime(2025, 3, 1, 12, 0, tzinfo=UTC))


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def engine(clock: FakeClock, sleeps: list[float]) -> SimEngine:
    return SimEngine(clock=clock, sleep=sleeps.append)


def order(
    symbol: str,
    side: str,
    order_type: str,
    quantity: str,
    *,
    price: str | None = None,
    stop_price: str | None = None,
    client_order_id: str = "",
    market_type: MarketType = MarketType.SPOT,
) -> OrderRequest:
    return OrderRequest(
        symbol=symbol,
        market_type=market_type,
        side=Side(side),
        order_type=OrderType(order_type),
        quantity=Decimal(quantity),
        price=Decimal(price) if price else None,
        stop_price=Decimal(stop_price) if stop_price else None,
        client_order_id=client_order_id,
    )
