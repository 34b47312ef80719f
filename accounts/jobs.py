"""Account jobs: securities_token_refresh (6 h), auto_rebalance_accounts (hourly :17)."""

from __future__ import annotations

import logging

from django.utils import timezone

from accounts.allocation_services import capital_pair_update, capital_pairs_active
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


class CapitalRefreshError(Exception):
    """No (account, market type) had a usable capital total: every balance call failed without a fallback."""


@scheduler_job("auto_rebalance_accounts")
def auto_rebalance_accounts() -> JobResult:
    """Snapshot each (account, market type)'s capital, then reallocate or compound (SPEC §4.11).

    A failed balance call falls back to a LIVE snapshot at most 24 h old (logged); without one
    the pair is skipped for allocation (logged, alerted under `capital:<account>:<market>`,
    counted) but still compounds. The run fails only when every pair was skipped.
    """
    now = timezone.now()
    pairs = capital_pairs_active()
    rebalanced = compounded = fallback = 0
    skipped: list[str] = []
    for account, market_type in pairs:
        outcome = capital_pair_update(account=account, market_type=market_type, now=now)
        rebalanced += outcome.rebalanced
        compounded += outcome.compounded
        if outcome.skipped:
            skipped.append(outcome.key)
            logger.warning("capital of %s: no allocation this run: %s", outcome.key, outcome.error)
            alert_raise(
                key=f"capital:{account.pk}:{market_type}",
                text=f"Capital of {outcome.key}: no allocation this run: {outcome.error}",
            )
        elif outcome.balance_error:
            fallback += 1
            logger.warning("capital of %s: using the LIVE total of up to 24 h ago: %s", outcome.key, outcome.error)
    summary = (
        f"{len(pairs)} account markets: {rebalanced} rebalanced, {compounded} capitals compounded, "
        f"{fallback} on a fallback total, {len(skipped)} skipped"
    )
    if skipped:
        summary += ": " + ", ".join(skipped[:10])
        if len(skipped) == len(pairs):
            raise CapitalRefreshError(summary)
    return JobResult(summary=summary, noop=not rebalanced and not compounded and not skipped)
