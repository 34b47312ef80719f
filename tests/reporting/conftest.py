"""Reporting fixtures: the daily summary goes out through the notifications outbox and its fake Bot API."""

from tests.notifications.conftest import bot_api, host, no_telegram, telegram  # noqa: F401
