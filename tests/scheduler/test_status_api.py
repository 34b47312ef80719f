"""Status API and /healthz: auth, the documented body, the running predicate, bounded queries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django_apscheduler.models import DjangoJob
from rest_framework.test import APIClient

from scheduler import registry
from scheduler.models import JobControl, JobRun, Leadership, SchedulerInstance
from scheduler.registry import JobSpec, cron, interval
from scheduler.selectors import scheduler_leader, scheduler_running, scheduler_status

pytestmark = pytest.mark.django_db

STATUS_URL = "/api/system/scheduler/status"
NOW = datetime(2026, 11, 23, 23, 34, 20, tzinfo=UTC)  # 08:34:20 in Asia/Seoul

FAST = JobSpec(id="fast_job", name="Fast Job", func="x:fast", trigger=interval(seconds=1), grace=2, budget=0.8)
DAILY = JobSpec(id="daily_job", name="Daily Job", func="x:daily", trigger=cron(hour=3, minute=7), grace=3600, budget=9)
HELD = JobSpec(id="held_job", name="Held Job", func="x:held", trigger=interval(seconds=29), grace=29, budget=20)
OFF = JobSpec(id="off_job", name="Off Job", func="x:off", trigger=interval(minutes=5), grace=60, budget=20)
NEW = JobSpec(id="new_job", name="New Job", func="x:new", trigger=interval(hours=6), grace=3600, budget=120)


@pytest.fixture(autouse=True)
def fixed_registry(monkeypatch, settings):
    monkeypatch.setattr(registry, "REGISTRY", (FAST, DAILY, HELD, OFF, NEW))
    settings.SCHEDULER_PROBE_JOB = False
    settings.SCHEDULER_TIMEZONE = "Asia/Seoul"
    settings.SCHEDULER_JOB_OVERRIDES = {"off_job": {"enabled": False}}


@pytest.fixture
def frozen():
    with time_machine.travel(NOW, tick=False):
        yield


@pytest.fixture
def lock_pid():
    """On PostgreSQL, really hold the leader advisory lock and return its backend pid."""
    if connection.vendor != "postgresql":
        yield None
        return
    from scheduler.leadership import PostgresLeaderLock

    lock = PostgresLeaderLock()
    assert lock.try_acquire()
    yield lock.backend_pid
    lock.release()


def make_leader(lock_pid, **overrides):
    fields = {
        "instance_id": "alpha:100:aa",
        "host": "alpha",
        "pid": 100,
        "role": SchedulerInstance.Role.LEADER,
        "term": 7,
        "backend_pid": lock_pid,
        "started_at": NOW - timedelta(hours=2),
        "leader_since": NOW - timedelta(hours=1),
        "last_heartbeat": NOW - timedelta(seconds=1),
        "thread_alive": True,
    }
    fields.update(overrides)
    return SchedulerInstance.objects.create(**fields)


@pytest.fixture
def seeded(frozen, lock_pid):
    Leadership.objects.update_or_create(
        id=1, defaults={"term": 7, "host": "alpha", "pid": 100, "backend_pid": lock_pid, "since": NOW}
    )
    leader = make_leader(lock_pid)
    SchedulerInstance.objects.create(
        instance_id="beta:200:bb",
        host="beta",
        pid=200,
        role=SchedulerInstance.Role.STANDBY,
        started_at=NOW - timedelta(hours=2),
        last_heartbeat=NOW - timedelta(seconds=2),
    )
    SchedulerInstance.objects.create(  # a standby that stopped heartbeating: not listed
        instance_id="gamma:300:cc",
        host="gamma",
        pid=300,
        role=SchedulerInstance.Role.STANDBY,
        started_at=NOW - timedelta(hours=2),
        last_heartbeat=NOW - timedelta(seconds=30),
    )
    SchedulerInstance.objects.create(
        instance_id="delta:400:dd",
        host="delta",
        pid=400,
        role=SchedulerInstance.Role.STOPPED,
        started_at=NOW - timedelta(hours=2),
        last_heartbeat=NOW,
    )
    # job_state is not valid pickle: anything that unpickled it would fail (django-apscheduler
    # would even delete the row), so these rows prove only the columns are read.
    DjangoJob.objects.create(id="fast_job", next_run_time=NOW + timedelta(seconds=1), job_state=b"")
    DjangoJob.objects.create(id="daily_job", next_run_time=NOW + timedelta(hours=18, minutes=33), job_state=b"")
    DjangoJob.objects.create(id="held_job", next_run_time=None, job_state=b"")
    DjangoJob.objects.create(id="off_job", next_run_time=NOW - timedelta(hours=1), job_state=b"")
    JobControl.objects.create(job_id="held_job", paused=True, pause_reason="exchange maintenance")
    JobControl.objects.create(job_id="daily_job", paused=False)
    run = {"term": 7, "host": "alpha", "pid": 100, "started_at": NOW}
    JobRun.objects.create(
        job_id="fast_job",
        scheduled_at=NOW - timedelta(seconds=1),
        duration_ms=4,
        lateness_ms=2,
        outcome="ok",
        summary="moved 3 orders",
        **run,
    )
    # Inserted later (higher id) but scheduled earlier: "latest" is by scheduled_at.
    JobRun.objects.create(
        job_id="fast_job",
        scheduled_at=NOW - timedelta(seconds=2),
        duration_ms=9,
        lateness_ms=1,
        outcome="error",
        summary="boom",
        **run,
    )
    JobRun.objects.create(
        job_id="daily_job",
        scheduled_at=NOW - timedelta(hours=5, minutes=27),
        duration_ms=61_000,
        lateness_ms=13,
        outcome="overrun",
        summary="took long",
        **run,
    )
    return leader


def test_status_without_credentials_is_401():
    response = APIClient().get(STATUS_URL)
    assert response.status_code == 401
    assert "Token" in response["WWW-Authenticate"]


def test_status_for_non_staff_is_403(user_client):
    assert user_client.get(STATUS_URL).status_code == 403


def test_status_accepts_a_staff_session(seeded, staff_user):
    client = APIClient()
    client.force_login(staff_user)
    response = client.get(STATUS_URL)
    assert response.status_code == 200
    assert response.json()["running"] is True


def test_status_body_for_seeded_state(seeded, staff_client):
    response = staff_client.get(STATUS_URL)

    assert response.status_code == 200
    assert response.json() == {
        "running": True,
        "leader": {
            "host": "alpha",
            "pid": 100,
            "term": 7,
            "since": "2026-11-24T07:34:20+09:00",
            "last_heartbeat": "2026-11-24T08:34:19+09:00",
        },
        "standbys": [{"host": "beta", "pid": 200, "last_heartbeat": "2026-11-24T08:34:18+09:00"}],
        # SQLite: not sharded; PostgreSQL: every shard listed, none held (no scheduler runs here).
        "shards": []
        if connection.vendor != "postgresql"
        else [{"shard": i, "held": False, "host": None, "pid": None, "term": None, "since": None} for i in range(16)],
        "jobs": [
            {
                "id": "fast_job",
                "name": "Fast Job",
                "trigger": "interval[0:00:01]",
                "next_run": "2026-11-24T08:34:21+09:00",
                "paused": False,
                "pause_reason": None,
                "last_run": {
                    "outcome": "ok",
                    "scheduled_at": "2026-11-24T08:34:19+09:00",
                    "duration_ms": 4,
                    "lateness_ms": 2,
                    "summary": "moved 3 orders",
                },
            },
            {
                "id": "daily_job",
                "name": "Daily Job",
                "trigger": "cron[hour='3', minute='7']",
                "next_run": "2026-11-25T03:07:20+09:00",
                "paused": False,
                "pause_reason": None,
                "last_run": {
                    "outcome": "overrun",
                    "scheduled_at": "2026-11-24T03:07:20+09:00",
                    "duration_ms": 61000,
                    "lateness_ms": 13,
                    "summary": "took long",
                },
            },
            {
                "id": "held_job",
                "name": "Held Job",
                "trigger": "interval[0:00:29]",
                "next_run": None,
                "paused": True,
                "pause_reason": "exchange maintenance",
                "last_run": None,
            },
            {
                "id": "off_job",
                "name": "Off Job",
                "trigger": "interval[0:05:00]",
                "next_run": "2026-11-24T07:34:20+09:00",
                "paused": True,
                "pause_reason": "disabled by SCHEDULER_JOB_OVERRIDES",
                "last_run": None,
            },
            {
                "id": "new_job",
                "name": "New Job",
                "trigger": "interval[6:00:00]",
                "next_run": None,
                "paused": False,
                "pause_reason": None,
                "last_run": None,
            },
        ],
    }
    # Nothing unpickled (and so nothing deleted) the unreadable job_state rows.
    assert DjangoJob.objects.count() == 4


def test_status_queries_do_not_grow_with_job_runs(seeded):
    with CaptureQueriesContext(connection) as few:
        scheduler_status(now=NOW)
    JobRun.objects.bulk_create(
        [
            JobRun(
                job_id=("fast_job", "daily_job")[i % 2],
                scheduled_at=NOW - timedelta(seconds=10 + i),
                term=7,
                host="alpha",
                pid=100,
                started_at=NOW,
                outcome="ok",
            )
            for i in range(1000)
        ],
        batch_size=500,
    )
    with CaptureQueriesContext(connection) as many:
        body = scheduler_status(now=NOW)
    assert len(many) == len(few)
    assert body["jobs"][0]["last_run"]["summary"] == "moved 3 orders"
    assert not any("job_state" in query["sql"] for query in many.captured_queries)


@pytest.mark.skipif(connection.vendor != "sqlite", reason="the SQLite leader rule: heartbeat younger than 3 s")
def test_running_needs_a_fresh_leader_heartbeat_on_sqlite(seeded):
    assert scheduler_running(now=NOW) is True
    SchedulerInstance.objects.filter(pk=seeded.pk).update(last_heartbeat=NOW - timedelta(seconds=4))
    assert scheduler_leader(now=NOW) is None
    assert scheduler_running(now=NOW) is False


@pytest.mark.postgres
def test_running_on_postgres_needs_the_lock_holder_and_a_fresh_heartbeat(seeded):
    assert scheduler_running(now=NOW) is True
    SchedulerInstance.objects.filter(pk=seeded.pk).update(last_heartbeat=NOW - timedelta(seconds=8))
    assert scheduler_running(now=NOW) is True  # within 10 s while it holds the lock
    SchedulerInstance.objects.filter(pk=seeded.pk).update(last_heartbeat=NOW - timedelta(seconds=11))
    assert scheduler_running(now=NOW) is False  # a frozen process still holding the lock
    # A fresh heartbeat claiming leadership from a connection that does not hold the lock.
    SchedulerInstance.objects.filter(pk=seeded.pk).update(last_heartbeat=NOW, backend_pid=seeded.backend_pid + 1)
    assert scheduler_leader(now=NOW) is None
    assert scheduler_running(now=NOW) is False


def test_running_is_false_when_an_enabled_job_is_overdue(seeded):
    # fast_job: grace 2 s + 5 s of slack.
    DjangoJob.objects.filter(id="fast_job").update(next_run_time=NOW - timedelta(seconds=6))
    assert scheduler_running(now=NOW) is True
    DjangoJob.objects.filter(id="fast_job").update(next_run_time=NOW - timedelta(seconds=8))
    assert scheduler_running(now=NOW) is False
    assert scheduler_status(now=NOW)["running"] is False


def test_a_disabled_job_is_never_overdue(seeded):
    # off_job's column says an hour ago, but SCHEDULER_JOB_OVERRIDES disables it.
    assert DjangoJob.objects.get(id="off_job").next_run_time == NOW - timedelta(hours=1)
    assert scheduler_running(now=NOW) is True


def test_running_is_false_when_the_apscheduler_thread_is_dead(seeded):
    SchedulerInstance.objects.filter(pk=seeded.pk).update(thread_alive=False)
    assert scheduler_running(now=NOW) is False
    body = scheduler_status(now=NOW)
    assert body["running"] is False
    assert body["leader"]["host"] == "alpha"  # still listed: it is the leader, just not running


def test_no_leader_row_means_not_running(frozen):
    assert scheduler_status(now=NOW)["leader"] is None
    assert scheduler_running(now=NOW) is False


def test_healthz_reports_the_predicate_without_auth_or_details(seeded):
    client = APIClient()
    ok = client.get("/healthz")
    assert ok.status_code == 200
    assert ok.json() == {"status": "ok"}

    SchedulerInstance.objects.filter(pk=seeded.pk).update(thread_alive=False)
    down = client.get("/healthz")
    assert down.status_code == 503
    assert down.json() == {"status": "unavailable"}


def test_healthz_is_503_without_any_scheduler(frozen):
    response = APIClient().get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unavailable"}
