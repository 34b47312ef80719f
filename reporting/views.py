"""Plain Django views of the reporting app: the landing page and the trader dashboard."""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from reporting.consumers import trader_feed_start
from reporting.trader_selectors import TraderScope


@require_GET
def home(request: HttpRequest) -> HttpResponse:
    """`/`: what this site offers and where (dashboards, admin, API docs); the admin's "View site"."""
    return render(request, "reporting/home.html", {"display_timezone": settings.DISPLAY_TIMEZONE})


@never_cache
@require_GET
@login_required
def trader_dashboard(request: HttpRequest) -> HttpResponse:
    """The trader's view: PnL per strategy, positions, orders with their queue rank, fills, balances.

    Staff see every account, other users their own. Rendered from the same snapshot the `ws/trader/`
    feed starts with, then kept current by the feed; read-only.
    """
    snapshot, _ = trader_feed_start(scope=TraderScope.for_user(request.user), now=timezone.now())
    return render(
        request,
        "reporting/trader.html",
        {"snapshot": snapshot, "display_timezone": settings.DISPLAY_TIMEZONE, "everything": request.user.is_staff},
    )
