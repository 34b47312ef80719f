"""Notification jobs: send_daily_summary (daily 21:03 KST)."""

from __future__ import annotations

from django.utils import timezone

from notifications.summary import summary_local_day, summary_send_all
from scheduler.runs import JobResult, current_run, scheduler_job


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
