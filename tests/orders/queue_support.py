"""Helpers for the queue tests: a spying gateway, order set-up, a job tick, and the SPEC §4.1 invariants.

Also imported by `manage.py shell -c` in subprocess tests (seed_queue_scenario), so no pytest here.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from django.db import connection
from django.utils import timezone

from accounts.models import StrategyAccount
from exchanges.gateway import CallPolicy, GatewayError, MarketType, call_policy_current
from exchanges.paper import PaperGateway
from exchanges.simulator.engine import default_engine
from orders.faults import crash_disable_all
from orders.invariants import order_invariant_problems
from orders.jobs import rebalance_order_queue, update_open_orders
from orders.models import OpenOrder, PendingOrder
from orders.queue import queue_sweep_reset
from orders.services import OrderSpec, orders_enqueue
from scheduler.models import JobRun
from scheduler.runs import JobFailedError

if TYPE_CHECKING:
    from time_machine import Traveller

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


@dataclass
class Injection:
    """Raise `error` on calls to `method` (before calling the exchange, or after it acted)."""

    method: str
    error: Callable[[], GatewayError]
    after: bool = False
    remaining: int = 1


@dataclass
class SpyGateway:
    """Wraps the PAPER gateway: records every call, raises injected errors."""

    inner: Any
    calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    injections: list[Injection] = field(default_factory=list)
    policies: list[CallPolicy] = field(default_factory=list)  # the caller's CallPolicy at each call
    on_call: Callable[[str], None] | None = None  # e.g. a fake clock that each call moves on

    @property
    def exchange(self) -> str:
        return self.inner.exchange

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, {**kwargs, **({"request": args[0]} if args else {})}))
            self.policies.append(call_policy_current())
            if self.on_call is not None:
                self.on_call(name)
            hit = next((i for i in self.injections if i.method == name and i.remaining > 0), None)
            if hit is not None:
                hit.remaining -= 1
                if not hit.after:
                    raise hit.error()
            result = attr(*args, **kwargs)
            if hit is not None and hit.after:
                raise hit.error()
            return result

        return call

    def count(self, name: str | None = None) -> int:
        return sum(1 for n, _ in self.calls if name is None or n == name)


class SpyFactory:
    """Stands in for orders.queue.gateway_for: one SpyGateway per account, shared call log."""

    def __init__(self) -> None:
        self.spies: dict[int, SpyGateway] = {}
        self.injections: list[Injection] = []
        self.on_call: Callable[[str], None] | None = None

    def __call__(self, account: Any) -> SpyGateway:
        if account.pk not in self.spies:
            self.spies[account.pk] = SpyGateway(
                PaperGateway(f"account-{account.pk}"), injections=self.injections, on_call=self.on_call
            )
        return self.spies[account.pk]

    def inject(self, method: str, error: Callable[[], GatewayError], *, after: bool = False, times: int = 1) -> None:
        self.injections.append(Injection(method=method, error=error, after=after, remaining=times))

    def count(self, name: str | None = None) -> int:
        return sum(spy.count(name) for spy in self.spies.values())

    def policies(self) -> list[CallPolicy]:
        return [p for spy in self.spies.values() for p in spy.policies]

    def counts(self) -> Counter:
        return Counter(n for spy in self.spies.values() for n, _ in spy.calls)


def enqueue(
    sa: StrategyAccount,
    side: str,
    price: str | None,
    *,
    symbol: str = "ETH/USDT",
    quantity: str = "0.01",
    order_type: str = "LIMIT",
    stop_price: str | None = None,
    priority: int = 0,
    signal_at: datetime | None = None,
) -> PendingOrder:
    (order,) = orders_enqueue(
        specs=[
            OrderSpec(
                strategy_account_id=sa.pk,
                account_id=sa.account_id,
                symbol=symbol,
                market_type=sa.strategy.market_type,
                side=side,
                order_type=order_type,
                quantity=Decimal(quantity),
                price=Decimal(price) if price else None,
                stop_price=Decimal(stop_price) if stop_price else None,
                priority=priority,
            )
        ],
        signal_at=signal_at or timezone.now(),
        now=timezone.now(),
    )
    return order


@contextlib.contextmanager
def queue_state_reset() -> Iterator[None]:
    """The queue's sweep memo and every crash point cleared before and after the block (both live in the process)."""
    queue_sweep_reset()
    crash_disable_all()
    try:
        yield
    finally:
        crash_disable_all()
        queue_sweep_reset()


def tick(clock: Traveller, seconds: float = 1, *, reconcile: bool = False) -> JobRun | None:
    """Shift the frozen clock by `seconds`, run the queue job (then update_open_orders with `reconcile`) and
    return the queue job's latest JobRun (outcome "error" when a crash point fired)."""
    clock.shift(timedelta(seconds=seconds))
    with contextlib.suppress(JobFailedError):  # a crash point fired: the run records the error
        rebalance_order_queue()
    if reconcile:
        update_open_orders()
    return JobRun.objects.filter(job_id="rebalance_order_queue").order_by("-id").first()


def exchange_live_ids(account_ids: list[int], market_type: str = "SPOT") -> set[str]:
    ids = set()
    for account_id in account_ids:
        for conditional in (False, True):
            for state in default_engine.order_list_open(
                "PAPER", f"account-{account_id}", MarketType(market_type), conditional=conditional
            ):
                ids.add(state.exchange_order_id)
    return ids


def invariant_problems(account_ids: list[int], market_type: str = "SPOT") -> list[str]:
    """Every logical order in exactly one place with a consistent history; exchange live == OpenOrder rows."""
    problems = order_invariant_problems()
    db_ids = set(OpenOrder.objects.filter(account_id__in=account_ids).values_list("exchange_order_id", flat=True))
    on_exchange = exchange_live_ids(account_ids, market_type)
    if db_ids != on_exchange:
        problems.append(f"exchange live {sorted(on_exchange)} != OpenOrder {sorted(db_ids)}")
    return problems


def bucket_occupancy(account_id: int, symbol: str = "ETH/USDT") -> dict[str, int]:
    """Occupied slots per (side) of LIMIT orders: live rows + SUBMITTING rows, and the exchange's view."""
    out: Counter = Counter()
    for side, _status in OpenOrder.objects.filter(account_id=account_id, symbol=symbol, order_type="LIMIT").values_list(
        "side", "status"
    ):
        out[f"db:{side}"] += 1
    for side in PendingOrder.objects.filter(
        account_id=account_id, symbol=symbol, order_type="LIMIT", status="SUBMITTING"
    ).values_list("side", flat=True):
        out[f"db:{side}"] += 1
    for state in default_engine.order_list_open("PAPER", f"account-{account_id}", MarketType.SPOT, symbol=symbol):
        out[f"ex:{state.side}"] += 1
    return dict(out)


def writes(captured: Any) -> list[str]:
    """INSERT/UPDATE/DELETE statements on order tables among captured queries."""
    return [
        q["sql"]
        for q in captured.captured_queries
        if q["sql"].lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")) and "orders_" in q["sql"]
    ]


def seed_queue_scenario(*, buys: int = 3, sells: int = 3) -> dict[str, Any]:
    """Seed a fresh database (subprocess tests): one PAPER spot account, ETH/USDT rules, queued LIMITs far away."""
    from tests.orders.factories import StrategyAccountFactory, paper_market_info

    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    for i in range(buys):
        enqueue(sa, "BUY", f"{2000 + 10 * i}")
    for i in range(sells):
        enqueue(sa, "SELL", f"{5000 - 10 * i}")
    connection.close()
    return {"account_id": sa.account_id}
