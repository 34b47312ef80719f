"""Database side of the stream transport: StreamState rows and their health; which exchanges and markets stream.

Which accounts get a stream and what an order update does are the orders app's (orders.streams),
passed to the manager as its handler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.db import transaction
from django.db.models import F, Q

from core.scrub import scrub
from exchanges.gateway import MarketType
from exchanges.models import StreamState
from exchanges.streams.messages import stream_alive

logger = logging.getLogger(__name__)

STREAMED_EXCHANGES = ("BINANCE", "BYBIT")
# Binance spot accounts rely on the REST poll; a Bybit stream carries spot and linear alike.
STREAMED_MARKETS = {"BINANCE": (MarketType.FUTURES,), "BYBIT": (MarketType.SPOT, MarketType.FUTURES)}


@dataclass(frozen=True)
class StreamAccount:
    """What a stream task needs of an account; equal values mean the running stream can stay."""

    account_id: int
    exchange: str
    api_key: str = field(repr=False)
    api_secret: str = field(repr=False)
    testnet: bool = False


# --- StreamState rows (one short statement or transaction each) -------------------------


def stream_state_write(
    *, account_id: int, exchange: str, now: datetime, count_reconnect: bool = False, **fields: Any
) -> None:
    """Upsert the account's StreamState with `fields`; `count_reconnect` adds one to `reconnects`."""
    if "last_error" in fields:
        fields["last_error"] = scrub(fields["last_error"])[:500]
    values = {**fields, "exchange": exchange, "updated_at": now}
    if count_reconnect:
        values["reconnects"] = F("reconnects") + 1
    with transaction.atomic():
        if StreamState.objects.filter(account_id=account_id).update(**values):
            return
        StreamState.objects.bulk_create(
            [StreamState(account_id=account_id, exchange=exchange, updated_at=now)], ignore_conflicts=True
        )
        StreamState.objects.filter(account_id=account_id).update(**values)


def stream_state_stop(*, account_ids: list[int], now: datetime) -> int:
    """Mark streams stopped (leadership lost, account no longer streamed); pending flags are void."""
    return StreamState.objects.filter(account_id__in=account_ids).update(
        state=StreamState.State.STOPPED, next_reconnect_at=None, reconnect_requested_at=None, updated_at=now
    )


def stream_flags_take(*, account_ids: list[int]) -> list[int]:
    """The accounts whose stream check_websocket_health asked to replace; the flags are cleared."""
    if not account_ids:
        return []
    with transaction.atomic():
        flagged = list(
            StreamState.objects.select_for_update()
            .filter(account_id__in=account_ids, reconnect_requested_at__isnull=False)
            .values_list("account_id", flat=True)
        )
        if flagged:
            StreamState.objects.filter(account_id__in=flagged).update(reconnect_requested_at=None)
    return flagged


# --- health (check_websocket_health) ------------------------------------------------------


@dataclass
class StreamHealthReport:
    """What one health check saw; `requested` counts the reconnects this check asked for."""

    expected: int = 0
    alive: int = 0
    reconnecting: int = 0
    dead: int = 0
    requested: int = 0
    missing: int = 0
    stopped: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.expected} streams: {self.alive} alive, {self.reconnecting} reconnecting"
        if self.dead:
            text += f", {self.dead} dead ({self.requested} reconnects requested now)"
        if self.missing:
            text += f", {self.missing} not started"
        if self.stopped:
            text += f", {self.stopped} stopped"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text[:500]


def stream_health_report(*, accounts: list[StreamAccount], now: datetime) -> StreamHealthReport:
    """Classify the stream of every account in `accounts` (those that should have one, SPEC §4.6) and flag
    open-but-stale ones for the manager.

    alive: open with a message or pong younger than twice its ping interval. reconnecting:
    connecting, or torn down and waiting out its backoff — a reconnect is in flight, so
    nothing is asked. dead: open but stale, which the manager has not noticed yet; its row
    gets `reconnect_requested_at` unless already set, and the manager replaces the stream
    through its one task per account, so repeated checks never start a second reconnect.
    """
    report = StreamHealthReport()
    report.expected = len(accounts)
    rows = {row.account_id: row for row in StreamState.objects.filter(account_id__in=[a.account_id for a in accounts])}
    for account in accounts:
        row = rows.get(account.account_id)
        if row is None:
            report.missing += 1
            report.notes.append(f"account {account.account_id} {account.exchange}: no stream yet")
            continue
        if row.state == StreamState.State.OPEN:
            if stream_alive(
                now=now,
                ping_interval=row.ping_interval,
                last_message_at=row.last_message_at,
                last_pong_at=row.last_pong_at,
                connected_at=row.connected_at,
            ):
                report.alive += 1
                continue
            report.dead += 1
            if row.reconnect_requested_at is None:
                flagged = StreamState.objects.filter(
                    Q(reconnect_requested_at__isnull=True), pk=row.pk, state=StreamState.State.OPEN
                ).update(reconnect_requested_at=now)
                report.requested += flagged
            seen = [t for t in (row.last_message_at, row.last_pong_at, row.connected_at) if t is not None]
            silence = f"{(now - max(seen)).total_seconds():.0f} s" if seen else "ever"
            report.notes.append(f"account {account.account_id} {account.exchange}: open but silent for {silence}")
        elif row.state in (StreamState.State.CONNECTING, StreamState.State.DEAD):
            report.reconnecting += 1
            wait = ""
            if row.next_reconnect_at is not None:
                wait = f", next try in {max(0.0, (row.next_reconnect_at - now).total_seconds()):.0f} s"
            report.notes.append(
                f"account {account.account_id} {account.exchange}: {row.state}, "
                f"{row.consecutive_failures} failures in a row{wait}"
                + (f" ({row.last_error[:80]})" if row.last_error else "")
            )
        else:
            report.stopped += 1
            report.notes.append(f"account {account.account_id} {account.exchange}: stopped")
    return report
