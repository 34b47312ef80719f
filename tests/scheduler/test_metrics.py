"""/metrics: staff or bearer token only, and samples computed from JobRun, Leadership and MetricCounter."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import time_machine
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django_apscheduler.models import DjangoJob

from core.models import MetricCounter
from scheduler import registry
from scheduler.metrics import parse_labels
from scheduler.models import JobRun, Leadership, SchedulerInstance
from scheduler.registry import JobSpec, cron, interval

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 23, 23, 34, 20, tzinfo=UTC)
MINUTE = NOW.replace(second=0)
TOKEN = "metrics-secret-0123456789"

FAST = JobSpec(id="fast_job", name="Fast Job", func="x:fast", trigger=interval(seconds=1), grace=2, budget=0.8)
DAILY = JobSpec(id="daily_job", name="Daily Job", func="x:daily", trigger=cron(hour=3, minute=7), grace=3600, budget=9)


@pytest.fixture(autouse=True)
def fixed_registry(monkeypatch, settings):
    monkeypatch.setattr(registry, "REGISTRY", (FAST, DAILY))
    settings.SCHEDULER_PROBE_JOB = False
    settings.SCHEDULER_JOB_OVERRIDES = {}
    settings.METRICS_TOKEN = TOKEN


@pytest.fixture
def lock_pid():
    if connection.vendor != "postgresql":
        yield None
        return
    from scheduler.leadership import PostgresLeaderLock

    lock = PostgresLeaderLock()
    assert lock.try_acquire()
    yield lock.backend_pid
    lock.release()


def run(job_id, ago, outcome="ok", duration_ms=None, lateness_ms=None):
    return JobRun(
        job_id=job_id,
        scheduled_at=NOW - ago,
        term=7,
        host="alpha",
        pid=100,
        started_at=NOW - ago,
        outcome=outcome,
        duration_ms=duration_ms,
        lateness_ms=lateness_ms,
    )


@pytest.fixture
def seeded(lock_pid):
    with time_machine.travel(NOW, tick=False):
        Leadership.objects.update_or_create(id=1, defaults={"term": 7, "host": "alpha", "pid": 100})
        SchedulerInstance.objects.create(
            instance_id="alpha:100",
            host="alpha",
            pid=100,
            role=SchedulerInstance.Role.LEADER,
            term=7,
            backend_pid=lock_pid,
            started_at=NOW - timedelta(hours=1),
            last_heartbeat=NOW - timedelta(seconds=1),
            thread_alive=True,
            rss_bytes=123_456_789,
        )
        DjangoJob.objects.create(id="fast_job", next_run_time=NOW + timedelta(seconds=1), job_state=b"")
        s = timedelta(seconds=1)
        JobRun.objects.bulk_create(
            [
                run("fast_job", 1 * s, "ok", duration_ms=4, lateness_ms=2),
                run("fast_job", 2 * s, "ok", duration_ms=30, lateness_ms=2),
                run("fast_job", 3 * s, "ok", duration_ms=700, lateness_ms=1500),
                run("fast_job", 4 * s, "error", duration_ms=20, lateness_ms=3),
                run("fast_job", 5 * s, "running", lateness_ms=1),  # not finished: no duration
                run("daily_job", 600 * s, "overrun", duration_ms=400_000, lateness_ms=13),
                run("fast_job", 20 * 60 * s, "ok", duration_ms=1, lateness_ms=1),  # outside the window
            ]
        )
        m = timedelta(minutes=1)
        counters = [
            ("suppressed_duplicates", "job=fast_job", 2 * m, 2),
            ("suppressed_duplicates", "job=fast_job", 1 * m, 3),
            ("suppressed_duplicates", "job=fast_job", 30 * m, 100),  # outside the window
            ("job_overruns", "job=daily_job", 10 * m, 1),
            ("job_errors", "job=fast_job", 1 * m, 1),
            ("exchange_calls", "exchange=BINANCE", 2 * m, 10),
            ("exchange_calls", "exchange=BINANCE", 1 * m, 5),
            ("exchange_calls", "exchange=BYBIT", 1 * m, 7),
            ("exchange_errors", "exchange=BINANCE", 1 * m, 1),
            ("queue_moves", "", 3 * m, 4),
            ("queue_congested_pairs", "", 2 * m, 5),
            ("queue_congested_pairs", "", 1 * m, 2),
        ]
        MetricCounter.objects.bulk_create(
            [
                MetricCounter(name=name, labels=labels, minute=MINUTE - ago, value=value)
                for name, labels, ago, value in counters
            ]
        )
        yield


def scrape(client=None, **headers):
    return (client or Client()).get("/metrics", **headers)


def test_metrics_without_credentials_is_401():
    response = scrape()
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


def test_metrics_with_a_wrong_token_is_401():
    assert scrape(HTTP_AUTHORIZATION="Bearer not-the-token").status_code == 401


def test_metrics_token_is_refused_when_none_is_configured(settings):
    settings.METRICS_TOKEN = ""
    assert scrape(HTTP_AUTHORIZATION="Bearer ").status_code == 401
    assert scrape(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").status_code == 401


def test_metrics_for_a_non_staff_session_is_403(plain_user):
    client = Client()
    client.force_login(plain_user)
    assert scrape(client).status_code == 403


def test_metrics_for_a_staff_session_is_200(seeded, staff_user):
    client = Client()
    client.force_login(staff_user)
    response = scrape(client)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")


def test_metrics_samples_from_seeded_rows(seeded):
    response = scrape(HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    lines = set(response.content.decode().splitlines())

    expected = {
        "tradingsite_scheduler_running 1.0",
        "tradingsite_scheduler_leader_term 7.0",
        'tradingsite_scheduler_instances{role="leader"} 1.0',
        'tradingsite_scheduler_instances{role="standby"} 0.0',
        'tradingsite_scheduler_job_runs_15m{job="fast_job",outcome="ok"} 3.0',
        'tradingsite_scheduler_job_runs_15m{job="fast_job",outcome="error"} 1.0',
        'tradingsite_scheduler_job_runs_15m{job="fast_job",outcome="running"} 1.0',
        'tradingsite_scheduler_job_runs_15m{job="daily_job",outcome="overrun"} 1.0',
        # fast_job durations 4, 30, 700, 20 ms (the unfinished run has none)
        'tradingsite_scheduler_job_duration_seconds_bucket{job="fast_job",le="0.005"} 1.0',
        'tradingsite_scheduler_job_duration_seconds_bucket{job="fast_job",le="0.025"} 2.0',
        'tradingsite_scheduler_job_duration_seconds_bucket{job="fast_job",le="0.05"} 3.0',
        'tradingsite_scheduler_job_duration_seconds_bucket{job="fast_job",le="0.5"} 3.0',
        'tradingsite_scheduler_job_duration_seconds_bucket{job="fast_job",le="1.0"} 4.0',
        'tradingsite_scheduler_job_duration_seconds_bucket{job="fast_job",le="+Inf"} 4.0',
        'tradingsite_scheduler_job_duration_seconds_count{job="fast_job"} 4.0',
        'tradingsite_scheduler_job_duration_seconds_sum{job="fast_job"} 0.754',
        'tradingsite_scheduler_job_duration_seconds_bucket{job="daily_job",le="300.0"} 0.0',
        'tradingsite_scheduler_job_duration_seconds_bucket{job="daily_job",le="+Inf"} 1.0',
        # fast_job lateness 2, 2, 1500, 3, 1 ms
        'tradingsite_scheduler_job_lateness_seconds_bucket{job="fast_job",le="0.005"} 4.0',
        'tradingsite_scheduler_job_lateness_seconds_bucket{job="fast_job",le="2.5"} 5.0',
        'tradingsite_scheduler_job_lateness_seconds_count{job="fast_job"} 5.0',
        'tradingsite_scheduler_job_lateness_seconds_sum{job="fast_job"} 1.508',
        'tradingsite_scheduler_suppressed_duplicates_15m{job="fast_job"} 5.0',
        'tradingsite_scheduler_job_overruns_15m{job="daily_job"} 1.0',
        'tradingsite_scheduler_job_errors_15m{job="fast_job"} 1.0',
        'tradingsite_exchange_calls_15m{exchange="BINANCE"} 15.0',
        'tradingsite_exchange_calls_15m{exchange="BYBIT"} 7.0',
        'tradingsite_exchange_errors_15m{exchange="BINANCE"} 1.0',
        "tradingsite_queue_moves_15m 4.0",
        "tradingsite_queue_congested_pairs 2.0",
        'tradingsite_scheduler_rss_bytes{host="alpha",pid="100",role="leader"} 1.23456789e+08',
    }
    assert expected <= lines, sorted(expected - lines)


def test_metrics_are_recomputed_not_accumulated(seeded):
    first = scrape(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content
    assert scrape(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content == first
    JobRun.objects.bulk_create([run("fast_job", timedelta(seconds=6), "ok", duration_ms=4, lateness_ms=2)])
    lines = scrape(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode().splitlines()
    assert 'tradingsite_scheduler_job_runs_15m{job="fast_job",outcome="ok"} 4.0' in lines


def test_scheduler_running_gauge_is_zero_without_a_live_leader(seeded):
    SchedulerInstance.objects.update(thread_alive=False)
    lines = scrape(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode().splitlines()
    assert "tradingsite_scheduler_running 0.0" in lines


def test_metrics_queries_do_not_grow_with_job_runs(seeded):
    with CaptureQueriesContext(connection) as few:
        scrape(HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    JobRun.objects.bulk_create(
        [run(("fast_job", "daily_job")[i % 2], timedelta(seconds=10 + i), "ok", 3, 1) for i in range(600)],
        batch_size=500,
    )
    with CaptureQueriesContext(connection) as many:
        body = scrape(HTTP_AUTHORIZATION=f"Bearer {TOKEN}").content.decode()
    assert len(many) == len(few)
    assert 'tradingsite_scheduler_job_runs_15m{job="daily_job",outcome="ok"} 300.0' in body.splitlines()


def test_parse_labels():
    assert parse_labels("job=fast_job") == {"job": "fast_job"}
    assert parse_labels("exchange=BINANCE,market=spot") == {"exchange": "BINANCE", "market": "spot"}
    assert parse_labels("") == {}
    assert parse_labels("bad key=x,1x=y,__name__=z,ok=1") == {"ok": "1"}
