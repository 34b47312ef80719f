"""The drill's data: a staff user with an API token, Binance USDⓈ-M and Bybit linear accounts, strategies,
and the fan-out strategy's followers, each an account with an exchange key pair of its own.

Runs in the drill process (Django set up on the drill database). The accounts hold key pairs the
simulator server accepts (`--api-key` and `--keys`), so real ccxt in the scheduler processes signs
requests it verifies, and each key is an account of its own on the simulated exchange.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from decimal import Decimal

from django.contrib.auth import get_user_model
from django.db import transaction

from accounts.models import Exchange, MarketType
from accounts.services import account_create, strategy_account_create, strategy_create
from core.tokens import api_token_issue

SYMBOLS = ("BTC/USDT", "ETH/USDT", "SOL/USDT", "XRP/USDT", "DOGE/USDT")
ALLOCATED = Decimal("30000")


@dataclass(frozen=True)
class Route:
    """One (account, strategy) the load generator may post orders for."""

    account_id: int
    exchange: str
    strategy: str


@dataclass(frozen=True)
class KeyPair:
    key: str
    secret: str


@dataclass(frozen=True)
class ExchangeAccount:
    """One of our accounts and the simulator account (API key) it trades on."""

    account_id: int
    exchange: str
    key: str


@dataclass
class Seeded:
    token: str
    api_key: str
    account_ids: dict[str, int]  # exchange → account id (the load's own accounts)
    routes: list[Route]
    webhook_tokens: dict[str, str] = field(default_factory=dict)  # group_name → token
    followers: list[ExchangeAccount] = field(default_factory=list)  # FAN_STRATEGY's accounts
    fan_token: str = ""

    def exchange_accounts(self) -> list[ExchangeAccount]:
        """Every account of the drill with its simulator key: the load's own, then the followers."""
        own = [ExchangeAccount(pk, exchange, self.api_key) for exchange, pk in sorted(self.account_ids.items())]
        return own + self.followers


# (group_name, exchanges it trades on): drill-alpha fans out to both accounts (webhooks).
STRATEGIES = (
    ("drill-alpha", (Exchange.BINANCE, Exchange.BYBIT)),
    ("drill-beta", (Exchange.BINANCE,)),
    ("drill-gamma", (Exchange.BYBIT,)),
)
# The fan-out strategy: only webhooks, to every follower (half on Binance, half on Bybit).
FAN_STRATEGY = "drill-fan"
FOLLOWER_EXCHANGES = (Exchange.BINANCE, Exchange.BYBIT)


def follower_keys(count: int) -> list[KeyPair]:
    """Fresh key pairs for `count` followers (written to the simulator's --keys file before it starts)."""
    return [
        KeyPair(f"drill-follower-{i:03d}-{secrets.token_hex(4)}", f"drill-secret-{secrets.token_hex(12)}")
        for i in range(count)
    ]


@transaction.atomic
def seed(*, api_key: str, api_secret: str, followers: list[KeyPair]) -> Seeded:
    """Create the user, token, accounts (credentials encrypted), strategies and their capital, and one
    follower account per key pair of `followers` on FAN_STRATEGY."""
    user = get_user_model().objects.create_user(username="drill", password=secrets.token_urlsafe(18), is_staff=True)
    _, token = api_token_issue(user=user, name="drill")
    accounts = {
        exchange: account_create(
            user=user,
            name=f"drill {exchange.lower()}",
            exchange=exchange,
            credentials={"api_key": api_key, "api_secret": api_secret},
        )
        for exchange in (Exchange.BINANCE, Exchange.BYBIT)
    }
    routes: list[Route] = []
    webhook_tokens: dict[str, str] = {}
    for group_name, exchanges in STRATEGIES:
        webhook_token = secrets.token_urlsafe(24)
        strategy = strategy_create(
            name=group_name, group_name=group_name, market_type=MarketType.FUTURES, webhook_token=webhook_token
        )
        webhook_tokens[group_name] = webhook_token
        for exchange in exchanges:
            strategy_account_create(
                strategy=strategy,
                account=accounts[exchange],
                leverage=Decimal(2),
                allocated_capital=ALLOCATED,
            )
            routes.append(Route(account_id=accounts[exchange].pk, exchange=exchange, strategy=group_name))
    fan_token = secrets.token_urlsafe(24)
    fan = strategy_create(
        name=FAN_STRATEGY, group_name=FAN_STRATEGY, market_type=MarketType.FUTURES, webhook_token=fan_token
    )
    seeded_followers: list[ExchangeAccount] = []
    for i, pair in enumerate(followers):
        exchange = FOLLOWER_EXCHANGES[i % len(FOLLOWER_EXCHANGES)]
        account = account_create(
            user=user,
            name=f"drill follower {i:03d}",
            exchange=exchange,
            credentials={"api_key": pair.key, "api_secret": pair.secret},
        )
        strategy_account_create(strategy=fan, account=account, leverage=Decimal(2), allocated_capital=ALLOCATED)
        seeded_followers.append(ExchangeAccount(account.pk, exchange, pair.key))
    return Seeded(
        token=token,
        api_key=api_key,
        account_ids={exchange: account.pk for exchange, account in accounts.items()},
        routes=routes,
        webhook_tokens=webhook_tokens,
        followers=seeded_followers,
        fan_token=fan_token,
    )
