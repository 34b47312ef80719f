"""Error reports without credentials: the debug page's settings, request and frame values are scrubbed."""

from __future__ import annotations

from typing import Any

from django.views.debug import SafeExceptionReporterFilter as DjangoFilter

from core.scrub import url_password_scrub


class SafeExceptionReporterFilter(DjangoFilter):
    """Django's filter (hides settings named like KEY, TOKEN, PASS, SECRET, …), plus: a password in
    any URL-shaped value (`postgres://u:pw@host`, `redis://:pw@host`) is replaced by ***, wherever
    the URL sits (CACHES LOCATION, CHANNEL_LAYERS hosts, a frame's local variable)."""

    def cleanse_setting(self, key: Any, value: Any) -> Any:
        cleansed = super().cleanse_setting(key, value)
        return _scrub_urls(cleansed)

    def get_traceback_frame_variables(self, request: Any, tb_frame: Any) -> Any:
        return [(name, _scrub_urls(value)) for name, value in super().get_traceback_frame_variables(request, tb_frame)]


def _scrub_urls(value: Any) -> Any:
    if type(value) is str:  # not lazy settings objects: str() would evaluate them
        return url_password_scrub(value)
    if isinstance(value, dict):
        return {k: _scrub_urls(v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_scrub_urls(v) for v in value)
    return value
