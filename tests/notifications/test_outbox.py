"""Enqueueing: targets, idempotency, HTML-safe splitting, throttled alerts, the leader announce."""

from __future__ import annotations

import logging
from datetime import timedelta
from html.parser import HTMLParser
from types import SimpleNamespace

import pytest
import time_machine
from django.db import connection
from django.utils import timezone
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from core.runtime import HOST
from notifications.formatting import text_split, tg_len
from notifications.models import AlertThrottle, OutboxMessage, TelegramProfile
from notifications.services import alert_raise, outbox_enqueue
from scheduler import runner
from scheduler.services import leader_announce
from tests.notifications.conftest import BOT_TOKEN, CHAT_ID, USER_BOT_TOKEN

pytestmark = pytest.mark.django_db


class _Balance(HTMLParser):
    """Fails on a closing tag that does not match, or on tags left open at the end."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=False)
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):  # noqa: ANN001, ANN201
        self.stack.append(tag)

    def handle_endtag(self, tag):  # noqa: ANN001, ANN201
        assert self.stack and self.stack[-1] == tag, f"unbalanced </{tag}> with {self.stack}"
        self.stack.pop()


def _assert_well_formed(part: str) -> None:
    parser = _Balance()
    parser.feed(part)
    parser.close()
    assert parser.stack == [], f"left open: {parser.stack}"


def _plain(text: str) -> str:
    """Visible text without tags and whitespace, to compare a split against its original."""
    out = []

    class Collect(HTMLParser):
        def handle_data(self, data):  # noqa: ANN001, ANN201
            out.append(data)

    Collect(convert_charrefs=True).feed(text)
    return "".join("".join(out).split())


# --- targets and idempotency ---------------------------------------------------------------------


def test_global_target_stores_a_bot_reference_not_the_token(telegram):  # noqa: ANN001
    [row] = outbox_enqueue(text="hello")

    assert (row.bot, row.chat_id, row.status, row.part_no, row.parts) == ("global", CHAT_ID, "PENDING", 1, 1)
    stored = OutboxMessage.objects.filter(pk=row.pk).values().get()
    assert all(BOT_TOKEN not in str(value) for value in stored.values())


def test_user_with_profile_gets_their_own_bot_and_chat(telegram, plain_user):  # noqa: ANN001
    TelegramProfile.objects.create(user=plain_user, bot_token=USER_BOT_TOKEN, chat_id="555")

    [row] = outbox_enqueue(text="your summary", user=plain_user)

    assert (row.bot, row.chat_id, row.user_id) == (f"user:{plain_user.pk}", "555", plain_user.pk)
    stored = OutboxMessage.objects.filter(pk=row.pk).values().get()
    assert all(USER_BOT_TOKEN not in str(value) for value in stored.values())
    with connection.cursor() as cursor:
        cursor.execute("SELECT bot_token FROM notifications_telegramprofile WHERE user_id = %s", [plain_user.pk])
        [(raw,)] = cursor.fetchall()
    assert raw and USER_BOT_TOKEN not in raw  # encrypted at rest


def test_user_without_profile_falls_back_to_the_global_bot(telegram, plain_user):  # noqa: ANN001
    [row] = outbox_enqueue(text="x", user=plain_user)
    assert (row.bot, row.chat_id) == ("global", CHAT_ID)


def test_user_with_chat_only_uses_the_global_bot_in_their_chat(telegram, plain_user):  # noqa: ANN001
    TelegramProfile.objects.create(user=plain_user, chat_id="777")
    [row] = outbox_enqueue(text="x", user=plain_user)
    assert (row.bot, row.chat_id) == ("global", "777")


def test_nothing_configured_enqueues_nothing(no_telegram, plain_user):  # noqa: ANN001
    assert outbox_enqueue(text="hello") == []
    assert outbox_enqueue(text="hello", user=plain_user) == []
    assert OutboxMessage.objects.count() == 0


def test_user_bot_without_global_configuration_still_delivers(no_telegram, plain_user):  # noqa: ANN001
    TelegramProfile.objects.create(user=plain_user, bot_token=USER_BOT_TOKEN, chat_id="555")
    assert [row.bot for row in outbox_enqueue(text="x", user=plain_user)] == [f"user:{plain_user.pk}"]
    assert outbox_enqueue(text="operator only") == []


def test_dedupe_key_makes_enqueue_idempotent(telegram):  # noqa: ANN001
    first = outbox_enqueue(text="once\n" * 2000, dedupe_key="summary:1:2026-11-24")
    again = outbox_enqueue(text="once\n" * 2000, dedupe_key="summary:1:2026-11-24")

    assert len(first) > 1
    assert [row.pk for row in again] == [row.pk for row in first]
    assert OutboxMessage.objects.count() == len(first)
    # Without a key every call is a new message.
    outbox_enqueue(text="a")
    outbox_enqueue(text="a")
    assert OutboxMessage.objects.filter(text="a").count() == 2


# --- splitting ---------------------------------------------------------------------------------


def test_long_html_is_split_below_4096_at_lines_without_breaking_tags(telegram):  # noqa: ANN001
    lines = [f'<b>line {i}</b> &amp; <a href="https://example.com/{i}">trade {i}</a> 📈 done' for i in range(300)]
    text = "<i>report</i>\n<pre>" + "\n".join(lines) + "</pre>\n<b>end</b>"

    rows = outbox_enqueue(text=text, dedupe_key="long-1")

    assert len(rows) >= 3
    assert [(row.part_no, row.parts) for row in rows] == [(n, len(rows)) for n in range(1, len(rows) + 1)]
    assert {row.dedupe_key for row in rows} == {"long-1"}
    for row in rows:
        assert tg_len(row.text) < 4096
        _assert_well_formed(row.text)
        assert row.text.startswith(("<i>", "<pre>"))  # <pre> reopened in every later part
        assert "&amp" not in row.text.replace("&amp;", "")  # no entity cut in half
    for row in rows[:-1]:
        inner = row.text.removesuffix("</pre>")
        assert inner.endswith("done"), "a part ends at the end of a line"
    assert _plain("".join(row.text for row in rows)) == _plain(text)


def test_a_single_huge_line_is_cut_at_spaces_then_anywhere():  # noqa: ANN001
    words = text_split("<b>" + " ".join(["word"] * 3000) + "</b>")
    blob = text_split("x" * 9000)

    assert all(tg_len(part) < 4096 for part in words + blob)
    assert all(part.startswith("<b>") and part.endswith("</b>") for part in words)
    assert "".join(blob) == "x" * 9000


_tag = st.sampled_from(["b", "i", "u", "s", "code", "pre", "tg-spoiler"])
_word = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<>&"), min_size=1, max_size=40)


@st.composite
def _html(draw):  # noqa: ANN001, ANN202
    out = []
    for _ in range(draw(st.integers(1, 400))):
        piece = draw(st.one_of(_word, st.just("&amp;"), st.just("&lt;"), st.just("\n")))
        if draw(st.booleans()):
            tag = draw(_tag)
            piece = f"<{tag}>{piece}</{tag}>"
        out.append(piece)
        out.append(draw(st.sampled_from([" ", "\n", ""])))
    return "".join(out) * draw(st.integers(1, 12))


@hyp_settings(max_examples=25, deadline=None)
@given(_html())
def test_split_property_every_part_fits_and_is_well_formed(text):  # noqa: ANN001
    parts = text_split(text)
    for part in parts:
        assert tg_len(part) < 4096
        _assert_well_formed(part)
    assert _plain("".join(parts)) == _plain(text)


# --- alerts ---------------------------------------------------------------------------------


def test_alert_enqueues_once_per_ten_minutes_per_key(telegram, caplog):  # noqa: ANN001
    start = timezone.now()
    with time_machine.travel(start, tick=False):
        assert alert_raise(key="job:x", text="Job x failed: <ValueError> boom") is True
        assert alert_raise(key="job:x", text="Job x failed again") is False
        assert alert_raise(key="job:y", text="Job y failed") is True
    with time_machine.travel(start + timedelta(minutes=9, seconds=59), tick=False):
        assert alert_raise(key="job:x", text="still failing") is False
    with time_machine.travel(start + timedelta(minutes=10, seconds=1), tick=False):
        assert alert_raise(key="job:x", text="Job x failed at last") is True

    texts = list(OutboxMessage.objects.order_by("id").values_list("text", flat=True))
    assert len(texts) == 3
    assert texts[0].startswith("⚠️ <b>ALERT</b> <code>job:x</code>")
    assert "&lt;ValueError&gt; boom" in texts[0]  # the alert text is escaped for HTML mode
    assert "job:y" in texts[1]
    assert "Job x failed at last" in texts[2] and "(+2 suppressed)" in texts[2]
    assert AlertThrottle.objects.get(key="job:x").suppressed == 0
    assert len([r for r in caplog.records if r.levelno == logging.ERROR and r.getMessage().startswith("ALERT")]) == 3


def test_alert_text_is_scrubbed_before_it_is_queued(telegram, caplog):  # noqa: ANN001
    alert_raise(key="job:leak", text=f"GET https://api.telegram.org/bot{BOT_TOKEN}/sendMessage failed")

    [row] = OutboxMessage.objects.all()
    assert BOT_TOKEN not in row.text and "/bot***/sendMessage" in row.text
    assert BOT_TOKEN not in caplog.text


def test_alert_without_telegram_is_logged_and_not_queued(no_telegram, caplog):  # noqa: ANN001
    assert alert_raise(key="job:z", text="boom") is True
    assert OutboxMessage.objects.count() == 0
    assert any(r.getMessage() == "ALERT job:z: boom" for r in caplog.records)


# --- leader announce ---------------------------------------------------------------------------


def test_leader_announce_once_per_term(telegram):  # noqa: ANN001
    leader_announce(host=SimpleNamespace(term=4))
    leader_announce(host=SimpleNamespace(term=4))  # the hook re-run in the same term
    leader_announce(host=SimpleNamespace(term=5))
    leader_announce(host=SimpleNamespace(term=None))  # stepped down before the hook ran

    assert list(OutboxMessage.objects.order_by("id").values_list("text", "dedupe_key")) == [
        (f"scheduler leader on {HOST} (term 4)", "leader-term-4"),
        (f"scheduler leader on {HOST} (term 5)", "leader-term-5"),
    ]


def test_leader_announce_without_telegram_queues_nothing(no_telegram):  # noqa: ANN001
    assert leader_announce(host=SimpleNamespace(term=1)) == []
    assert OutboxMessage.objects.count() == 0


def test_runner_wires_the_sender_and_the_announce():
    assert "notifications.sender:OutboxSender" in runner.LEADER_THREADS
    assert "scheduler.services:leader_announce" in runner.LEADER_HOOKS
