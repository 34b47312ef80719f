"""Orders HTTP API (SPEC §6): create (validate, then enqueue), list queued and live orders, user cancel."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import (
    PAGINATION_PARAMETERS,
    BoundedChoiceField,
    ErrorsSerializer,
    IdField,
    PlainDecimalField,
    PositiveDecimalField,
    SymbolField,
    UserApi,
    errors_response,
    fields_parse,
    page_serializer,
    paginated_response,
    request_user,
)
from orders.intake import IntakeRequest, order_intake
from orders.models import OpenOrder, OrderType, PendingOrder, Side
from orders.selectors import order_key_owned_by, order_list_for_user, signal_execution, signal_list_for_user
from orders.throttles import OrderWriteThrottle
from orders.transitions import order_cancel_by_user
from orders.validation import OrderRejectedError

logger = logging.getLogger(__name__)

# --- Orders ---------------------------------------------------------------------------------------


class OrderCreateApi(UserApi):
    """POST /api/orders/: validate one order against the market rules and enqueue it (202).

    The account must be one of the requesting user's own (staff included: the API always acts as
    the authenticated user). Quantity is floored to the step and prices to the tick; the reply shows
    the values that were queued. A 400 names every bad field and nothing is written.
    """

    throttle_classes = [OrderWriteThrottle]

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "OrderCreateInput"

        account = IdField(help_text="id of one of your accounts")
        strategy = serializers.CharField(max_length=100, help_text="strategy group_name; fixes the market type")
        symbol = SymbolField(help_text="canonical BASE/QUOTE, e.g. BTC/USDT")
        side = BoundedChoiceField(choices=Side.choices)
        order_type = BoundedChoiceField(choices=OrderType.choices)
        price = PositiveDecimalField(
            required=False, allow_null=True, help_text="limit price: LIMIT and STOP_LIMIT only; floored to the tick"
        )
        stop_price = PositiveDecimalField(
            required=False, allow_null=True, help_text="trigger price: STOP_LIMIT and STOP_MARKET only"
        )
        quantity = PositiveDecimalField(help_text="base quantity; floored to the step")
        priority = serializers.IntegerField(
            required=False, default=0, min_value=-1_000_000, max_value=1_000_000, help_text="lower ranks first"
        )

    class OutputSerializer(serializers.Serializer):
        class AcceptedOrderSerializer(serializers.Serializer):
            class Meta:
                ref_name = "OrderCreateAccepted"

            order_key = serializers.UUIDField()
            symbol = serializers.CharField()
            market_type = serializers.CharField()
            side = serializers.CharField()
            order_type = serializers.CharField()
            quantity = PlainDecimalField()
            price = PlainDecimalField(allow_null=True)
            stop_price = PlainDecimalField(allow_null=True)
            express = serializers.BooleanField()

        class Meta:
            ref_name = "OrderCreateOutput"

        order_keys = serializers.ListField(child=serializers.UUIDField())
        orders = AcceptedOrderSerializer(many=True)

    @extend_schema(
        operation_id="orders_create",
        request=InputSerializer,
        responses={202: OutputSerializer, 400: ErrorsSerializer},
    )
    def post(self, request: Request) -> Response:
        values, parse_errors = fields_parse(OrderCreateApi.InputSerializer, request.data)
        if "non_field_errors" in parse_errors:
            return errors_response(parse_errors)
        intake = IntakeRequest(
            account_id=values.get("account"),
            strategy=values.get("strategy"),
            symbol=values.get("symbol"),
            side=values.get("side"),
            order_type=values.get("order_type"),
            quantity=values.get("quantity"),
            price=values.get("price"),
            stop_price=values.get("stop_price"),
            priority=values.get("priority") or 0,
        )
        try:
            orders = order_intake(
                user=request_user(request), request=intake, now=timezone.now(), known_errors=parse_errors
            )
        except OrderRejectedError as exc:
            return errors_response(exc.errors)
        body = OrderCreateApi.OutputSerializer({"order_keys": [o.order_key for o in orders], "orders": orders}).data
        return Response(body, status=status.HTTP_202_ACCEPTED)


class OrderListApi(UserApi):
    """GET /api/orders/: the user's queued and live orders, newest first, paginated."""

    class FilterSerializer(serializers.Serializer):
        account = IdField(required=False)
        symbol = SymbolField(required=False)
        status = BoundedChoiceField(required=False, choices=[*PendingOrder.Status.choices, *OpenOrder.Status.choices])

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "OrderListItem"

        order_key = serializers.UUIDField()
        location = serializers.ChoiceField(choices=["queued", "live"], help_text="queued: waiting; live: on exchange")
        status = serializers.CharField()
        account = serializers.IntegerField(source="account_id")
        strategy = serializers.CharField()
        symbol = serializers.CharField()
        market_type = serializers.CharField()
        side = serializers.CharField()
        order_type = serializers.CharField()
        price = PlainDecimalField(allow_null=True)
        stop_price = PlainDecimalField(allow_null=True)
        quantity = PlainDecimalField()
        filled_quantity = PlainDecimalField()
        priority = serializers.IntegerField()
        express = serializers.BooleanField()
        cancel_requested_by = serializers.CharField()
        exchange_order_id = serializers.CharField(source="ext_id", allow_blank=True)
        signal_at = serializers.DateTimeField()
        created_at = serializers.DateTimeField()

    @extend_schema(
        operation_id="orders_list",
        parameters=[FilterSerializer, *PAGINATION_PARAMETERS],
        responses={200: page_serializer("OrderListPage", OutputSerializer), 400: ErrorsSerializer},
    )
    def get(self, request: Request) -> Response:
        values, errors = fields_parse(OrderListApi.FilterSerializer, request.query_params)
        if errors:
            return errors_response(errors)
        orders = order_list_for_user(
            user=request_user(request), account_id=values["account"], symbol=values["symbol"], status=values["status"]
        )
        return paginated_response(request=request, view=self, queryset=orders, serializer=OrderListApi.OutputSerializer)


