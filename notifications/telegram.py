"""Telegram Bot API client (sendMessage only) on requests, with typed errors that never carry the token."""

from __future__ import annotations

import logging
from typing import Any

import requests
from django.conf import settings

from core.scrub import REDACTED, scrub, secret_register

logger = logging.getLogger(__name__)

# Connect, read. The read timeout bounds how long a delivery can stay unknown (notifications.sender).
TIMEOUT = (5.0, 10.0)

_session = requests.Session()


class TelegramError(Exception):
    """Base of the client's errors; the message is scrubbed and never contains the bot token."""


class TelegramRetryAfter(TelegramError):
    """429: Telegram asks this chat (or bot) to wait `retry_after` seconds."""

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class TelegramTemporaryError(TelegramError):
    """5xx, timeouts, network failures and unreadable replies: worth retrying later."""


class TelegramPermanentError(TelegramError):
    """4xx other than 429 (chat not found, bot blocked, bad token, bad markup): retrying will not help."""


def _clean(text: object, token: str) -> str:
    out = str(text)
    if token:
        out = out.replace(token, REDACTED)
    return scrub(out)


def send_message(*, token: str, chat_id: str, text: str, parse_mode: str | None = "HTML") -> int:
    """POST {TELEGRAM_API_URL}/bot<token>/sendMessage and return Telegram's message_id.

    No retries here (the outbox decides). Raises TelegramRetryAfter (429), TelegramTemporaryError
    (5xx, network, timeout) or TelegramPermanentError (other 4xx, ok=false); messages are scrubbed.
    """
    secret_register(token)  # scrub it from every later log line, even where settings were overridden
    url = f"{settings.TELEGRAM_API_URL.rstrip('/')}/bot{token}/sendMessage"
    payload: dict[str, Any] = {"chat_id": chat_id, "text": text, "disable_web_page_preview": True}
    if parse_mode:
        payload["parse_mode"] = parse_mode
    try:
        response = _session.post(url, json=payload, timeout=TIMEOUT)
    except requests.RequestException as exc:
        # requests puts the full URL (with the token) into the text; `from None` keeps the
        # original exception, and so its text, out of tracebacks as well.
        raise TelegramTemporaryError(f"network error: {type(exc).__name__}: {_clean(exc, token)}") from None
    status = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    description = _clean(body.get("description") or response.reason or "", token)[:500]
    if status == 200 and body.get("ok"):
        try:
            return int(body["result"]["message_id"])
        except (KeyError, TypeError, ValueError):
            raise TelegramTemporaryError("sendMessage reply without result.message_id") from None
    if status == 429:
        parameters = body.get("parameters") or {}
        try:
            retry_after = float(parameters.get("retry_after", 1))
        except (TypeError, ValueError):
            retry_after = 1.0
        raise TelegramRetryAfter(f"429 {description}", retry_after=max(retry_after, 1.0))
    if status >= 500 or status == 408:
        raise TelegramTemporaryError(f"{status} {description}")
    if status == 200:
        # ok=false with 200 is not documented; treat it as a rejection rather than loop on it.
        raise TelegramPermanentError(f"200 ok=false {description}")
    raise TelegramPermanentError(f"{status} {description}")
