"""Queue ranking (SPEC §4.1): which orders of one pair should be live. Pure: no ORM, no clock, no network."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_FLOOR, Decimal
from enum import StrEnum
from typing import Any


class Bucket(StrEnum):
    LIMIT_BUY = "LIMIT-BUY"
    LIMIT_SELL = "LIMIT-SELL"
    STOP_BUY = "STOP-BUY"
    STOP_SELL = "STOP-SELL"


class Slot(StrEnum):
    """Where an order stands relative to the exchange's slots."""

    QUEUED = "QUEUED"  # waiting; may be promoted when `eligible`
    LIVE = "LIVE"  # on the exchange; may be demoted
    PINNED = "PINNED"  # live and never demoted: PARTIALLY_FILLED, or a TRIGGERED stop
    SUBMITTING = "SUBMITTING"  # placement outcome unknown: occupies a slot, untouchable
    CANCELLING = "CANCELLING"  # cancel outcome unknown: occupies a slot, untouchable


OCCUPYING = frozenset({Slot.LIVE, Slot.PINNED, Slot.SUBMITTING, Slot.CANCELLING})


@dataclass(frozen=True)
class QueueEntry:
    key: str  # order_key
    bucket: Bucket
    slot: Slot
    side: str  # BUY | SELL
    price: Decimal | None
    stop_price: Decimal | None
    priority: int
    signal_at: datetime
    queue_seq: int
    eligible: bool = True  # False while a queued order waits out a placement backoff


@dataclass(frozen=True)
class PairPlan:
    demote: tuple[str, ...] = ()
    promote: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.demote and not self.promote


def bucket_for(*, order_type: str, side: str, triggered: bool = False) -> Bucket:
    """The bucket of an order; a triggered STOP_LIMIT is tracked as the LIMIT it spawned."""
    is_stop = order_type in ("STOP_LIMIT", "STOP_MARKET") and not (triggered and order_type == "STOP_LIMIT")
    if is_stop:
        return Bucket.STOP_BUY if side == "BUY" else Bucket.STOP_SELL
    return Bucket.LIMIT_BUY if side == "BUY" else Bucket.LIMIT_SELL


def entry_of(row: Mapping[str, Any], *, slot: Slot, triggered: bool = False, eligible: bool = True) -> QueueEntry:
    """The ranking's view of one queued or live order row (a mapping of its identity fields)."""
    return QueueEntry(
        key=str(row["order_key"]),
        bucket=bucket_for(order_type=row["order_type"], side=row["side"], triggered=triggered),
        slot=slot,
        side=row["side"],
        price=row["price"],
        stop_price=row["stop_price"],
        priority=row["priority"],
        signal_at=row["signal_at"],
        queue_seq=row["queue_seq"],
        eligible=eligible,
    )


def to_tick(value: Decimal, tick: Decimal | None) -> Decimal:
    if not tick or tick <= 0:
        return value
    return (value / tick).to_integral_value(rounding=ROUND_FLOOR) * tick


def rank_key(entry: QueueEntry, tick: Decimal | None = None) -> tuple:
    """Sort key, first = most deserving. A function of stable fields only, so ranks never oscillate."""
    tail = (entry.signal_at, entry.queue_seq, entry.key)
    if entry.bucket in (Bucket.LIMIT_BUY, Bucket.LIMIT_SELL):
        if entry.price is None:
            return (1, 0, Decimal(0), *tail)
        price = to_tick(entry.price, tick)
        nearest = -price if entry.side == "BUY" else price  # BUY: higher first; SELL: lower first
        return (0, entry.priority, nearest, *tail)
    # STOP buckets ignore priority: BUY lower stop first, SELL higher stop first.
    if entry.stop_price is None:
        return (1, 0, Decimal(0), *tail)
    stop = to_tick(entry.stop_price, tick)
    return (0, 0, stop if entry.side == "BUY" else -stop, *tail)


def plan_bucket(entries: Sequence[QueueEntry], *, slots: int, tick: Decimal | None = None) -> PairPlan:
    """Demotions and promotions that move one bucket toward its top `slots` being live.

    Pinned and submitting orders always keep their slot; cancelling ones hold theirs until
    resolved. While any order of the bucket is being demoted (now or still CANCELLING),
    nothing is promoted into it, so the number of occupied slots never exceeds `slots`.
    """
    forced = [e for e in entries if e.slot in (Slot.PINNED, Slot.SUBMITTING)]
    candidates = sorted(
        (e for e in entries if e.slot == Slot.LIVE or (e.slot == Slot.QUEUED and e.eligible)),
        key=lambda e: rank_key(e, tick),
    )
    room = max(0, slots - len(forced))
    target = {e.key for e in candidates[:room]}
    demote = tuple(e.key for e in candidates if e.slot == Slot.LIVE and e.key not in target)
    if demote or any(e.slot == Slot.CANCELLING for e in entries):
        return PairPlan(demote=demote)
    occupied = sum(1 for e in entries if e.slot in OCCUPYING)
    free = max(0, slots - occupied)
    promote = tuple(e.key for e in candidates if e.slot == Slot.QUEUED and e.key in target)[:free]
    return PairPlan(promote=promote)


def plan_pair(entries: Iterable[QueueEntry], *, slots: int, tick: Decimal | None = None) -> PairPlan:
    """Plan every bucket of one (account, market type, symbol); demotions listed before promotions."""
    buckets: dict[Bucket, list[QueueEntry]] = defaultdict(list)
    for entry in entries:
        buckets[entry.bucket].append(entry)
    demote: list[str] = []
    promote: list[str] = []
    for bucket in Bucket:
        plan = plan_bucket(buckets.get(bucket, []), slots=slots, tick=tick)
        demote.extend(plan.demote)
        promote.extend(plan.promote)
    return PairPlan(demote=tuple(demote), promote=tuple(promote))
