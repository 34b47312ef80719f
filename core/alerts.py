"""The operator-alert hook: lower layers raise alerts without importing the app that delivers them.

The notifications app installs its throttled, outbox-backed `alert_raise` at start-up
(NotificationsConfig.ready); until then, or without it, an alert is an ERROR log line.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from core.scrub import scrub

logger = logging.getLogger(__name__)

AlertHandler = Callable[..., bool]
_handler: AlertHandler | None = None


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
