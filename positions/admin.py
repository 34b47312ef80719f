"""Admin for positions and daily performance — read-only: a position always equals the sum of its fills
(SPEC §4.3) and performance rows are recomputed by their job."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from core.admin_display import PlainDecimalsMixin
from positions.models import Position, StrategyDailyPerformance


class ReadOnlyAdmin(PlainDecimalsMixin, admin.ModelAdmin):
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
