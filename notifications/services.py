"""Notification services: throttled alerts, the Telegram outbox (enqueue and delivery state), leader announce."""

from __future__ import annotations

import hashlib
import html
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from core.scrub import scrub
from notifications.formatting import text_split
from notifications.models import AlertThrottle, OutboxMessage, TelegramProfile

logger = logging.getLogger(__name__)

ALERT_THROTTLE = timedelta(minutes=10)
Status = OutboxMessage.Status


@dataclass(frozen=True)
class Target:
    """Where a message goes: a bot reference (never the token itself) and a chat."""

    bot: str
    chat_id: str


def outbox_target(*, user: Any = None) -> Target | None:
    """The user's own chat (their bot, else the global bot) when set, else the global bot and chat.

    None when nothing is configured. A profile with a bot token but no chat cannot be used on its
    own and falls back to the global target.
    """
    if user is not None:
        profile = TelegramProfile.objects.filter(user=user).first()
        if profile is not None and profile.chat_id:
            if profile.bot_token:
                return Target(bot=f"user:{profile.user_id}", chat_id=profile.chat_id)
            if settings.TELEGRAM_BOT_TOKEN:
                return Target(bot=OutboxMessage.GLOBAL_BOT, chat_id=profile.chat_id)
    if settings.TELEGRAM_BOT_TOKEN and settings.TELEGRAM_CHAT_ID:
        return Target(bot=OutboxMessage.GLOBAL_BOT, chat_id=str(settings.TELEGRAM_CHAT_ID))
    return None


def outbox_bot_token(*, bot: str) -> str:
    """The token for a stored bot reference; "" when it is no longer configured."""
    if bot == OutboxMessage.GLOBAL_BOT:
        return settings.TELEGRAM_BOT_TOKEN or ""
    if bot.startswith("user:"):
        user_id = bot.removeprefix("user:")
        profile = TelegramProfile.objects.filter(user_id=int(user_id)).first() if user_id.isdigit() else None
        return profile.bot_token if profile else ""
    return ""


def _dedupe_key(dedupe_key: str | None) -> str:
    if not dedupe_key:
        return f"auto:{uuid.uuid4().hex}"
    if len(dedupe_key) <= 200:
        return dedupe_key
    digest = hashlib.sha256(dedupe_key.encode()).hexdigest()
    return f"{dedupe_key[:150]}:{digest}"


def outbox_enqueue(*, text: str, user: Any = None, dedupe_key: str | None = None) -> list[OutboxMessage]:
    """Queue Telegram HTML `text` for the outbox sender; returns its rows (one per part), in order.

    `text` is HTML (escape your values); longer texts are split below 4096 characters
    (notifications.formatting). Written in the caller's transaction, so a rollback drops it. With
    a `dedupe_key` the call is idempotent: the rows already queued under that key are returned.
    Returns [] and writes nothing when no Telegram bot and chat are configured.
    """
    target = outbox_target(user=user)
    if target is None:
        logger.debug("outbox: no Telegram bot and chat configured; message dropped")
        return []
    key = _dedupe_key(dedupe_key)
    if dedupe_key:
        existing = list(OutboxMessage.objects.filter(dedupe_key=key).order_by("part_no"))
        if existing:
            return existing
    parts = text_split(text)
    now = timezone.now()
    rows = [
        OutboxMessage(
            user=user,
            bot=target.bot,
            chat_id=target.chat_id,
            dedupe_key=key,
            part_no=number,
            parts=len(parts),
            text=part,
            next_attempt_at=now,
            created_at=now,
        )
        for number, part in enumerate(parts, start=1)
    ]
    try:
        with transaction.atomic():  # a savepoint when the caller has a transaction open
            created = OutboxMessage.objects.bulk_create(rows)
    except IntegrityError:
        if not dedupe_key:
            raise
        # A concurrent enqueue with the same key won the race; theirs are the rows.
        return list(OutboxMessage.objects.filter(dedupe_key=key).order_by("part_no"))
    if created and created[0].pk is None:  # backends without RETURNING on bulk insert
        return list(OutboxMessage.objects.filter(dedupe_key=key).order_by("part_no"))
    return created


def alert_format(*, key: str, text: str, suppressed: int) -> str:
    suffix = f"\n(+{suppressed} suppressed)" if suppressed else ""
    return f"⚠️ <b>ALERT</b> <code>{html.escape(key)}</code>\n{html.escape(text, quote=False)}{suffix}"


