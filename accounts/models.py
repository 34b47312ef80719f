"""Accounts and strategies: who trades where, with what weight and capital (SPEC §3)."""

from __future__ import annotations

from django.conf import settings
from django.db import models

from core.choices import text_choices
from core.fields import EncryptedTextField, MoneyField
from exchanges import gateway


def money(**kwargs) -> MoneyField:  # noqa: ANN003
    """Money and quantities: numeric(28, 12) on PostgreSQL, exact decimal text on SQLite (core.fields)."""
    return MoneyField(max_digits=28, decimal_places=12, **kwargs)


class Exchange(models.TextChoices):
    BINANCE = "BINANCE"
    BYBIT = "BYBIT"
    PAPER = "PAPER"
    KIS = "KIS"


# Model choices of the gateway's enum (defined once, in exchanges.gateway): same values and labels.
MarketType = text_choices(gateway.MarketType)


class Account(models.Model):
    """An exchange or broker account. Credentials are encrypted at rest and never shown."""

    class AccountType(models.TextChoices):
        CRYPTO = "CRYPTO"
        SECURITIES = "SECURITIES"

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="accounts")
    name = models.CharField(max_length=100)
    exchange = models.CharField(max_length=16, choices=Exchange.choices)
    account_type = models.CharField(max_length=16, choices=AccountType.choices, default=AccountType.CRYPTO)
    is_testnet = models.BooleanField(default=False)
    is_active = models.BooleanField(default=True)
    api_key = EncryptedTextField(blank=True, default="")
    api_secret = EncryptedTextField(blank=True, default="")
    passphrase = EncryptedTextField(blank=True, default="")
    kis_appkey = EncryptedTextField(blank=True, default="")
    kis_appsecret = EncryptedTextField(blank=True, default="")
    kis_account_no = EncryptedTextField(blank=True, default="")
    is_virtual = models.BooleanField(default=False, help_text="KIS virtual (paper) trading account")
    created_at = models.DateTimeField(auto_now_add=True)

    SECRET_FIELDS = ("api_key", "api_secret", "passphrase", "kis_appkey", "kis_appsecret", "kis_account_no")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "name"], name="account_unique_name_per_user")]

    def __str__(self) -> str:
        return f"{self.name} ({self.exchange})"

    def __repr__(self) -> str:
        # Credentials stay out of reprs, tracebacks and debug pages.
        return f"<Account {self.pk} {self.exchange} {self.name!r}>"


class Strategy(models.Model):
    """A trading strategy; `group_name` routes webhooks to it and fixes the market type."""

    name = models.CharField(max_length=100)
    group_name = models.CharField(max_length=100, unique=True)
    market_type = models.CharField(max_length=8, choices=MarketType.choices)
    webhook_token_hash = models.CharField(max_length=200, blank=True)
    is_active = models.BooleanField(default=True)

    class Meta:
        verbose_name_plural = "strategies"

    def __str__(self) -> str:
        return f"{self.name} [{self.group_name}]"


class StrategyAccount(models.Model):
    """A strategy trading on one account, with its share (weight) and leverage."""

    strategy = models.ForeignKey(Strategy, on_delete=models.PROTECT, related_name="strategy_accounts")
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="strategy_accounts")
    weight = models.DecimalField(max_digits=12, decimal_places=6, default=1)
    leverage = models.DecimalField(max_digits=8, decimal_places=2, default=1)
    is_active = models.BooleanField(default=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["strategy", "account"], name="strategyaccount_unique"),
            models.CheckConstraint(condition=models.Q(weight__gte=0), name="strategyaccount_weight_nonneg"),
            models.CheckConstraint(condition=models.Q(leverage__gt=0), name="strategyaccount_leverage_pos"),
        ]

    def __str__(self) -> str:
        return f"{self.strategy.group_name} @ {self.account.name}"


class StrategyCapital(models.Model):
    """Capital allocated to one StrategyAccount and the watermark of realized PnL compounded into it."""

    strategy_account = models.OneToOneField(StrategyAccount, on_delete=models.CASCADE, related_name="capital")
    allocated_capital = money(default=0)
    current_pnl = money(default=0)
    last_rebalance_at = models.DateTimeField(null=True, blank=True)
    pnl_reflected_until = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.strategy_account}: {self.allocated_capital}"


class SecuritiesToken(models.Model):
    """The KIS access token of one securities account (SPEC §3, §4.7); written only by accounts.tokens.

    `last_issue_attempt_at` is the single-flight claim: an issue is attempted only by the caller
    whose UPDATE moved it forward, at most once per 61 s (KIS allows one issue a minute per appkey).
    """

    account = models.OneToOneField(Account, on_delete=models.CASCADE, related_name="securities_token")
    access_token = EncryptedTextField(blank=True, default="")
    token_type = models.CharField(max_length=20, blank=True, default="")
    expires_at = models.DateTimeField(null=True, blank=True)
    last_refreshed_at = models.DateTimeField(null=True, blank=True)
    last_issue_attempt_at = models.DateTimeField(null=True, blank=True)
    # Why the last attempt failed (scrubbed, one line); cleared by a successful issue.
    last_error = models.CharField(max_length=500, blank=True, default="")

    def __str__(self) -> str:
        return f"KIS token of account {self.account_id}"

    def __repr__(self) -> str:
        # The token stays out of reprs, tracebacks and debug pages.
        return f"<SecuritiesToken account={self.account_id} expires_at={self.expires_at}>"


class CapitalSnapshot(models.Model):
    """The total capital of one (account, market type) as read each hour (SPEC §3, §4.11).

    LIVE rows come from the exchange. When the balance call fails, a FALLBACK row repeats the
    newest LIVE total at most 24 h old (`fallback_of` names it), so every run leaves a trace and
    the allocation it fed is recorded on the row it actually used (`used_for_allocation`).
    """

    class Source(models.TextChoices):
        LIVE = "LIVE"
        FALLBACK = "FALLBACK"

    account = models.ForeignKey(Account, on_delete=models.CASCADE, related_name="capital_snapshots")
    market_type = models.CharField(max_length=8, choices=MarketType.choices)
    total = money()
    source = models.CharField(max_length=8, choices=Source.choices)
    taken_at = models.DateTimeField()
    used_for_allocation = models.BooleanField(default=False)
    fallback_of = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", help_text="the LIVE row repeated"
    )

    class Meta:
        indexes = [models.Index(fields=["account", "market_type", "taken_at"], name="capitalsnapshot_lookup_idx")]

    def __str__(self) -> str:
        return f"{self.account_id} {self.market_type} {self.total} ({self.source} {self.taken_at:%Y-%m-%d %H:%M})"
