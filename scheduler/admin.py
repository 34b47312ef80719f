"""Scheduler admin: a read-only job admin whose actions queue JobCommands, and read-only history views."""

from __future__ import annotations

import logging
from typing import Any

import django_apscheduler.admin  # noqa: F401  registers DjangoJobAdmin, which is replaced below
from django import forms
from django.contrib import admin, messages
from django.contrib.admin.helpers import ActionForm
from django.db.models import OuterRef, QuerySet, Subquery
from django.http import HttpRequest
from django.utils import timezone
from django_apscheduler.models import DjangoJob

from core.models import MetricCounter
from scheduler.models import JobCommand, JobControl, JobRun, Leadership, SchedulerInstance
from scheduler.registry import JobSpec, registry_specs_lenient
from scheduler.selectors import DISABLED_REASON, scheduler_leader
from scheduler.services import jobcommand_request

logger = logging.getLogger(__name__)


def _specs_by_id() -> dict[str, JobSpec]:
    return {spec.id: spec for spec in registry_specs_lenient()}


class StaffReadOnlyAdmin(admin.ModelAdmin):
    """Visible to every staff user (as the status API is); nobody adds, edits or deletes through it."""

    def has_module_permission(self, request: HttpRequest) -> bool:
        return request.user.is_active and request.user.is_staff

    def has_view_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return request.user.is_active and request.user.is_staff

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class JobCommandActionForm(ActionForm):
    reason = forms.CharField(required=False, max_length=500, label="Reason (required to pause)")


# django-apscheduler's own DjangoJobAdmin runs jobs inside the web request and unpickles job
# state (deleting rows it cannot unpickle); neither may happen outside the leader (SPEC §2.2).
if admin.site.is_registered(DjangoJob):
    admin.site.unregister(DjangoJob)


