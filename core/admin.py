"""Core admin: API tokens (issued with the key shown once, revoked; keys never stored), and helpers
shared by the apps' read-only admins."""

from __future__ import annotations

import uuid
from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from core.models import ApiToken
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
