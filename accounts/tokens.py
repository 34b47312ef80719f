"""KIS access tokens: `ensure_token` is the one way to get a valid token for a securities account (SPEC §4.7)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from accounts.kis import KisAuthError, KisError, KisThrottledError, kis_base_url, token_issue
from accounts.models import Account, Exchange, SecuritiesToken
from core.scrub import scrub

logger = logging.getLogger(__name__)

EXPIRY_MARGIN = timedelta(minutes=5)  # issue when less than this remains
REFRESH_AGE = timedelta(hours=6)  # re-issue when the token is older than this
# One issue per minute per appkey at KIS; a second of slack for clock skew between our hosts and KIS.
CLAIM_WINDOW = timedelta(seconds=61)


class TokenIssuePendingError(KisError):
    """No valid token yet, and another caller's issue (or a throttled one) holds the claim; retry later."""


def token_due(
    *, access_token: str, expires_at: datetime | None, last_refreshed_at: datetime | None, now: datetime
) -> str:
    """Why a token must be (re-)issued at `now`: "missing", "expiring", "stale", or "" when it is kept."""
    if not access_token or expires_at is None:
        return "missing"
    if expires_at - now < EXPIRY_MARGIN:
        return "expiring"
    if last_refreshed_at is None or now - last_refreshed_at > REFRESH_AGE:
        return "stale"
    return ""


def token_usable(token: SecuritiesToken, *, now: datetime) -> bool:
    return bool(token.access_token) and token.expires_at is not None and token.expires_at > now


def securities_account_list_active() -> QuerySet[Account]:
    """Active KIS securities accounts, the ones whose tokens the refresh job keeps fresh."""
    return Account.objects.filter(
        is_active=True, account_type=Account.AccountType.SECURITIES, exchange=Exchange.KIS
    ).order_by("pk")


def _claim(*, token_pk: int, now: datetime) -> bool:
    """Move last_issue_attempt_at to `now` unless an attempt was made in the last 61 s.

    One UPDATE in its own transaction: the row lock lasts only for the statement, so of any
    number of concurrent callers exactly one sees a row updated, and nobody holds a lock while
    KIS is called. The claim is never released: it doubles as KIS's one-issue-a-minute limit.
    """
    with transaction.atomic(durable=True):
        return bool(
            SecuritiesToken.objects.filter(pk=token_pk)
            .filter(Q(last_issue_attempt_at__isnull=True) | Q(last_issue_attempt_at__lt=now - CLAIM_WINDOW))
            .update(last_issue_attempt_at=now)
        )


def _record_failure(token: SecuritiesToken, *, now: datetime, error: str) -> None:
    token.last_error = scrub(error)[:500]
    token.last_issue_attempt_at = now
    with transaction.atomic(durable=True):
        SecuritiesToken.objects.filter(pk=token.pk).update(last_error=token.last_error)


def ensure_token(account: Account, *, now: datetime | None = None) -> SecuritiesToken:
    """Return the account's KIS token, issuing one first when it is missing, expiring (< 5 min) or > 6 h old.

    Single flight without a lock over the network: only the caller whose claim UPDATE hit the row
    calls KIS, then stores the token in a second short transaction. When the issue fails (throttle,
    auth, outage) or another caller holds the claim, the stored token is kept and returned while it is
    still valid; the failure is recorded in `last_error` and the next attempt waits >= 61 s.
    Raises KisError (KisThrottledError, KisAuthError, KisUnavailableError, TokenIssuePendingError)
    only when no valid token can be returned. Must not run inside a transaction (durable blocks).
    After the call, `last_refreshed_at == now` means this call issued the token, and
    `last_issue_attempt_at == now` without it means this call tried and failed.
    """
    if account.exchange != Exchange.KIS or account.account_type != Account.AccountType.SECURITIES:
        raise ValueError(f"account {account.pk} is not a KIS securities account")
    now = now or timezone.now()
    token, _ = SecuritiesToken.objects.get_or_create(account=account)
    reason = token_due(
        access_token=token.access_token,
        expires_at=token.expires_at,
        last_refreshed_at=token.last_refreshed_at,
        now=now,
    )
    if not reason:
        return token
    if not account.kis_appkey or not account.kis_appsecret:
        # A configuration problem, not a KIS answer: no claim is spent on it.
        raise KisAuthError(f"account {account.pk} has no KIS appkey/appsecret configured")

    if not _claim(token_pk=token.pk, now=now):
        token.refresh_from_db()
        if token_usable(token, now=now):
            logger.info(
                "KIS token for account %s is %s; an issue is already in flight or throttled", account.pk, reason
            )
            return token
        retry_at = (token.last_issue_attempt_at or now) + CLAIM_WINDOW
        raise TokenIssuePendingError(
            f"KIS token for account {account.pk}: issue in flight or throttled, retry after {retry_at:%H:%M:%S} UTC"
            + (f" (last error: {token.last_error})" if token.last_error else "")
        )

    base_url = kis_base_url(is_virtual=account.is_virtual, override=settings.KIS_BASE_URL)
    logger.info("KIS token for account %s is %s; issuing at %s", account.pk, reason, base_url)
    try:
        issued = token_issue(base_url=base_url, appkey=account.kis_appkey, appsecret=account.kis_appsecret, now=now)
    except KisError as exc:
        _record_failure(token, now=now, error=f"{type(exc).__name__}: {exc}")
        if token_usable(token, now=now):
            level = logging.WARNING if isinstance(exc, KisThrottledError) else logging.ERROR
            # Wording matters: "token: <text>" would be taken for a secret by the scrubber.
            logger.log(level, "KIS token issue for account %s failed (%s); the old one is kept", account.pk, exc)
            return token
        raise

    token.access_token = issued.access_token
    token.token_type = issued.token_type
    token.expires_at = issued.expires_at
    token.last_refreshed_at = now
    token.last_issue_attempt_at = now
    token.last_error = ""
    with transaction.atomic(durable=True):
        SecuritiesToken.objects.filter(pk=token.pk).update(
            access_token=issued.access_token,
            token_type=issued.token_type,
            expires_at=issued.expires_at,
            last_refreshed_at=now,
            last_error="",
        )
    logger.info("KIS token issued for account %s, expires at %s", account.pk, issued.expires_at)
    return token
