"""Live feed `ws/scheduler/` and the dashboard page (SPEC §2.5): staff only, polling with an id cursor."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client
from django.utils import timezone

from scheduler import consumers
from scheduler.consumers import CLOSE_FORBIDDEN, FeedCursor, SchedulerFeedConsumer, feed_poll, feed_start
from scheduler.models import JobControl, JobRun, SchedulerInstance
from scheduler.registry import registry_specs_lenient
from scheduler.selectors import jobrun_max_id
from tradingsite.asgi import application

FEED_PATH = "/ws/scheduler/"
ORIGIN = (b"origin", b"http://testserver")


def make_run(job_id: str = "rebalance_order_queue", *, run_id: int | None = None, **fields: Any) -> JobRun:
    now = timezone.now()
    values = {
        "job_id": job_id,
        "scheduled_at": now - timedelta(milliseconds=20),
        "term": 3,
        "host": "alpha",
        "pid": 4242,
        "started_at": now,
        "lateness_ms": 20,
        "outcome": JobRun.Outcome.OK,
        "duration_ms": 7,
        "finished_at": now,
        "summary": "moved 0 orders",
    }
    values.update(fields)
    if run_id is not None:
        values["id"] = run_id
    return JobRun.objects.create(**values)


def session_headers(user) -> list[tuple[bytes, bytes]]:  # noqa: ANN001
    client = Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    return [ORIGIN, (b"cookie", cookie.encode())]


async def receive_until(
    communicator: WebsocketCommunicator, predicate: Callable[[dict], bool], *, timeout: float
) -> tuple[dict, list[dict]]:
    """The first JSON message matching `predicate` within `timeout` seconds, and every message before it."""
    deadline = time.monotonic() + timeout
    seen: list[dict] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no matching message within {timeout} s; got {seen}")
        message = await communicator.receive_json_from(timeout=left)
        if predicate(message):
            return message, seen
        seen.append(message)


@pytest.fixture
def fast_poll(monkeypatch):
    monkeypatch.setattr(SchedulerFeedConsumer, "poll_interval", 0.1)


# --- the websocket ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_staff_gets_snapshot_then_a_jobrun_inserted_after_connect(staff_user):
    headers = session_headers(staff_user)
    registry_ids = [spec.id for spec in registry_specs_lenient()]

    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, FEED_PATH, headers=headers)
        connected, _ = await communicator.connect(timeout=5)
        assert connected
        snapshot = await communicator.receive_json_from(timeout=5)
        assert snapshot["type"] == "snapshot"
        assert [job["id"] for job in snapshot["jobs"]] == registry_ids
        assert set(snapshot) >= {"running", "leader", "standbys", "jobs"}

        run = await database_sync_to_async(make_run)("update_price_cache", summary="3 prices")
        started = time.monotonic()
        message, _ = await receive_until(communicator, lambda m: m["type"] == "jobrun" and m["id"] == run.id, timeout=5)
        # The real one-second poll: the run shows up within a couple of polls.
        assert time.monotonic() - started < 3
        assert message["job_id"] == "update_price_cache"
        assert message["outcome"] == "ok"
        assert message["duration_ms"] == 7
        assert message["lateness_ms"] == 20
        assert message["summary"] == "3 prices"
        # Datetimes in the scheduler time zone, with their offset.
        assert message["scheduled_at"].endswith("+09:00")
        assert "next_run" in message
        await communicator.disconnect()

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_running_run_is_sent_again_when_it_finishes(staff_user, fast_poll):
    headers = session_headers(staff_user)

    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, FEED_PATH, headers=headers)
        assert (await communicator.connect(timeout=5))[0]
        await receive_until(communicator, lambda m: m["type"] == "snapshot", timeout=5)

        run = await database_sync_to_async(make_run)(
            outcome=JobRun.Outcome.RUNNING, duration_ms=None, finished_at=None, summary=""
        )
        first, _ = await receive_until(communicator, lambda m: m.get("id") == run.id, timeout=5)
        assert first["outcome"] == "running"

        await database_sync_to_async(_finish)(run.pk)
        second, _ = await receive_until(communicator, lambda m: m.get("id") == run.id, timeout=5)
        assert (second["outcome"], second["duration_ms"], second["summary"]) == ("error", 12, "boom")
        await communicator.disconnect()

    async_to_sync(scenario)()


def _finish(run_id: int) -> None:
    JobRun.objects.filter(pk=run_id).update(
        outcome=JobRun.Outcome.ERROR, duration_ms=12, summary="boom", finished_at=timezone.now()
    )


@pytest.mark.django_db(transaction=True)
def test_heartbeats_stream_as_instances_messages(staff_user, fast_poll):
    headers = session_headers(staff_user)

    def upsert_standby(beat: timedelta) -> None:
        now = timezone.now()
        SchedulerInstance.objects.update_or_create(
            instance_id="beta:77:bb",
            defaults={
                "host": "beta",
                "pid": 77,
                "role": SchedulerInstance.Role.STANDBY,
                "started_at": now - timedelta(minutes=5),
                "last_heartbeat": now - beat,
            },
        )

    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, FEED_PATH, headers=headers)
        assert (await communicator.connect(timeout=5))[0]
        snapshot = await communicator.receive_json_from(timeout=5)
        assert snapshot["standbys"] == []

        await database_sync_to_async(upsert_standby)(timedelta(seconds=1))
        first, _ = await receive_until(communicator, lambda m: m["type"] == "instances", timeout=5)
        assert first["leader"] is None
        assert [(s["host"], s["pid"]) for s in first["standbys"]] == [("beta", 77)]

        await database_sync_to_async(upsert_standby)(timedelta(0))
        second, _ = await receive_until(communicator, lambda m: m["type"] == "instances", timeout=5)
        assert second["standbys"][0]["last_heartbeat"] > first["standbys"][0]["last_heartbeat"]
        await communicator.disconnect()

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_client_cursor_replays_only_runs_after_it(staff_user, fast_poll):
    headers = session_headers(staff_user)
    seen_before = make_run("update_open_orders", scheduled_at=timezone.now() - timedelta(seconds=30))
    missed = make_run("update_open_orders", scheduled_at=timezone.now() - timedelta(seconds=1))

    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, f"{FEED_PATH}?after={seen_before.id}", headers=headers)
        assert (await communicator.connect(timeout=5))[0]
        message, earlier = await receive_until(communicator, lambda m: m["type"] == "jobrun", timeout=5)
        assert message["id"] == missed.id
        assert [m["type"] for m in earlier] == ["snapshot"]
        await communicator.disconnect()

    async_to_sync(scenario)()


def _assert_closed_forbidden(headers: list[tuple[bytes, bytes]]) -> None:
    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, FEED_PATH, headers=headers)
        connected, _ = await communicator.connect(timeout=5)
        # Accepted, then closed: a browser sees the 4403 (a refused handshake would surface as 1006).
        assert connected
        output = await communicator.receive_output(timeout=5)
        assert output == {"type": "websocket.close", "code": CLOSE_FORBIDDEN}
        # As a server would once the client answers the close frame.
        await communicator.disconnect(code=CLOSE_FORBIDDEN)

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_anonymous_is_closed_with_4403():
    _assert_closed_forbidden([ORIGIN])


@pytest.mark.django_db(transaction=True)
def test_non_staff_is_closed_with_4403(plain_user):
    _assert_closed_forbidden(session_headers(plain_user))


@pytest.mark.django_db(transaction=True)
def test_foreign_origin_is_refused(staff_user):
    headers = [(b"origin", b"http://evil.example"), session_headers(staff_user)[1]]

    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, FEED_PATH, headers=headers)
        connected, _ = await communicator.connect(timeout=5)
        assert not connected

    async_to_sync(scenario)()


@pytest.mark.django_db(transaction=True)
def test_revoked_staff_is_closed_with_4403(staff_user, fast_poll, monkeypatch):
    monkeypatch.setattr(SchedulerFeedConsumer, "user_recheck_every", 0.2)
    headers = session_headers(staff_user)

    async def scenario() -> None:
        communicator = WebsocketCommunicator(application, FEED_PATH, headers=headers)
        assert (await communicator.connect(timeout=5))[0]
        assert (await communicator.receive_json_from(timeout=5))["type"] == "snapshot"
        await database_sync_to_async(type(staff_user).objects.filter(pk=staff_user.pk).update)(is_staff=False)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            output = await communicator.receive_output(timeout=deadline - time.monotonic())
            if output["type"] == "websocket.close":
                assert output["code"] == CLOSE_FORBIDDEN
                break
        else:
            raise AssertionError("feed not closed after staff was revoked")
        # As a server would once the client answers the close frame.
        await communicator.disconnect(code=CLOSE_FORBIDDEN)

    async_to_sync(scenario)()


# --- the poll itself ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_poll_catches_a_run_committed_after_a_higher_id():
    base = jobrun_max_id() + 1000
    cursor = FeedCursor(last_id=base)
    later = make_run("update_open_orders", run_id=base + 2)
    first = feed_poll(cursor, now=timezone.now(), clock=100.0)
    assert [m["id"] for m in first if m["type"] == "jobrun"] == [later.id]
    assert cursor.last_id == base + 2
    assert set(cursor.gaps) == {base + 1}

    # Row base+1 took its id first but committed second (concurrent INSERTs on PostgreSQL).
    earlier = make_run("update_price_cache", run_id=base + 1)
    second = feed_poll(cursor, now=timezone.now(), clock=101.0)
    assert [m["id"] for m in second if m["type"] == "jobrun"] == [earlier.id]
    assert cursor.gaps == {}


@pytest.mark.django_db
def test_poll_forgets_skipped_ids_after_the_gap_window():
    base = jobrun_max_id() + 1000
    cursor = FeedCursor(last_id=base)
    make_run(run_id=base + 3)
    feed_poll(cursor, now=timezone.now(), clock=100.0)
    assert set(cursor.gaps) == {base + 1, base + 2}
    feed_poll(cursor, now=timezone.now(), clock=100.0 + consumers.GAP_WINDOW + 0.1)
    assert cursor.gaps == {}


@pytest.mark.django_db
def test_poll_bounds_the_skipped_ids_after_a_sequence_jump():
    base = jobrun_max_id() + 1000
    cursor = FeedCursor(last_id=base)
    make_run(run_id=base + 100_000)
    feed_poll(cursor, now=timezone.now(), clock=100.0)
    assert len(cursor.gaps) == consumers.GAP_LIMIT
    assert min(cursor.gaps) == base + 100_000 - consumers.GAP_LIMIT


@pytest.mark.django_db
def test_feed_start_follows_running_runs_and_bounds_the_client_cursor():
    finished = make_run("update_open_orders")
    running = make_run(
        "update_price_cache", outcome=JobRun.Outcome.RUNNING, duration_ms=None, finished_at=None, summary=""
    )
    cursor = feed_start(after=None, now=timezone.now())
    assert cursor.last_id == running.id
    assert cursor.pending == {running.id}

    assert feed_start(after=finished.id, now=timezone.now()).last_id == finished.id
    assert feed_start(after=running.id + 50, now=timezone.now()).last_id == running.id
    assert feed_start(after=-5, now=timezone.now()).last_id == max(0, running.id - consumers.CATCHUP_LIMIT)


@pytest.mark.django_db
def test_idle_poll_is_a_few_queries(django_assert_max_num_queries):
    cursor = feed_start(after=None, now=timezone.now())
    feed_poll(cursor, now=timezone.now())
    # New runs, then running + leader (+ pg_locks on PostgreSQL) + standbys + overdue: nothing per job.
    with django_assert_max_num_queries(5):
        assert feed_poll(cursor, now=timezone.now()) == []


# --- the dashboard page ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_dashboard_lists_every_registered_job_for_staff(client, staff_user):
    run = make_run("update_open_orders", summary="synced 4 orders")
    JobControl.objects.create(job_id="update_price_cache", paused=True, pause_reason="exchange maintenance")
    client.force_login(staff_user)
    response = client.get("/dashboard/")
    assert response.status_code == 200
    html = response.content.decode()
    specs = registry_specs_lenient()
    for spec in specs:
        assert f'data-job-id="{spec.id}"' in html
    # Only the paused job shows its badge (the others carry `hidden`).
    assert 'title="exchange maintenance">paused' in html
    assert html.count(" hidden title=") == len(specs) - 1
    assert f'data-run-id="{run.id}"' in html
    assert "synced 4 orders" in html
    assert f'data-cursor="{run.id}"' in html


@pytest.mark.django_db
def test_dashboard_redirects_anonymous_to_admin_login(client):
    response = client.get("/dashboard/")
    assert response.status_code == 302
    assert response["Location"] == "/admin/login/?next=/dashboard/"


@pytest.mark.django_db
def test_dashboard_redirects_non_staff_to_admin_login(client, plain_user):
    client.force_login(plain_user)
    response = client.get("/dashboard/")
    assert response.status_code == 302
    assert response["Location"].startswith("/admin/login/")
