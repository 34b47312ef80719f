"""Admin for positions, trades, the fill ledger and daily performance — read-only: a position always equals
the sum of its fills (SPEC §4.3), fills are appended only by the fill path, and performance rows are
recomputed by their job."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from core.admin import OrderKeySearchMixin
from positions.models import Fill, Position, StrategyDailyPerformance, Trade


class ReadOnlyAdmin(admin.ModelAdmin):
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Position)
class PositionAdmin(ReadOnlyAdmin):
    list_display = (
        "strategy_account",
        "symbol",
        "market_type",
        "quantity",
        "average_entry",
        "realized_pnl",
        "unrealized_pnl",
        "unrealized_updated_at",
        "updated_at",
    )
    list_filter = ("market_type", "strategy_account__account", "symbol")
    list_select_related = ("strategy_account__strategy", "strategy_account__account")
    search_fields = ("symbol", "strategy_account__strategy__group_name")


@admin.register(Trade)
class TradeAdmin(OrderKeySearchMixin, ReadOnlyAdmin):
    list_display = (
        "exchange_order_id",
        "strategy_account",
        "symbol",
        "market_type",
        "side",
        "cumulative_filled",
        "average_price",
        "fees",
        "fee_currency",
        "realized_pnl",
        "updated_at",
    )
    list_filter = ("market_type", "side", "account")
    list_select_related = ("strategy_account__strategy", "strategy_account__account")
    search_fields = ("exchange_order_id", "symbol")
    ordering = ("-id",)


@admin.register(Fill)
class FillAdmin(ReadOnlyAdmin):
    list_display = (
        "filled_at",
        "strategy_account",
        "symbol",
        "delta_qty",
        "price",
        "fee",
        "fee_currency",
        "realized_pnl",
        "source",
        "trade",
    )
    list_filter = ("source",)
    list_select_related = ("strategy_account__strategy", "strategy_account__account", "trade")
    search_fields = ("symbol", "trade__exchange_order_id")
    ordering = ("-id",)


@admin.register(StrategyDailyPerformance)
class StrategyDailyPerformanceAdmin(ReadOnlyAdmin):
    """Read-only: calculate_daily_performance recomputes a day to the same row."""

    list_display = (
        "day",
        "strategy",
        "capital_base",
        "daily_pnl",
        "cumulative_pnl",
        "daily_return",
        "trades",
        "win_rate",
        "fees",
        "sharpe",
        "max_drawdown",
    )
    list_filter = ("strategy",)
    list_select_related = ("strategy",)
    date_hierarchy = "day"
    ordering = ("-day", "strategy")
