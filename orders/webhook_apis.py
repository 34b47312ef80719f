"""Webhook HTTP API (SPEC §6): `POST /api/webhook/`, authenticated by the strategy's token in the body."""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.api import BoundedChoiceField, PositiveDecimalField, SymbolField, errors_response, fields_parse
from core.money import COLUMN_LIMIT
from core.parsers import DecimalJSONParser, DecimalTextParser
from orders.models import Side
from orders.throttles import (
    WebhookBadTokenThrottle,
    WebhookIpThrottle,
    webhook_bad_token_record,
    webhook_strategy_throttle,
)
from orders.webhook import (
    WEBHOOK_ORDER_TYPES,
    WebhookRejectedError,
    WebhookSignal,
    webhook_payload_hash,
    webhook_receive,
    webhook_strategy_authenticate,
)

logger = logging.getLogger(__name__)

FORBIDDEN = {"detail": "invalid group_name or token"}


class UpperChoiceField(BoundedChoiceField):
    """A choice matched case-insensitively (TradingView's {{strategy.order.action}} says "buy")."""

    def to_internal_value(self, data: Any) -> Any:
        if isinstance(data, str):
            data = data.strip().upper()
        return super().to_internal_value(data)


class QtyPerField(serializers.DecimalField):
    """A percentage of the allocated capital: any decimal, sign included (-100 closes); no booleans."""

    default_error_messages = {"too_large": "must be between -10^16 and 10^16"}

    def __init__(self, **kwargs: Any):
        super().__init__(max_digits=None, decimal_places=None, **kwargs)

    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, bool):
            self.fail("invalid")
        value = super().to_internal_value(data)
        # Compared as is: abs() rounds to the context and overflows on 1e999999999 (found by the fuzz test).
        if not -COLUMN_LIMIT < value < COLUMN_LIMIT:
            self.fail("too_large")
        return value


class WebhookErrorsSerializer(serializers.Serializer):
    """A 400 body: bad payload fields, and per account reference the rules that fail for that account."""

    class Meta:
        ref_name = "WebhookErrors"

    # A declared field, popped from the class by SerializerMetaclass: Serializer.errors is not shadowed.
    errors = serializers.DictField(child=serializers.ListField(child=serializers.CharField()))  # type: ignore[assignment]
    account_errors = serializers.DictField(
        child=serializers.DictField(child=serializers.ListField(child=serializers.CharField())),
        help_text="account reference (as the strategy's admin page shows it) → field → messages; "
        "the rule only, never the account's capital or position",
    )


class WebhookForbiddenSerializer(serializers.Serializer):
    class Meta:
        ref_name = "WebhookForbidden"

    detail = serializers.CharField()


class WebhookApi(APIView):
    """POST /api/webhook/: a strategy's signal (e.g. a TradingView alert), fanned out to its active accounts.

    No Django authentication: the body's `token` is checked, in constant time, against the hashed
    token of the strategy named by `group_name`. An unknown group, a strategy without a token and
    a wrong token all get the same 403. Orders are sized per account as allocated capital ×
    qty_per / 100 / price × leverage, floored to the step (price: the order's own for LIMIT and
    STOP_LIMIT, the stop price for STOP_MARKET, else a fresh market price); qty_per = -100 closes
    each account's position with a MARKET order on the opposite side. CANCEL cancels the strategy's
    orders on `symbol`, CANCEL_ALL on every symbol. All-or-nothing: a 400 names the payload fields
    and, per account reference, the rules that fail (never an account id, its capital or position),
    and nothing is written. A repeated delivery (same `id`, or without one
    the same payload within 60 s) gets the first reply again (header `X-Webhook-Duplicate: true`).
    """

    authentication_classes: list = []
    permission_classes = [AllowAny]
    parser_classes = [DecimalJSONParser, DecimalTextParser]
    throttle_classes = [WebhookIpThrottle, WebhookBadTokenThrottle]

    class InputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "WebhookInput"

        id = serializers.CharField(
            required=False,
            allow_blank=True,
            max_length=100,
            help_text="delivery id, unique per strategy; without it the payload is deduped for 60 s",
        )
        group_name = serializers.CharField(max_length=100, help_text="the strategy's group_name")
        token = serializers.CharField(help_text="the strategy's webhook token")
        symbol = SymbolField(required=False, help_text="canonical BASE/QUOTE; not needed for CANCEL_ALL")
        side = UpperChoiceField(choices=Side.choices, required=False, help_text="not needed for CANCEL(_ALL)")
        order_type = UpperChoiceField(choices=[(t, t) for t in WEBHOOK_ORDER_TYPES])
        price = PositiveDecimalField(required=False, allow_null=True, help_text="LIMIT and STOP_LIMIT only")
        stop_price = PositiveDecimalField(required=False, allow_null=True, help_text="STOP_LIMIT and STOP_MARKET only")
        qty_per = QtyPerField(
            required=False, help_text="% of allocated capital (> 0), or -100 to close; not needed for CANCEL(_ALL)"
        )

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "WebhookOutput"

        orders = serializers.DictField(
            child=serializers.ListField(child=serializers.UUIDField()),
            help_text="account id → order_keys queued (an empty list: nothing to do on that account)",
        )
        cancelled = serializers.DictField(
            child=serializers.DictField(child=serializers.ChoiceField(choices=["cancelled", "cancelling", "ended"])),
            help_text="account id → order_key → cancelled (queued, removed), cancelling (live: the queue "
            "job cancels it) or ended (it ended meanwhile)",
        )

    @extend_schema(
        operation_id="webhook_receive",
        request=InputSerializer,
        responses={202: OutputSerializer, 400: WebhookErrorsSerializer, 403: WebhookForbiddenSerializer},
        auth=[],
    )
    def post(self, request: Request) -> Response:
        data = request.data
        if not isinstance(data, dict):
            return errors_response({"non_field_errors": ["expected a JSON object"]})
        strategy = webhook_strategy_authenticate(group_name=data.get("group_name"), token=data.get("token"))
        if strategy is None:
            logger.warning("webhook refused: bad group_name or token")
            webhook_bad_token_record(request)
            return Response(FORBIDDEN, status=status.HTTP_403_FORBIDDEN)
        webhook_strategy_throttle(strategy_id=strategy.pk)
        values, parse_errors = fields_parse(WebhookApi.InputSerializer, data)
        signal = WebhookSignal(
            delivery_id=values.get("id") or "",
            symbol=values.get("symbol"),
            side=values.get("side"),
            order_type=values.get("order_type"),
            price=values.get("price"),
            stop_price=values.get("stop_price"),
            qty_per=values.get("qty_per"),
        )
        try:
            reply = webhook_receive(
                strategy=strategy,
                signal=signal,
                payload_hash=webhook_payload_hash(data),
                now=timezone.now(),
                known_errors=parse_errors,
            )
        except WebhookRejectedError as exc:
            logger.info("webhook of %s rejected: %s", strategy, exc)
            body = {
                "errors": exc.errors,
                "account_errors": exc.account_errors,
            }
            return Response(body, status=status.HTTP_400_BAD_REQUEST)
        response = Response(reply.body, status=status.HTTP_202_ACCEPTED)
        if reply.duplicate:
            response["X-Webhook-Duplicate"] = "true"
        return response
