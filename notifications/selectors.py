"""Notification reads: the outbox's next message per chat, and a chat's last delivery."""

from __future__ import annotations

from datetime import datetime

from django.db.models import Max, Min

from notifications.models import OutboxMessage

Status = OutboxMessage.Status


def outbox_chat_heads(*, limit: int = 500) -> list[OutboxMessage]:
    """The oldest undelivered (PENDING or SENDING) row of each chat, oldest chat first.

    Delivery is in id order per chat: a chat's later rows wait while its head is backing off,
    rate limited or of unknown delivery (SENDING).
    """
    head_ids = (
        OutboxMessage.objects.filter(status__in=[Status.PENDING, Status.SENDING])
        .values("chat_id")
        .annotate(head=Min("id"))
        .order_by("head")
        .values_list("head", flat=True)[:limit]
    )
    return list(OutboxMessage.objects.filter(id__in=list(head_ids)).order_by("id"))


def outbox_last_sent_at(*, chat_id: str) -> datetime | None:
    """When this chat last got a message from the outbox (seeds the per-chat rate limit after a restart)."""
    return OutboxMessage.objects.filter(chat_id=chat_id, sent_at__isnull=False).aggregate(last=Max("sent_at"))["last"]
