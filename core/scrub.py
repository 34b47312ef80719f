"""Secret scrubbing for log lines, stored errors and alerts (SPEC §2.3)."""

from __future__ import annotations

import logging
import re
import threading

REDACTED = "***"

# requests and ccxt put URLs, headers and signed query strings into exception text.
# The password of a URL's userinfo: scheme://user:password@host (DATABASE_URL, REDIS_URL, proxies).
_URL_PASSWORD = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://[^\s:/@]*:)([^\s@/]+)@")


def url_password_scrub(text: str) -> str:
    """`text` with the password of every URL replaced by ***: postgres://u:pw@h → postgres://u:***@h."""
    return _URL_PASSWORD.sub(r"\1" + REDACTED + "@", text)


_PATTERNS = [
    (_URL_PASSWORD, r"\1" + REDACTED + "@"),
    # Telegram bot tokens, in URLs (/bot<id>:<secret>/) and bare.
    (re.compile(r"/bot\d+:[A-Za-z0-9_-]+"), "/bot" + REDACTED),
    (re.compile(r"\b\d{6,12}:[A-Za-z0-9_-]{30,}\b"), REDACTED),
    # key=value in query strings, JSON bodies and headers.
    (
        re.compile(
            r"(?i)([\"']?(?:api[-_]?key|apikey|api[-_]?secret|secret|signature|sign|appkey|appsecret|"
            r"access[-_]?token|token|password|passphrase|x-mbx-apikey|x-bapi-api-key|x-bapi-sign|"
            r"listenkey|authorization)[\"']?\s*[:=]\s*[\"']?)(?:bearer\s+)?([^\s&\"',;}]{8,})"
        ),
        r"\1" + REDACTED,
    ),
]

_known: set[str] = set()
_known_lock = threading.Lock()


def secret_register(value: str | None) -> None:
    """Remember a literal secret (decrypted credential, bot token) so it is scrubbed wherever it appears."""
    if value and len(value) >= 6:
        with _known_lock:
            _known.add(value)


def scrub(text: object) -> str:
    """Return `text` with every known secret and secret-shaped value replaced by ***."""
    out = str(text)
    with _known_lock:
        known = sorted(_known, key=len, reverse=True)
    for value in known:
        if value in out:
            out = out.replace(value, REDACTED)
    for pattern, repl in _PATTERNS:
        out = pattern.sub(repl, out)
    return out


class ScrubFilter(logging.Filter):
    """Logging filter that renders the message (and traceback) once and scrubs it."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken %-format must not lose the line
            message = str(record.msg)
        record.msg = scrub(message)
        record.args = None
        if record.exc_info:
            formatter = logging.Formatter()
            record.exc_text = scrub(formatter.formatException(record.exc_info))
            record.exc_info = None
        return True


def secret_register_from_settings() -> None:
    from django.conf import settings

    for name in ("TELEGRAM_BOT_TOKEN", "METRICS_TOKEN", "SECRET_KEY", "FIELD_ENCRYPTION_KEY"):
        secret_register(getattr(settings, name, ""))
