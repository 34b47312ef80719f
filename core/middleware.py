"""Request body caps by path prefix: 413 with a JSON body before anything parses the body or checks a token.

Two layers, one table (`body_limit_for`):
- `BodySizeLimitMiddleware` (Django): refuses a declared Content-Length above the cap, and turns
  Django's own RequestDataTooBig (DATA_UPLOAD_MAX_MEMORY_SIZE, a 400 by default) into a 413.
  Under WSGI that is the whole story: Django reads at most Content-Length bytes.
- `asgi_body_limit` (ASGI, wrapped around the Django app in tradingsite.asgi): counts the body
  while it arrives, so a chunked body without Content-Length is cut off at the cap instead of
  being spooled whole by Django's ASGI handler first.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse, JsonResponse

logger = logging.getLogger(__name__)

ASGIMessage = Mapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]
ASGIApp = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


def body_limit_for(path: str) -> int | None:
    """The byte cap of a request body on `path` (longest matching prefix of BODY_LIMITS), or None."""
    best: tuple[int, int] | None = None
    for prefix, limit in settings.BODY_LIMITS.items():
        if path.startswith(prefix) and (best is None or len(prefix) > best[0]):
            best = (len(prefix), int(limit))
    return best[1] if best is not None else None


def too_large_body(limit: int | None) -> dict[str, Any]:
    detail = "request body too large" + (f": at most {limit} bytes" if limit is not None else "")
    return {"detail": detail}


def _declared_length(value: Any) -> int | None:
    try:
        length = int(value)
    except (TypeError, ValueError):
        return None
    return length if length >= 0 else None


class BodySizeLimitMiddleware:
    """413 (JSON body) for a body whose Content-Length is above its path's cap or DATA_UPLOAD_MAX_MEMORY_SIZE."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]):
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = body_limit_for(request.path_info)
        # Django's cap covers every body but file uploads (multipart); it is checked here too, because
        # a RequestDataTooBig raised before the view (e.g. by the CSRF check) never reaches process_exception.
        django_limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        if django_limit is not None and not (request.content_type or "").startswith("multipart/"):
            limit = django_limit if limit is None else min(limit, django_limit)
        length = _declared_length(request.META.get("CONTENT_LENGTH"))
        if limit is not None and length is not None and length > limit:
            logger.warning("request to %s refused: body of %d bytes above %d", request.path_info, length, limit)
            return JsonResponse(too_large_body(limit), status=413)
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        # Django's own cap (DATA_UPLOAD_MAX_MEMORY_SIZE) is a SuspiciousOperation, which Django answers
        # with 400; too large is 413.
        if isinstance(exception, RequestDataTooBig):
            return JsonResponse(too_large_body(settings.DATA_UPLOAD_MAX_MEMORY_SIZE), status=413)
        return None


async def _reply_413(send: Send, limit: int) -> None:
    body = json.dumps(too_large_body(limit)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


def asgi_body_limit(app: ASGIApp) -> ASGIApp:
    """Wrap an ASGI HTTP app: bodies on capped paths are read here, at most their cap, then replayed to `app`.

    A declared Content-Length above the cap is refused before any body is read; otherwise the
    chunks are counted as they arrive and the request is refused (413) as soon as they pass the
    cap, without `app` ever seeing it. Paths without a cap pass through untouched.
    """

    async def limited(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        limit = body_limit_for(scope.get("path", "")) if scope.get("type") == "http" else None
        if limit is None:
            await app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = _declared_length(headers.get(b"content-length", b"").decode("latin-1") or None)
        if declared is not None and declared > limit:
            await _reply_413(send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                logger.warning("request to %s refused: body above %d bytes", scope.get("path"), limit)
                await _reply_413(send, limit)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> ASGIMessage:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: the client's disconnect, when it comes

        await app(scope, replay, send)

    return limited
