"""Admin login lockout: django-axes' backend, tolerant of authenticate() calls without a request."""

from __future__ import annotations

from typing import Any

from axes.backends import AxesStandaloneBackend
from axes.helpers import get_cool_off
from django.conf import settings
from django.http import HttpRequest, HttpResponse


class AxesLockoutBackend(AxesStandaloneBackend):
    """Refuses every login from a locked-out source (AXES_* settings); authenticates nobody itself.

    Logins through a web form always pass the request, so they are counted and locked. Calls
    without one (management commands, `Client.login` in tests) cannot be attributed to a source;
    axes would raise for them, so they pass to the next backend unchecked.
    """

    def authenticate(
        self, request: HttpRequest | None, username: str | None = None, password: str | None = None, **kwargs: Any
    ) -> None:
        if request is None:
            return None
        return super().authenticate(request, username, password, **kwargs)


def lockout_response(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: dict | None = None
) -> HttpResponse:
    """AXES_LOCKOUT_CALLABLE: axes' 429, plus Retry-After (the cool-off) like the API throttles' 429."""
    response = HttpResponse(
        "Too many failed login attempts from this address; try again later.",
        status=settings.AXES_HTTP_RESPONSE_CODE,
        content_type="text/plain; charset=utf-8",
    )
    cool_off = get_cool_off(request)
    if cool_off:
        response["Retry-After"] = str(int(cool_off.total_seconds()))
    return response
