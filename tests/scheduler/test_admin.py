"""Admin: the read-only job admin queues JobCommands only; the JobRun admin's cost does not grow with rows."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import django_apscheduler.admin
import pytest
from django.contrib import admin
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django_apscheduler.models import DjangoJob, DjangoJobExecution

from scheduler import registry
from scheduler.admin import JobRunAdmin, JobRunJobFilter, SchedulerJobAdmin
from scheduler.models import JobCommand, JobControl, JobRun
from scheduler.registry import JobSpec, cron, interval

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 23, 23, 34, 20, tzinfo=UTC)
JOBS_URL = "/admin/django_apscheduler/djangojob/"
RUNS_URL = "/admin/scheduler/jobrun/"

FAST = JobSpec(id="fast_job", name="Fast Job", func="x:fast", trigger=interval(seconds=1), grace=2, budget=0.8)
DAILY = JobSpec(id="daily_job", name="Daily Job", func="x:daily", trigger=cron(hour=3, minute=7), grace=3600, budget=9)


@pytest.fixture(autouse=True)
def fixed_registry(monkeypatch, settings):
    monkeypatch.setattr(registry, "REGISTRY", (FAST, DAILY))
    settings.SCHEDULER_PROBE_JOB = False
    settings.SCHEDULER_JOB_OVERRIDES = {}


@pytest.fixture
def jobs():
    # Not valid pickle: django-apscheduler's admin would unpickle these, fail, and delete the rows.
    DjangoJob.objects.create(id="fast_job", next_run_time=NOW, job_state=b"")
    DjangoJob.objects.create(id="daily_job", next_run_time=None, job_state=b"")
    JobControl.objects.create(job_id="daily_job", paused=True, pause_reason="exchange maintenance")
    JobRun.objects.create(
        job_id="fast_job", scheduled_at=NOW, term=1, host="alpha", pid=1, started_at=NOW, outcome="error"
    )


@pytest.fixture
def operator(staff_user):
    staff_user.user_permissions.add(Permission.objects.get(codename="add_jobcommand"))
    client = Client()
    client.force_login(staff_user)
    return client


@pytest.fixture
def viewer(staff_user):
    client = Client()
    client.force_login(staff_user)
    return client


def act(client, action, ids, reason=""):
    return client.post(
        JOBS_URL, {"action": action, "_selected_action": ids, "reason": reason, "index": "0"}, follow=True
    )


def messages_of(response):
    return [str(message) for message in response.context["messages"]]


def test_admin_registrations():
    assert isinstance(admin.site._registry[DjangoJob], SchedulerJobAdmin)
    assert isinstance(admin.site._registry[JobRun], JobRunAdmin)
    # django-apscheduler's execution admin stays as it is.
    assert type(admin.site._registry[DjangoJobExecution]) is django_apscheduler.admin.DjangoJobExecutionAdmin


def test_job_changelist_renders_columns_from_registry_and_controls(jobs, operator):
    response = operator.get(JOBS_URL)
    assert response.status_code == 200
    body = response.content.decode()
    for text in ("fast_job", "Fast Job", "interval[0:00:01]", "cron[hour=&#x27;3&#x27;, minute=&#x27;7&#x27;]"):
        assert text in body
    assert "exchange maintenance" in body
    assert "error (" in body  # fast_job's last outcome
    assert 'name="reason"' in body  # the action form's reason field
    assert 'value="run_now"' in body
    assert DjangoJob.objects.count() == 2  # nothing unpickled, nothing deleted


def test_job_change_view_is_read_only_and_never_shows_job_state(jobs, viewer):
    response = viewer.get(f"{JOBS_URL}fast_job/change/")
    assert response.status_code == 200
    body = response.content.decode()
    assert "Fast Job" in body
    assert "job_state" not in body
    assert 'type="submit" value="Save"' not in body
    assert viewer.get(f"{JOBS_URL}add/").status_code == 403
    assert viewer.post(f"{JOBS_URL}fast_job/delete/", {"post": "yes"}).status_code == 403
    assert DjangoJob.objects.count() == 2


def test_run_now_writes_commands_and_runs_nothing(jobs, operator, staff_user):
    response = act(operator, "run_now", ["fast_job", "daily_job"])

    commands = list(JobCommand.objects.order_by("job_id").values_list("job_id", "action", "status", "requested_by"))
    assert commands == [
        ("daily_job", "run", "pending", staff_user.pk),
        ("fast_job", "run", "pending", staff_user.pk),
    ]
    assert JobRun.objects.count() == 1  # only the seeded run
    assert DjangoJobExecution.objects.count() == 0
    assert any("leader will carry it out" in message for message in messages_of(response))
    assert any("No scheduler leader is running" in message for message in messages_of(response))


def test_pause_without_reason_writes_nothing(jobs, operator):
    response = act(operator, "pause", ["fast_job"], reason="  ")
    assert JobCommand.objects.count() == 0
    assert JobControl.objects.filter(job_id="fast_job").count() == 0
    assert any("needs a reason" in message for message in messages_of(response))


def test_pause_with_reason_and_resume_queue_commands(jobs, operator):
    act(operator, "pause", ["fast_job"], reason="exchange maintenance 21:00")
    act(operator, "resume", ["daily_job"])
    assert list(JobCommand.objects.order_by("id").values_list("job_id", "action", "reason")) == [
        ("fast_job", "pause", "exchange maintenance 21:00"),
        ("daily_job", "resume", ""),
    ]
    # The leader's poller applies pauses; the web request does not touch JobControl.
    assert not JobControl.objects.filter(job_id="fast_job").exists()
    assert JobControl.objects.get(job_id="daily_job").paused is True


def test_a_stale_job_is_refused(jobs, operator):
    DjangoJob.objects.create(id="gone_job", next_run_time=None, job_state=b"")
    response = act(operator, "run_now", ["gone_job"])
    assert JobCommand.objects.count() == 0
    assert any("Not requested: gone_job" in message for message in messages_of(response))


def test_actions_need_the_jobcommand_permission(jobs, viewer):
    response = viewer.get(JOBS_URL)
    assert response.status_code == 200
    assert 'value="run_now"' not in response.content.decode()
    act(viewer, "run_now", ["fast_job"])
    assert JobCommand.objects.count() == 0


def make_runs(count, start=0):
    jobs = ("fast_job", "daily_job")
    outcomes = ("ok", "noop", "error", "overrun")
    return [
        JobRun(
            job_id=jobs[i % 2],
            scheduled_at=NOW - timedelta(seconds=i),
            term=1,
            host="alpha",
            pid=1,
            kind="SCHEDULED",
            started_at=NOW - timedelta(seconds=i),
            duration_ms=i % 50,
            lateness_ms=i % 7,
            outcome=outcomes[i % 4],
            summary=f"run {i}",
        )
        for i in range(start, start + count)
    ]


def changelist_queries(client, url):
    with CaptureQueriesContext(connection) as queries:
        response = client.get(url)
    assert response.status_code == 200
    return response, queries


@pytest.mark.parametrize("query", ["", "?job=fast_job", "?outcome=error", "?scheduled_at__year=2026"])
def test_jobrun_changelist_query_count_does_not_grow_with_rows(viewer, query):
    JobRun.objects.bulk_create(make_runs(10))
    small, few = changelist_queries(viewer, RUNS_URL + query)
    assert small.context["cl"].result_count > 0

    for start in range(10, 2000, 500):
        JobRun.objects.bulk_create(make_runs(min(500, 2000 - start), start=start))
    assert JobRun.objects.count() == 2000
    large, many = changelist_queries(viewer, RUNS_URL + query)

    assert len(many) == len(few), [q["sql"] for q in many.captured_queries]
    assert len(large.context["cl"].result_list) == 100  # one page, however many rows
    # The job filter's choices come from the registry: no DISTINCT over JobRun.job_id.
    selects = [q["sql"].split(" FROM ")[0] for q in many.captured_queries]
    assert not any("DISTINCT" in select and "job_id" in select for select in selects)


def test_jobrun_filters_apply(viewer):
    JobRun.objects.bulk_create(make_runs(40))
    response, _ = changelist_queries(viewer, RUNS_URL + "?job=daily_job&outcome=noop")
    rows = response.context["cl"].result_list
    assert len(rows) == 10
    assert {(row.job_id, row.outcome) for row in rows} == {("daily_job", "noop")}
    body = response.content.decode()
    assert "?job=fast_job" in body


def test_job_filter_lookups_come_from_the_registry_without_queries(django_assert_num_queries, rf, staff_user):
    request = rf.get(RUNS_URL)
    request.user = staff_user
    model_admin = admin.site._registry[JobRun]
    with django_assert_num_queries(0):
        lookups = JobRunJobFilter(request, {}, JobRun, model_admin).lookups(request, model_admin)
    assert [job_id for job_id, _ in lookups] == ["fast_job", "daily_job"]


def test_jobrun_admin_is_read_only(viewer):
    JobRun.objects.bulk_create(make_runs(1))
    run = JobRun.objects.get()
    assert viewer.get(f"{RUNS_URL}add/").status_code == 403
    assert viewer.post(f"{RUNS_URL}{run.pk}/delete/", {"post": "yes"}).status_code == 403
    response = viewer.post(f"{RUNS_URL}{run.pk}/change/", {"summary": "edited"})
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.summary == "run 0"
    assert JobRun.objects.count() == 1
