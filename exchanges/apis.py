"""Exchanges HTTP API: the stored last prices (`GET /api/prices/`); no request calls an exchange."""

from __future__ import annotations

from django.conf import settings
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework import serializers
from rest_framework.request import Request
from rest_framework.response import Response

from core.api import ErrorsSerializer, SymbolField, UserApi, errors_response, fields_parse
from core.money import decimal_text
from exchanges.gateway import MarketType
from exchanges.selectors import price_quote_list


class PriceApi(UserApi):
    """GET /api/prices/?exchange=PAPER[&market_type=SPOT][&symbol=BTC/USDT]: the last prices the scheduler
    stored (refreshed every 31 s by update_price_cache), with their age and whether they are fresh enough
    for trading (PRICE_MAX_AGE_TRADE) and for valuation (PRICE_MAX_AGE_VALUE). Any signed-in user."""

    class FilterSerializer(serializers.Serializer):
        exchange = serializers.CharField(max_length=32, help_text="e.g. PAPER, BINANCE, BYBIT")
        market_type = serializers.ChoiceField(choices=[m.value for m in MarketType], required=False)
        symbol = SymbolField(required=False, help_text="canonical BASE/QUOTE, e.g. BTC/USDT")

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
        parameters=[FilterSerializer],
        responses={200: OutputSerializer, 400: ErrorsSerializer},
    )
    def get(self, request: Request) -> Response:
        values, errors = fields_parse(PriceApi.FilterSerializer, request.query_params)
        if errors:
            return errors_response(errors)
        now = timezone.now()
        quotes = price_quote_list(
            exchange=values["exchange"].upper(), market_type=values["market_type"], symbol=values["symbol"]
        )
        results = []
        for quote in quotes:
            age = (now - quote.as_of).total_seconds()
            results.append(
                {
                    "exchange": quote.exchange,
                    "market_type": quote.market_type,
                    "symbol": quote.symbol,
                    "price": decimal_text(quote.price),
                    "as_of": quote.as_of,
                    "age_seconds": round(age, 3),
                    "fresh_for_trading": age <= settings.PRICE_MAX_AGE_TRADE,
                    "fresh_for_valuation": age <= settings.PRICE_MAX_AGE_VALUE,
                }
            )
        return Response(PriceApi.OutputSerializer({"results": results}).data)
