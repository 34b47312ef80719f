"""Notification state: the per-key alert throttle, Telegram profiles and the outbox."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone

from core.fields import EncryptedTextField


class AlertThrottle(models.Model):
    """Last time an alert with this key was sent; survives a leader takeover."""

    key = models.CharField(max_length=200, primary_key=True)
    last_sent_at = models.DateTimeField()
    suppressed = models.IntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.key} @ {self.last_sent_at}"


class TelegramProfile(models.Model):
    """A user's own Telegram bot and chat (SPEC §4.9); the token is encrypted at rest and never shown."""

    user = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="telegram_profile")
    bot_token = EncryptedTextField(blank=True, default="")
    chat_id = models.CharField(max_length=64, blank=True, default="")

    def __str__(self) -> str:
        return f"telegram profile of user {self.user_id}"


class OutboxMessage(models.Model):
    """One Telegram message (or one part of a long one) waiting for, or done with, delivery.

    `bot` names the bot without storing its token: "global" (TELEGRAM_BOT_TOKEN) or "user:<id>"
    (that user's TelegramProfile.bot_token). Parts of one text share `dedupe_key`; (dedupe_key,
    part_no) is unique, which makes enqueueing idempotent. See notifications.sender for the
    state machine and the delivery guarantee.
    """

    GLOBAL_BOT = "global"

    class Status(models.TextChoices):
        PENDING = "PENDING"
        SENDING = "SENDING"
        SENT = "SENT"
        FAILED = "FAILED"

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    bot = models.CharField(max_length=32, default=GLOBAL_BOT)
    chat_id = models.CharField(max_length=64)
    dedupe_key = models.CharField(max_length=200)
    part_no = models.PositiveSmallIntegerField(default=1)
    parts = models.PositiveSmallIntegerField(default=1)
    text = models.TextField()
    status = models.CharField(max_length=8, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    claimed_at = models.DateTimeField(null=True, blank=True)
    claimed_by = models.CharField(max_length=120, blank=True, default="")
    # Set in its own commit just before the HTTP request leaves: a SENDING row without it was
    # never sent and is safe to send again; with it, delivery is unknown (see notifications.sender).
    send_started_at = models.DateTimeField(null=True, blank=True)
    sent_at = models.DateTimeField(null=True, blank=True)
    telegram_message_id = models.BigIntegerField(null=True, blank=True)
    last_error = models.TextField(blank=True, default="")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["dedupe_key", "part_no"], name="outbox_dedupe_part_unique"),
        ]
        indexes = [models.Index(fields=["status", "chat_id", "id"], name="outbox_status_chat_idx")]

    def __str__(self) -> str:
        return f"outbox {self.pk} {self.status} chat {self.chat_id} part {self.part_no}/{self.parts}"


class SummarySent(models.Model):
    """The daily summary of (user, KST day) was queued (SPEC §4.9); created with its outbox rows."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    day = models.DateField(help_text="KST calendar day")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["user", "day"], name="summarysent_unique_user_day")]
        verbose_name_plural = "summaries sent"

    def __str__(self) -> str:
        return f"summary of user {self.user_id} for {self.day}"
