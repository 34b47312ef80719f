"""Reconciliation of the code registry with the DjangoJob store, once per leadership term (SPEC §2.2)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from apscheduler.schedulers.base import BaseScheduler
from apscheduler.util import ref_to_obj
from django.conf import settings
from django_apscheduler.models import DjangoJob

from scheduler.models import JobControl
from scheduler.registry import JobSpec

logger = logging.getLogger(__name__)

STALE_REASON = "no longer in the code registry"


@dataclass
class ReconcileReport:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    stale: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)


def job_function(spec: JobSpec) -> Any:
    """Import the job function; it must be the scheduler wrapper (SPEC §2.1)."""
    func = ref_to_obj(spec.func)
    if getattr(func, "scheduler_job_id", None) != spec.id:
        raise ValueError(f"{spec.func} is not wrapped with @scheduler_job({spec.id!r})")
    return func


def _differences(job: Any, spec: JobSpec, trigger: Any) -> list[str]:
    diffs = []
    if job.func_ref != spec.func:
        diffs.append(f"function {job.func_ref} -> {spec.func}")
    if str(job.trigger) != str(trigger) or str(job.trigger.timezone) != str(trigger.timezone):
        diffs.append(f"trigger {job.trigger} ({job.trigger.timezone}) -> {trigger} ({trigger.timezone})")
    if job.misfire_grace_time != spec.grace:
        diffs.append(f"grace {job.misfire_grace_time} -> {spec.grace}")
    if job.name != spec.name:
        diffs.append(f"name {job.name!r} -> {spec.name!r}")
    if job.coalesce is not True or job.max_instances != 1 or job.args or job.kwargs:
        diffs.append("options")
    return diffs


def reconcile(scheduler: BaseScheduler, specs: list[JobSpec]) -> ReconcileReport:
    """Make the job store match the registry. Leader only: this unpickles job state.

    Unchanged jobs keep their next run time and pause; changed ones are replaced and
    logged; ids no longer in the registry are paused and flagged, never deleted.
    Pause state from JobControl and `enabled: false` overrides is re-applied last.
    """
    report = ReconcileReport()
    tz = settings.SCHEDULER_TIMEZONE
    stored_ids = set(DjangoJob.objects.values_list("id", flat=True))
    controls = {c.job_id: c for c in JobControl.objects.all()}
    for spec in specs:
        job_function(spec)
        trigger = spec.trigger.build(tz)
        job = scheduler.get_job(spec.id) if spec.id in stored_ids else None
        if job is not None and not _differences(job, spec, trigger):
            report.unchanged.append(spec.id)
        else:
            if job is not None:
                logger.warning("job %s changed: %s; replacing", spec.id, "; ".join(_differences(job, spec, trigger)))
                report.replaced.append(spec.id)
            else:
                logger.info("job %s added (%s)", spec.id, trigger)
                report.added.append(spec.id)
            job = scheduler.add_job(
                spec.func,
                trigger=trigger,
                id=spec.id,
                name=spec.name,
                misfire_grace_time=spec.grace,
                coalesce=True,
                max_instances=1,
                replace_existing=True,
            )
        control = controls.get(spec.id)
        if control is not None and control.stale:
            JobControl.objects.filter(job_id=spec.id).update(stale=False)
        paused = not spec.enabled or (control is not None and control.paused)
        if paused:
            report.paused.append(spec.id)
            if job.next_run_time is not None:
                scheduler.pause_job(spec.id)
        elif job.next_run_time is None:
            scheduler.resume_job(spec.id)
    stale = sorted(stored_ids - {spec.id for spec in specs})
    if stale:
        # Pause by the column alone: these rows may not even unpickle any more.
        DjangoJob.objects.filter(id__in=stale).update(next_run_time=None)
        for job_id in stale:
            JobControl.objects.update_or_create(
                job_id=job_id, defaults={"paused": True, "stale": True, "pause_reason": STALE_REASON}
            )
        logger.warning("stale job ids paused (delete with runscheduler --prune-stale): %s", ", ".join(stale))
        report.stale = stale
    return report


def prune_stale(specs: list[JobSpec]) -> list[str]:
    """Delete DjangoJob rows (and, by cascade, their history) whose ids left the registry."""
    stale = sorted(set(DjangoJob.objects.values_list("id", flat=True)) - {spec.id for spec in specs})
    DjangoJob.objects.filter(id__in=stale).delete()
    JobControl.objects.filter(job_id__in=stale).delete()
    return stale
