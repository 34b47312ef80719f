"""The outbox sender: order, pace, 429/backoff, permanent failures, crashes, restarts, stop, no token leaks."""

from __future__ import annotations

import socket
import time
from datetime import timedelta

import pytest

from notifications.models import OutboxMessage, TelegramProfile
from notifications.sender import STALE_AFTER, OutboxSender, backoff_seconds
from notifications.services import outbox_enqueue
from notifications.telegram import send_message
from tests.notifications.conftest import BOT_TOKEN, CHAT_ID, USER_BOT_TOKEN, bad_request, server_error, too_many

Status = OutboxMessage.Status


class Crash(BaseException):
    """A process death at an injected point: nothing in the sender handles it or cleans up."""


def make_sender(host, clock, *, fault=None, calls=None):  # noqa: ANN001, ANN201
    """A sender on the fake clock whose send() also records the (fake) time of each request."""

    def send(**kwargs):  # noqa: ANN003, ANN202
        if calls is not None:
            calls.append((clock.now(), kwargs["chat_id"]))
        return send_message(**kwargs)

    return OutboxSender(host, now=clock.now, sleep=clock.sleep, send=send, fault=fault)


def drain(sender, clock, *, limit: int = 200) -> None:  # noqa: ANN001
    """Run passes, sleeping on the fake clock, until nothing is PENDING or SENDING."""
    for _ in range(limit):
        if not OutboxMessage.objects.filter(status__in=[Status.PENDING, Status.SENDING]).exists():
            return
        clock.sleep(sender.run_once())
    raise AssertionError("outbox did not drain")


@pytest.mark.django_db
def test_delivers_in_id_order_at_most_one_per_second_per_chat(telegram, host, clock, settings):  # noqa: ANN001
    settings.TELEGRAM_CHAT_ID = "chat-a"
    for i in range(4):
        outbox_enqueue(text=f"a{i}")
    settings.TELEGRAM_CHAT_ID = "chat-b"
    for i in range(2):
        outbox_enqueue(text=f"b{i}")
    calls: list = []

    drain(make_sender(host, clock, calls=calls), clock)

    assert telegram.texts("chat-a") == ["a0", "a1", "a2", "a3"]
    assert telegram.texts("chat-b") == ["b0", "b1"]
    for chat in ("chat-a", "chat-b"):
        times = [t for t, c in calls if c == chat]
        gaps = [(later - earlier).total_seconds() for earlier, later in zip(times, times[1:], strict=False)]
        assert gaps and min(gaps) >= 1.0, gaps
    # Two chats go in parallel: chat-b did not wait for all of chat-a.
    first_b = next(t for t, c in calls if c == "chat-b")
    last_a = [t for t, c in calls if c == "chat-a"][-1]
    assert first_b < last_a
    rows = list(OutboxMessage.objects.order_by("id"))
    assert all(row.status == Status.SENT and row.telegram_message_id and row.sent_at for row in rows)
    assert all(row.attempts == 1 for row in rows)


@pytest.mark.django_db
def test_rate_limit_survives_a_restart(telegram, host, clock):  # noqa: ANN001
    outbox_enqueue(text="one")
    outbox_enqueue(text="two")
    calls: list = []
    first = make_sender(host, clock, calls=calls)
    first.run_once()
    assert telegram.texts() == ["one"]

    second = make_sender(host, clock, calls=calls)  # a new leader: no in-memory pace
    wait = second.run_once()
    assert telegram.texts() == ["one"] and 0 < wait <= 1.0
    drain(second, clock)
    assert telegram.texts() == ["one", "two"]
    assert (calls[1][0] - calls[0][0]).total_seconds() >= 1.0


@pytest.mark.django_db
def test_429_retry_after_is_honoured_for_the_chat(telegram, host, clock):  # noqa: ANN001
    telegram.queue(too_many(30))
    [first] = outbox_enqueue(text="first")
    outbox_enqueue(text="second")
    calls: list = []
    sender = make_sender(host, clock, calls=calls)
    t0 = clock.now()

    sender.run_once()
    first.refresh_from_db()
    assert first.status == Status.PENDING
    assert first.next_attempt_at >= t0 + timedelta(seconds=30)
    assert "429" in first.last_error
    clock.advance(29)
    sender.run_once()
    assert len(telegram.requests) == 1  # neither the row nor the chat's next row went early

    drain(sender, clock)
    assert telegram.texts() == ["first", "first", "second"]
    assert (calls[1][0] - calls[0][0]).total_seconds() >= 30
    first.refresh_from_db()
    assert (first.status, first.last_error) == (Status.SENT, "")


