"""Exchanges HTTP API: the stored last prices (`GET /api/prices/`); no request calls an exchange."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.authentication import SessionAuthentication, TokenAuthentication
from rest_framework.permissions import IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from exchanges.gateway import MarketType
from exchanges.selectors import price_quote_list


class PriceApi(APIView):
    """GET /api/prices/?exchange=PAPER[&market_type=SPOT][&symbol=BTC/USDT]: the last prices the scheduler
    stored (refreshed every 31 s by update_price_cache), with their age and whether they are fresh enough
    for trading (PRICE_MAX_AGE_TRADE) and for valuation (PRICE_MAX_AGE_VALUE). Any signed-in user."""

    # TokenAuthentication first: an anonymous request gets 401 with WWW-Authenticate.
    authentication_classes = [TokenAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]

    class FilterSerializer(serializers.Serializer):
        exchange = serializers.CharField(max_length=32, help_text="e.g. PAPER, BINANCE, BYBIT")
        market_type = serializers.ChoiceField(choices=[m.value for m in MarketType], required=False)
        symbol = serializers.RegexField(
            r"^[A-Za-z0-9]{1,20}/[A-Za-z0-9]{1,12}$", required=False, help_text="canonical BASE/QUOTE"
        )

    class OutputSerializer(serializers.Serializer):
        class QuoteSerializer(serializers.Serializer):
            class Meta:
                ref_name = "PriceQuoteItem"

            exchange = serializers.CharField()
            market_type = serializers.CharField()
            symbol = serializers.CharField()
            price = serializers.CharField(help_text="plain decimal text")
            as_of = serializers.DateTimeField()
            age_seconds = serializers.FloatField()
            fresh_for_trading = serializers.BooleanField()
            fresh_for_valuation = serializers.BooleanField()

        class Meta:
            ref_name = "PriceList"

        results = QuoteSerializer(many=True)

    @extend_schema(
        operation_id="prices_list",
        parameters=[
            OpenApiParameter("exchange", str, required=True),
            OpenApiParameter("market_type", str, enum=[m.value for m in MarketType]),
            OpenApiParameter("symbol", str),
        ],
        responses={200: OutputSerializer},
    )
    def get(self, request: Request) -> Response:
        filters = PriceApi.FilterSerializer(data=request.query_params)
        if not filters.is_valid():
            return Response({"errors": filters.errors}, status=400)
        values: dict[str, Any] = filters.validated_data
        now = timezone.now()
        quotes = price_quote_list(
            exchange=values["exchange"].upper(),
            market_type=values.get("market_type"),
            symbol=values["symbol"].upper() if values.get("symbol") else None,
        )
        results = []
        for quote in quotes:
            age = (now - quote.as_of).total_seconds()
            results.append(
                {
                    "exchange": quote.exchange,
                    "market_type": quote.market_type,
                    "symbol": quote.symbol,
                    "price": format(Decimal(quote.price).normalize(), "f"),
                    "as_of": quote.as_of,
                    "age_seconds": round(age, 3),
                    "fresh_for_trading": age <= settings.PRICE_MAX_AGE_TRADE,
                    "fresh_for_valuation": age <= settings.PRICE_MAX_AGE_VALUE,
                }
            )
        return Response(PriceApi.OutputSerializer({"results": results}).data)
