"""The host in-process: reconciliation, watchdog, command poller, manual runs, pruning."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from apscheduler.schedulers.background import BackgroundScheduler
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_apscheduler.models import DjangoJob, DjangoJobExecution

from scheduler.executor import SafeDjangoJobStore
from scheduler.jobs import prune_job_history
from scheduler.models import JobCommand, JobControl, JobRun, SchedulerInstance
from scheduler.reconcile import reconcile
from scheduler.registry import PROBE_JOB, REGISTRY, interval
from scheduler.runner import SchedulerHost
from scheduler.services import jobcommand_request, leadership_begin_term
from tests.procs import wait_for

PRUNE = REGISTRY[0]


def paused_store_scheduler() -> BackgroundScheduler:
    scheduler = BackgroundScheduler(jobstores={"default": SafeDjangoJobStore()}, timezone="Asia/Seoul")
    scheduler.start(paused=True)
    return scheduler


@pytest.mark.django_db
def test_reconcile_keeps_unchanged_replaces_changed_pauses_stale():
    scheduler = paused_store_scheduler()
    try:
        first = reconcile(scheduler, [PRUNE, PROBE_JOB])
        assert sorted(first.added) == ["prune_job_history", "scheduler_probe"]
        kept_next = DjangoJob.objects.get(id="prune_job_history").next_run_time
        scheduler.pause_job("scheduler_probe")
        JobControl.objects.create(job_id="scheduler_probe", paused=True, pause_reason="maintenance")
        DjangoJob.objects.create(id="retired_job", next_run_time=timezone.now(), job_state=b"not a pickle")
        changed_probe = dataclasses.replace(PROBE_JOB, trigger=interval(seconds=2))

        second = reconcile(scheduler, [PRUNE, changed_probe])
        assert second.unchanged == ["prune_job_history"] and second.replaced == ["scheduler_probe"]
        assert DjangoJob.objects.get(id="prune_job_history").next_run_time == kept_next
        assert str(scheduler.get_job("scheduler_probe").trigger) == "interval[0:00:02]"
        assert scheduler.get_job("scheduler_probe").next_run_time is None  # pause re-applied
        assert second.stale == ["retired_job"]
        retired = DjangoJob.objects.get(id="retired_job")  # never deleted, even unpicklable
        assert retired.next_run_time is None
        assert JobControl.objects.get(job_id="retired_job").stale

        call_command("runscheduler", "--prune-stale")
        assert not DjangoJob.objects.filter(id="retired_job").exists()
        assert DjangoJob.objects.filter(id="prune_job_history").exists()
    finally:
        scheduler.shutdown(wait=False)


@pytest.mark.django_db
def test_disabled_override_pauses_without_deleting():
    scheduler = paused_store_scheduler()
    try:
        reconcile(scheduler, [PROBE_JOB])
        reconcile(scheduler, [dataclasses.replace(PROBE_JOB, enabled=False)])
        assert DjangoJob.objects.get(id="scheduler_probe").next_run_time is None
        reconcile(scheduler, [PROBE_JOB])
        assert DjangoJob.objects.get(id="scheduler_probe").next_run_time is not None
    finally:
        scheduler.shutdown(wait=False)


@pytest.fixture
def host(transactional_db, settings):  # noqa: ANN001
    settings.SCHEDULER_PROBE_JOB = True
    host = SchedulerHost(specs=[PROBE_JOB, PRUNE])
    yield host
    host.stop_event.set()
    host._shutdown(wait_for_jobs=False)
    host.lock.release()


def probe_runs() -> int:
    return JobRun.objects.filter(job_id="scheduler_probe").count()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_watchdog_rebuilds_a_dead_scheduler_thread(host):
    from scheduler.selectors import scheduler_running

    host._standby_tick()
    assert host.role == SchedulerInstance.Role.LEADER
    wait_for(lambda: probe_runs() >= 2, timeout=15, what="probe runs")
    assert scheduler_running(now=timezone.now())

    def explode():
        raise RuntimeError("job store failed mid-save")

    dead = host.scheduler
    dead._process_jobs = explode  # APScheduler 3's thread dies; scheduler.running stays true
    dead.wakeup()
    wait_for(lambda: not host.thread_alive(), timeout=5, what="the APScheduler thread to die")
    assert dead.running
    host._heartbeat(force=True)
    assert not scheduler_running(now=timezone.now())

    host._watchdog()
    assert host.scheduler is not dead and host.thread_alive()
    assert len(host.restarts) == 1
    host._heartbeat(force=True)
    assert scheduler_running(now=timezone.now())
    before = probe_runs()
    wait_for(lambda: probe_runs() >= before + 2, timeout=15, what="runs after the rebuild")
    assert JobRun.objects.values("term").distinct().count() == 1  # same term: the lock was still held


def test_new_leader_closes_runs_abandoned_by_a_dead_leader(host):
    now = timezone.now()

    def running(kind, term):
        return JobRun.objects.create(
            job_id="scheduler_probe",
            scheduled_at=now - timedelta(seconds=10 if kind == JobRun.Kind.MANUAL else 20),
            term=term,
            host="dead",
            pid=1,
            kind=kind,
            started_at=now,
            outcome=JobRun.Outcome.RUNNING,
        )

    abandoned = running(JobRun.Kind.SCHEDULED, 0)
    manual = running(JobRun.Kind.MANUAL, 0)
    host._standby_tick()
    abandoned.refresh_from_db()
    manual.refresh_from_db()
    assert abandoned.outcome == JobRun.Outcome.ERROR and abandoned.summary.startswith("abandoned")
    assert abandoned.finished_at is not None
    assert manual.outcome == JobRun.Outcome.RUNNING  # a CLI --run may outlive a takeover


def test_watchdog_exits_after_three_restarts(host):
    from scheduler.runner import WatchdogExit

    host._standby_tick()
    for _ in range(3):
        host._restart_scheduler("test")
    with pytest.raises(WatchdogExit) as excinfo:
        host._restart_scheduler("test")
    assert excinfo.value.code == 3


def test_command_poller_runs_pauses_and_resumes(host, staff_user):
    host._standby_tick()
    poller = host.leader_threads[0]
    run_cmd = jobcommand_request(job_id="prune_job_history", action=JobCommand.Action.RUN, user=staff_user)
    pause_cmd = jobcommand_request(job_id="scheduler_probe", action=JobCommand.Action.PAUSE, reason="exchange down")
    wait_for(
        lambda: JobCommand.objects.filter(pk__in=[run_cmd.pk, pause_cmd.pk], status="done").count() == 2,
        timeout=15,
        what="both commands done",
    )
    manual = JobRun.objects.get(job_id="prune_job_history")
    assert manual.kind == JobRun.Kind.MANUAL and manual.term == host.term
    assert JobControl.objects.get(job_id="scheduler_probe").pause_reason == "exchange down"
    assert DjangoJob.objects.get(id="scheduler_probe").next_run_time is None
    assert poller.term == host.term

    resume = jobcommand_request(job_id="scheduler_probe", action=JobCommand.Action.RESUME)
    wait_for(lambda: JobCommand.objects.get(pk=resume.pk).status == "done", timeout=15, what="resume")
    assert not JobControl.objects.get(job_id="scheduler_probe").paused
    assert DjangoJob.objects.get(id="scheduler_probe").next_run_time is not None


def test_pause_survives_a_new_term(host):
    host._standby_tick()
    jobcommand_request(job_id="scheduler_probe", action=JobCommand.Action.PAUSE, reason="hold")
    wait_for(lambda: JobControl.objects.filter(paused=True).exists(), timeout=15, what="pause")
    host._step_down()
    host._standby_tick()
    assert host.term == 2
    assert DjangoJob.objects.get(id="scheduler_probe").next_run_time is None


@pytest.mark.django_db
def test_run_refused_while_leader_runs_it_unless_forced():
    leadership_begin_term(instance_id="x", host="h", pid=1, backend_pid=None)
    SchedulerInstance.objects.create(
        instance_id="x", host="h", pid=1, role="leader", started_at=timezone.now(), last_heartbeat=timezone.now()
    )
    with pytest.raises(CommandError, match="refused"):
        call_command("runscheduler", "--run", "prune_job_history")
    assert not JobRun.objects.exists()
    call_command("runscheduler", "--run", "prune_job_history", "--force")
    assert JobRun.objects.get().kind == JobRun.Kind.MANUAL
    with pytest.raises(CommandError, match="unknown job"):
        call_command("runscheduler", "--run", "nope")


@pytest.mark.django_db
def test_list_reads_columns_only(capsys):
    DjangoJob.objects.create(id="prune_job_history", next_run_time=None, job_state=b"garbage")
    call_command("runscheduler", "--list")
    out = capsys.readouterr().out
    assert "prune_job_history" in out and "paused" in out
    assert DjangoJob.objects.filter(id="prune_job_history").exists()  # never unpickled, never deleted


@pytest.mark.django_db
def test_prune_job_history_deletes_old_rows_in_batches(settings):
    settings.SCHEDULER_HISTORY_DAYS = 7
    now = timezone.now()
    DjangoJob.objects.create(id="prune_job_history", next_run_time=None, job_state=b"")

    def jobrun(job_id, age, outcome="ok"):
        return JobRun(
            job_id=job_id,
            scheduled_at=now - age,
            term=1,
            host="h",
            pid=1,
            started_at=now - age,
            outcome=outcome,
        )

    rows = [jobrun("prune_job_history", timedelta(days=8, seconds=i)) for i in range(1200)]
    rows += [jobrun("scheduler_probe", timedelta(days=2, seconds=i)) for i in range(10)]
    rows += [jobrun("scheduler_probe", timedelta(days=2, seconds=100), outcome="error")]
    rows += [jobrun("prune_job_history", timedelta(days=2))]
    JobRun.objects.bulk_create(rows, batch_size=500)
    DjangoJobExecution.objects.create(job_id="prune_job_history", status="Executed", run_time=now - timedelta(days=9))
    prune_job_history()
    remaining = set(JobRun.objects.values_list("job_id", "outcome"))
    assert JobRun.objects.filter(scheduled_at__lt=now - timedelta(days=7)).count() == 0
    assert ("scheduler_probe", "error") in remaining  # failures of the 1 s job are kept for the window
    assert JobRun.objects.filter(job_id="scheduler_probe", outcome="ok").count() == 0
    assert JobRun.objects.filter(job_id="prune_job_history", scheduled_at__gte=now - timedelta(days=3)).exists()
    assert not DjangoJobExecution.objects.filter(run_time__lt=now - timedelta(days=7)).exists()
    summary = JobRun.objects.filter(kind=JobRun.Kind.MANUAL).get().summary
    assert "deleted 1210 job runs" in summary and "1 executions" in summary
