"""Account jobs: securities_token_refresh (6 h)."""

from __future__ import annotations

import logging

from django.utils import timezone

from accounts.kis import KisError
from accounts.tokens import ensure_token, securities_account_list_active
from notifications.services import alert_raise
from scheduler.runs import JobResult, scheduler_job

logger = logging.getLogger(__name__)


class TokenRefreshError(Exception):
    """Every securities account's token refresh failed; the accounts kept whatever tokens they had."""


@scheduler_job("securities_token_refresh")
def securities_token_refresh() -> JobResult:
    """ensure_token for every active KIS securities account (SPEC §4.7).

    Failures are per account: logged, alerted under `kis:<account id>` (throttled per key) and
    counted; the old token is kept. The run fails only when every account failed.
    """
    now = timezone.now()
    accounts = list(securities_account_list_active())
    issued = kept = 0
    failed: list[str] = []
    for account in accounts:
        try:
            token = ensure_token(account, now=now)
        except KisError as exc:
            kind, error = type(exc).__name__, f"{type(exc).__name__}: {exc}"
        else:
            if token.last_refreshed_at == now:
                issued += 1
                continue
            if token.last_issue_attempt_at != now:
                kept += 1
                continue
            # This run tried and failed; the still-valid old token was kept.
            kind = token.last_error.partition(":")[0]
            error = f"{token.last_error} (old token kept, valid until {token.expires_at:%Y-%m-%d %H:%M} UTC)"
        failed.append(f"account {account.pk} {kind}")
        logger.warning("KIS token refresh for account %s failed: %s", account.pk, error)
        alert_raise(key=f"kis:{account.pk}", text=f"KIS token refresh for account {account.pk} failed: {error}")
    summary = f"{len(accounts)} accounts: {issued} issued, {kept} kept, {len(failed)} failed"
    if failed:
        summary += "; failed: " + ", ".join(failed)
        if len(failed) == len(accounts):
            raise TokenRefreshError(summary)
    return JobResult(summary=summary, noop=not issued and not failed)
