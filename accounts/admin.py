"""Admin for accounts and strategies. Credentials and webhook tokens are write-only: set, never shown."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from accounts.models import (
    Account,
    CapitalSnapshot,
    SecuritiesToken,
    Strategy,
    StrategyAccount,
    StrategyCapital,
)
from accounts.services import account_credentials_set, strategy_account_ref, strategy_webhook_token_set

CREDENTIAL_LABELS = {
    "api_key": "API key",
    "api_secret": "API secret",
    "passphrase": "API passphrase",
    "kis_appkey": "KIS app key",
    "kis_appsecret": "KIS app secret",
    "kis_account_no": "KIS account number",
}


def _write_only(label: str, help_text: str = "Leave blank to keep the stored value.") -> forms.CharField:
    # render_value=False: a re-displayed form (after an error) never echoes what was typed.
    return forms.CharField(
        label=label,
        required=False,
        strip=True,
        widget=forms.PasswordInput(render_value=False, attrs={"autocomplete": "new-password"}),
        help_text=help_text,
    )


class AccountAdminForm(forms.ModelForm):
    """The account form without its encrypted columns; new credentials go in write-only fields."""

    new_api_key = _write_only(CREDENTIAL_LABELS["api_key"])
    new_api_secret = _write_only(CREDENTIAL_LABELS["api_secret"])
    new_passphrase = _write_only(CREDENTIAL_LABELS["passphrase"])
    new_kis_appkey = _write_only(CREDENTIAL_LABELS["kis_appkey"])
    new_kis_appsecret = _write_only(CREDENTIAL_LABELS["kis_appsecret"])
    new_kis_account_no = _write_only(CREDENTIAL_LABELS["kis_account_no"])
    clear_credentials = forms.BooleanField(
        required=False, help_text="Erase every stored credential (new values above are stored after erasing)."
    )

    class Meta:
        model = Account
        exclude = Account.SECRET_FIELDS

    def save(self, commit: bool = True) -> Account:
        account = super().save(commit=False)
        if self.cleaned_data.get("clear_credentials"):
            for name in Account.SECRET_FIELDS:
                setattr(account, name, "")
        account_credentials_set(
            account=account,
            credentials={name: self.cleaned_data.get(f"new_{name}") or "" for name in Account.SECRET_FIELDS},
            save=False,
        )
        if commit:
            account.save()
            self.save_m2m()
        return account


@admin.register(Account)
class AccountAdmin(admin.ModelAdmin):
    form = AccountAdminForm
    exclude = Account.SECRET_FIELDS
    list_display = ("name", "user", "exchange", "account_type", "is_testnet", "is_active", "credentials")
    list_filter = ("exchange", "account_type", "is_active", "is_testnet")
    search_fields = ("name", "user__username")
    list_select_related = ("user",)
    autocomplete_fields = ("user",)
    fieldsets = (
        (None, {"fields": ("user", "name", "exchange", "account_type", "is_testnet", "is_virtual", "is_active")}),
        (
            "Credentials (write-only)",
            {
                "description": "Stored values are encrypted and never displayed. Type a new value to replace one.",
                "fields": (
                    "credentials",
                    "new_api_key",
                    "new_api_secret",
                    "new_passphrase",
                    "new_kis_appkey",
                    "new_kis_appsecret",
                    "new_kis_account_no",
                    "clear_credentials",
                ),
            },
        ),
    )
    readonly_fields = ("credentials",)

    @admin.display(description="credentials stored")
    def credentials(self, obj: Account) -> str:
        """Which credentials are set — names only, never values."""
        stored = [CREDENTIAL_LABELS[name] for name in Account.SECRET_FIELDS if getattr(obj, name, "")]
        return ", ".join(stored) or "none"


class StrategyAccountInline(admin.TabularInline):
    model = StrategyAccount
    extra = 0
    fields = ("account", "weight", "leverage", "is_active", "webhook_ref")
    readonly_fields = ("webhook_ref",)
    autocomplete_fields = ("account",)

    @admin.display(description="webhook reference")
    def webhook_ref(self, obj: StrategyAccount) -> str:
        """How a webhook 400 names this account to the sender (accounts.services.strategy_account_ref)."""
        return strategy_account_ref(obj.pk) if obj.pk else "-"


class StrategyAdminForm(forms.ModelForm):
    webhook_token = _write_only(
        "Webhook token", "Stored hashed; leave blank to keep the current one. Senders put it in the payload."
    )
    clear_webhook_token = forms.BooleanField(required=False, help_text="Remove the token: webhooks are refused.")

    class Meta:
        model = Strategy
        exclude = ("webhook_token_hash",)

    def save(self, commit: bool = True) -> Strategy:
        strategy = super().save(commit=False)
        token = self.cleaned_data.get("webhook_token") or ""
        if token or self.cleaned_data.get("clear_webhook_token"):
            strategy_webhook_token_set(strategy=strategy, token=token, save=False)
        if commit:
            strategy.save()
            self.save_m2m()
        return strategy


@admin.register(Strategy)
class StrategyAdmin(admin.ModelAdmin):
    form = StrategyAdminForm
    exclude = ("webhook_token_hash",)
    list_display = ("name", "group_name", "market_type", "is_active", "has_webhook_token")
    list_filter = ("market_type", "is_active")
    search_fields = ("name", "group_name")
    inlines = (StrategyAccountInline,)

    @admin.display(boolean=True, description="webhook token")
    def has_webhook_token(self, obj: Strategy) -> bool:
        return bool(obj.webhook_token_hash)

    def save_formset(self, request: HttpRequest, form: Any, formset: Any, change: bool) -> None:
        super().save_formset(request, form, formset, change)
        # Every StrategyAccount has its StrategyCapital row (SPEC §3), also when added here.
        for strategy_account in formset.new_objects:
            if isinstance(strategy_account, StrategyAccount):
                StrategyCapital.objects.get_or_create(strategy_account=strategy_account)


@admin.register(StrategyCapital)
class StrategyCapitalAdmin(admin.ModelAdmin):
    """allocated_capital may be corrected by hand until the next allocation; the PnL watermark may not."""

    list_display = (
        "strategy_account",
        "allocated_capital",
        "current_pnl",
        "last_rebalance_at",
        "pnl_reflected_until",
    )
    list_select_related = ("strategy_account__strategy", "strategy_account__account")
    search_fields = ("strategy_account__strategy__group_name", "strategy_account__account__name")
    readonly_fields = ("strategy_account", "current_pnl", "last_rebalance_at", "pnl_reflected_until")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # created with its StrategyAccount


@admin.register(SecuritiesToken)
class SecuritiesTokenAdmin(admin.ModelAdmin):
    """Read-only: the token is issued by the securities_token_refresh job and never shown."""

    exclude = ("access_token",)
    list_display = ("account", "token_type", "expires_at", "last_refreshed_at", "last_issue_attempt_at", "has_token")
    list_select_related = ("account",)

    @admin.display(boolean=True, description="token stored")
    def has_token(self, obj: SecuritiesToken) -> bool:
        return bool(obj.access_token)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(CapitalSnapshot)
class CapitalSnapshotAdmin(admin.ModelAdmin):
    """Read-only: written by auto_rebalance_accounts; the allocation history is its audit trail."""

    list_display = ("taken_at", "account", "market_type", "total", "source", "used_for_allocation")
    list_filter = ("market_type", "source", "used_for_allocation", "account")
    list_select_related = ("account",)
    show_full_result_count = False
    ordering = ("-taken_at",)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
