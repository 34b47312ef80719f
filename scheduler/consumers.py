"""Live scheduler feed (SPEC §2.5): a staff-only websocket streaming JobRuns and heartbeats by polling."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs

from django.contrib.auth import get_user_model
from django.utils import timezone

from core.feeds import CLOSE_FORBIDDEN, CLOSE_INTERNAL_ERROR, PollingFeedConsumer
from scheduler.models import JobRun
from scheduler.selectors import (
    jobrun_list_after,
    jobrun_list_by_ids,
    jobrun_list_running_ids,
    jobrun_max_id,
    scheduler_instances,
    scheduler_next_runs,
    scheduler_status,
)

logger = logging.getLogger(__name__)

__all__ = ["CLOSE_FORBIDDEN", "CLOSE_INTERNAL_ERROR", "FeedCursor", "SchedulerFeedConsumer", "feed_poll", "feed_start"]

POLL_INTERVAL = 1.0
# New runs sent per poll; a backlog (a client reconnecting with an old cursor) drains over a few polls.
BATCH_LIMIT = 200
# How far behind the newest id a client's ?after= cursor may start; older history is the admin's job.
CATCHUP_LIMIT = 200
# Runs sent while still "running" are re-read every poll until they finish (their outcome is an UPDATE,
# which an id cursor cannot see). Bounded so a stuck fleet of runs cannot grow one query without limit.
PENDING_LIMIT = 500
# Running runs older than this at connect time are not followed (a run that old is stuck or orphaned).
PENDING_MAX_AGE = timedelta(hours=1)
# Ids the cursor jumped over: on PostgreSQL a sequence value is taken at INSERT and becomes visible at
# COMMIT, so row 11 can be visible before row 10. A skipped id is re-checked for this long, then dropped
# (a claim refused by ON CONFLICT DO NOTHING also burns a sequence value and never appears).
GAP_WINDOW = 5.0
GAP_LIMIT = 500
# The user's staff flag is re-read this often, so revoking staff ends an open feed.
USER_RECHECK_EVERY = 30.0


@dataclass
class FeedCursor:
    """Where one connection's feed stands: the id cursor, runs still running, ids skipped, last instances."""

    last_id: int
    pending: set[int] = field(default_factory=set)
    gaps: dict[int, float] = field(default_factory=dict)  # id -> monotonic deadline
    instances: dict[str, Any] | None = None


def feed_start(*, after: int | None, now: datetime) -> FeedCursor:
    """The cursor of a new connection: the newest id, or the client's own cursor if it is recent enough.

    Runs still running are followed from the start, so rows rendered (or snapshotted) as "running"
    get their outcome. Two queries.
    """
    newest = jobrun_max_id()
    last_id = newest if after is None or after >= newest else max(after, newest - CATCHUP_LIMIT, 0)
    pending = set(jobrun_list_running_ids(since=now - PENDING_MAX_AGE, limit=PENDING_LIMIT))
    return FeedCursor(last_id=last_id, pending=pending)


def feed_poll(cursor: FeedCursor, *, now: datetime, clock: float | None = None) -> list[dict[str, Any]]:
    """One poll: new JobRuns (id > cursor), finished pending or late-committed runs, changed instances.

    Mutates `cursor`. Read-only on the database: one query for new runs, one for pending and skipped
    ids (when any), one for next run times (when a run was sent), three or four for the instances.
    """
    clock = time.monotonic() if clock is None else clock
    previous_id = cursor.last_id
    fresh = jobrun_list_after(after_id=previous_id, limit=BATCH_LIMIT)
    if fresh:
        cursor.last_id = fresh[-1]["id"]
        seen = {run["id"] for run in fresh}
        # Only the last GAP_LIMIT ids can be gaps worth waiting for; a sequence jump (setval,
        # PostgreSQL's cached values lost in a crash) must not become millions of entries.
        for missing in range(max(previous_id + 1, cursor.last_id - GAP_LIMIT), cursor.last_id):
            if missing not in seen:
                cursor.gaps[missing] = clock + GAP_WINDOW
    cursor.gaps = {run_id: deadline for run_id, deadline in cursor.gaps.items() if deadline > clock}
    if len(cursor.gaps) > GAP_LIMIT:
        cursor.gaps = dict(sorted(cursor.gaps.items())[-GAP_LIMIT:])

    recheck = sorted(cursor.pending | cursor.gaps.keys())
    revisited = jobrun_list_by_ids(ids=recheck) if recheck else []
    runs: list[dict[str, Any]] = []
    for run in revisited:
        if run["id"] in cursor.gaps:
            del cursor.gaps[run["id"]]
            runs.append(run)
        elif run["outcome"] != JobRun.Outcome.RUNNING:
            runs.append(run)
    # A pending run deleted meanwhile (pruning) simply stops being followed.
    cursor.pending &= {run["id"] for run in revisited}
    runs.extend(fresh)
    for run in runs:
        if run["outcome"] == JobRun.Outcome.RUNNING:
            cursor.pending.add(run["id"])
        else:
            cursor.pending.discard(run["id"])
    if len(cursor.pending) > PENDING_LIMIT:
        cursor.pending = set(sorted(cursor.pending)[-PENDING_LIMIT:])

    messages: list[dict[str, Any]] = []
    if runs:
        next_runs = scheduler_next_runs(job_ids=sorted({run["job_id"] for run in runs}))
        for run in sorted(runs, key=lambda row: row["id"]):
            messages.append({"type": "jobrun", **run, "next_run": next_runs.get(run["job_id"])})

    # Recomputed every poll rather than only on changed rows: a leader that dies stops writing
    # heartbeats, and only the age test notices it leave.
    instances = scheduler_instances(now=now)
    if instances != cursor.instances:
        cursor.instances = instances
        messages.append({"type": "instances", **instances})
    return messages


def _parse_after(query_string: bytes) -> int | None:
    values = parse_qs(query_string.decode("latin-1")).get("after")
    try:
        return int(values[0]) if values else None
    except ValueError:
        return None


def _user_is_staff(user_id: int) -> bool:
    return get_user_model().objects.filter(pk=user_id, is_active=True, is_staff=True).exists()


class SchedulerFeedConsumer(PollingFeedConsumer):
    """`ws/scheduler/`: a snapshot (the status body) on connect, then JobRuns and instances every second.

    Staff only; anyone else is accepted and closed at once with 4403 so the client can tell why. The
    staff flag is re-read every USER_RECHECK_EVERY seconds, so revoking staff ends an open feed.
    Reads the database through database_sync_to_async; nothing is pushed by the scheduler's threads.
    """

    name = "scheduler feed"
    poll_interval = POLL_INTERVAL
    user_recheck_every = USER_RECHECK_EVERY

    def allowed(self, user: Any) -> bool:
        return bool(user.is_staff)

    def start(self, user: Any) -> dict[str, Any]:
        now = timezone.now()
        after = _parse_after(self.scope.get("query_string", b""))
        # Cursor first: a run inserted between the two reads is then sent again, never missed.
        self.cursor = feed_start(after=after, now=now)
        status = scheduler_status(now=now)
        self.cursor.instances = {key: status[key] for key in ("running", "leader", "standbys")}
        return {"type": "snapshot", **status}

    def poll(self) -> list[dict[str, Any]]:
        return feed_poll(self.cursor, now=timezone.now())

    def still_allowed(self) -> bool:
        return _user_is_staff(self.user_id)
