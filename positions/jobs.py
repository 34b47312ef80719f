"""Position jobs: calculate_unrealized_pnl (307 s), calculate_daily_performance (daily 00:00:13), and the
exchange refreshes of what is traded or held: update_price_cache (31 s), precision_cache_update (daily
03:07), symbol_validator_refresh (hourly :15).
"""

from __future__ import annotations

import logging

from django.utils import timezone

from exchanges.gateway import GatewayError
from exchanges.services import exchange_error_count, market_info_refresh, markets_load, price_cache_refresh
from positions.selectors import market_targets, price_targets
from positions.services import performance_update_all, positions_unrealized_update
from scheduler.runs import JobResult, scheduler_job

logger = logging.getLogger(__name__)


@scheduler_job("calculate_unrealized_pnl")
def calculate_unrealized_pnl() -> JobResult:
    """Value open positions at cached prices and roll them into StrategyCapital.current_pnl (SPEC §4.5)."""
    report = positions_unrealized_update(now=timezone.now())
    summary = (
        f"{report.valued} positions valued, {report.flat} flat reset, "
        f"{report.skipped} skipped (no fresh price), {report.capitals} strategy capitals updated"
    )
    if report.skipped_keys:
        summary += ": " + ", ".join(report.skipped_keys[:10])
    return JobResult(summary=summary, noop=report.valued == 0 and report.flat == 0 and report.capitals == 0)


@scheduler_job("calculate_daily_performance")
def calculate_daily_performance() -> JobResult:
    """Upsert StrategyDailyPerformance for every finished KST day not stored yet (SPEC §4.10).

    Catches up every day missed while no leader ran; a re-run of a stored day writes nothing.
    """
    report = performance_update_all(now=timezone.now())
    summary = f"{report.strategies} active strategies: {report.written} days written, {report.unchanged} unchanged"
    if report.first_day is not None:
        summary += f" ({report.first_day} .. {report.last_day})"
    return JobResult(summary=summary, noop=report.written == 0)


class MarketRefreshError(Exception):
    """Some (exchange, market type) pairs could not be refreshed; their last good rows were kept."""


@scheduler_job("update_price_cache")
def update_price_cache() -> JobResult:
    """One last-prices call per (exchange, market_type) used by active accounts, plus one per pair that
    only positions hold, each stored in one upsert (SPEC §4.4).

    A failing pair is logged and counted and keeps its previous quotes; the run fails only
    when every pair failed.
    """
    now = timezone.now()
    targets = price_targets()
    pairs = targets.pairs
    stored, calls, failed = 0, 0, []
    for exchange, market_type, reason in pairs:
        calls += 1
        try:
            stored += price_cache_refresh(exchange=exchange, market_type=market_type, now=now)
        except GatewayError as exc:
            exchange_error_count(exchange=exchange)
            failed.append(f"{exchange}/{market_type}: {type(exc).__name__}")
            logger.warning(
                "price refresh %s %s (%s) failed: %s: %s", exchange, market_type, reason, type(exc).__name__, exc
            )
    summary = (
        f"{stored} quotes from {len(pairs) - len(failed)}/{len(pairs)} pairs "
        f"({len(targets.in_use)} used by active accounts, {len(targets.positions_only)} with positions only) "
        f"in {calls} exchange calls"
    )
    if failed:
        summary += "; failed " + ", ".join(failed)
        if len(failed) == len(pairs):
            raise MarketRefreshError(summary)
    return JobResult(summary=summary, noop=not pairs)


def _refresh_markets(*, numeric: bool) -> JobResult:
    now = timezone.now()
    upserted = added = deactivated = 0
    failed = []
    targets = market_targets()
    for exchange, market_type in targets:
        try:
            rules = markets_load(exchange=exchange, market_type=market_type)
        except GatewayError as exc:
            # Keep the last good rows: nothing is written for this pair.
            exchange_error_count(exchange=exchange)
            failed.append(f"{exchange}/{market_type}: {type(exc).__name__}: {exc}")
            logger.warning("load markets %s %s failed: %s: %s", exchange, market_type, type(exc).__name__, exc)
            continue
        result = market_info_refresh(exchange=exchange, market_type=market_type, rules=rules, now=now, numeric=numeric)
        upserted += result.upserted
        added += result.added
        deactivated += result.deactivated
    summary = (
        f"{len(targets) - len(failed)}/{len(targets)} markets: "
        f"{upserted} rows written, {added} new, {deactivated} delisted"
    )
    if failed:
        raise MarketRefreshError(f"{summary}; kept last good rules for " + "; ".join(failed))
    return JobResult(summary=summary, noop=upserted == 0 and deactivated == 0)


@scheduler_job("precision_cache_update")
def precision_cache_update() -> JobResult:
    """Reload every market's numeric rules into MarketInfo (SPEC §4.8); a failing exchange keeps its rows."""
    return _refresh_markets(numeric=True)


@scheduler_job("symbol_validator_refresh")
def symbol_validator_refresh() -> JobResult:
    """Refresh the tradable symbol set: new symbols added, delisted ones inactive, none deleted (SPEC §4.8)."""
    return _refresh_markets(numeric=False)
