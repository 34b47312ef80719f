"""Accounts app config."""

from django.apps import AppConfig


class AccountsConfig(AppConfig):
    name = "accounts"
    verbose_name = "Accounts"

    def ready(self) -> None:
        from core.checks import credentials_check_register

        def encrypted_models():  # noqa: ANN202
            from accounts.models import Account, SecuritiesToken

            return (Account, SecuritiesToken)

        # `runscheduler --check` fails when stored credentials do not decrypt with FIELD_ENCRYPTION_KEY.
        credentials_check_register(encrypted_models, check_id="accounts.E001")
