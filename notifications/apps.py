"""Notifications app config."""

from django.apps import AppConfig


class NotificationsConfig(AppConfig):
    name = "notifications"
    verbose_name = "Notifications"

    def ready(self) -> None:
        from django.conf import settings

        from core.alerts import alert_handler_set, notice_handler_set
        from core.checks import credentials_check_register
        from core.scrub import secret_register
        from notifications.services import alert_raise, outbox_enqueue

        # Every process (web, scheduler, commands) scrubs the global bot token; per-user tokens
        # are registered when EncryptedTextField decrypts them.
        secret_register(settings.TELEGRAM_BOT_TOKEN)
        # Alerts raised below this layer (the scheduler's job wrapper and watchdog) go through the outbox.
        alert_handler_set(alert_raise)
        # Notices of the layers below (the scheduler's leader announcement) are outbox messages too.
        notice_handler_set(outbox_enqueue)

        def encrypted_models():  # noqa: ANN202
            from notifications.models import TelegramProfile

            return (TelegramProfile,)

        credentials_check_register(encrypted_models, check_id="notifications.E001")
