"""Shared DRF pieces every app's API uses: decimal and symbol fields, 400 bodies, pagination, auth."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any, cast

from django.conf import settings
from django.contrib.auth.models import User
from drf_spectacular.utils import OpenApiParameter
from rest_framework import serializers, status
from rest_framework.authentication import SessionAuthentication
from rest_framework.fields import SkipField
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.permissions import BasePermission, IsAuthenticated
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from core.money import COLUMN_LIMIT
from core.text import echo
from core.tokens import HashedTokenAuthentication

SYMBOL_RE = re.compile(r"^[A-Z0-9]{1,20}/[A-Z0-9]{1,12}$")
# Database ids are 64-bit: a bigger number is refused as a bad parameter before it reaches a query
# (SQLite raises OverflowError on it).
ID_MAX = 2**63 - 1
# The longest message one field's error may carry (a last guard for messages that quote the input).
MESSAGE_LIMIT = 300


class PlainDecimalField(serializers.DecimalField):
    """A Decimal rendered as a plain string without trailing zeros ("3000", "0.0015")."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("max_digits", 28)
        kwargs.setdefault("decimal_places", 12)
        super().__init__(**kwargs)

    # The ignore: DRF's stubs promise a str, and a None value stays None here.
    def to_representation(self, value: Any) -> str | None:  # type: ignore[override]
        if value is None:
            return None
        return format(Decimal(value).normalize(), "f")


class PositiveDecimalField(serializers.DecimalField):
    """A decimal input greater than zero and small enough for a money column; any number of decimals
    (the market rules floor it to the step or tick afterwards)."""

    default_error_messages = {
        "not_positive": "must be a number greater than zero",
        "too_large": "must be below 10^16",
    }

    def __init__(self, **kwargs: Any):
        super().__init__(max_digits=None, decimal_places=None, **kwargs)

    def to_internal_value(self, data: Any) -> Decimal:
        if isinstance(data, bool):
            self.fail("invalid")
        value = super().to_internal_value(data)
        if value <= 0:
            self.fail("not_positive")
        # What a money column can hold; the domain checks refuse from 10^15 up (core.money.INTAKE_LIMIT).
        if value >= COLUMN_LIMIT:
            self.fail("too_large")
        return value


class IdField(serializers.IntegerField):
    """A database id: a whole number from 1 to 2^63 - 1."""

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", ID_MAX)
        super().__init__(**kwargs)


class BoundedChoiceField(serializers.ChoiceField):
    """A ChoiceField whose "not a valid choice" message quotes at most ECHO_LIMIT characters of the input."""

    def to_internal_value(self, data: Any) -> Any:
        try:
            return super().to_internal_value(data)
        except serializers.ValidationError:
            self.fail("invalid_choice", input=echo(data))


class SymbolField(serializers.CharField):
    """A canonical BASE/QUOTE symbol (upper-cased); exchange spellings like BTCUSDT or BTC/USDT:USDT are refused."""

    default_error_messages = {"format": "must be a canonical BASE/QUOTE symbol such as BTC/USDT"}

    def __init__(self, **kwargs: Any):
        kwargs.setdefault("max_length", 32)
        super().__init__(**kwargs)

    def to_internal_value(self, data: Any) -> str:
        value = super().to_internal_value(data).strip().upper()
        if not SYMBOL_RE.match(value):
            self.fail("format")
        return value


class ErrorsSerializer(serializers.Serializer):
    """A 400 body: every bad field with its messages."""

    class Meta:
        ref_name = "ValidationErrors"

    # A declared field, popped from the class by SerializerMetaclass: Serializer.errors is not shadowed.
    errors = serializers.DictField(child=serializers.ListField(child=serializers.CharField()))  # type: ignore[assignment]


def errors_response(errors: dict[str, list[str]]) -> Response:
    return Response({"errors": errors}, status=status.HTTP_400_BAD_REQUEST)


def fields_parse(serializer_class: type[serializers.Serializer], data: Any) -> tuple[dict[str, Any], dict[str, list]]:
    """Parse every field on its own: (values of the fields that parsed, errors of those that did not).

    Unlike `Serializer.is_valid`, the values that did parse are kept, so the domain rules can still
    check them and one 400 names every bad field. Missing optional fields come back as None.
    """
    if not hasattr(data, "get"):
        return {}, {"non_field_errors": ["expected a JSON object"]}
    values: dict[str, Any] = {}
    errors: dict[str, list] = {}
    for name, field in serializer_class().fields.items():
        try:
            values[name] = field.run_validation(field.get_value(data))
        except SkipField:
            values[name] = None
        except serializers.ValidationError as exc:
            detail = exc.detail
            messages = detail if isinstance(detail, list) else [detail]
            errors[name] = [echo(message, MESSAGE_LIMIT) for message in messages]
    return values, errors


class ApiPagination(LimitOffsetPagination):
    default_limit = 100
    max_limit = 1000


def page_serializer(name: str, item: type[serializers.Serializer]) -> type[serializers.Serializer]:
    """The schema of one LimitOffsetPagination page of `item`."""
    return type(
        name,
        (serializers.Serializer,),
        {
            "count": serializers.IntegerField(),
            "next": serializers.URLField(allow_null=True),
            "previous": serializers.URLField(allow_null=True),
            "results": item(many=True),
            "Meta": type("Meta", (), {"ref_name": name}),
        },
    )


def paginated_response(*, request: Request, view: APIView, queryset: Any, serializer: type) -> Response:
    paginator = ApiPagination()
    page = paginator.paginate_queryset(queryset, request, view=view)
    return paginator.get_paginated_response(serializer(page, many=True).data)


PAGINATION_PARAMETERS = [
    OpenApiParameter("limit", int, description="page size (default 100, at most 1000)"),
    OpenApiParameter("offset", int, description="rows to skip"),
]


class UserApi(APIView):
    # Token authentication first: an anonymous request gets 401 with WWW-Authenticate.
    authentication_classes = [HashedTokenAuthentication, SessionAuthentication]
    permission_classes = [IsAuthenticated]


class ApiDocsPermission(BasePermission):
    """/api/schema/ and /api/docs/ per API_DOCS_ACCESS: staff, authenticated (default) or public."""

    def has_permission(self, request: Request, view: APIView) -> bool:
        access = settings.API_DOCS_ACCESS
        if access == "public":
            return True
        user = request.user
        if not (user and user.is_authenticated):
            return False
        return access != "staff" or bool(user.is_staff)


def request_user(request: Request) -> User:
    """The user of a UserApi request: IsAuthenticated has turned anonymous requests away already."""
    return cast(User, request.user)
