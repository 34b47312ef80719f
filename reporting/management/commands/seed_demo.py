"""seed_demo: idempotent demo data on the PAPER exchange (SPEC §2.6)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_CEILING, Decimal
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand
from django.db import transaction
from django.utils import timezone

from accounts.models import Account, CapitalSnapshot, Exchange, MarketType, Strategy, StrategyAccount
from accounts.services import account_create, strategy_account_create, strategy_create
from core.money import decimal_text
from core.tokens import api_token_issue
from exchanges.gateway import MarketType as GatewayMarketType
from exchanges.models import MarketInfo
from exchanges.rounding import floor_to_step
from exchanges.selectors import price_for_trading
from exchanges.services import market_info_refresh, markets_load, price_cache_refresh
from exchanges.simulator.catalog import DEFAULT_BALANCES
from orders.models import OpenOrder, OrderEvent, PendingOrder
from orders.selectors import queue_slots_for
from orders.services import OrderSpec, orders_enqueue
from reporting.allocation import capital_pair_update

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
    DemoStrategy("demo-grid", "Demo grid (fills)", MarketType.FUTURES, FUTURES_ACCOUNT, Decimal(1), Decimal(1)),
)

# The grid strategy trades close to the market so the demo shows fills, positions and PnL moving: a
# MARKET buy (placed and filled within seconds) and LIMIT buys below and sells above the price, GRID_SPACING
# apart. The simulated price walks about 0.1-0.2 % a minute, so the nearest levels fill within a minute or
# two (update_open_orders sees them every 29 s); as they fill, the queue promotes the next ones.
GRID_STRATEGY = "demo-grid"
GRID_SYMBOL = "SOL/USDT"
GRID_LEVELS = 5
GRID_SPACING = Decimal("0.0003")

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
        self._capital(accounts, now)
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
            self.stdout.write(
                f"prices PAPER {market_type}: {stored} quotes as of {timezone.localtime(now).isoformat()}"
            )

    def _capital(self, accounts: dict[str, Account], now: datetime) -> None:
        """A first capital snapshot and allocation per demo account (what auto_rebalance_accounts does at
        :17 each hour), so balances and allocations show from the start; later runs leave them to the job."""
        for demo_account, market_type in ((SPOT_ACCOUNT, MarketType.SPOT), (FUTURES_ACCOUNT, MarketType.FUTURES)):
            account = accounts[demo_account]
            if CapitalSnapshot.objects.filter(account=account, market_type=market_type).exists():
                continue
            outcome = capital_pair_update(account=account, market_type=market_type, now=now)
            self.stdout.write(
                f"capital PAPER {market_type}: {decimal_text(outcome.total)} read, "
                f"{'allocated by weight' if outcome.rebalanced else 'not allocated'}"
                + (f" ({outcome.problem or outcome.balance_error})" if outcome.problem or outcome.balance_error else "")
            )

    def _market(
        self, market_type: str, symbol: str, now: datetime, *, skipped: str
    ) -> tuple[MarketInfo, Decimal] | None:
        """The PAPER market's rules and a fresh price, or None (said on stderr, with what is `skipped`)."""
        info = MarketInfo.objects.get(exchange=Exchange.PAPER, market_type=market_type, symbol=symbol)
        market = price_for_trading(exchange=Exchange.PAPER, market_type=market_type, symbol=symbol, now=now)
        if market is None:
            self.stderr.write(f"no fresh price for {symbol} {market_type}; {skipped}")
            return None
        return info, market

    def _grid(self, strategy_account: StrategyAccount, now: datetime) -> None:
        """A fresh grid around the current price whenever the grid strategy has no queued or live order left."""
        waiting = (
            PendingOrder.objects.filter(strategy_account=strategy_account).exists()
            or OpenOrder.objects.filter(strategy_account=strategy_account).exists()
        )
        if waiting:
            self.stdout.write(f"{GRID_STRATEGY!r} still has queued or live orders; no new grid")
            return
        market_type = strategy_account.strategy.market_type
        found = self._market(market_type, GRID_SYMBOL, now, skipped="no demo grid")
        if found is None:
            return
        info, market = found
        quantity = demo_order_size(
            price=market, step=info.step_size, min_qty=info.min_qty, min_notional=info.min_notional
        )
        base: dict[str, Any] = {
            "strategy_account_id": strategy_account.pk,
            "account_id": strategy_account.account_id,
            "symbol": GRID_SYMBOL,
            "market_type": market_type,
            "quantity": quantity,
        }
        specs = [OrderSpec(**base, side="BUY", order_type="MARKET")]
        for level in range(1, GRID_LEVELS + 1):
            below = floor_to_step(market * (1 - GRID_SPACING * level), info.tick_size)
            above = floor_to_step(market * (1 + GRID_SPACING * level), info.tick_size) + info.tick_size
            specs.append(OrderSpec(**base, side="BUY", order_type="LIMIT", price=below))
            specs.append(OrderSpec(**base, side="SELL", order_type="LIMIT", price=above))
        orders_enqueue(specs=specs, signal_at=now, now=now)
        self.stdout.write(
            f"{GRID_STRATEGY!r}: MARKET BUY {decimal_text(quantity)} {GRID_SYMBOL} and {GRID_LEVELS} LIMIT levels "
            f"each side {decimal_text(GRID_SPACING * 100)}% apart around {decimal_text(market)}: "
            "fills within a minute or two"
        )

    def _orders(self, accounts: dict[str, Account], strategies: dict[str, StrategyAccount], now: datetime) -> None:
        grid = strategies[GRID_STRATEGY]
        self._grid(grid, now)
        # Events are append-only, so "ever had an order" survives fills, cancels and demotions; the grid
        # trades its own (account, symbol), which no far bucket uses.
        events = OrderEvent.objects.filter(account__in=list(accounts.values())).exclude(
            account_id=grid.account_id, symbol=GRID_SYMBOL
        )
        if events.exists():
            self.stdout.write("demo orders were seeded before; none added")
            return
        specs = []
        for group_name, symbol, side in DEMO_BUCKETS:
            strategy_account = strategies[group_name]
            market_type = strategy_account.strategy.market_type
            found = self._market(market_type, symbol, now, skipped="its demo orders skipped")
            if found is None:
                continue
            info, market = found
            count = queue_slots_for(exchange=Exchange.PAPER, market_type=market_type) + EXTRA_PER_BUCKET
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
