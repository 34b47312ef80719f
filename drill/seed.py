"""The drill's data: a staff user with an API token, Binance USDⓈ-M and Bybit linear accounts, strategies.

Runs in the drill process (Django set up on the drill database). The accounts hold the key pair the
simulator server accepts, so real ccxt in the scheduler processes signs requests it verifies.
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


@dataclass
class Seeded:
    token: str
    api_key: str
    account_ids: dict[str, int]  # exchange → account id
    routes: list[Route]
    webhook_tokens: dict[str, str] = field(default_factory=dict)  # group_name → token


# (group_name, exchanges it trades on): drill-alpha fans out to both accounts (webhooks).
STRATEGIES = (
    ("drill-alpha", (Exchange.BINANCE, Exchange.BYBIT)),
    ("drill-beta", (Exchange.BINANCE,)),
    ("drill-gamma", (Exchange.BYBIT,)),
)


@transaction.atomic
def seed(*, api_key: str, api_secret: str) -> Seeded:
    """Create the user, token, accounts (credentials encrypted), strategies and their capital."""
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
    return Seeded(
        token=token,
        api_key=api_key,
        account_ids={exchange: account.pk for exchange, account in accounts.items()},
        routes=routes,
        webhook_tokens=webhook_tokens,
    )
