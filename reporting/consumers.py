"""Live trader feed `ws/trader/`: fills by id cursor, and the other panels when they change; polled, never pushed.

The same design as the scheduler feed (SPEC §2.5): the consumer polls the database every second
through database_sync_to_async; nothing is pushed from the scheduler's threads. Scoped per user:
staff see every account, anyone else their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.contrib.auth import get_user_model
from django.utils import timezone

from core.feeds import CLOSE_FORBIDDEN, PollingFeedConsumer
from reporting.trader_selectors import (
    TraderScope,
    fill_max_id,
    order_event_marker,
    trader_balances,
    trader_fills_after,
    trader_orders,
    trader_performance,
    trader_positions,
    trader_signals,
    trader_snapshot,
)

__all__ = ["CLOSE_FORBIDDEN", "TraderFeedConsumer", "trader_feed_poll", "trader_feed_start"]

POLL_INTERVAL = 1.0
# Positions (marked to the last price), balances and PnL are re-read this often even without a new fill.
SLOW_PANELS_EVERY = 5.0
FILL_BATCH = 200
# Fill ids below the cursor re-read each poll: on PostgreSQL a sequence value is taken at INSERT and
# becomes visible at COMMIT, so fill 11 can be visible before fill 10. Ids already sent are remembered.
FILL_GAP_WINDOW = 200
USER_RECHECK_EVERY = 30.0
SLOW_PANELS = ("performance", "positions", "balances")


@dataclass
class TraderCursor:
    """Where one connection stands: the fill cursor, fills sent near it, the last panels sent."""

    scope: TraderScope
    last_fill_id: int
    start_fill_id: int = 0  # fills at or below the starting cursor are the snapshot's business
    sent_fills: set[int] = field(default_factory=set)
    order_marker: int = 0
    panels: dict[str, Any] = field(default_factory=dict)
    slow_due: float = 0.0


def trader_feed_start(*, scope: TraderScope, now: datetime) -> tuple[dict[str, Any], TraderCursor]:
    """The first message (every panel) and the connection's cursor. Cursors are read before the panels,
    so a fill landing in between is sent again (the page de-duplicates by id) rather than missed."""
    newest = fill_max_id()
    cursor = TraderCursor(
        scope=scope, last_fill_id=newest, start_fill_id=newest, order_marker=order_event_marker(scope=scope)
    )
    snapshot = trader_snapshot(scope=scope, now=now)
    cursor.sent_fills = {row["id"] for row in snapshot["fills"]}
    cursor.panels = {name: snapshot[name] for name in (*SLOW_PANELS, "orders", "signals")}
    cursor.slow_due = time.monotonic() + SLOW_PANELS_EVERY
    return snapshot, cursor


def trader_feed_poll(cursor: TraderCursor, *, now: datetime, clock: float | None = None) -> list[dict[str, Any]]:
    """One poll: new fills (one query), orders when an order event moved (one query, plus the panel),
    and positions/balances/PnL after a fill or every SLOW_PANELS_EVERY seconds, each sent only when it
    changed. Mutates `cursor`."""
    clock = time.monotonic() if clock is None else clock
    scope = cursor.scope
    messages: list[dict[str, Any]] = []
    floor = max(cursor.start_fill_id, cursor.last_fill_id - FILL_GAP_WINDOW)
    fills = trader_fills_after(scope=scope, after_id=floor, exclude=cursor.sent_fills, limit=FILL_BATCH)
    for fill in fills:
        cursor.sent_fills.add(fill["id"])
        cursor.last_fill_id = max(cursor.last_fill_id, fill["id"])
        messages.append({"type": "fill", **fill})
    cursor.sent_fills = {i for i in cursor.sent_fills if i > cursor.last_fill_id - FILL_GAP_WINDOW}

    marker = order_event_marker(scope=scope)
    if marker != cursor.order_marker:
        cursor.order_marker = marker
        messages.extend(_changed(cursor, "orders", trader_orders(scope=scope, now=now)))
        # Every step of a signal's orders (placed, filled, rejected, …) is an order event.
        messages.extend(_changed(cursor, "signals", trader_signals(scope=scope)))

    if fills or clock >= cursor.slow_due:
        cursor.slow_due = clock + SLOW_PANELS_EVERY
        messages.extend(_changed(cursor, "performance", trader_performance(scope=scope, now=now)))
        messages.extend(_changed(cursor, "positions", trader_positions(scope=scope, now=now)))
        messages.extend(_changed(cursor, "balances", trader_balances(scope=scope)))
    return messages


def _changed(cursor: TraderCursor, name: str, value: Any) -> list[dict[str, Any]]:
    if cursor.panels.get(name) == value:
        return []
    cursor.panels[name] = value
    return [{"type": name, "data": value}]


def _active_user(user_id: int) -> Any:
    return get_user_model().objects.filter(pk=user_id, is_active=True).first()


class TraderFeedConsumer(PollingFeedConsumer):
    """`ws/trader/`: a snapshot of every panel on connect, then fills and changed panels every second.

    Any signed-in user; anonymous clients are accepted and closed at once with 4403. Every 30 s the
    user is re-read: a deactivated user is closed, and a change of the staff flag changes the scope.
    """

    name = "trader feed"
    poll_interval = POLL_INTERVAL
    user_recheck_every = USER_RECHECK_EVERY

    def allowed(self, user: Any) -> bool:
        return True

    def start(self, user: Any) -> dict[str, Any]:
        snapshot, self.cursor = trader_feed_start(scope=TraderScope.for_user(user), now=timezone.now())
        return {"type": "snapshot", **snapshot}

    def poll(self) -> list[dict[str, Any]]:
        return trader_feed_poll(self.cursor, now=timezone.now())

    def still_allowed(self) -> bool:
        user = _active_user(self.user_id)
        if user is None:
            return False
        self.cursor.scope = TraderScope.for_user(user)
        return True
