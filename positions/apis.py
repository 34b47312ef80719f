"""Positions HTTP API: the user's positions (SPEC §6)."""

from __future__ import annotations

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
from positions.selectors import position_list_for_user


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
