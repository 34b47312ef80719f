"""Admin for orders, events, dirty marks and circuit breakers — read-only.

Orders move only through the queue and reconciliation services (each move writes its event and
dirty mark in the same transaction); an edit or delete here would bypass them, so none is offered.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils.html import format_html_join
from django.utils.safestring import mark_safe

from core.admin import OrderKeySearchMixin
from orders.models import CircuitState, OpenOrder, OrderEvent, PendingOrder, QueueDirty, Signal, SignalOrder
from orders.selectors import signal_execution


class ReadOnlyAdmin(admin.ModelAdmin):
    # Tables grow to millions of rows: no COUNT(*) of the whole table on every changelist.
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


ORDER_FIELDS = (
    "order_key",
    "status",
    "account",
    "symbol",
    "market_type",
    "side",
    "order_type",
    "price",
    "stop_price",
    "quantity",
    "filled_quantity",
    "priority",
    "express",
    "cancel_requested_by",
    "signal_at",
)


@admin.register(PendingOrder)
class PendingOrderAdmin(OrderKeySearchMixin, ReadOnlyAdmin):
    list_display = (*ORDER_FIELDS, "placement_no", "attempts", "next_attempt_at")
    list_filter = ("status", "account", "symbol", "market_type", "side", "order_type", "express")
    list_select_related = ("account",)
    search_fields = ("symbol", "client_order_id")
    ordering = ("-queue_seq",)


@admin.register(OpenOrder)
class OpenOrderAdmin(OrderKeySearchMixin, ReadOnlyAdmin):
    list_display = (*ORDER_FIELDS, "exchange_order_id", "placement_no", "last_seen_at")
    list_filter = ("status", "account", "symbol", "market_type", "side", "order_type", "conditional")
    list_select_related = ("account",)
    search_fields = ("symbol", "client_order_id", "exchange_order_id")
    ordering = ("-queue_seq",)


@admin.register(OrderEvent)
class OrderEventAdmin(OrderKeySearchMixin, ReadOnlyAdmin):
    list_display = ("created_at", "order_key", "kind", "account", "symbol", "details")
    list_filter = ("kind",)
    list_select_related = ("account",)
    search_fields = ("symbol",)
    ordering = ("-id",)


@admin.register(QueueDirty)
class QueueDirtyAdmin(ReadOnlyAdmin):
    list_display = ("account", "market_type", "symbol", "marked_at")
    list_select_related = ("account",)


@admin.register(CircuitState)
class CircuitStateAdmin(ReadOnlyAdmin):
    list_display = ("scope", "failures", "opened_until", "cooldown_seconds", "last_error", "updated_at")
    search_fields = ("scope",)
    actions = ("close_circuit",)

    def has_close_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("orders.change_circuitstate")

    @admin.action(description="Close the selected circuits (forget failures and cool-down)", permissions=["close"])
    def close_circuit(self, request: HttpRequest, queryset: QuerySet) -> None:
        closed = queryset.update(failures=0, opened_until=None, cooldown_seconds=0)
        self.message_user(request, f"{closed} circuit(s) closed; the next run tries the exchange again.", messages.INFO)


class SignalOrderInline(admin.TabularInline):
    model = SignalOrder
    fields = ("order_key", "account", "side", "order_type", "quantity", "reference_price")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Signal)
class SignalAdmin(ReadOnlyAdmin):
    """Each signal with its followers and the execution report (times, fills, slippage) read from their events."""

    list_display = ("id", "received_at", "source", "strategy", "symbol", "side", "order_type", "price")
    list_filter = ("source", "strategy", "order_type")
    list_select_related = ("strategy",)
    search_fields = ("symbol", "orders__order_key")
    date_hierarchy = "received_at"
    ordering = ("-received_at",)
    readonly_fields = ("execution_report",)
    inlines = (SignalOrderInline,)

    @admin.display(description="execution")
    def execution_report(self, obj: Signal) -> str:
        summary = signal_execution(signal=obj).summary

        def span(latency: Any) -> str:
            if not latency.count:
                return "none yet"
            return (
                f"{latency.count}: first {latency.first:.2f} s, median {latency.median:.2f} s, "
                f"p99 {latency.p99:.2f} s, last {latency.last:.2f} s"
            )

        lines = [
            f"followers: {summary.followers} ({', '.join(f'{k} {v}' for k, v in summary.by_outcome.items())})",
            f"acknowledged by the exchange: {span(summary.acknowledged)}",
            f"filled: {span(summary.filled)}",
            f"slippage: average {summary.slippage_avg_bps} bps, worst {summary.slippage_worst_bps} bps",
            *summary.failures[:20],
        ]
        return format_html_join(mark_safe("<br>"), "{}", ((line,) for line in lines))  # noqa: S308 - a constant
