"""Order history API: every logical order in any state with its events (the fill ledger is positions')."""

from __future__ import annotations

import uuid

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import (
    PAGINATION_PARAMETERS,
    ApiPagination,
    ErrorsSerializer,
    PlainDecimalField,
    SymbolField,
    UserApi,
    errors_response,
    fields_parse,
    page_serializer,
    request_user,
)
from orders.apis import OrderCancelApi
from orders.models import OrderEvent
from orders.selectors import order_history_latest, order_history_rows


class OrderEventSerializer(serializers.Serializer):
    class Meta:
        ref_name = "OrderHistoryEvent"

    kind = serializers.ChoiceField(choices=OrderEvent.Kind.choices)
    at = serializers.DateTimeField()
    details = serializers.DictField(help_text="what the event recorded, e.g. exchange_order_id, filled, by")


class OrderHistorySerializer(serializers.Serializer):
    class Meta:
        ref_name = "OrderHistoryItem"

    order_key = serializers.UUIDField()
    state = serializers.ChoiceField(
        choices=OrderEvent.Kind.choices, help_text="the latest event: where the order is or how it ended"
    )
    location = serializers.ChoiceField(
        choices=["queued", "live", "ended"], help_text="queued or live while it exists, else ended"
    )
    status = serializers.CharField(allow_null=True, help_text="the queued or live row's status; null once ended")
    account = serializers.IntegerField(source="account_id")
    strategy = serializers.CharField(allow_null=True)
    symbol = serializers.CharField()
    market_type = serializers.CharField(allow_null=True)
    side = serializers.CharField(allow_null=True)
    order_type = serializers.CharField(allow_null=True)
    price = PlainDecimalField(allow_null=True)
    stop_price = PlainDecimalField(allow_null=True)
    quantity = PlainDecimalField(allow_null=True, help_text="as it arrived")
    filled_quantity = PlainDecimalField()
    average_price = PlainDecimalField(allow_null=True, help_text="average fill price over its placements")
    realized_pnl = PlainDecimalField()
    fees = PlainDecimalField()
    created_at = serializers.DateTimeField()
    updated_at = serializers.DateTimeField()
    events = OrderEventSerializer(many=True)


class OrderHistoryApi(UserApi):
    """GET /api/orders/history/: the user's orders in every state — queued, live, filled, cancelled,
    rejected, lost — newest activity first, each with its full event history; paginated."""

    class FilterSerializer(serializers.Serializer):
        account = serializers.IntegerField(required=False, min_value=1)
        symbol = SymbolField(required=False)
        state = serializers.ChoiceField(
            required=False, choices=OrderEvent.Kind.choices, help_text="the latest event's kind, e.g. filled"
        )
        since = serializers.DateTimeField(required=False, help_text="latest activity at or after (ISO 8601)")
        until = serializers.DateTimeField(required=False, help_text="latest activity before (ISO 8601)")

    @extend_schema(
        operation_id="orders_history",
        parameters=[FilterSerializer, *PAGINATION_PARAMETERS],
        responses={200: page_serializer("OrderHistoryPage", OrderHistorySerializer), 400: ErrorsSerializer},
    )
    def get(self, request: Request) -> Response:
        values, errors = fields_parse(OrderHistoryApi.FilterSerializer, request.query_params)
        if errors:
            return errors_response(errors)
        latest = order_history_latest(
            user=request_user(request),
            account_id=values["account"],
            symbol=values["symbol"],
            state=values["state"],
            since=values["since"],
            until=values["until"],
        )
        paginator = ApiPagination()
        page = paginator.paginate_queryset(latest, request, view=self) or []
        return paginator.get_paginated_response(OrderHistorySerializer(order_history_rows(page), many=True).data)


class OrderDetailApi(UserApi):
    """GET /api/orders/{order_key}/: one of the user's orders, in any state, with its events (404 otherwise)."""

    @extend_schema(operation_id="orders_retrieve", responses={200: OrderHistorySerializer, 404: None})
    def get(self, request: Request, order_key: uuid.UUID) -> Response:
        rows = order_history_rows(order_history_latest(user=request_user(request), order_key=order_key))
        if not rows:
            raise NotFound(f"no order {order_key}")
        return Response(OrderHistorySerializer(rows[0]).data)


# The ignore: both bases name their own nested serializers; each handler refers to its own class's.
class OrderItemApi(OrderDetailApi, OrderCancelApi):  # type: ignore[misc]
    """/api/orders/{order_key}/: GET (the order with its events) and DELETE (user cancel) on one path."""
