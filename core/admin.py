"""Core admin: API tokens (issued with the key shown once, revoked; keys never stored), and helpers
shared by the apps' read-only admins."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.core.exceptions import FieldDoesNotExist
from django.db import models
from django.db.models import QuerySet
from django.http import HttpRequest

from core.models import ApiToken
from core.money import decimal_text
from core.tokens import api_token_key_set


class OrderKeySearchMixin:
    """Search by order key: a full UUID is an indexed exact match; anything else matches text fields."""

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        try:
            key = uuid.UUID(term)
        except ValueError:
            return super().get_search_results(request, queryset, search_term)  # type: ignore[misc]
        return queryset.filter(order_key=key), False


# Change lists without the 12 stored decimals: 0.001000000000 → 0.001, 65000.000000000000 → 65000.


def plain_decimal_column(field: models.DecimalField) -> Callable[[Any], str]:
    """A change-list column showing `field` without trailing zeros, sortable and titled like the field."""

    @admin.display(description=str(field.verbose_name), ordering=field.name)
    def column(obj: Any) -> str:
        value = getattr(obj, field.name)
        return "-" if value is None else decimal_text(value)

    column.__name__ = field.name
    return column


class PlainDecimalsMixin:
    """Shows every DecimalField column of `list_display` as plain text. Quantities and prices are floored
    to the market's step and tick, so this is exactly the market's precision, without the storage padding."""

    model: type[models.Model]

    # Returns Any: django-stubs types ModelAdmin.get_list_display generically over the model.
    def get_list_display(self, request: HttpRequest) -> Any:
        columns = super().get_list_display(request)  # type: ignore[misc]
        return [self._plain(column) for column in columns]

    def _plain(self, column: Any) -> Any:
        if not isinstance(column, str):
            return column
        try:
            field = self.model._meta.get_field(column)
        except FieldDoesNotExist:
            return column
        return plain_decimal_column(field) if isinstance(field, models.DecimalField) else column


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ("prefix", "user", "name", "created_at")
    list_select_related = ("user",)
    search_fields = ("user__username", "name", "prefix")
    fields = ("user", "name")
    raw_id_fields = ("user",)

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A token is issued or revoked, never edited (its key cannot be shown again).
        return False

    def save_model(self, request: HttpRequest, obj: ApiToken, form: Any, change: bool) -> None:
        key = api_token_key_set(obj)
        super().save_model(request, obj, form, change)
        messages.warning(request, f"API token for {obj.user}: {key} — shown once; copy it now, it is stored hashed.")
