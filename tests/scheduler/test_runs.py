"""The job wrapper: JobRun claim, outcomes, suppressed duplicates, stale terms, alerts and scrubbing."""

from __future__ import annotations

import io
import logging
from datetime import timedelta
from types import SimpleNamespace

import pytest
from apscheduler.events import EVENT_JOB_ERROR
from django.conf import settings
from django.utils import timezone
from django_apscheduler.jobstores import DjangoJobStore
from django_apscheduler.models import DjangoJob, DjangoJobExecution

from core.models import MetricCounter
from core.scrub import ScrubFilter, scrub, secret_register
from notifications.models import AlertThrottle
from scheduler.executor import _run_with_scheduled_time
from scheduler.models import JobRun, Leadership
from scheduler.runs import JobFailedError, JobResult, RunContext, jobrun_claim, run_in_context, scheduler_job
from scheduler.services import leadership_begin_term

pytestmark = pytest.mark.django_db

SECRET = "sk_live_SUPERSECRETKEY123"
BOT_URL = "https://api.telegram.org/bot123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw/sendMessage"


@scheduler_job("test_ok")
def ok_job():
    return JobResult(summary="did 3 things")


@scheduler_job("test_noop")
def noop_job():
    return JobResult(summary="nothing to do", noop=True)


@scheduler_job("test_fail")
def failing_job():
    raise RuntimeError(f"GET {BOT_URL}?signature=abcdef0123456789 failed with key {SECRET}")


def run(fn, *, when, term=None, kind=JobRun.Kind.SCHEDULED):
    return run_in_context(RunContext(scheduled_at=when, kind=kind, term=term), fn)


def suppressed(job_id):
    return sum(
        MetricCounter.objects.filter(name="suppressed_duplicates", labels=f"job={job_id}").values_list(
            "value", flat=True
        )
    )


@pytest.fixture
def term():
    return leadership_begin_term(instance_id="test", host="h", pid=1, backend_pid=None)


def test_claim_written_before_body_and_outcome_after(term):
    when = timezone.now() - timedelta(milliseconds=250)
    seen = {}

    @scheduler_job("test_observe")
    def observe():
        seen["row"] = JobRun.objects.get(job_id="test_observe")
        return "observed"

    run(observe, when=when, term=term)
    assert seen["row"].outcome == JobRun.Outcome.RUNNING and seen["row"].finished_at is None
    row = JobRun.objects.get(job_id="test_observe")
    assert row.outcome == JobRun.Outcome.OK and row.summary == "observed"
    assert row.term == term and row.kind == JobRun.Kind.SCHEDULED and row.scheduled_at == when
    assert row.lateness_ms >= 250 and row.duration_ms is not None and row.finished_at >= row.started_at


def test_noop_and_overrun_outcomes(term, monkeypatch):
    now = timezone.now()
    run(noop_job, when=now, term=term)
    assert JobRun.objects.get(job_id="test_noop").outcome == JobRun.Outcome.NOOP
    monkeypatch.setattr("scheduler.runs._budget", lambda job_id: -1.0)
    run(ok_job, when=now, term=term)
    assert JobRun.objects.get(job_id="test_ok").outcome == JobRun.Outcome.OVERRUN
    assert MetricCounter.objects.get(name="job_overruns").labels == "job=test_ok"


def test_same_scheduled_time_runs_once(term):
    when = timezone.now()
    calls = []

    @scheduler_job("test_count")
    def count():
        calls.append(1)
        return "x"

    run(count, when=when, term=term)
    run(count, when=when, term=term)
    assert len(calls) == 1
    assert JobRun.objects.filter(job_id="test_count").count() == 1
    assert suppressed("test_count") == 1


def test_stale_term_claim_is_refused(term):
    new_term = leadership_begin_term(instance_id="other", host="h2", pid=2, backend_pid=None)
    assert new_term == term + 1
    calls = []

    @scheduler_job("test_stale")
    def stale():
        calls.append(1)

    run(stale, when=timezone.now(), term=term)
    assert calls == [] and not JobRun.objects.filter(job_id="test_stale").exists()
    assert suppressed("test_stale") == 1
    assert (
        jobrun_claim(
            job_id="test_stale", ctx=RunContext(scheduled_at=timezone.now(), term=term), started_at=timezone.now()
        )
        is None
    )
    assert jobrun_claim(
        job_id="test_stale", ctx=RunContext(scheduled_at=timezone.now(), term=new_term), started_at=timezone.now()
    )


def test_direct_call_is_a_manual_run_at_the_current_term(term):
    ok_job()
    row = JobRun.objects.get(job_id="test_ok")
    assert row.kind == JobRun.Kind.MANUAL and row.term == Leadership.objects.get().term


def test_error_is_stored_scrubbed_alerted_once_and_raised_scrubbed(term, caplog):
    secret_register(SECRET)
    with pytest.raises(JobFailedError) as excinfo:
        run(failing_job, when=timezone.now(), term=term)
    with pytest.raises(JobFailedError):
        run(failing_job, when=timezone.now() + timedelta(seconds=1), term=term)
    row = JobRun.objects.filter(job_id="test_fail").first()
    assert row.outcome == JobRun.Outcome.ERROR
    stored = " ".join([row.summary, row.error, str(excinfo.value)])
    assert "RuntimeError" in stored and "Traceback" in row.error
    for leaked in (SECRET, "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw", "abcdef0123456789"):
        assert leaked not in stored
    throttle = AlertThrottle.objects.get(key="job:test_fail")
    assert throttle.suppressed == 1  # the second failure within 10 minutes was not alerted again
    alerts = [r for r in caplog.records if r.getMessage().startswith("ALERT job:test_fail")]
    assert len(alerts) == 1
    assert all(SECRET not in scrub(r.getMessage()) for r in caplog.records)


def test_djangojobexecution_gets_the_scrubbed_error(term):
    secret_register(SECRET)
    DjangoJob.objects.create(id="test_fail", next_run_time=None, job_state=b"")
    when = timezone.now().replace(microsecond=0)
    job = SimpleNamespace(
        id="test_fail", func=failing_job, args=(), kwargs={}, misfire_grace_time=None, _jobstore_alias="default"
    )
    events = _run_with_scheduled_time(job, "default", [when], "apscheduler.executors.default", term)
    assert [e.code for e in events] == [EVENT_JOB_ERROR]
    DjangoJobStore.lock = __import__("threading").RLock()
    DjangoJobStore.handle_error_event(events[0])
    execution = DjangoJobExecution.objects.get(job_id="test_fail")
    assert execution.status == DjangoJobExecution.ERROR
    assert SECRET not in execution.exception and SECRET not in (execution.traceback or "")
    assert "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw" not in execution.exception
    assert JobRun.objects.get(job_id="test_fail").scheduled_at == when


def test_log_lines_are_scrubbed_by_the_configured_handler():
    assert "scrub" in settings.LOGGING["handlers"]["console"]["filters"]
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ScrubFilter())
    log = logging.getLogger("test.scrub")
    log.addHandler(handler)
    try:
        secret_register(SECRET)
        log.error("calling %s with %s", BOT_URL, SECRET)
        try:
            raise ValueError(f"apiKey={SECRET}&signature=deadbeef")
        except ValueError:
            log.exception("failed")
    finally:
        log.removeHandler(handler)
    text = stream.getvalue()
    assert "calling https://api.telegram.org/bot***/sendMessage" in text
    assert SECRET not in text and "deadbeef" not in text and "ValueError" in text
