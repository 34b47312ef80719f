"""Notifications admin: the outbox read-only; Telegram profiles with a write-only bot token."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from notifications.models import AlertThrottle, OutboxMessage, TelegramProfile


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):
    list_display = ("id", "status", "chat_id", "bot", "part_no", "parts", "attempts", "created_at", "sent_at")
    list_filter = ("status",)
    search_fields = ("dedupe_key", "chat_id")
    date_hierarchy = "created_at"
    show_full_result_count = False

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(AlertThrottle)
class AlertThrottleAdmin(admin.ModelAdmin):
    list_display = ("key", "last_sent_at", "suppressed")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class TelegramProfileForm(forms.ModelForm):
    # Never rendered back: an empty field on edit keeps the stored token.
    bot_token = forms.CharField(required=False, widget=forms.PasswordInput(render_value=False))

    class Meta:
        model = TelegramProfile
        fields = ("user", "chat_id", "bot_token")

    def clean_bot_token(self) -> str:
        value = self.cleaned_data.get("bot_token") or ""
        if not value and self.instance.pk:
            return self.instance.bot_token
        return value


@admin.register(TelegramProfile)
class TelegramProfileAdmin(admin.ModelAdmin):
    form = TelegramProfileForm
    list_display = ("user", "chat_id", "has_own_bot")

    @admin.display(boolean=True, description="own bot")
    def has_own_bot(self, obj: TelegramProfile) -> bool:
        return bool(obj.bot_token)
