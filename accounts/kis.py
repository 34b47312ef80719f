"""Korea Investment & Securities (KIS) Open API client: access-token issue over requests (SPEC §4.7)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import requests

from core.scrub import scrub, secret_register

logger = logging.getLogger(__name__)

REAL_BASE_URL = "https://openapi.koreainvestment.com:9443"
VIRTUAL_BASE_URL = "https://openapivts.koreainvestment.com:29443"
TOKEN_PATH = "/oauth2/tokenP"  # noqa: S105 -- a URL path, not a credential
TIMEOUT = (3.0, 10.0)  # connect, read (seconds)
KST = ZoneInfo("Asia/Seoul")
EXPIRED_FORMAT = "%Y-%m-%d %H:%M:%S"
# KIS answers a second token request within a minute for the same appkey with
# HTTP 403 {"error_code": "EGW00133", "error_description": "접근토큰 발급 잠시 후 다시 시도하세요(1분당 1회)"}.
THROTTLE_CODE = "EGW00133"


class KisError(Exception):
    """A KIS call failed. Messages never carry the appkey, appsecret or a token (they are scrubbed)."""

    def __init__(self, message: str) -> None:
        super().__init__(scrub(message))


class KisThrottledError(KisError):
    """KIS refused the token issue: one issue per minute per appkey (403 EGW00133). Retry after a minute."""


class KisAuthError(KisError):
    """KIS rejected the credentials or the request (401/403/400 other than the throttle)."""


class KisUnavailableError(KisError):
    """KIS could not be reached, timed out, failed (5xx) or sent a reply without a usable token."""


@dataclass(frozen=True)
class IssuedToken:
    access_token: str = field(repr=False)
    token_type: str
    expires_at: datetime


def kis_base_url(*, is_virtual: bool, override: str = "") -> str:
    """The API base: `override` (KIS_BASE_URL) when set, else the virtual or the real host."""
    if override:
        return override.rstrip("/")
    return VIRTUAL_BASE_URL if is_virtual else REAL_BASE_URL


def expires_at_parse(reply: dict[str, Any], *, now: datetime) -> datetime:
    """`access_token_token_expired` (KST wall time) as aware UTC; falls back to now + `expires_in`.

    Raises KisUnavailableError when the reply has neither in a usable form.
    """
    text = reply.get("access_token_token_expired")
    if isinstance(text, str) and text:
        try:
            return datetime.strptime(text, EXPIRED_FORMAT).replace(tzinfo=KST).astimezone(UTC)
        except ValueError:
            logger.warning("KIS access_token_token_expired %r unparsable; using expires_in", text[:40])
    seconds: Any = reply.get("expires_in")  # int() below turns None and junk alike away
    try:
        seconds = int(seconds)
    except (TypeError, ValueError):
        raise KisUnavailableError("KIS token reply has neither access_token_token_expired nor expires_in") from None
    if seconds <= 0:
        raise KisUnavailableError(f"KIS token reply has expires_in={seconds}")
    return now + timedelta(seconds=seconds)


def _error_detail(response: requests.Response) -> tuple[str, str]:
    """(error_code, one-line description) from a KIS error reply; the body when it is not JSON."""
    try:
        body = response.json()
    except ValueError:
        return "", response.text[:200].replace("\n", " ")
    if not isinstance(body, dict):
        return "", str(body)[:200]
    code = str(body.get("error_code") or body.get("msg_cd") or "")
    description = str(body.get("error_description") or body.get("msg1") or "")[:200]
    return code, description


def token_issue(*, base_url: str, appkey: str, appsecret: str, now: datetime) -> IssuedToken:
    """POST {base}/oauth2/tokenP once (no retries: KIS allows one issue a minute per appkey).

    Raises KisThrottledError (403 EGW00133), KisAuthError (credentials or request rejected) or
    KisUnavailableError (network, timeout, 5xx, malformed reply). The appkey, appsecret and the
    issued token are registered for scrubbing before anything can be logged.
    """
    secret_register(appkey)
    secret_register(appsecret)
    url = f"{base_url.rstrip('/')}{TOKEN_PATH}"
    payload = {"grant_type": "client_credentials", "appkey": appkey, "appsecret": appsecret}
    try:
        response = requests.post(url, json=payload, timeout=TIMEOUT)
    except requests.Timeout as exc:
        raise KisUnavailableError(f"KIS token request to {url} timed out: {type(exc).__name__}") from None
    except requests.RequestException as exc:
        raise KisUnavailableError(f"KIS token request to {url} failed: {type(exc).__name__}: {exc}") from None
    status = response.status_code
    if status != 200:
        code, description = _error_detail(response)
        detail = f"HTTP {status} {code} {description}".strip()
        # The throttle is documented as 403; any status carrying its code means the same.
        if code == THROTTLE_CODE or status == 429:
            raise KisThrottledError(f"KIS token issue throttled (one per minute per appkey): {detail}")
        if status in (400, 401, 403):
            raise KisAuthError(f"KIS rejected the token request: {detail}")
        raise KisUnavailableError(f"KIS token request failed: {detail}")
    try:
        reply = response.json()
    except ValueError:
        raise KisUnavailableError("KIS token reply is not JSON") from None
    token = reply.get("access_token") if isinstance(reply, dict) else None
    if not isinstance(token, str) or not token:
        raise KisUnavailableError("KIS token reply has no access_token")
    secret_register(token)
    return IssuedToken(
        access_token=token,
        token_type=str(reply.get("token_type") or "Bearer")[:20],
        expires_at=expires_at_parse(reply, now=now),
    )
