"""seed_demo: idempotent demo data on the PAPER exchange (SPEC §2.6)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from accounts.models import Account, Exchange, MarketType, Strategy, StrategyAccount
from accounts.services import account_create, strategy_account_create, strategy_create
from core.tokens import api_token_issue
from exchanges.gateway import MarketType as GatewayMarketType
from exchanges.models import MarketInfo
from exchanges.rounding import floor_to_step
from exchanges.selectors import price_for_trading
from exchanges.services import market_info_refresh, markets_load, price_cache_refresh
from exchanges.simulator.catalog import DEFAULT_BALANCES
from orders.models import OrderEvent
from orders.services import OrderSpec, orders_enqueue

DEMO_USERNAME = "demo"
SPOT_ACCOUNT = "Demo PAPER spot"
FUTURES_ACCOUNT = "Demo PAPER futures"


@dataclass(frozen=True)
class DemoStrategy:
    group_name: str
    name: str
    market_type: str
    account: str
    weight: Decimal
    leverage: Decimal


DEMO_STRATEGIES = (
    DemoStrategy("demo-spot-trend", "Demo spot trend", MarketType.SPOT, SPOT_ACCOUNT, Decimal(2), Decimal(1)),
    DemoStrategy("demo-spot-swing", "Demo spot swing", MarketType.SPOT, SPOT_ACCOUNT, Decimal(1), Decimal(1)),
    DemoStrategy(
        "demo-futures-trend", "Demo futures trend", MarketType.FUTURES, FUTURES_ACCOUNT, Decimal(1), Decimal(3)
    ),
)

# (strategy group, symbol, side): each bucket gets more orders than it has slots, far from the market
# (buys at about half the price, sells at about double), so some go live and the rest stay queued.
DEMO_BUCKETS = (
    ("demo-spot-trend", "BTC/USDT", "BUY"),
    ("demo-spot-trend", "ETH/USDT", "BUY"),
    ("demo-spot-swing", "SOL/USDT", "BUY"),
    ("demo-futures-trend", "BTC/USDT", "BUY"),
    ("demo-futures-trend", "BTC/USDT", "SELL"),
    ("demo-futures-trend", "ETH/USDT", "SELL"),
)
EXTRA_PER_BUCKET = 3


def queue_slots(*, exchange: str, market_type: str) -> int:
    slots = settings.ORDER_QUEUE_SLOTS
    return int(slots.get(f"{exchange}:{market_type}", slots.get("default", 2)))


def demo_order_size(*, price: Decimal, step: Decimal, min_qty: Decimal, min_notional: Decimal | None) -> Decimal:
    """The smallest step multiple worth at least twice the minimum notional (and at least min_qty)."""
    target = (min_notional or Decimal(0)) * 2 / price
    steps = (target / step).to_integral_value(rounding=ROUND_CEILING)
    return max(steps * step, min_qty)


class Command(BaseCommand):
    help = "Create demo data on the PAPER exchange (idempotent): user, accounts, strategies, markets, queued orders."

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        with transaction.atomic():
            user = self._user()
            accounts = self._accounts(user)
            strategies = self._strategies(accounts)
        self._markets(now)
        self._orders(accounts, strategies, now)
        self.stdout.write(self.style.SUCCESS("demo data ready"))

    def _user(self) -> Any:
        User = get_user_model()  # noqa: N806
        user = User.objects.filter(username=DEMO_USERNAME).first()
        if user is not None:
            self.stdout.write(f"user {DEMO_USERNAME!r} exists (its password was shown when it was created)")
            return user
        password = secrets.token_urlsafe(18)
        # A superuser, so the demo can browse every admin page; it trades on PAPER only.
        user = User.objects.create_superuser(username=DEMO_USERNAME, email="", password=password)
        _, token_key = api_token_issue(user=user, name="seed_demo")
        self.stdout.write(f"created staff user {DEMO_USERNAME!r}; shown once, store them now:")
        self.stdout.write(f"  password:  {password}")
        self.stdout.write(f"  API token: {token_key}")
        return user

    def _accounts(self, user: Any) -> dict[str, Account]:
        accounts = {}
        for name in (SPOT_ACCOUNT, FUTURES_ACCOUNT):
            account = Account.objects.filter(user=user, name=name).first()
            if account is None:
                account = account_create(user=user, name=name, exchange=Exchange.PAPER)
                self.stdout.write(f"created account {account.pk} {name!r} on PAPER")
            accounts[name] = account
        return accounts

    def _strategies(self, accounts: dict[str, Account]) -> dict[str, StrategyAccount]:
        linked = {}
        for demo in DEMO_STRATEGIES:
            strategy = Strategy.objects.filter(group_name=demo.group_name).first()
            if strategy is None:
                token = secrets.token_urlsafe(24)
                strategy = strategy_create(
                    name=demo.name, group_name=demo.group_name, market_type=demo.market_type, webhook_token=token
                )
                self.stdout.write(f"created strategy {demo.group_name!r} ({demo.market_type}); webhook token: {token}")
            account = accounts[demo.account]
            strategy_account = StrategyAccount.objects.filter(strategy=strategy, account=account).first()
            if strategy_account is None:
                strategy_account = strategy_account_create(
                    strategy=strategy,
                    account=account,
                    weight=demo.weight,
                    leverage=demo.leverage,
                    allocated_capital=self._initial_capital(demo),
                )
                self.stdout.write(f"linked {demo.group_name!r} to account {account.pk} (weight {demo.weight})")
            linked[demo.group_name] = strategy_account
        return linked

    @staticmethod
    def _initial_capital(demo: DemoStrategy) -> Decimal:
        """The simulated account's opening quote balance split by weight among the demo strategies on it;
        auto_rebalance_accounts replaces it with the live figure on its first run."""
        total = DEFAULT_BALANCES[GatewayMarketType(demo.market_type)]["USDT"]
        peers = [d.weight for d in DEMO_STRATEGIES if d.account == demo.account and d.market_type == demo.market_type]
        return (total * demo.weight / sum(peers)).quantize(Decimal("0.01"))

    def _markets(self, now: datetime) -> None:
        for market_type in (GatewayMarketType.SPOT, GatewayMarketType.FUTURES):
            if not MarketInfo.objects.filter(exchange=Exchange.PAPER, market_type=market_type).exists():
                rules = markets_load(exchange=Exchange.PAPER, market_type=market_type)
                result = market_info_refresh(
                    exchange=Exchange.PAPER, market_type=market_type, rules=rules, now=now, numeric=True
                )
                self.stdout.write(f"market info PAPER {market_type}: {result.added} symbols")
            # Prices are market data, not seed data: refreshed on every run so MARKET orders validate.
            stored = price_cache_refresh(exchange=Exchange.PAPER, market_type=market_type, now=now)
            self.stdout.write(f"prices PAPER {market_type}: {stored} quotes as of {now:%Y-%m-%d %H:%M:%S} UTC")

    def _orders(self, accounts: dict[str, Account], strategies: dict[str, StrategyAccount], now: datetime) -> None:
        # Events are append-only, so "ever had an order" survives fills, cancels and demotions.
        if OrderEvent.objects.filter(account__in=list(accounts.values())).exists():
            self.stdout.write("demo orders were seeded before; none added")
            return
        specs = []
        for group_name, symbol, side in DEMO_BUCKETS:
            strategy_account = strategies[group_name]
            market_type = strategy_account.strategy.market_type
            info = MarketInfo.objects.get(exchange=Exchange.PAPER, market_type=market_type, symbol=symbol)
            market = price_for_trading(exchange=Exchange.PAPER, market_type=market_type, symbol=symbol, now=now)
            if market is None:
                self.stderr.write(f"no fresh price for {symbol} {market_type}; its demo orders skipped")
                continue
            count = queue_slots(exchange=Exchange.PAPER, market_type=market_type) + EXTRA_PER_BUCKET
            for i in range(count):
                # Buys step down from half the price, sells up from double: never near a fill.
                factor = Decimal("0.5") - Decimal("0.01") * i if side == "BUY" else Decimal(2) + Decimal("0.02") * i
                price = floor_to_step(market * factor, info.tick_size)
                quantity = demo_order_size(
                    price=price, step=info.step_size, min_qty=info.min_qty, min_notional=info.min_notional
                )
                specs.append(
                    OrderSpec(
                        strategy_account_id=strategy_account.pk,
                        account_id=strategy_account.account_id,
                        symbol=symbol,
                        market_type=market_type,
                        side=side,
                        order_type="LIMIT",
                        quantity=quantity,
                        price=price,
                    )
                )
        if specs:
            orders_enqueue(specs=specs, signal_at=now, now=now)
        self.stdout.write(f"queued {len(specs)} demo LIMIT orders far from the market")
