"""The operator-alert and notice hooks: lower layers raise alerts and send notices without importing
the app that delivers them.

The notifications app installs its throttled, outbox-backed `alert_raise` and its `outbox_enqueue`
at start-up (NotificationsConfig.ready); until then, or without them, an alert is an ERROR log
line and a notice is not sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from core.scrub import scrub

logger = logging.getLogger(__name__)

AlertHandler = Callable[..., bool]
_handler: AlertHandler | None = None
NoticeHandler = Callable[..., list[Any]]
_notice_handler: NoticeHandler | None = None


def alert_handler_set(handler: AlertHandler | None) -> None:
    """Install the function that delivers alerts (called with key= and text=, returns True if raised)."""
    global _handler
    _handler = handler


def alert_raise(*, key: str, text: str) -> bool:
    """Raise an operator alert through the installed handler; True when raised, False when throttled."""
    if _handler is None:
        logger.error("ALERT %s: %s", key, scrub(text))
        return True
    return _handler(key=key, text=text)


def notice_handler_set(handler: NoticeHandler | None) -> None:
    """Install the function that queues notices (called with text= and dedupe_key=, returns the rows queued)."""
    global _notice_handler
    _notice_handler = handler


def notice_send(*, text: str, dedupe_key: str) -> list[Any]:
    """Queue an operator notice (no throttle; once per dedupe_key) through the installed handler.

    Returns the rows queued: none when nothing is configured to deliver it or no handler is installed.
    """
    if _notice_handler is None:
        logger.info("notice %s not sent: no notice handler installed", dedupe_key)
        return []
    return _notice_handler(text=text, dedupe_key=dedupe_key)
