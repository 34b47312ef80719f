"""Account and strategy services: creation, credentials and webhook tokens (hashed, compared in constant time)."""

from __future__ import annotations

import hashlib
import hmac
import logging
from decimal import Decimal

from django.conf import settings
from django.contrib.auth.hashers import check_password
from django.contrib.auth.models import User
from django.db import transaction

from accounts.models import Account, Exchange, Strategy, StrategyAccount, StrategyCapital

logger = logging.getLogger(__name__)


def account_credentials_set(*, account: Account, credentials: dict[str, str], save: bool = True) -> list[str]:
    """Set the given encrypted credential fields; blank values keep the stored ones.

    Returns the names of the fields that changed (never their values). Unknown names raise
    ValueError so a typo cannot silently drop a secret.
    """
    unknown = sorted(set(credentials) - set(Account.SECRET_FIELDS))
    if unknown:
        raise ValueError(f"not credential fields: {', '.join(unknown)}")
    changed = [name for name, value in credentials.items() if value]
    for name in changed:
        setattr(account, name, credentials[name])
    if save and changed and account.pk is not None:
        account.save(update_fields=changed)
    return changed


def account_credentials_clear(*, account: Account) -> None:
    """Blank every stored credential of the account."""
    for name in Account.SECRET_FIELDS:
        setattr(account, name, "")
    account.save(update_fields=list(Account.SECRET_FIELDS))
    logger.info("credentials cleared for account %s", account.pk)


def account_create(
    *,
    user: User,
    name: str,
    exchange: str = Exchange.PAPER,
    account_type: str = Account.AccountType.CRYPTO,
    is_testnet: bool = False,
    is_active: bool = True,
    credentials: dict[str, str] | None = None,
) -> Account:
    """Create an account; `credentials` (api_key, api_secret, …) are stored encrypted."""
    account = Account(
        user=user,
        name=name,
        exchange=exchange,
        account_type=account_type,
        is_testnet=is_testnet,
        is_active=is_active,
    )
    account_credentials_set(account=account, credentials=credentials or {}, save=False)
    account.full_clean()
    account.save()
    logger.info("account %s created: %s for user %s", account.pk, exchange, user.pk)
    return account


WEBHOOK_HASH_PREFIX = "sha256$"


def webhook_token_hash(token: str) -> str:
    """SHA-256 of a webhook token.

    Webhook tokens are long random secrets, not passwords: a slow salted password hash
    (0.27 s of CPU per check, measured) buys nothing against guessing and makes every
    webhook slow, so a plain digest compared in constant time is the right tool.
    """
    return WEBHOOK_HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def webhook_token_matches(*, token: str, stored: str) -> bool:
    """Constant-time check of `token` against a stored hash (sha256, or a legacy password hash)."""
    if stored.startswith(WEBHOOK_HASH_PREFIX):
        return hmac.compare_digest(stored, webhook_token_hash(token))
    return check_password(token, stored)


def strategy_webhook_token_set(*, strategy: Strategy, token: str, save: bool = True) -> None:
    """Store the token's hash; an empty token removes it (the strategy then accepts no webhook)."""
    strategy.webhook_token_hash = webhook_token_hash(token) if token else ""
    if save and strategy.pk is not None:
        strategy.save(update_fields=["webhook_token_hash"])


def strategy_webhook_token_check(*, strategy: Strategy, token: str) -> bool:
    """Whether `token` matches the stored hash, compared in constant time; False when none is set."""
    if not strategy.webhook_token_hash or not token:
        return False
    return webhook_token_matches(token=token, stored=strategy.webhook_token_hash)


def strategy_account_ref(strategy_account_id: int) -> str:
    """The opaque, stable name of one strategy account in webhook replies ("acct-3f9a1c2d7e").

    A webhook's sender holds a strategy token, not a user login: a 400 names a failing account by
    this reference (an HMAC of its id under SECRET_KEY), which the operator finds in the admin's
    strategy page and in the log line of the rejection, while the sender learns no account ids.
    """
    key = settings.SECRET_KEY.encode()
    digest = hmac.new(key, f"strategy-account:{strategy_account_id}".encode(), hashlib.sha256).hexdigest()
    return f"acct-{digest[:10]}"


def strategy_create(
    *, name: str, group_name: str, market_type: str, webhook_token: str = "", is_active: bool = True
) -> Strategy:
    """Create a strategy; the webhook token is kept only as a hash."""
    strategy = Strategy(name=name, group_name=group_name, market_type=market_type, is_active=is_active)
    strategy_webhook_token_set(strategy=strategy, token=webhook_token, save=False)
    strategy.full_clean()
    strategy.save()
    logger.info("strategy %s created: %s %s", strategy.pk, group_name, market_type)
    return strategy


@transaction.atomic
def strategy_account_create(
    *,
    strategy: Strategy,
    account: Account,
    weight: Decimal = Decimal(1),
    leverage: Decimal = Decimal(1),
    allocated_capital: Decimal = Decimal(0),
    is_active: bool = True,
) -> StrategyAccount:
    """Attach a strategy to an account with its StrategyCapital row, in one transaction."""
    strategy_account = StrategyAccount.objects.create(
        strategy=strategy, account=account, weight=weight, leverage=leverage, is_active=is_active
    )
    StrategyCapital.objects.create(strategy_account=strategy_account, allocated_capital=allocated_capital)
    return strategy_account