# The ignore: both bases name a nested OutputSerializer; each handler refers to its own class's by name.
class OrderCollectionApi(OrderCreateApi, OrderListApi):  # type: ignore[misc]
    """/api/orders/ serves two operations on one path; each keeps its own class and serializers,
    and this class only routes GET and POST to them."""


class OrderCancelApi(UserApi):
    """DELETE /api/orders/{order_key}/: a user cancel (SPEC §4.1); no exchange call in the request.

    202 "cancelled": a queued order was removed. 202 "cancelling": a live or placing order is marked
    and the queue job cancels and ends it (never re-queued). 409 "ended": it had already filled or
    ended, nothing changed. 404: unknown, or another user's order.
    """

    throttle_classes = [OrderWriteThrottle]

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "OrderCancelOutput"

        order_key = serializers.UUIDField()
        state = serializers.ChoiceField(
            choices=["cancelled", "cancelling", "ended"], help_text="where the order stands after the request"
        )

    @extend_schema(
        operation_id="orders_cancel",
        request=None,
        responses={202: OutputSerializer, 404: None, 409: OutputSerializer},
    )
    def delete(self, request: Request, order_key: uuid.UUID) -> Response:
        if not order_key_owned_by(user=request_user(request), order_key=order_key):
            raise NotFound(f"no order {order_key}")
        state = order_cancel_by_user(order_key=order_key, now=timezone.now())
        logger.info("user %s cancel of order %s: %s", request.user.pk, order_key, state)
        if state == "not_found":
            raise NotFound(f"no order {order_key}")
        code = status.HTTP_409_CONFLICT if state == "ended" else status.HTTP_202_ACCEPTED
        return Response(OrderCancelApi.OutputSerializer({"order_key": order_key, "state": state}).data, status=code)


# --- Signals: the per-signal execution report -------------------------------------------------------


class LatencySerializer(serializers.Serializer):
    count = serializers.IntegerField(help_text="followers that reached this step")
    first = serializers.FloatField(allow_null=True, help_text="seconds from the signal to the first follower")
    median = serializers.FloatField(allow_null=True)
    p99 = serializers.FloatField(allow_null=True)
    last = serializers.FloatField(allow_null=True)


