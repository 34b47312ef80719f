"""Exchange jobs: check_websocket_health (60 s).

The price and market-rule jobs refresh what the business trades or holds, which this layer does not
know: they live in positions.jobs.
"""

from __future__ import annotations

import logging

from django.utils import timezone

from exchanges.streams.services import stream_health_check
from scheduler.runs import JobResult, scheduler_job

logger = logging.getLogger(__name__)


@scheduler_job("check_websocket_health")
def check_websocket_health() -> JobResult:
    """Report the leader's user-data streams from their StreamState rows (SPEC §4.6).

    Repairs only through the stream manager's single flight: an open but stale stream is
    flagged (once) for the manager to replace; a stream already reconnecting is left alone,
    so repeated checks never add reconnects. No exchange call.
    """
    report = stream_health_check(now=timezone.now())
    if report.requested:
        logger.warning("websocket health: %d open but stale streams flagged for reconnect", report.requested)
    return JobResult(summary=report.summary(), noop=report.expected == 0)
