"""Admin for market rules, price quotes and the simulator's state (simulator rows are read-only but faults)."""

from __future__ import annotations

from django.contrib import admin

from core.admin import PlainDecimalsMixin
from exchanges.models import (
    MarketInfo,
    PriceQuote,
    SimBalance,
    SimExchange,
    SimFault,
    SimFill,
    SimOrder,
    SimPosition,
    SimPricePath,
    StreamState,
)


@admin.register(MarketInfo)
class MarketInfoAdmin(PlainDecimalsMixin, admin.ModelAdmin):
    list_display = ("exchange", "market_type", "symbol", "tick_size", "step_size", "min_qty", "min_notional", "active")
    list_filter = ("exchange", "market_type", "active")
    search_fields = ("symbol",)


@admin.register(PriceQuote)
class PriceQuoteAdmin(PlainDecimalsMixin, admin.ModelAdmin):
    list_display = ("exchange", "market_type", "symbol", "price", "as_of")
    list_filter = ("exchange", "market_type")
    search_fields = ("symbol",)


class ReadOnlyAdmin(PlainDecimalsMixin, admin.ModelAdmin):
    """Engine state changes only through the engine's short locked transactions."""

    def has_add_permission(self, request) -> bool:  # noqa: ANN001
        return False

    def has_change_permission(self, request, obj=None) -> bool:  # noqa: ANN001
        return False


@admin.register(SimOrder)
class SimOrderAdmin(ReadOnlyAdmin):
    list_display = (
        "id",
        "exchange",
        "account",
        "market_type",
        "symbol",
        "side",
        "order_type",
        "status",
        "quantity",
        "filled_quantity",
        "updated_at",
    )
    list_filter = ("exchange", "market_type", "status", "conditional")
    search_fields = ("client_order_id", "symbol", "account")


@admin.register(SimBalance)
class SimBalanceAdmin(ReadOnlyAdmin):
    list_display = ("exchange", "account", "market_type", "currency", "free", "used")
    list_filter = ("exchange", "market_type")


@admin.register(SimFill)
class SimFillAdmin(ReadOnlyAdmin):
    list_display = ("id", "order", "quantity", "price", "fee", "is_maker", "created_at")


@admin.register(SimPosition)
class SimPositionAdmin(ReadOnlyAdmin):
    list_display = ("exchange", "account", "symbol", "quantity", "entry_price")


@admin.register(SimExchange)
class SimExchangeAdmin(admin.ModelAdmin):
    list_display = ("exchange", "seq", "last_match_at", "open_order_cap", "maker_fee_rate", "taker_fee_rate", "seed")
    readonly_fields = ("seq", "last_match_at")


@admin.register(SimFault)
class SimFaultAdmin(admin.ModelAdmin):
    list_display = ("id", "kind", "phase", "exchange", "endpoint", "account", "remaining", "probability", "fired")
    list_filter = ("kind", "exchange")


@admin.register(SimPricePath)
class SimPricePathAdmin(admin.ModelAdmin):
    list_display = ("exchange", "symbol", "start_at", "step_seconds")


@admin.register(StreamState)
class StreamStateAdmin(ReadOnlyAdmin):
    """Written only by the leader's stream manager; check_websocket_health reports from it."""

    list_display = (
        "account",
        "exchange",
        "state",
        "last_message_at",
        "last_pong_at",
        "consecutive_failures",
        "reconnects",
        "next_reconnect_at",
        "updated_at",
    )
    list_filter = ("exchange", "state")
    list_select_related = ("account",)