class SignalSerializer(serializers.Serializer):
    class Meta:
        ref_name = "Signal"

    id = serializers.IntegerField()
    # A declared field, popped from the class by SerializerMetaclass: Field.source is not shadowed.
    source = serializers.CharField()  # type: ignore[assignment]
    strategy = serializers.CharField(source="strategy.group_name")
    symbol = serializers.CharField()
    side = serializers.CharField()
    order_type = serializers.CharField()
    price = PlainDecimalField(allow_null=True)
    received_at = serializers.DateTimeField()


class SignalListApi(UserApi):
    """GET /api/signals/: signals with orders on the user's accounts (staff: all), newest first, paginated;
    `?order_key=` finds the signal of one order."""

    @extend_schema(
        operation_id="signals_list",
        parameters=[
            OpenApiParameter("order_key", uuid.UUID, description="the signal of this order"),
            *PAGINATION_PARAMETERS,
        ],
        responses={200: page_serializer("SignalPage", SignalSerializer)},
    )
    def get(self, request: Request) -> Response:
        raw_key = request.query_params.get("order_key")
        order_key = None
        if raw_key is not None:
            try:
                order_key = str(uuid.UUID(raw_key))
            except ValueError:
                return errors_response({"order_key": ["must be an order key (a UUID)"]})
        signals = signal_list_for_user(user=request_user(request), order_key=order_key)
        return paginated_response(request=request, view=self, queryset=signals, serializer=SignalSerializer)


class SignalExecutionApi(UserApi):
    """GET /api/signals/{id}/execution: each follower's queued → submitted → acknowledged → filled times, its fill
    price against the price it was judged at (slippage in basis points; positive is worse) and how it ended,
    with the signal's latency percentiles. A user sees only their own accounts' followers (staff: all)."""

    class FollowerSerializer(serializers.Serializer):
        class Meta:
            ref_name = "SignalFollower"

        order_key = serializers.CharField()
        account_id = serializers.IntegerField()
        side = serializers.CharField()
        order_type = serializers.CharField()
        quantity = PlainDecimalField()
        reference_price = PlainDecimalField(allow_null=True)
        queued_at = serializers.DateTimeField(allow_null=True)
        submitted_at = serializers.DateTimeField(allow_null=True)
        acknowledged_at = serializers.DateTimeField(allow_null=True)
        filled_at = serializers.DateTimeField(allow_null=True)
        filled_quantity = PlainDecimalField()
        fill_price = PlainDecimalField(allow_null=True)
        slippage_bps = PlainDecimalField(allow_null=True)
        outcome = serializers.CharField()
        failure = serializers.CharField()

    class SummarySerializer(serializers.Serializer):
        class Meta:
            ref_name = "SignalExecutionSummary"

        followers = serializers.IntegerField()
        by_outcome = serializers.DictField(child=serializers.IntegerField())
        submitted = LatencySerializer()
        acknowledged = LatencySerializer()
        filled = LatencySerializer()
        slippage_avg_bps = PlainDecimalField(allow_null=True, help_text="weighted by filled quantity")
        slippage_worst_bps = PlainDecimalField(allow_null=True)
        failures = serializers.ListField(child=serializers.CharField())

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "SignalExecution"

        signal = SignalSerializer()
        summary = serializers.SerializerMethodField()
        followers = serializers.SerializerMethodField()

        def get_summary(self, execution: Any) -> dict:
            return SignalExecutionApi.SummarySerializer(execution.summary).data

        def get_followers(self, execution: Any) -> list:
            return list(SignalExecutionApi.FollowerSerializer(execution.followers, many=True).data)

    @extend_schema(operation_id="signals_execution", responses={200: OutputSerializer, 404: None})
    def get(self, request: Request, signal_id: int) -> Response:
        user = request_user(request)
        signal = signal_list_for_user(user=user).filter(pk=signal_id).first()
        if signal is None:
            raise NotFound(f"no signal {signal_id}")
        execution = signal_execution(signal=signal, user=user)
        return Response(SignalExecutionApi.OutputSerializer(execution).data)
