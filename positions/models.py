"""Positions: the signed quantity per strategy account and symbol, kept equal to the sum of its fills."""

from __future__ import annotations

from django.db import models

from accounts.models import MarketType, StrategyAccount, money


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