@admin.register(DjangoJob)
class SchedulerJobAdmin(StaffReadOnlyAdmin):
    """The job store as columns only: job_state is deferred and never unpickled."""

    action_form = JobCommandActionForm
    actions = ["run_now", "pause", "resume"]
    list_display = ["id", "job_name", "job_trigger", "next_run_time", "is_paused", "pause_reason", "last_outcome"]
    fields = readonly_fields = (
        "id",
        "job_name",
        "job_trigger",
        "next_run_time",
        "is_paused",
        "pause_reason",
        "last_outcome",
    )
    exclude = ["job_state"]
    search_fields = ["id"]
    ordering = ["id"]

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        latest_run = JobRun.objects.filter(job_id=OuterRef("id")).order_by("-scheduled_at")
        control = JobControl.objects.filter(job_id=OuterRef("id"))
        return (
            super()
            .get_queryset(request)
            .defer("job_state")
            .annotate(
                last_run_outcome=Subquery(latest_run.values("outcome")[:1]),
                last_run_at=Subquery(latest_run.values("scheduled_at")[:1]),
                control_paused=Subquery(control.values("paused")[:1]),
                control_reason=Subquery(control.values("pause_reason")[:1]),
            )
        )

    def has_operate_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("scheduler.add_jobcommand")

    @admin.display(description="name")
    def job_name(self, obj: DjangoJob) -> str:
        spec = _specs_by_id().get(obj.id)
        return spec.name if spec else "(not in the registry)"

    @admin.display(description="trigger")
    def job_trigger(self, obj: DjangoJob) -> str:
        spec = _specs_by_id().get(obj.id)
        return spec.trigger_text() if spec else "-"

    @admin.display(description="paused", boolean=True)
    def is_paused(self, obj: DjangoJob) -> bool:
        spec = _specs_by_id().get(obj.id)
        return obj.next_run_time is None or bool(obj.control_paused) or (spec is not None and not spec.enabled)

    @admin.display(description="pause reason")
    def pause_reason(self, obj: DjangoJob) -> str:
        if obj.control_paused:
            return obj.control_reason or "-"
        spec = _specs_by_id().get(obj.id)
        return DISABLED_REASON if spec is not None and not spec.enabled else "-"

    @admin.display(description="last outcome")
    def last_outcome(self, obj: DjangoJob) -> str:
        if obj.last_run_outcome is None:
            return "-"
        at = timezone.localtime(obj.last_run_at).strftime("%Y-%m-%d %H:%M:%S")
        return f"{obj.last_run_outcome} ({at})"

    def _request(self, request: HttpRequest, queryset: QuerySet, action: str, reason: str) -> None:
        requested, refused = [], []
        for job_id in queryset.values_list("id", flat=True):
            try:
                jobcommand_request(job_id=job_id, action=action, reason=reason, user=request.user)
            except ValueError as exc:
                refused.append(f"{job_id} ({exc})")
            else:
                requested.append(job_id)
        if requested:
            logger.info("admin: %s requested for %s by %s", action, ", ".join(requested), request.user.get_username())
            self.message_user(
                request,
                f"{action.capitalize()} requested for {', '.join(requested)}; "
                "the scheduler leader will carry it out within a few seconds.",
                messages.SUCCESS,
            )
            if scheduler_leader(now=timezone.now()) is None:
                self.message_user(
                    request, "No scheduler leader is running: the request waits until one is.", messages.WARNING
                )
        if refused:
            self.message_user(request, f"Not requested: {'; '.join(refused)}", messages.ERROR)

    @admin.action(description="Run now", permissions=["operate"])
    def run_now(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._request(request, queryset, JobCommand.Action.RUN, request.POST.get("reason", "").strip())

    @admin.action(description="Pause (with reason)", permissions=["operate"])
    def pause(self, request: HttpRequest, queryset: QuerySet) -> None:
        reason = request.POST.get("reason", "").strip()
        if not reason:
            self.message_user(request, "Pausing needs a reason: nothing was requested.", messages.ERROR)
            return
        self._request(request, queryset, JobCommand.Action.PAUSE, reason)

    @admin.action(description="Resume", permissions=["operate"])
    def resume(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._request(request, queryset, JobCommand.Action.RESUME, request.POST.get("reason", "").strip())


class JobRunJobFilter(admin.SimpleListFilter):
    """Job ids from the code registry; never a DISTINCT over JobRun (millions of rows)."""

    title = "job"
    parameter_name = "job"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [(spec.id, spec.id) for spec in registry_specs_lenient()]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        if self.value():
            return queryset.filter(job_id=self.value())
        return queryset


@admin.register(JobRun)
class JobRunAdmin(StaffReadOnlyAdmin):
    """Run history. Deletion is left to prune_job_history (batched); the admin never deletes runs."""

    list_display = [
        "job_id",
        "scheduled_at",
        "kind",
        "outcome",
        "duration_ms",
        "lateness_ms",
        "term",
        "host",
        "summary",
    ]
    list_filter = [JobRunJobFilter, "outcome"]
    date_hierarchy = "scheduled_at"
    ordering = ["-scheduled_at"]
    # A full COUNT(*) and facet counts would scan the table on every page view.
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER


@admin.register(SchedulerInstance)
class SchedulerInstanceAdmin(StaffReadOnlyAdmin):
    list_display = [
        "host",
        "pid",
        "role",
        "term",
        "backend_pid",
        "thread_alive",
        "last_heartbeat",
        "leader_since",
        "started_at",
        "version",
    ]
    list_filter = ["role"]
    ordering = ["-last_heartbeat"]


@admin.register(JobControl)
class JobControlAdmin(StaffReadOnlyAdmin):
    list_display = ["job_id", "paused", "pause_reason", "stale", "updated_at", "updated_by"]
    ordering = ["job_id"]


@admin.register(JobCommand)
class JobCommandAdmin(StaffReadOnlyAdmin):
    list_display = ["id", "job_id", "action", "reason", "requested_by", "created_at", "status", "result", "done_at"]
    list_filter = ["status", "action"]
    list_select_related = ["requested_by"]
    ordering = ["-id"]
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER


@admin.register(Leadership)
class LeadershipAdmin(StaffReadOnlyAdmin):
    list_display = ["term", "host", "pid", "backend_pid", "instance_id", "since"]


@admin.register(MetricCounter)
class MetricCounterAdmin(StaffReadOnlyAdmin):
    list_display = ["minute", "name", "labels", "value"]
    date_hierarchy = "minute"
    ordering = ["-minute", "name", "labels"]
    show_full_result_count = False
    show_facets = admin.ShowFacets.NEVER
