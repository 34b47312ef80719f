"""The leader's outbox sender: delivers OutboxMessage rows to Telegram, in order, once (SPEC §2.4, §4.9).

State machine of a row, each arrow one short UPDATE of its own (no lock held over the network):

    PENDING --claim--> SENDING --send-started--> SENDING* --HTTP ok--> SENT
                                                         --429------> PENDING (next_attempt_at = retry_after)
                                                         --5xx/net--> PENDING (exponential backoff, cap 10 min)
                                                         --4xx------> FAILED (scrubbed error)

Delivery guarantee. Telegram's sendMessage has no idempotency key and no way to ask "did message X
arrive", so the only ambiguity is a sender that dies (or loses the database) after its request
may have left and before SENT is committed. The extra `send_started_at` commit, made right before
the HTTP call, separates the two SENDING cases:

- claimed, `send_started_at` empty: the request never left this process. Any sender returns the row
  to PENDING at once and sends it (exactly once). The send-started UPDATE is conditional on the
  claim, so a sender whose claim was recovered meanwhile sees 0 rows and does not send.
- `send_started_at` set (SENDING*): delivery unknown. The row blocks its chat (ordering) until it is
  STALE_AFTER (60 s) old - longer than the HTTP timeout plus the SENT retries of a live sender -
  and is then sent again: at-least-once in this one window, one HTTP round trip wide. We chose a
  possible duplicate over a possible silent loss: a lost alert or summary goes unnoticed, a
  duplicate is visible and harmless. A network error or timeout during the call is retried under
  the same rule. A SENT commit that fails is retried in memory first, so a database blip does not
  turn into a duplicate.

Order and pace: per chat, rows go in id order (a chat's later rows wait behind its head); at most
one message per second per chat (seeded from the last sent_at after a restart); a 429 makes the
chat wait retry_after. Two senders briefly alive at once (a leader stepping down while the next
one starts) cannot send the same row: every transition is conditional on the claimer.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django.db import DatabaseError, close_old_connections, connection
from django.utils import timezone

from core.scrub import scrub
from notifications.models import OutboxMessage
from notifications.selectors import outbox_chat_heads, outbox_last_sent_at
from notifications.services import (
    outbox_bot_token,
    outbox_claim,
    outbox_fail,
    outbox_mark_send_started,
    outbox_mark_sent,
    outbox_recover,
    outbox_release,
    outbox_retry_later,
)
from notifications.telegram import (
    TelegramPermanentError,
    TelegramRetryAfter,
    TelegramTemporaryError,
    send_message,
)

logger = logging.getLogger(__name__)

POLL_EVERY = 1.0  # seconds between looks at the outbox when nothing is due sooner
MIN_INTERVAL = timedelta(seconds=1)  # per chat
STALE_AFTER = timedelta(seconds=60)  # > HTTP timeout (15 s) + SENT retries (~8 s)
BACKOFF_BASE = 2.0
BACKOFF_CAP = 600.0
ACK_RETRY_DELAYS = (0.0, 0.5, 1.0, 2.0, 4.0)

Fault = Callable[[str, OutboxMessage], None]


def backoff_seconds(attempts: int) -> float:
    """2, 4, 8 … seconds after the 1st, 2nd, 3rd … attempt, at most 10 minutes."""
    return min(BACKOFF_BASE * 2 ** max(attempts - 1, 0), BACKOFF_CAP)


class OutboxSender:
    """Leader-only thread delivering the outbox; stop() stops it before its next send.

    `now`, `sleep`, `send` and `fault` are injectable for tests: a fake clock, a fake sleep, a
    fake Bot API, and a hook called at the points "claimed" (before the request) and "sent"
    (before SENT is committed) that can simulate a crash by raising.
    """

    def __init__(
        self,
        host: Any,
        *,
        now: Callable[[], datetime] = timezone.now,
        sleep: Callable[[float], Any] | None = None,
        send: Callable[..., int] = send_message,
        fault: Fault | None = None,
    ):
        self.host = host
        instance = getattr(host, "instance_id", "sender")
        self.claimer = f"{instance}/t{getattr(host, 'term', None)}/{uuid.uuid4().hex[:8]}"[-120:]
        self._stop = threading.Event()
        self._now = now
        self._sleep = sleep or self._stop.wait
        self._send = send
        self._fault = fault
        self._chat_ready_at: dict[str, datetime] = {}
        self._thread = threading.Thread(target=self._loop, name="outbox-sender", daemon=True)

    # --- thread ----------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """No new send starts after this returns; a request already in flight completes and is recorded."""
        self._stop.set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        failures = 0
        try:
            while not self._stop.is_set():
                try:
                    close_old_connections()
                    wait = self.run_once()
                    failures = 0
                except DatabaseError as exc:
                    # An outage: back off quietly (1, 2, 4 … 30 s); the rows wait in the database.
                    failures += 1
                    wait = min(POLL_EVERY * 2 ** (failures - 1), 30.0)
                    logger.warning("outbox sender: database unavailable (%s); retrying in %.0f s", exc, wait)
                except Exception:
                    logger.exception("outbox sender failed; retrying")
                    wait = POLL_EVERY
                finally:
                    close_old_connections()
                if not self._stop.is_set():
                    self._sleep(wait)
        finally:
            connection.close()

    # --- one pass ----------------------------------------------------------------
    def run_once(self) -> float:
        """Recover orphaned claims, then send each chat's head if it is due. Returns seconds to wait."""
        recovered, unknown = outbox_recover(now=self._now(), stale_after=STALE_AFTER)
        if recovered or unknown:
            logger.info("outbox: %d unsent and %d unknown-delivery claims returned to pending", recovered, unknown)
        wait = POLL_EVERY
        for row in outbox_chat_heads():
            if self._stop.is_set():
                break
            if row.status != OutboxMessage.Status.PENDING:
                continue  # delivery unknown: the chat waits until the row is recovered
            now = self._now()
            due = max(row.next_attempt_at, self._chat_ready(row.chat_id, now))
            if due > now:
                wait = min(wait, (due - now).total_seconds())
                continue
            self._deliver(row)
            wait = min(wait, MIN_INTERVAL.total_seconds())
        return max(wait, 0.01)

    def _chat_ready(self, chat_id: str, now: datetime) -> datetime:
        ready = self._chat_ready_at.get(chat_id)
        if ready is None:
            last = outbox_last_sent_at(chat_id=chat_id)
            ready = last + MIN_INTERVAL if last else now
            self._chat_ready_at[chat_id] = ready
        return ready

    def _deliver(self, row: OutboxMessage) -> None:
        if not outbox_claim(message_id=row.pk, claimer=self.claimer, now=self._now()):
            return
        try:
            token = outbox_bot_token(bot=row.bot)
        except ValueError as exc:  # a stored token that no longer decrypts
            token, problem = "", scrub(exc)
        else:
            problem = f"bot {row.bot!r} is not configured"
        if not token:
            outbox_fail(message_id=row.pk, claimer=self.claimer, error=problem)
            logger.error("outbox %s to chat %s failed: %s", row.pk, row.chat_id, problem)
            return
        self._inject("claimed", row)
        if self._stop.is_set():
            outbox_release(message_id=row.pk, claimer=self.claimer)
            return
        if not outbox_mark_send_started(message_id=row.pk, claimer=self.claimer, now=self._now()):
            logger.warning("outbox %s: claim taken over before sending; not sent", row.pk)
            return
        # From here until outbox_mark_sent commits, a crash leaves the delivery unknown (module doc).
        try:
            message_id = self._send(token=token, chat_id=row.chat_id, text=row.text)
        except TelegramRetryAfter as exc:
            until = self._now() + timedelta(seconds=exc.retry_after)
            self._chat_ready_at[row.chat_id] = until
            outbox_retry_later(message_id=row.pk, claimer=self.claimer, next_attempt_at=until, error=str(exc))
            logger.warning("outbox %s: chat %s rate limited for %.0f s", row.pk, row.chat_id, exc.retry_after)
            return
        except TelegramTemporaryError as exc:
            now = self._now()
            delay = backoff_seconds(row.attempts + 1)
            self._chat_ready_at[row.chat_id] = now + MIN_INTERVAL
            outbox_retry_later(
                message_id=row.pk, claimer=self.claimer, next_attempt_at=now + timedelta(seconds=delay), error=str(exc)
            )
            logger.warning("outbox %s: temporary error (%s); retrying in %.0f s", row.pk, exc, delay)
            return
        except TelegramPermanentError as exc:
            self._chat_ready_at[row.chat_id] = self._now() + MIN_INTERVAL
            outbox_fail(message_id=row.pk, claimer=self.claimer, error=str(exc))
            logger.error("outbox %s to chat %s failed permanently: %s", row.pk, row.chat_id, exc)
            return
        sent_at = self._now()
        self._chat_ready_at[row.chat_id] = sent_at + MIN_INTERVAL
        self._inject("sent", row)
        self._ack(row, message_id, sent_at)

    def _ack(self, row: OutboxMessage, message_id: int, sent_at: datetime) -> None:
        for delay in ACK_RETRY_DELAYS:
            if delay:
                time.sleep(delay)
            try:
                if outbox_mark_sent(
                    message_id=row.pk, claimer=self.claimer, telegram_message_id=message_id, now=sent_at
                ):
                    logger.info("outbox %s sent to chat %s as message %s", row.pk, row.chat_id, message_id)
                else:
                    logger.warning(
                        "outbox %s sent as message %s, but its claim had been taken over", row.pk, message_id
                    )
                return
            except DatabaseError as exc:
                logger.warning("outbox %s sent, recording it failed (%s); retrying", row.pk, exc)
                close_old_connections()
        logger.error(
            "outbox %s sent as message %s but not recorded; it will be sent again after %s",
            row.pk,
            message_id,
            STALE_AFTER,
        )

    def _inject(self, point: str, row: OutboxMessage) -> None:
        if self._fault is not None:
            self._fault(point, row)