@pytest.mark.django_db
def test_temporary_errors_back_off_exponentially(telegram, host, clock):  # noqa: ANN001
    telegram.queue(server_error(), server_error(), server_error())
    [row] = outbox_enqueue(text="flaky")
    calls: list = []

    drain(make_sender(host, clock, calls=calls), clock)

    gaps = [(b[0] - a[0]).total_seconds() for a, b in zip(calls, calls[1:], strict=False)]
    assert len(calls) == 4
    assert gaps[0] >= backoff_seconds(1) and gaps[1] >= backoff_seconds(2) and gaps[2] >= backoff_seconds(3)
    row.refresh_from_db()
    assert (row.status, row.attempts) == (Status.SENT, 4)
    assert backoff_seconds(1) == 2 and backoff_seconds(30) == 600


@pytest.mark.django_db
def test_permanent_error_fails_the_row_with_a_scrubbed_error_and_the_chat_moves_on(telegram, host, clock, caplog):  # noqa: ANN001
    telegram.queue(bad_request(f"Bad Request: chat not found (bot{BOT_TOKEN})"))
    [bad] = outbox_enqueue(text="lost cause")
    [good] = outbox_enqueue(text="next")

    drain(make_sender(host, clock), clock)

    bad.refresh_from_db()
    good.refresh_from_db()
    assert bad.status == Status.FAILED and "chat not found" in bad.last_error
    assert good.status == Status.SENT
    assert BOT_TOKEN not in bad.last_error and BOT_TOKEN.split(":")[1] not in bad.last_error
    assert BOT_TOKEN not in caplog.text


