"""A real runscheduler leader delivers through the outbox: one announce per term, no token in its log."""

from __future__ import annotations

import signal

import pytest

from tests.notifications.conftest import BOT_TOKEN, CHAT_ID
from tests.procs import spawn, wait_for

pytestmark = pytest.mark.subprocess


def sent(db) -> int:  # noqa: ANN001
    return db.scalar("SELECT count(*) FROM notifications_outboxmessage WHERE status = 'SENT'")


@pytest.mark.parametrize("database", ["proc_sqlite_db", pytest.param("proc_pg_db", marks=pytest.mark.postgres)])
def test_each_leader_term_is_announced_once_through_the_bot_api(database, request, bot_api):  # noqa: ANN001
    db = request.getfixturevalue(database)
    env = {
        "SCHEDULER_PROBE_JOB": "1",
        "TELEGRAM_BOT_TOKEN": BOT_TOKEN,
        "TELEGRAM_CHAT_ID": CHAT_ID,
        "TELEGRAM_API_URL": bot_api.url,
    }
    first = spawn(db, **env)
    procs = [first]
    try:
        wait_for(lambda: any("(term 1)" in t for t in bot_api.texts()), timeout=60, what="term 1 announce")
        # Killed only once SENT is committed: a kill inside the send window is the at-least-once case.
        wait_for(lambda: sent(db) == 1, timeout=30, what="term 1 announce recorded as SENT")
        first.signal(signal.SIGKILL)
        first.popen.wait(10)
        second = spawn(db, **env)
        procs.append(second)
        wait_for(lambda: any("(term 2)" in t for t in bot_api.texts()), timeout=60, what="term 2 announce")
        wait_for(lambda: sent(db) == 2, timeout=30, what="both announces recorded as SENT")
    finally:
        for proc in procs:
            proc.stop()

    texts = bot_api.texts(CHAT_ID)
    assert len(texts) == 2
    assert texts[0].startswith("scheduler leader on ") and texts[0].endswith("(term 1)")
    assert texts[1].endswith("(term 2)")
    assert {r["token"] for r in bot_api.requests} == {BOT_TOKEN}
    for proc in procs:
        assert BOT_TOKEN.split(":")[1] not in proc.log()
