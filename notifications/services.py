"""Notification services: throttled alerts."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from notifications.models import AlertThrottle
from scheduler.scrub import scrub

logger = logging.getLogger(__name__)

ALERT_THROTTLE = timedelta(minutes=10)


def alert_raise(*, key: str, text: str) -> bool:
    """Raise an operator alert at most once per `key` per 10 minutes (state in AlertThrottle).

    Returns True when the alert was delivered, False when it was throttled. Until the
    Telegram outbox lands, delivery is an ERROR log line; the text is scrubbed either way.
    """
    now = timezone.now()
    text = scrub(text)
    try:
        with transaction.atomic():
            throttle = AlertThrottle.objects.select_for_update().filter(key=key).first()
            if throttle and now - throttle.last_sent_at < ALERT_THROTTLE:
                throttle.suppressed += 1
                throttle.save(update_fields=["suppressed"])
                return False
            suppressed = throttle.suppressed if throttle else 0
            AlertThrottle.objects.update_or_create(key=key, defaults={"last_sent_at": now, "suppressed": 0})
    except Exception:
        # An alert must never take the job wrapper down with it; log it unthrottled.
        logger.exception("alert throttle unavailable for %s", key)
        suppressed = 0
    suffix = f" (+{suppressed} suppressed)" if suppressed else ""
    logger.error("ALERT %s: %s%s", key, text, suffix)
    return True
