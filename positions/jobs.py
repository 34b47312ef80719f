"""Position jobs: calculate_unrealized_pnl (307 s), calculate_daily_performance (daily 00:00:13)."""

from __future__ import annotations

from django.utils import timezone

from positions.services import performance_update_all, positions_unrealized_update
from scheduler.runs import JobResult, scheduler_job


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
