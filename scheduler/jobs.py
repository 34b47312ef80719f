"""System jobs of the scheduler host: the probe and the history pruner."""

from __future__ import annotations

import time
from datetime import timedelta

from django.conf import settings
from django.db.models import QuerySet
from django.utils import timezone
from django_apscheduler.models import DjangoJobExecution

from core.models import MetricCounter
from scheduler.models import JobCommand, JobRun, SchedulerInstance
from scheduler.registry import registry_specs_lenient
from scheduler.runs import JobResult, scheduler_job

PRUNE_BATCH = 500


def _delete_in_batches(queryset: QuerySet) -> int:
    """Delete in short transactions of at most PRUNE_BATCH rows (SQLite writers stay brief)."""
    total = 0
    while True:
        ids = list(queryset.values_list("pk", flat=True)[:PRUNE_BATCH])
        if not ids:
            return total
        queryset.model.objects.filter(pk__in=ids).delete()
        total += len(ids)


def _one_second_job_ids() -> list[str]:
    return [
        spec.id
        for spec in registry_specs_lenient()
        if spec.trigger.kind == "interval" and spec.trigger.build("UTC").interval_length <= 1
    ]


@scheduler_job("prune_job_history")
def prune_job_history() -> JobResult:
    """Batched deletes of run history older than SCHEDULER_HISTORY_DAYS (1 s jobs' successes after 1 day)."""
    now = timezone.now()
    cutoff = now - timedelta(days=settings.SCHEDULER_HISTORY_DAYS)
    runs = _delete_in_batches(JobRun.objects.filter(scheduled_at__lt=cutoff))
    runs += _delete_in_batches(
        JobRun.objects.filter(
            job_id__in=_one_second_job_ids() + ["scheduler_probe"],
            scheduled_at__lt=now - timedelta(days=1),
            outcome__in=[JobRun.Outcome.OK, JobRun.Outcome.NOOP],
        )
    )
    executions = _delete_in_batches(DjangoJobExecution.objects.filter(run_time__lt=cutoff))
    executions += _delete_in_batches(
        DjangoJobExecution.objects.filter(
            job_id__in=_one_second_job_ids() + ["scheduler_probe"],
            run_time__lt=now - timedelta(days=1),
            status=DjangoJobExecution.SUCCESS,
        )
    )
    counters = _delete_in_batches(MetricCounter.objects.filter(minute__lt=cutoff))
    commands = _delete_in_batches(JobCommand.objects.filter(created_at__lt=cutoff))
    instances = _delete_in_batches(SchedulerInstance.objects.filter(last_heartbeat__lt=now - timedelta(days=1)))
    total = runs + executions + counters + commands + instances
    return JobResult(
        summary=f"deleted {runs} job runs, {executions} executions, {counters} counters, "
        f"{commands} commands, {instances} instances",
        noop=total == 0,
    )


@scheduler_job("scheduler_probe")
def scheduler_probe() -> JobResult:
    """Does nothing but let the wrapper record its run: proof the host schedules on time."""
    if settings.SCHEDULER_PROBE_SLEEP:
        time.sleep(settings.SCHEDULER_PROBE_SLEEP)
        return JobResult(summary=f"alive after {settings.SCHEDULER_PROBE_SLEEP:g} s")
    return JobResult(summary="alive", noop=True)
