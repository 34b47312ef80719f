"""Admin login lockout: django-axes' backend, tolerant of authenticate() calls without a request."""

from __future__ import annotations

from typing import Any

from axes.backends import AxesStandaloneBackend
from django.http import HttpRequest


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
