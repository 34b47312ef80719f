"""Reporting jobs: send_daily_summary (daily 21:03 KST), auto_rebalance_accounts (hourly :17)."""

from __future__ import annotations

import logging

from django.utils import timezone

from notifications.services import alert_raise
from reporting.allocation import capital_pair_update, capital_pairs_active
from reporting.summary import summary_local_day, summary_send_all
from scheduler.runs import JobResult, current_run, scheduler_job

logger = logging.getLogger(__name__)


@scheduler_job("send_daily_summary")
def send_daily_summary() -> JobResult:
    """Queue each user's summary of today (KST) through the outbox, once per (user, day) (SPEC §4.9).

    The day is that of the run's scheduled time (the catch-up's is its start), so a 21:03 run
    started late still reports its own day. Without any Telegram configuration nothing is queued
    and the summary says so.
    """
    run = current_run.get()
    report = summary_send_all(day=summary_local_day(run.scheduled_at if run else timezone.now()))
    return JobResult(summary=report.summary(), noop=report.sent == 0)


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
