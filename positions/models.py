"""Positions and the fill ledger they are built from (trades, fills), and daily performance."""

from __future__ import annotations

from django.db import models

from accounts.models import Account, MarketType, StrategyAccount, money
from core.choices import text_choices
from core.fields import MoneyField
from exchanges import gateway

# Model choices of the gateway's enum (defined once, in exchanges.gateway): same values and labels.
Side = text_choices(gateway.Side)


class Position(models.Model):
    """One per (strategy account, symbol); quantity is signed (spot never below 0)."""

    strategy_account = models.ForeignKey(StrategyAccount, on_delete=models.PROTECT, related_name="positions")
    symbol = models.CharField(max_length=32)
    market_type = models.CharField(max_length=8, choices=MarketType.choices)
    quantity = money(default=0)
    average_entry = money(default=0)
    realized_pnl = money(default=0, help_text="gross, cumulative")
    unrealized_pnl = money(default=0)
    unrealized_updated_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["strategy_account", "symbol"], name="position_unique_symbol"),
        ]

    def __str__(self) -> str:
        return f"{self.symbol} {self.quantity} @ {self.average_entry}"


class Trade(models.Model):
    """One per (strategy account, exchange order): cumulative fill, average price, fees, realized PnL."""

    strategy_account = models.ForeignKey(StrategyAccount, on_delete=models.PROTECT, related_name="trades")
    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="+")
    exchange_order_id = models.CharField(max_length=64)
    order_key = models.UUIDField(null=True, blank=True, db_index=True)
    symbol = models.CharField(max_length=32)
    market_type = models.CharField(max_length=8, choices=MarketType.choices)
    side = models.CharField(max_length=4, choices=Side.choices)
    cumulative_filled = money(default=0)
    average_price = money(default=0)
    fees = money(default=0)
    fee_currency = models.CharField(max_length=16, blank=True)
    realized_pnl = money(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "orders_trade"  # moved from the orders app; the table kept its name
        constraints = [
            models.UniqueConstraint(fields=["strategy_account", "exchange_order_id"], name="trade_unique_order")
        ]

    def __str__(self) -> str:
        return f"{self.exchange_order_id} {self.side} {self.cumulative_filled} {self.symbol}"


class Fill(models.Model):
    """Append-only fill ledger; UNIQUE(trade, cum_filled_after) makes a fill seen twice a no-op."""

    class Source(models.TextChoices):
        REST = "REST"
        STREAM = "STREAM"
        ADJUSTMENT = "ADJUSTMENT"

    trade = models.ForeignKey(Trade, null=True, blank=True, on_delete=models.PROTECT, related_name="fills")
    strategy_account = models.ForeignKey(StrategyAccount, on_delete=models.PROTECT, related_name="fills")
    symbol = models.CharField(max_length=32)
    cum_filled_after = money()
    delta_qty = money(help_text="signed: + buy, - sell")
    price = money()
    fee = money(default=0)
    fee_currency = models.CharField(max_length=16, blank=True)
    realized_pnl = money(default=0)
    filled_at = models.DateTimeField(db_index=True)
    source = models.CharField(max_length=10, choices=Source.choices)

    class Meta:
        db_table = "orders_fill"  # moved from the orders app; the table kept its name
        constraints = [models.UniqueConstraint(fields=["trade", "cum_filled_after"], name="fill_unique_increment")]
        indexes = [models.Index(fields=["strategy_account", "symbol"], name="fill_position_idx")]

    def __str__(self) -> str:
        return f"{self.symbol} {self.delta_qty} @ {self.price}"


def ratio(**kwargs) -> MoneyField:  # noqa: ANN003
    """Percentages and ratios: wide enough for a return on a tiny capital base; exact like money."""
    return MoneyField(max_digits=28, decimal_places=12, **kwargs)


class StrategyDailyPerformance(models.Model):
    """One strategy's results for one KST calendar day (SPEC §4.10); written only by positions.services.

    Returns are % of `capital_base` (None when the base is not positive); risk figures are over
    the daily returns (%) of the 30 days ending at `day`.
    """

    strategy = models.ForeignKey("accounts.Strategy", on_delete=models.CASCADE, related_name="daily_performance")
    day = models.DateField(help_text="KST calendar day")
    capital_base = money(help_text="Σ allocated capital at the day's start; kept on re-run")
    next_capital_base = money(
        default=0, help_text="Σ allocated when this row was first computed: the next day's capital_base; kept on re-run"
    )
    daily_pnl = money(default=0)
    cumulative_pnl = money(default=0)
    daily_return = ratio(null=True, blank=True)
    cumulative_return = ratio(null=True, blank=True)
    trades = models.PositiveIntegerField(default=0, help_text="fills in the day")
    winning = models.PositiveIntegerField(default=0)
    losing = models.PositiveIntegerField(default=0)
    win_rate = ratio(null=True, blank=True, help_text="% of closing fills (realized ≠ 0) that won")
    fees = money(default=0, help_text="fees paid in the quote currency")
    volatility = ratio(null=True, blank=True)
    sharpe = ratio(null=True, blank=True)
    sortino = ratio(null=True, blank=True)
    sharpe_annualized = ratio(null=True, blank=True)
    sortino_annualized = ratio(null=True, blank=True)
    max_drawdown = money(default=0)
    max_drawdown_pct = ratio(default=0)
    computed_at = models.DateTimeField()

    class Meta:
        constraints = [models.UniqueConstraint(fields=["strategy", "day"], name="dailyperformance_unique_day")]
        ordering = ["strategy", "day"]

    def __str__(self) -> str:
        return f"{self.strategy_id} {self.day}: {self.daily_pnl}"
