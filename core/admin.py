"""Admin for API tokens: issue (the key is shown once, on the next page) and revoke; keys are never stored."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest

from core.models import ApiToken
from core.tokens import api_token_key_set


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
