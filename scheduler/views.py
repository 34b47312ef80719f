"""Plain Django views of the scheduler: the unauthenticated health check."""

from __future__ import annotations

import logging

from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from scheduler.selectors import scheduler_running

logger = logging.getLogger(__name__)


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
