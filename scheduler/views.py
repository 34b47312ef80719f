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

from scheduler.selectors import jobrun_list_recent, jobrun_max_id, scheduler_running, scheduler_status

logger = logging.getLogger(__name__)

DASHBOARD_RECENT_RUNS = 30


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
    context = {
        "status": scheduler_status(now=now),
        "recent_runs": jobrun_list_recent(limit=DASHBOARD_RECENT_RUNS),
        "cursor": cursor,
        "recent_limit": DASHBOARD_RECENT_RUNS,
        "scheduler_timezone": settings.SCHEDULER_TIMEZONE,
    }
    return render(request, "scheduler/dashboard.html", context)
