"""factory-boy factories for accounts, strategies and orders (shared by the orders and positions tests)."""

from __future__ import annotations

import itertools
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal

import factory
from django.contrib.auth import get_user_model
from django.utils import timezone

from accounts.models import Account, Strategy, StrategyAccount, StrategyCapital
from accounts.services import strategy_webhook_token_set
from exchanges.models import MarketInfo, PriceQuote
from orders.models import OpenOrder, PendingOrder
from orders.services import client_order_id_for
from positions.models import Position

_seq = itertools.count()


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"trader{n}")


class AccountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Account

    user = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"account-{n}")
    exchange = "PAPER"


class StrategyFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Strategy

    name = factory.Sequence(lambda n: f"strategy-{n}")
    group_name = factory.Sequence(lambda n: f"group-{n}")
    market_type = "SPOT"


class StrategyAccountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = StrategyAccount

    strategy = factory.SubFactory(StrategyFactory)
    account = factory.SubFactory(AccountFactory)


class _OrderFactory(factory.django.DjangoModelFactory):
    strategy_account = factory.SubFactory(StrategyAccountFactory)
    account = factory.SelfAttribute("strategy_account.account")
    market_type = factory.SelfAttribute("strategy_account.strategy.market_type")
    symbol = "ETH/USDT"
    side = "BUY"
    order_type = "LIMIT"
    price = Decimal("3000")
    quantity = Decimal("1")
    signal_at = factory.LazyFunction(lambda: datetime(2025, 3, 1, 12, 0, tzinfo=UTC))
    queue_seq = factory.LazyFunction(lambda: time.time_ns() + next(_seq))
    express = factory.LazyAttribute(lambda o: o.order_type == "MARKET")


class PendingOrderFactory(_OrderFactory):
    class Meta:
        model = PendingOrder


class OpenOrderFactory(_OrderFactory):
    class Meta:
        model = OpenOrder

    placement_no = 1
    client_order_id = factory.LazyAttribute(lambda o: client_order_id_for(order_key=o.order_key, placement_no=1))
    order_key = factory.LazyFunction(uuid.uuid4)
    exchange_order_id = factory.Sequence(lambda n: f"x{n}")
    conditional = factory.LazyAttribute(lambda o: o.order_type in ("STOP_LIMIT", "STOP_MARKET"))


class MarketInfoFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = MarketInfo
        django_get_or_create = ("exchange", "market_type", "symbol")

    exchange = "PAPER"
    market_type = "SPOT"
    symbol = "ETH/USDT"
    tick_size = Decimal("0.01")
    step_size = Decimal("0.0001")
    min_qty = Decimal("0.0001")
    min_notional = Decimal("5")
    updated_at = factory.LazyFunction(lambda: datetime(2025, 3, 1, tzinfo=UTC))


class PriceQuoteFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = PriceQuote
        django_get_or_create = ("exchange", "market_type", "symbol")

    exchange = "PAPER"
    market_type = "SPOT"
    symbol = "ETH/USDT"
    price = Decimal("3000")
    as_of = factory.LazyFunction(lambda: datetime(2025, 3, 1, 12, 0, tzinfo=UTC))


class PositionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Position

    strategy_account = factory.SubFactory(StrategyAccountFactory)
    symbol = "ETH/USDT"
    market_type = factory.SelfAttribute("strategy_account.strategy.market_type")
    quantity = Decimal("1")
    average_entry = Decimal("3000")


def paper_market_info(*, market_type: str = "SPOT", symbol: str = "ETH/USDT") -> MarketInfo:
    """A MarketInfo row with the PAPER simulator catalog's rules for the symbol."""
    from exchanges.gateway import MarketType
    from exchanges.simulator.catalog import catalog_market

    market = catalog_market(MarketType(market_type), symbol)
    assert market is not None, f"{symbol} is not in the PAPER {market_type} catalog"
    return MarketInfoFactory(
        exchange="PAPER",
        market_type=market_type,
        symbol=symbol,
        tick_size=market.tick_size,
        step_size=market.step_size,
        min_qty=market.min_qty,
        max_qty=market.max_qty,
        min_notional=market.min_notional,
    )


def webhook_strategy(*, group_name: str, market_type: str, token: str) -> Strategy:
    """A strategy that takes webhook alerts for `group_name` with `token`."""
    strategy = StrategyFactory(group_name=group_name, market_type=market_type)
    strategy_webhook_token_set(strategy=strategy, token=token)
    return strategy


def strategy_link(
    strategy: Strategy, account: Account, *, capital: str, leverage: str = "1", is_active: bool = True
) -> StrategyAccount:
    """`strategy` on `account` at `leverage`, with `capital` allocated to it (its StrategyCapital row)."""
    sa = StrategyAccountFactory(strategy=strategy, account=account, leverage=Decimal(leverage), is_active=is_active)
    StrategyCapital.objects.create(strategy_account=sa, allocated_capital=Decimal(capital))
    return sa


def btc_futures_market(*, max_qty: Decimal | None) -> None:
    """PAPER FUTURES BTC/USDT rules (tick 0.1, step 0.001, min qty 0.001, min notional 5, max qty `max_qty`, no
    max price) and a fresh quote (as of now) of 40,000."""
    MarketInfoFactory(
        market_type="FUTURES",
        symbol="BTC/USDT",
        tick_size=Decimal("0.1"),
        step_size=Decimal("0.001"),
        min_qty=Decimal("0.001"),
        max_qty=max_qty,
        min_notional=Decimal("5"),
    )
    PriceQuoteFactory(market_type="FUTURES", symbol="BTC/USDT", price=Decimal("40000"), as_of=timezone.now())