def alert_raise(*, key: str, text: str) -> bool:
    """Raise an operator alert at most once per `key` per 10 minutes (state in AlertThrottle).

    Returns True when the alert was raised, False when it was throttled. A raised alert is an
    ERROR log line and a message through the outbox to the global bot (none when Telegram is not
    configured), committed together with the throttle row. The text is scrubbed either way.
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
            outbox_enqueue(text=alert_format(key=key, text=text, suppressed=suppressed))
    except Exception:
        # An alert must never take the job wrapper down with it; log it unthrottled.
        logger.exception("alert throttle or outbox unavailable for %s", key)
        suppressed = 0
    suffix = f" (+{suppressed} suppressed)" if suppressed else ""
    logger.error("ALERT %s: %s%s", key, text, suffix)
    return True


# --- delivery state (called by notifications.sender; each is one short UPDATE) -------------------


def outbox_recover(*, now: datetime, stale_after: timedelta) -> tuple[int, int]:
    """Return SENDING rows to PENDING: those never sent at once, those of unknown delivery once stale.

    A row claimed but not marked send-started never left the process, so re-sending it cannot
    duplicate. A send-started row older than `stale_after` belongs to a sender that died (or lost
    the database) during or right after the HTTP call: it is re-sent (at-least-once; see
    notifications.sender). Read first, so an idle outbox costs one SELECT and no write.
    Returns (unsent, unknown) counts.
    """
    unsent = unknown = 0
    claimed = OutboxMessage.objects.filter(status=Status.SENDING).values_list("id", "send_started_at")
    for row_id, send_started_at in list(claimed):
        # Each UPDATE repeats its condition, so a claim that moved on meanwhile is left alone.
        if send_started_at is None:
            unsent += OutboxMessage.objects.filter(
                id=row_id, status=Status.SENDING, send_started_at__isnull=True
            ).update(status=Status.PENDING, claimed_at=None, claimed_by="")
        elif send_started_at < now - stale_after:
            changed = OutboxMessage.objects.filter(
                id=row_id, status=Status.SENDING, send_started_at=send_started_at
            ).update(
                status=Status.PENDING,
                claimed_at=None,
                claimed_by="",
                send_started_at=None,
                next_attempt_at=now,
                last_error="delivery unknown: the sender stopped during the HTTP call; sending again",
            )
            if changed:
                unknown += 1
                logger.warning("outbox %s: delivery unknown after a sender stopped mid-send; sending again", row_id)
    return unsent, unknown


def outbox_claim(*, message_id: int, claimer: str, now: datetime) -> bool:
    """PENDING → SENDING for this claimer; False when another sender (or a state change) got there first."""
    return (
        OutboxMessage.objects.filter(id=message_id, status=Status.PENDING, next_attempt_at__lte=now).update(
            status=Status.SENDING, claimed_at=now, claimed_by=claimer, send_started_at=None
        )
        == 1
    )


def outbox_mark_send_started(*, message_id: int, claimer: str, now: datetime) -> bool:
    """Record, just before the HTTP request leaves, that delivery may happen; counts the attempt.

    False when this claimer no longer holds the row (recovered by another sender): do not send.
    """
    return (
        OutboxMessage.objects.filter(
            id=message_id, status=Status.SENDING, claimed_by=claimer, send_started_at__isnull=True
        ).update(send_started_at=now, attempts=F("attempts") + 1)
        == 1
    )


def outbox_release(*, message_id: int, claimer: str) -> bool:
    """SENDING → PENDING for a claimed row that was never sent (the sender is stopping)."""
    return (
        OutboxMessage.objects.filter(
            id=message_id, status=Status.SENDING, claimed_by=claimer, send_started_at__isnull=True
        ).update(status=Status.PENDING, claimed_at=None, claimed_by="")
        == 1
    )


def outbox_mark_sent(*, message_id: int, claimer: str, telegram_message_id: int, now: datetime) -> bool:
    """SENDING → SENT with Telegram's message id; False when the claim had been taken over meanwhile."""
    return (
        OutboxMessage.objects.filter(id=message_id, status=Status.SENDING, claimed_by=claimer).update(
            status=Status.SENT, sent_at=now, telegram_message_id=telegram_message_id, last_error=""
        )
        == 1
    )


def outbox_retry_later(*, message_id: int, claimer: str, next_attempt_at: datetime, error: str) -> bool:
    """SENDING → PENDING, not before `next_attempt_at` (a 429's retry_after or an error backoff)."""
    return (
        OutboxMessage.objects.filter(id=message_id, status=Status.SENDING, claimed_by=claimer).update(
            status=Status.PENDING,
            claimed_at=None,
            claimed_by="",
            send_started_at=None,
            next_attempt_at=next_attempt_at,
            last_error=scrub(error)[:2000],
        )
        == 1
    )


def outbox_fail(*, message_id: int, claimer: str, error: str) -> bool:
    """SENDING → FAILED with the scrubbed error (a permanent rejection or a bot no longer configured)."""
    return (
        OutboxMessage.objects.filter(id=message_id, status=Status.SENDING, claimed_by=claimer).update(
            status=Status.FAILED, last_error=scrub(error)[:2000]
        )
        == 1
    )