@pytest.mark.django_db
def test_network_errors_never_put_the_token_in_rows_or_logs(telegram, host, clock, settings, caplog):  # noqa: ANN001
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        settings.TELEGRAM_API_URL = f"http://127.0.0.1:{sock.getsockname()[1]}"
    [row] = outbox_enqueue(text="into the void")

    make_sender(host, clock).run_once()

    row.refresh_from_db()
    assert row.status == Status.PENDING and row.attempts == 1
    assert "network error" in row.last_error and "sendMessage" in row.last_error
    secret = BOT_TOKEN.split(":")[1]
    assert secret not in row.last_error
    assert secret not in caplog.text
    assert any("temporary error" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_user_bot_is_used_for_the_users_messages(telegram, host, clock, plain_user):  # noqa: ANN001
    TelegramProfile.objects.create(user=plain_user, bot_token=USER_BOT_TOKEN, chat_id="555")
    outbox_enqueue(text="mine", user=plain_user)
    outbox_enqueue(text="ops")

    drain(make_sender(host, clock), clock)

    assert {(r["token"], r["chat_id"], r["text"]) for r in telegram.requests} == {
        (USER_BOT_TOKEN, "555", "mine"),
        (BOT_TOKEN, CHAT_ID, "ops"),
    }


@pytest.mark.django_db
def test_a_bot_no_longer_configured_fails_the_row(telegram, host, clock, plain_user):  # noqa: ANN001
    profile = TelegramProfile.objects.create(user=plain_user, bot_token=USER_BOT_TOKEN, chat_id="555")
    [row] = outbox_enqueue(text="mine", user=plain_user)
    profile.delete()

    make_sender(host, clock).run_once()

    row.refresh_from_db()
    assert row.status == Status.FAILED and "not configured" in row.last_error
    assert telegram.requests == []


@pytest.mark.django_db
def test_long_text_parts_are_delivered_in_order(telegram, host, clock):  # noqa: ANN001
    text = "\n".join(f"<b>{i:05d}</b> " + "x" * 60 for i in range(200))
    rows = outbox_enqueue(text=text, dedupe_key="summary-parts")

    drain(make_sender(host, clock), clock)

    assert telegram.texts() == [row.text for row in rows]
    assert all(len(t) < 4096 for t in telegram.texts())


# --- crashes and restarts ---------------------------------------------------------------------


@pytest.mark.django_db
def test_crash_between_claim_and_send_neither_loses_nor_duplicates(telegram, host, clock):  # noqa: ANN001
    [row] = outbox_enqueue(text="exactly once")

    def crash_after_claim(point, message):  # noqa: ANN001, ANN202
        if point == "claimed":
            raise Crash

    with pytest.raises(Crash):
        make_sender(host, clock, fault=crash_after_claim).run_once()
    row.refresh_from_db()
    assert row.status == Status.SENDING and row.send_started_at is None
    assert telegram.requests == []

    restarted = make_sender(host, clock)  # the next leader, a second later
    clock.advance(1)
    drain(restarted, clock)
    restarted.run_once()
    make_sender(host, clock).run_once()  # and yet another restart

    assert telegram.texts() == ["exactly once"]
    row.refresh_from_db()
    assert row.status == Status.SENT and row.telegram_message_id == telegram.next_message_id


@pytest.mark.django_db
def test_restart_after_sent_does_not_resend(telegram, host, clock):  # noqa: ANN001
    outbox_enqueue(text="done")
    drain(make_sender(host, clock), clock)
    clock.advance(STALE_AFTER.total_seconds() * 3)

    for _ in range(3):
        make_sender(host, clock).run_once()

    assert telegram.texts() == ["done"]


@pytest.mark.django_db
def test_crash_after_send_before_sent_is_the_one_at_least_once_window(telegram, host, clock):  # noqa: ANN001
    [row] = outbox_enqueue(text="maybe twice")
    [later] = outbox_enqueue(text="behind it")

    def crash_after_send(point, message):  # noqa: ANN001, ANN202
        if point == "sent":
            raise Crash

    with pytest.raises(Crash):
        make_sender(host, clock, fault=crash_after_send).run_once()
    assert telegram.texts() == ["maybe twice"]

    restarted = make_sender(host, clock)
    clock.advance(STALE_AFTER.total_seconds() - 5)
    restarted.run_once()
    # Delivery unknown and not yet stale: nothing is re-sent, and the chat keeps its order.
    assert telegram.texts() == ["maybe twice"]
    row.refresh_from_db()
    assert row.status == Status.SENDING and row.send_started_at is not None

    clock.advance(10)
    drain(restarted, clock)
    assert telegram.texts() == ["maybe twice", "maybe twice", "behind it"]
    row.refresh_from_db()
    later.refresh_from_db()
    assert row.status == later.status == Status.SENT
    assert row.attempts == 2


@pytest.mark.django_db
def test_two_senders_never_send_the_same_row(telegram, host, clock):  # noqa: ANN001
    [row] = outbox_enqueue(text="contended")
    other = make_sender(host, clock)

    def other_sender_runs_meanwhile(point, message):  # noqa: ANN001, ANN202
        if point == "claimed":
            other.run_once()  # recovers the unsent claim and delivers it

    make_sender(host, clock, fault=other_sender_runs_meanwhile).run_once()

    assert telegram.texts() == ["contended"]
    row.refresh_from_db()
    assert row.status == Status.SENT and row.claimed_by == other.claimer


@pytest.mark.django_db
def test_stop_between_claim_and_send_releases_the_row(telegram, host, clock):  # noqa: ANN001
    [row] = outbox_enqueue(text="after stop")
    sender = None

    def stop_now(point, message):  # noqa: ANN001, ANN202
        sender.stop()

    sender = make_sender(host, clock, fault=stop_now)
    sender.run_once()

    row.refresh_from_db()
    assert telegram.requests == []
    assert (row.status, row.claimed_by, row.attempts) == (Status.PENDING, "", 0)


# --- the real thread ---------------------------------------------------------------------------


def _wait_for(predicate, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.django_db(transaction=True)
def test_thread_delivers_and_sends_nothing_after_stop(telegram, host):  # noqa: ANN001
    [row] = outbox_enqueue(text="while leader")
    sender = OutboxSender(host)
    sender.start()
    try:
        assert _wait_for(lambda: OutboxMessage.objects.filter(pk=row.pk, status=Status.SENT).exists())
    finally:
        sender.stop()
        sender.join(timeout=10)
    assert not sender.is_alive()

    [after] = outbox_enqueue(text="after leadership was lost")
    time.sleep(1.5)

    assert telegram.texts() == ["while leader"]
    after.refresh_from_db()
    assert after.status == Status.PENDING
