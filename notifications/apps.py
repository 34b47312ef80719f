"""Notifications app config."""

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications"

    def ready(self) -> None:
        from django.conf import settings

        from scheduler.scrub import secret_register

        # Every process (web, scheduler, commands) scrubs the global bot token; per-user tokens
        # are registered when EncryptedTextField decrypts them.
        secret_register(settings.TELEGRAM_BOT_TOKEN)
