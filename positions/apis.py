"""Positions HTTP API: the user's positions (SPEC §6) and fills (the ledger)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import (
    PAGINATION_PARAMETERS,
    ErrorsSerializer,
    IdField,
    PlainDecimalField,
    SymbolField,
    UserApi,
    errors_response,
    fields_parse,
    page_serializer,
    paginated_response,
    request_user,
)
from positions.selectors import fill_list_for_user, position_list_for_user


class PositionListApi(UserApi):
    """GET /api/positions/: the user's open positions (flat ones too with include_flat=true), paginated."""

    class FilterSerializer(serializers.Serializer):
        account = IdField(required=False)
        symbol = SymbolField(required=False)
        include_flat = serializers.BooleanField(required=False, default=False)

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "PositionListItem"

        id = serializers.IntegerField()
        account = serializers.IntegerField(source="strategy_account.account_id")
        strategy = serializers.CharField(source="strategy_account.strategy.group_name")
        symbol = serializers.CharField()
        market_type = serializers.CharField()
        quantity = PlainDecimalField(help_text="signed: negative is short")
        average_entry = PlainDecimalField()
        realized_pnl = PlainDecimalField(help_text="gross, cumulative")
        unrealized_pnl = PlainDecimalField()
        unrealized_updated_at = serializers.DateTimeField(allow_null=True)
        updated_at = serializers.DateTimeField()

    @extend_schema(
        operation_id="positions_list",
        parameters=[FilterSerializer, *PAGINATION_PARAMETERS],
        responses={200: page_serializer("PositionListPage", OutputSerializer), 400: ErrorsSerializer},
    )
    def get(self, request: Request) -> Response:
        values, errors = fields_parse(self.FilterSerializer, request.query_params)
        if errors:
            return errors_response(errors)
        positions = position_list_for_user(
            user=request_user(request),
            account_id=values["account"],
            symbol=values["symbol"],
            include_flat=bool(values["include_flat"]),
        )
        return paginated_response(request=request, view=self, queryset=positions, serializer=self.OutputSerializer)


class FillListApi(UserApi):
    """GET /api/fills/: the user's fills (the append-only ledger), newest first; paginated."""

    class FilterSerializer(serializers.Serializer):
        account = serializers.IntegerField(required=False, min_value=1)
        symbol = SymbolField(required=False)
        strategy = serializers.CharField(required=False, max_length=100, help_text="strategy group_name")
        order_key = serializers.UUIDField(required=False)
        since = serializers.DateTimeField(required=False, help_text="filled at or after (ISO 8601)")
        until = serializers.DateTimeField(required=False, help_text="filled before (ISO 8601)")

    class OutputSerializer(serializers.Serializer):
        class Meta:
            ref_name = "FillListItem"

        id = serializers.IntegerField()
        order_key = serializers.UUIDField(source="trade.order_key", allow_null=True)
        exchange_order_id = serializers.CharField(source="trade.exchange_order_id", allow_null=True)
        account = serializers.IntegerField(source="strategy_account.account_id")
        strategy = serializers.CharField(source="strategy_account.strategy.group_name")
        symbol = serializers.CharField()
        market_type = serializers.CharField(source="strategy_account.strategy.market_type")
        side = serializers.SerializerMethodField()
        quantity = serializers.SerializerMethodField()
        price = PlainDecimalField()
        fee = PlainDecimalField()
        fee_currency = serializers.CharField()
        realized_pnl = PlainDecimalField()
        filled_at = serializers.DateTimeField()
        # A declared field (popped from the class by SerializerMetaclass), not Field.source.
        source = serializers.CharField()  # type: ignore[assignment]

        def get_side(self, fill: Any) -> str:
            return "BUY" if fill.delta_qty > 0 else "SELL"

        def get_quantity(self, fill: Any) -> str:
            return format(abs(fill.delta_qty).normalize(), "f")

    @extend_schema(
        operation_id="fills_list",
        parameters=[FilterSerializer, *PAGINATION_PARAMETERS],
        responses={200: page_serializer("FillListPage", OutputSerializer), 400: ErrorsSerializer},
    )
    def get(self, request: Request) -> Response:
        values, errors = fields_parse(FillListApi.FilterSerializer, request.query_params)
        if errors:
            return errors_response(errors)
        fills = fill_list_for_user(
            user=request_user(request),
            account_id=values["account"],
            symbol=values["symbol"],
            strategy=values["strategy"],
            order_key=values["order_key"],
            since=values["since"],
            until=values["until"],
        )
        return paginated_response(request=request, view=self, queryset=fills, serializer=FillListApi.OutputSerializer)
