"""Order primitives shared by intake, the queue and reconciliation: ids, events, dirty marks, pair locks."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import connection, transaction

from orders.models import OrderEvent, OrderIdentity, PendingOrder, QueueDirty, Signal, SignalOrder
from scheduler.locks import PAIR_LOCK_CLASS, advisory_key
from scheduler.wake import job_wake

logger = logging.getLogger(__name__)


def client_order_id_for(*, order_key: uuid.UUID, placement_no: int) -> str:
    """The exchange idempotency key of one placement: ≤ 32 characters, from order_key and placement_no."""
    return f"ts{order_key.hex[:24]}p{placement_no}"


@contextmanager
def pair_lock(*, account_id: int, symbol: str) -> Iterator[None]:
    """Serialize all mutations of one (account, symbol). Must run inside transaction.atomic.

    PostgreSQL: a transaction advisory lock, released at commit. SQLite: IMMEDIATE
    transactions already serialize every writer, so nothing more is needed.
    """
    if not connection.in_atomic_block:
        raise RuntimeError("pair_lock needs an open transaction")
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)", [PAIR_LOCK_CLASS, advisory_key(f"{account_id}:{symbol}")]
            )
    yield


def queue_mark_dirty(*, pairs: Iterable[tuple[int, str, str]], now: datetime) -> None:
    """Mark (account_id, market_type, symbol) pairs for the next queue pass; call in the mutating transaction."""
    rows = [QueueDirty(account_id=a, market_type=m, symbol=s, marked_at=now) for a, m, s in set(pairs)]
    if rows:
        QueueDirty.objects.bulk_create(
            rows,
            update_conflicts=True,
            unique_fields=["account", "market_type", "symbol"],
            update_fields=["marked_at"],
        )


def order_event_add(*, order: OrderIdentity, kind: str, details: dict[str, Any] | None = None) -> OrderEvent:
    """Append one event to a logical order's history (same transaction as the change it records)."""
    event = order_event_new(order=order, kind=kind, details=details)
    event.save(force_insert=True)
    return event


def order_event_new(*, order: OrderIdentity, kind: str, details: dict[str, Any] | None = None) -> OrderEvent:
    """One event, not yet saved: a batch's events go in with one bulk_create, in the transaction of their change."""
    return OrderEvent(
        order_key=order.order_key,
        kind=kind,
        account_id=order.account_id,
        symbol=order.symbol,
        details=_jsonable(details or {}),
    )


def _jsonable(details: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Decimal | datetime | uuid.UUID) else v) for k, v in details.items()}


@dataclass(frozen=True)
class OrderSpec:
    """A validated order to enqueue (intake and webhook build these)."""

    strategy_account_id: int
    account_id: int
    symbol: str
    market_type: str
    side: str
    order_type: str
    quantity: Decimal
    price: Decimal | None = None
    stop_price: Decimal | None = None
    priority: int = 0
    # The price the order was judged against at intake (limit, stop, or the market price for MARKET):
    # the base of its slippage in the signal execution report. Not stored on the order itself.
    reference_price: Decimal | None = None


QUEUE_JOB = "rebalance_order_queue"


def orders_enqueue(*, specs: list[OrderSpec], signal_at: datetime, now: datetime) -> list[PendingOrder]:
    """Create QUEUED PendingOrders with their `queued` events and dirty marks, all in one transaction.

    queue_seq is the nanosecond clock at arrival (increasing within the call); ties across
    processes are broken by order_key in the ranking, so it stays deterministic.
    """
    base = time.time_ns()
    orders = [
        PendingOrder(
            strategy_account_id=spec.strategy_account_id,
            account_id=spec.account_id,
            symbol=spec.symbol,
            market_type=spec.market_type,
            side=spec.side,
            order_type=spec.order_type,
            quantity=spec.quantity,
            price=spec.price,
            stop_price=spec.stop_price,
            priority=spec.priority,
            signal_at=signal_at,
            queue_seq=base + i,
            express=spec.order_type == "MARKET",
        )
        for i, spec in enumerate(specs)
    ]
    with transaction.atomic(savepoint=False):  # inside an intake's transaction: all or nothing with it
        PendingOrder.objects.bulk_create(orders)
        OrderEvent.objects.bulk_create(
            [
                OrderEvent(
                    order_key=o.order_key,
                    kind=OrderEvent.Kind.QUEUED,
                    account_id=o.account_id,
                    symbol=o.symbol,
                    # The order as it arrived: the order history reads it back once the order has ended.
                    details=_jsonable(
                        {
                            "side": o.side,
                            "type": o.order_type,
                            "quantity": o.quantity,
                            "price": o.price,
                            "stop_price": o.stop_price,
                            "market_type": o.market_type,
                            "strategy_account": o.strategy_account_id,
                            "signal_at": o.signal_at,
                        }
                    ),
                )
                for o in orders
            ]
        )
        queue_mark_dirty(pairs=[(o.account_id, o.market_type, o.symbol) for o in orders], now=now)
        if orders:
            job_wake(QUEUE_JOB)  # on commit: the queue runs now, not at its next tick
    return orders


def queue_mark_dirty_by(*, pairs: Iterable[tuple[int, str, str]], due_at: datetime) -> None:
    """Mark pairs dirty no later than `due_at` (a backoff or a lookup due then): an earlier mark is kept.

    Unlike queue_mark_dirty, never moves an existing mark later, so a change waiting to be
    processed is not delayed by a deferral. Two statements; call inside a transaction.
    """
    pairs = set(pairs)
    for account_id, market_type, symbol in pairs:
        QueueDirty.objects.filter(
            account_id=account_id, market_type=market_type, symbol=symbol, marked_at__gt=due_at
        ).update(marked_at=due_at)
    QueueDirty.objects.bulk_create(
        [QueueDirty(account_id=a, market_type=m, symbol=s, marked_at=due_at) for a, m, s in pairs],
        ignore_conflicts=True,
    )


@dataclass(frozen=True)
class SignalSource:
    """Where a batch of queued orders came from: one webhook signal, or one API order."""

    source: str  # Signal.Source
    strategy_id: int
    symbol: str
    side: str
    order_type: str
    price: Decimal | None = None
    user_id: int | None = None


def signal_record(*, source: SignalSource, orders: list[PendingOrder], specs: list[OrderSpec], now: datetime) -> Signal:
    """Store the signal and its followers' orders (with their reference prices) for the execution report.

    Two statements; call in the transaction that queued `orders` (built from `specs`, in that order).
    """
    signal = Signal.objects.create(
        source=source.source,
        strategy_id=source.strategy_id,
        user_id=source.user_id,
        symbol=source.symbol,
        side=source.side,
        order_type=source.order_type,
        price=source.price,
        received_at=now,
    )
    SignalOrder.objects.bulk_create(
        [
            SignalOrder(
                signal=signal,
                order_key=order.order_key,
                account_id=order.account_id,
                strategy_account_id=order.strategy_account_id,
                side=order.side,
                order_type=order.order_type,
                quantity=order.quantity,
                reference_price=spec.reference_price,
            )
            for order, spec in zip(orders, specs, strict=True)
        ]
    )
    return signal
