"""Plain Django views of the scheduler: the unauthenticated health check and the staff dashboard."""

from __future__ import annotations

import logging

from django.conf import settings
from django.contrib.admin.views.decorators import staff_member_required
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from scheduler.registry import registry_specs_lenient
from scheduler.selectors import (
    jobrun_list_recent,
    jobrun_max_id,
    jobrun_series,
    scheduler_running,
    scheduler_status,
)

logger = logging.getLogger(__name__)

DASHBOARD_RECENT_RUNS = 30
# Points per job in the lateness/duration chart (the 1 s job: the last five minutes).
DASHBOARD_SERIES_POINTS = 300


@never_cache
@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 {"status": "ok"} while the scheduler is running (SPEC §2.5 predicate), else 503; no details."""
    try:
        running = scheduler_running(now=timezone.now())
    except DatabaseError as exc:
        logger.warning("healthz: database unavailable: %s", exc)
        running = False
    if running:
        return JsonResponse({"status": "ok"})
    return JsonResponse({"status": "unavailable"}, status=503)


@never_cache
@require_GET
@staff_member_required
def dashboard(request: HttpRequest) -> HttpResponse:
    """The scheduler dashboard: every registry job, leader and standbys, recent runs. Staff only
    (others are sent to the admin login). Rendered here, then kept current by the `ws/scheduler/`
    feed from `cursor` on; read-only."""
    now = timezone.now()
    # The cursor is read before the page's data: a run landing in between is sent again by the
    # feed (the page de-duplicates by id) rather than missed.
    cursor = jobrun_max_id()
    # Runs that did something (or failed) and no-op runs are listed apart: the 1 s queue job's
    # no-ops would otherwise push everything else off the page. No-ops are collapsed by default.
    recent = jobrun_list_recent(limit=DASHBOARD_RECENT_RUNS, noop=False)
    noops = jobrun_list_recent(limit=DASHBOARD_RECENT_RUNS, noop=True)
    context = {
        "status": scheduler_status(now=now),
        "recent_runs": sorted([*recent, *noops], key=lambda run: run["id"], reverse=True),
        "cursor": cursor,
        "recent_limit": DASHBOARD_RECENT_RUNS,
        "series_points": DASHBOARD_SERIES_POINTS,
        "display_timezone": settings.DISPLAY_TIMEZONE,
    }
    return render(request, "scheduler/dashboard.html", context)


@never_cache
@require_GET
@staff_member_required
def job_series(request: HttpRequest, job_id: str) -> JsonResponse:
    """The dashboard's chart data of one job: its newest finished runs, oldest first (staff only)."""
    if job_id not in {spec.id for spec in registry_specs_lenient()}:
        return JsonResponse({"error": f"unknown job {job_id}"}, status=404)
    runs = jobrun_series(job_id=job_id, limit=DASHBOARD_SERIES_POINTS)
    return JsonResponse({"job_id": job_id, "runs": runs})
