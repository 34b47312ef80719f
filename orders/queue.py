"""The order queue pass (SPEC §4.1): express lane, top-N slots per bucket, demotions before promotions.

The pass selects its work (dirty pairs, and every 60 s the sweep's pairs), plans each pair with
orders.ranking and moves orders only through orders.transitions, which own every state change.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import Future
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, cast

from django.conf import settings
from django.db import transaction

from accounts.models import Account
from core.counters import counter_add, counters_buffer_add, counters_buffer_flush
from core.models import MetricCounter
from core.rawsql import rows_select
from exchanges.gateway import ExchangeGateway, GatewayError, Maintenance, Network, OrderType, RateLimited
from exchanges.services import UnknownExchangeError, gateway_for
from notifications.services import alert_raise
from orders import selectors
from orders.circuit import Breaker, account_scope, circuit_states, exchange_scope
from orders.execution import execution_pool
from orders.models import OpenOrder, PendingOrder, QueueDirty
from orders.ranking import PairPlan, QueueEntry, Slot, entry_of, plan_pair
from orders.selectors import OPEN_FIELDS, DirtyMark, Pair, PairRows, queue_slots_for
from orders.services import queue_mark_dirty, queue_mark_dirty_by
from orders.sweep import queue_sweep_detect
from orders.transitions import (
    DirtyTracker,
    lookup_due_at,
    order_cancel_send,
    order_demote,
    orders_promote,
    submitting_resolve,
)
from scheduler.shards import ShardSet, shard_account_owned

logger = logging.getLogger(__name__)

SWEEP_EVERY = timedelta(seconds=60)  # the safety-net sweep of every pair with queued or live orders
CONGESTION_QUEUED = 20  # queued orders that make a pair congested
CONGESTION_PAIRS = 10  # congested pairs that raise the alert
MAX_DIRTY_PER_PASS = 2000
PASS_BUDGET_SECONDS = 0.6  # stop starting new pairs after this; the rest stay dirty for the next tick
# A pass ends before the tick after next (the 1 s job's longest gap stays ≤ 2 s): no exchange call
# starts that could, at the queue's own timeout (EXCHANGE_QUEUE_TIMEOUT_MS), still run past this.
PASS_LIMIT_SECONDS = 1.8
SWEEP_LOAD_ALL = 2000  # a sweep that finds more pairs to look at than this loads every row at once
QUEUE_PAIR_RETRY = timedelta(seconds=30)  # a pair whose account has no gateway is retried this much later
# Failures that say the exchange (or the way to it) is in trouble rather than the order. After one,
# the pass sends nothing more to that exchange and its pairs are due again TROUBLE_RETRY later: a
# timing-out exchange costs one timeout per pass, not one per order, and never holds up the other
# exchanges' orders (express MARKET orders included) for the length of many timeouts.
TRANSPORT_FAILURES = (Network, RateLimited, Maintenance)
TROUBLE_RETRY = timedelta(seconds=2)  # as transitions.LOOKUP_DELAY: an unknown create is looked up no later


# --- The pass ----------------------------------------------------------------------------------


@dataclass
class QueueTally:
    """What a pass (or one pair of it) did, by outcome name."""

    counts: Counter = field(default_factory=Counter)
    pairs: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, outcome: str, n: int = 1) -> None:
        if outcome not in ("skipped", "waiting"):
            self.counts[outcome] += n

    def merge(self, other: QueueTally) -> None:
        self.counts.update(other.counts)
        self.errors.extend(other.errors)

    @property
    def moves(self) -> int:
        return self.counts["placed"] + self.counts["filled_at_once"] + self.counts["demoted"]

    @property
    def noop(self) -> bool:
        return not self.counts and not self.errors

    def summary(self) -> str:
        order = ("placed", "filled_at_once", "demoted", "requeued", "cancelled", "filled", "rejected", "triggered")
        parts = [f"{self.counts[k]} {k.replace('_', ' ')}" for k in order if self.counts[k]]
        parts += [f"{v} {k.replace('_', ' ')}" for k, v in sorted(self.counts.items()) if k not in order and v]
        text = f"{self.pairs} pairs: " + (", ".join(parts) if parts else "nothing to do")
        if self.errors:
            text += f"; {len(self.errors)} errors: " + "; ".join(self.errors[:3])
        return text


class _CountingGateway:
    """Counts exchange calls and errors of one pass (written once per pass as per-minute counters)."""

    def __init__(
        self,
        inner: ExchangeGateway,
        counts: Counter,
        troubled: set[str] | None = None,
        key: str = "",
        lock: threading.Lock | None = None,
    ):
        self._inner = inner
        self._counts = counts
        self._lock = lock or threading.Lock()
        self._troubled = troubled if troubled is not None else set()
        self._key = key or inner.exchange
        self.exchange = inner.exchange

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                self._counts[("exchange_calls", self.exchange)] += 1
            try:
                return attr(*args, **kwargs)
            except GatewayError as exc:
                with self._lock:
                    self._counts[("exchange_errors", self.exchange)] += 1
                if isinstance(exc, TRANSPORT_FAILURES):
                    self._troubled.add(self._key)
                raise

        return call


# The last sweep, kept in the process and tied to the leadership term: a new leader (or a
# leader that lost and regained the lock) sweeps on its first pass, then every SWEEP_EVERY.
# Nothing is written per pass for it, so the steady state stays at one query.
_sweep: dict[str, Any] = {"term": object(), "at": None}


def queue_sweep_reset() -> None:
    _sweep.update(term=object(), at=None)


def _sweep_due(now: datetime, term: Any) -> bool:
    last = _sweep["at"]
    return _sweep["term"] != term or last is None or now < last or now - last >= SWEEP_EVERY


@dataclass
class QueueWork:
    """One pass's snapshot: due dirty marks, express orders, the rows of every pair to look at."""

    now: datetime
    dirty: dict[Pair, DirtyMark]
    express: list[PendingOrder]
    rows: dict[Pair, PairRows]
    pairs: list[Pair]
    accounts: dict[int, Account]
    ticks: dict[tuple[str, str, str], tuple[Decimal, Decimal]]
    breakers: dict[str, Breaker]
    swept: bool
    started: float = field(default_factory=lambda: time.monotonic())  # looked up per pass (tests fake it)
    busy: int = 0  # due pairs left out: a task of an earlier pass still works on them (their marks stay)
    counts: Counter = field(default_factory=Counter)
    troubled: set[str] = field(default_factory=set)  # exchanges that failed in transport this pass
    # Express orders this pass handled: pending id → outcome (their rows in `rows` are as loaded).
    express_done: dict[int, str] = field(default_factory=dict)
    _gateways: dict[int, ExchangeGateway] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # guards `counts` across pair tasks
    # The pass's time limits apply (inline: the tick waits for the pass). A pool task sets False: it
    # runs beside the ticks, so it finishes its pair rather than leaving the rest for a later pass.
    timed: bool = True

    def gateway(self, account_id: int) -> ExchangeGateway:
        if account_id not in self._gateways:
            account = self.accounts[account_id]
            self._gateways[account_id] = _CountingGateway(
                gateway_for(account), self.counts, self.troubled, key=str(account.exchange), lock=self.lock
            )
        return self._gateways[account_id]

    def in_trouble(self, account_id: int) -> bool:
        """Whether the account's exchange failed in transport (timeout, rate limit, maintenance) this pass."""
        account = self.accounts.get(account_id)
        return account is not None and str(account.exchange) in self.troubled

    def over_budget(self) -> bool:
        return self.timed and time.monotonic() - self.started > PASS_BUDGET_SECONDS

    def out_of_time(self) -> bool:
        """Whether an exchange call started now could outlast PASS_LIMIT_SECONDS (never before the budget)."""
        if not self.timed:
            return False
        cutoff = max(PASS_BUDGET_SECONDS, PASS_LIMIT_SECONDS - settings.EXCHANGE_QUEUE_TIMEOUT_MS / 1000)
        return time.monotonic() - self.started > cutoff

    def may_call(self, account_id: int) -> bool:
        """Whether the pass may still send a call to the account's exchange (not in trouble, not out of time)."""
        return not self.in_trouble(account_id) and not self.out_of_time()

    def blocked_until(self, pair: Pair) -> datetime | None:
        """When an open circuit breaker of the pair's exchange market or account closes (None: not blocked)."""
        account = self.accounts.get(pair[0])
        if account is None:
            return None
        until = [
            cast(datetime, b.opened_until)  # an open breaker has one
            for scope in (
                exchange_scope(exchange=account.exchange, market_type=pair[1]),
                account_scope(account_id=pair[0]),
            )
            if (b := self.breakers.get(scope)) is not None and b.is_open(self.now)
        ]
        return max(until) if until else None


def queue_work_load(*, now: datetime, term: Any = None, shards: ShardSet | None = None) -> QueueWork | None:
    """Select the pass's work. Nothing dirty and no sweep due: exactly one (indexed) query, None.

    `shards`: only the accounts of these shards (a sharded scheduler's own); None: every account.
    Pairs whose task from an earlier pass is still in flight on the queue pool are left out before
    their rows are read (after a large fan-out most due pairs are busy, and reading them every
    second would cost the tick more than it has); their marks stay for a later pass.
    """
    marks = selectors.queue_dirty_due(now=now, limit=MAX_DIRTY_PER_PASS, shards=shards)
    swept = _sweep_due(now, term)
    if not marks and not swept:
        return None
    pool = execution_pool("queue")
    busy: set[Pair] = set() if pool.inline else {cast(Pair, key) for key in pool.keys_in_flight()}
    dirty = {m.pair: m for m in marks if m.pair not in busy}
    held = len(marks) - len(dirty)
    express = selectors.queue_express_due(now=now, shards=shards, busy=busy)
    if swept:
        wanted = set(dirty) | {p for p in queue_sweep_detect(now=now) if shards is None or shards.has(p[0])}
        if len(wanted) > SWEEP_LOAD_ALL:
            rows = selectors.queue_rows_for_pairs(pairs=(), everything=True, shards=shards)  # one plain load
        else:
            rows = selectors.queue_rows_for_pairs(pairs=wanted - busy)
        rows = {p: r for p, r in rows.items() if p not in busy}
        _sweep.update(term=term, at=now)
    else:
        rows = selectors.queue_rows_for_pairs(pairs=dirty)
    pairs = sorted(set(dirty) | set(rows), key=lambda p: (dirty[p].marked_at if p in dirty else now, p))
    account_ids = {p[0] for p in pairs} | {o.account_id for o in express}
    accounts = Account.objects.in_bulk(account_ids) if account_ids else {}
    ticks = selectors.market_ticks(keys={(a.exchange, p[1]) for p in pairs if (a := accounts.get(p[0]))})
    scopes = {account_scope(account_id=a) for a in accounts}
    scopes |= {exchange_scope(exchange=accounts[p[0]].exchange, market_type=p[1]) for p in pairs if p[0] in accounts}
    scopes |= {exchange_scope(exchange=accounts[o.account_id].exchange, market_type=o.market_type) for o in express}
    breakers = circuit_states(scopes=sorted(scopes)) if scopes else {}
    return QueueWork(
        now=now,
        dirty=dirty,
        express=express,
        rows=rows,
        pairs=pairs,
        accounts=accounts,
        ticks=ticks,
        breakers=breakers,
        swept=swept,
        busy=held,
    )


def queue_express_place(*, work: QueueWork, pair: Pair, pending: list[PendingOrder], dirty: DirtyTracker) -> QueueTally:
    """Place a pair's express (MARKET) orders at once, before any slot logic: one batch (orders_promote).

    Orders the batch did not send (its exchange failed meanwhile, or an inline pass ran out of time)
    are released QUEUED and their pair is due first next tick (or after TROUBLE_RETRY).
    """
    tally = QueueTally()
    if pair[0] not in work.accounts or work.blocked_until(pair):
        return tally
    outcomes = orders_promote(
        rows=pending,
        gateway=work.gateway(pair[0]),
        now=work.now,
        dirty=dirty,
        may_call=lambda: work.may_call(pair[0]),
        exchange=work.accounts[pair[0]].exchange,
    )
    work.express_done.update(outcomes)
    for outcome in outcomes.values():
        tally.add("filled_at_once" if outcome == "filled" else outcome)
    released = tally.counts.pop("released", 0)
    if released:
        if work.in_trouble(pair[0]):
            tally.add("trouble_deferred", queue_trouble_defer(work=work, pairs=[], express=[pair]))
        else:
            queue_express_defer(work=work, pairs=[pair])
            tally.add("express_late", released)
    return tally


def _entries(rows: PairRows, now: datetime) -> tuple[list[QueueEntry], dict[str, int], dict[str, int]]:
    """QueueEntry rows for the ranking, and order_key → row id maps for pending and live rows."""
    entries: list[QueueEntry] = []
    pending_ids: dict[str, int] = {}
    open_ids: dict[str, int] = {}
    for p in rows.pending:
        if p["express"] or p["order_type"] == OrderType.MARKET:
            continue  # the express lane, outside the slot logic
        key = str(p["order_key"])
        pending_ids[key] = p["id"]
        queued = p["status"] == PendingOrder.Status.QUEUED
        entries.append(
            entry_of(
                p,
                slot=Slot.QUEUED if queued else Slot.SUBMITTING,
                eligible=not queued or p["next_attempt_at"] is None or p["next_attempt_at"] <= now,
            )
        )
    for o in rows.open:
        if o["order_type"] == OrderType.MARKET:
            continue
        key = str(o["order_key"])
        open_ids[key] = o["id"]
        status = o["status"]
        triggered = OpenOrder.Status.TRIGGERED in (status, o["status_before_cancel"])
        if status == OpenOrder.Status.CANCELLING:
            slot = Slot.CANCELLING
        elif status == OpenOrder.Status.NEW and o["next_cancel_at"] and o["next_cancel_at"] > now:
            # The exchange refused its demotion: until the backoff passes the bucket is left as it
            # is, as while a cancel is pending (demoting another order instead would churn).
            slot = Slot.CANCELLING
        elif status == OpenOrder.Status.NEW:
            slot = Slot.LIVE
        else:
            slot = Slot.PINNED  # PARTIALLY_FILLED and TRIGGERED are never demoted
        entries.append(entry_of(o, slot=slot, triggered=triggered))
    return entries, pending_ids, open_ids


def _plan(work: QueueWork, pair: Pair, rows: PairRows) -> tuple[PairPlan, dict[str, int], dict[str, int]]:
    account = work.accounts[pair[0]]
    tick = work.ticks.get((account.exchange, pair[1], pair[2]), (None, None))[0]
    entries, pending_ids, open_ids = _entries(rows, work.now)
    plan = plan_pair(entries, slots=queue_slots_for(exchange=account.exchange, market_type=pair[1]), tick=tick)
    return plan, pending_ids, open_ids


def _next_due(work: QueueWork, pair: Pair, rows: PairRows, plan: PairPlan | None = None) -> datetime | None:
    """When the pair next needs a pass: now if its plan is not empty, else its earliest backoff or lookup.

    `plan`: the pair's plan of these same rows, when the caller has it already (saves planning twice).
    """
    now = work.now
    due: list[datetime] = []
    for p in rows.pending:
        handled = work.express_done.get(p["id"]) if p["express"] else None
        if handled == "submitting":
            due.append(lookup_due_at(submitting_at=now, next_attempt_at=None, now=now))
            continue
        if handled in ("placed", "filled", "rejected", "cancelled"):
            continue  # placed or ended by this pass's express batch
        if p["status"] == PendingOrder.Status.SUBMITTING:
            due.append(lookup_due_at(submitting_at=p["submitting_at"], next_attempt_at=p["next_attempt_at"], now=now))
        elif p["next_attempt_at"] and p["next_attempt_at"] > now:
            due.append(p["next_attempt_at"])
        elif p["express"]:
            due.append(now)
    for o in rows.open:
        if o["status"] == OpenOrder.Status.CANCELLING:
            due.append(max(o["next_cancel_at"] or now, now))
        elif o["next_cancel_at"] and o["next_cancel_at"] > now:
            due.append(o["next_cancel_at"])
    if plan is None:
        plan = _plan(work, pair, rows)[0]
    if not plan.empty:
        due.append(now)
    return min(due) if due else None


def queue_pair_rebalance(*, work: QueueWork, pair: Pair, dirty: DirtyTracker | None = None) -> QueueTally:
    """One pair: resolve due SUBMITTING rows, send due cancels, then demote and promote toward the
    ranking's target (demotions first; no promotion into a bucket with a demotion pending).

    Expected gateway errors are outcomes here; the unexpected propagate (the pair stays dirty).
    A pass out of time stops between moves; the rest of the plan keeps the pair due now.
    """
    tally = QueueTally(pairs=1)
    now = work.now
    dirty = dirty or DirtyTracker(pair, work.dirty.get(pair))
    rows = work.rows.get(pair) or PairRows()
    if pair[0] not in work.accounts:
        dirty.finish(None)  # the account is gone (its orders with it)
        return tally
    blocked = work.blocked_until(pair)
    if blocked is not None:
        dirty.finish(blocked if not rows.empty else None)
        return tally
    acted = False
    for p in rows.pending:
        if not work.may_call(pair[0]):
            break
        lookup_due = lookup_due_at(submitting_at=p["submitting_at"], next_attempt_at=p["next_attempt_at"], now=now)
        if p["status"] == PendingOrder.Status.SUBMITTING and lookup_due <= now:
            pending = PendingOrder.objects.filter(pk=p["id"]).first()
            if pending is not None:
                tally.add(submitting_resolve(pending=pending, gateway=work.gateway(pair[0]), now=now, dirty=dirty))
                acted = True
    for o in rows.open:
        if not work.may_call(pair[0]):
            break
        if o["status"] == OpenOrder.Status.CANCELLING and (o["next_cancel_at"] is None or o["next_cancel_at"] <= now):
            order = OpenOrder.objects.filter(pk=o["id"], status=OpenOrder.Status.CANCELLING).first()
            if order is not None:
                tally.add(order_cancel_send(order=order, gateway=work.gateway(pair[0]), now=now, dirty=dirty))
                acted = True
    if acted:
        rows = selectors.queue_rows_for_pairs(pairs=[pair]).get(pair) or PairRows()
    plan, pending_ids, open_ids = _plan(work, pair, rows)
    for key in plan.demote:
        if not work.may_call(pair[0]):
            break  # and promote nothing either: the plan's promotions counted on these demotions
        tally.add("demoted")
        tally.add(order_demote(open_id=open_ids[key], gateway=work.gateway(pair[0]), now=now, dirty=dirty))
    promoted: dict[int, str] = {}
    if plan.promote and work.may_call(pair[0]):
        # One batch: claimed together, created one after another, recorded together.
        ids = [pending_ids[key] for key in plan.promote]
        found = {row.pk: row for row in rows_select(PendingOrder, f"id IN ({', '.join(['%s'] * len(ids))})", ids)}
        promoted = orders_promote(
            rows=[found[i] for i in ids if i in found],
            gateway=work.gateway(pair[0]),
            now=now,
            dirty=dirty,
            may_call=lambda: work.may_call(pair[0]),
            exchange=work.accounts[pair[0]].exchange,
        )
        for outcome in promoted.values():
            tally.add(outcome)
    if acted or plan.demote or (promoted and not _rows_known_after(promoted)):
        rows = selectors.queue_rows_for_pairs(pairs=[pair]).get(pair) or PairRows()
        due = _next_due(work, pair, rows)
    elif promoted:
        due = _next_due(work, pair, _rows_after_promotions(rows, promoted, now))
    else:
        due = _next_due(work, pair, rows, plan)  # rows as planned: nothing changed them
    if due is not None and work.in_trouble(pair[0]):
        due = max(due, now + TROUBLE_RETRY)
    dirty.finish(due)
    return tally


# Promotion outcomes whose rows the pass can tell without reading them again.
_KNOWN_AFTER = frozenset({"placed", "filled", "submitting", "rejected"})


def _rows_known_after(promoted: dict[int, str]) -> bool:
    return all(outcome in _KNOWN_AFTER for outcome in promoted.values())


def _rows_after_promotions(rows: PairRows, promoted: dict[int, str], now: datetime) -> PairRows:
    """The pair's rows as the promotions left them (for its next due time), without reading them again:
    placed → a live NEW row, filled or rejected → gone, submitting → SUBMITTING now. A partial fill at
    once is PARTIALLY_FILLED in fact; the difference only matters to demotions, which the next plan,
    made from the rows themselves, decides."""
    after = PairRows(open=list(rows.open))
    for p in rows.pending:
        outcome = promoted.get(p["id"])
        if outcome is None:
            after.pending.append(p)
        elif outcome == "submitting":
            submitting = {"status": PendingOrder.Status.SUBMITTING, "submitting_at": now, "next_attempt_at": None}
            after.pending.append({**p, **submitting})
        elif outcome == "placed":
            live = {k: p[k] for k in OPEN_FIELDS if k in p}
            live.update(status=OpenOrder.Status.NEW, status_before_cancel="", next_cancel_at=None)
            after.open.append(live)
    return after


def queue_pair_defer(*, work: QueueWork, pair: Pair, until: datetime) -> None:
    """Leave a pair that failed this pass (e.g. no gateway for its exchange) dirty, due again at `until`."""
    DirtyTracker(pair, work.dirty.get(pair)).finish(until)


def queue_pass_defer(*, work: QueueWork, pairs: Iterable[Pair]) -> int:
    """Pairs the pass had no time for: dirty ones stay as they are; swept ones with work get a mark."""
    todo = [p for p in pairs if p not in work.dirty and p in work.accounts and _next_due(work, p, work.rows[p])]
    if todo:
        queue_mark_dirty(pairs=todo, now=work.now)
    return len(todo)


def queue_express_defer(*, work: QueueWork, pairs: Iterable[Pair]) -> int:
    """Pairs of express orders the pass had no time for: due now (an earlier mark is kept), first next tick."""
    todo = sorted(set(pairs))
    if todo:
        with transaction.atomic():
            queue_mark_dirty_by(pairs=todo, due_at=work.now)
    return len(todo)


def queue_trouble_defer(*, work: QueueWork, pairs: Iterable[Pair], express: Iterable[Pair] = ()) -> int:
    """Pairs of an exchange in trouble this pass (`QueueWork.in_trouble`), skipped: due TROUBLE_RETRY later.

    Their marks move to then, this pass's own (a failed create marks its pair) and concurrent ones
    alike: nothing is lost, a change made meanwhile just waits out the retry with the rest. Swept
    pairs with work, and the pairs of skipped `express` orders, get a mark (a later pass must see them).
    """
    until = work.now + TROUBLE_RETRY
    express = set(express)
    todo = sorted(
        {
            p
            for p in pairs
            if p in work.dirty or (p in work.accounts and _next_due(work, p, work.rows.get(p) or PairRows()))
        }
        | express
    )
    with transaction.atomic():
        for account_id, market_type, symbol in todo:
            QueueDirty.objects.filter(
                account_id=account_id, market_type=market_type, symbol=symbol, marked_at__lt=until
            ).update(marked_at=until)
        queue_mark_dirty_by(pairs=todo, due_at=until)
    return len(todo)


def queue_pass_finish(*, work: QueueWork, tally: QueueTally) -> None:
    """Per-minute counters (moves, exchange calls; with what tasks of earlier passes added since) in one
    statement and, with the sweep, the congestion check."""
    queue_counts_flush(work=work, moves=tally.moves)
    counters_buffer_flush()
    if work.swept:
        queue_congestion_check(now=work.now)


def queue_counts_flush(*, work: QueueWork, moves: int) -> None:
    """Hand the queue moves and the exchange calls counted so far to the process's counter buffer
    (core.counters), then forget them; the pass's finish (this one's or the next) writes the buffer in
    one statement. A thousand tasks that outlive their pass and end together would otherwise each
    upsert the same counter rows."""
    if moves:
        counters_buffer_add(name="queue_moves", labels="", value=moves, now=work.now)
    with work.lock:
        counts = sorted(work.counts.items())
        work.counts.clear()
    for (name, exchange), value in counts:
        counters_buffer_add(name=name, labels=f"exchange={exchange}", value=value, now=work.now)


def queue_congestion_check(*, now: datetime) -> int:
    """Count pairs with ≥ 20 queued orders; alert (throttled) at ≥ 10; write the metric once per minute."""
    congested = selectors.queue_congested_pairs(threshold=CONGESTION_QUEUED)
    minute = now.replace(second=0, microsecond=0)
    if not MetricCounter.objects.filter(minute=minute, name="queue_congested_pairs", labels="").exists():
        counter_add(name="queue_congested_pairs", labels="", value=congested, now=now)
    if congested >= CONGESTION_PAIRS:
        logger.warning("queue: %d pairs have %d or more queued orders", congested, CONGESTION_QUEUED)
        alert_raise(
            key="queue:congestion",
            text=f"Order queue congested: {congested} pairs have {CONGESTION_QUEUED} or more queued orders",
        )
    return congested


# The 1 s job waits this long for its pair tasks; the rest go on running beside the next ticks
# (their pairs are busy until they end, so no later pass touches them meanwhile).
PASS_WAIT_SECONDS = 0.5
# A pair task that starts this long after its pass loaded the rows loads its pair's rows again.
STALE_ROWS_SECONDS = 0.2


def _task_order(work: QueueWork) -> tuple[list[Pair], dict[Pair, list[PendingOrder]]]:
    """Pairs in the order their tasks are started: those with express orders first, then the rest due."""
    express: dict[Pair, list[PendingOrder]] = {}
    for pending in work.express:
        express.setdefault((pending.account_id, pending.market_type, pending.symbol), []).append(pending)
    ordered = list(express) + [p for p in work.pairs if p not in express]
    return ordered, express


def _only_these_express(rows: PairRows | None, express: list[PendingOrder]) -> bool:
    """Whether the pair's planned rows are only `express` orders (a fan-out follower's usual pair).

    Its rebalance after the express batch then has no move to plan, and knows their rows from the
    batch's outcomes (_next_due): reading the pair again would only cost two queries. Rows that
    arrived since the plan marked the pair again, and a later mark survives this pass's finish.
    """
    if rows is None:
        return True
    ids = {p.pk for p in express}
    return not rows.open and all(p["express"] and p["id"] in ids for p in rows.pending)


def queue_pair_task(*, work: QueueWork, pair: Pair, express: list[PendingOrder], rebalance: bool) -> QueueTally:
    """What one pass does for one pair, in a worker of the queue pool (or inline): its express orders,
    then (`rebalance`) the moves toward its slots. Expected gateway errors end as outcomes or deferrals.
    """
    tally = QueueTally()
    if not shard_account_owned(pair[0]):
        return tally  # its shard left this process since the pass began: its new owner takes it from here
    if not execution_pool("queue").inline:
        # A task beside the ticks: no pass time limits, and rows loaded by a pass that started a
        # while ago are read again (the transitions' guarded updates make stale rows safe, but a
        # fresh plan avoids needless moves).
        stale = time.monotonic() - work.started > STALE_ROWS_SECONDS
        if rebalance and stale and not _only_these_express(work.rows.get(pair), express):
            work = dataclasses.replace(work, rows={**work.rows, **selectors.queue_rows_for_pairs(pairs=[pair])})
        work = dataclasses.replace(work, timed=False)
    dirty = DirtyTracker(pair, work.dirty.get(pair))  # one for the pair's express batch and its rebalance
    if express:
        if work.in_trouble(pair[0]):
            tally.add("trouble_deferred", queue_trouble_defer(work=work, pairs=[], express=[pair]))
            return tally
        if work.out_of_time():
            queue_express_defer(work=work, pairs=[pair])
            tally.add("express_late", len(express))
            return tally
        try:
            tally.merge(queue_express_place(work=work, pair=pair, pending=express, dirty=dirty))
        except (GatewayError, UnknownExchangeError) as exc:
            tally.errors.append(f"express {pair[0]}/{pair[1]}/{pair[2]}: {type(exc).__name__}")
            logger.warning("queue: express orders of %s failed: %s: %s", pair, type(exc).__name__, exc)
    if not rebalance:
        return tally
    if work.in_trouble(pair[0]):
        tally.add("trouble_deferred", queue_trouble_defer(work=work, pairs=[pair]))
        return tally
    if work.over_budget():
        queue_pass_defer(work=work, pairs=[pair])
        tally.add("out_of_time")
        return tally
    try:
        tally.merge(queue_pair_rebalance(work=work, pair=pair, dirty=dirty))
    except (GatewayError, UnknownExchangeError) as exc:
        queue_pair_defer(work=work, pair=pair, until=work.now + QUEUE_PAIR_RETRY)
        tally.errors.append(f"{pair[0]}/{pair[1]}/{pair[2]}: {type(exc).__name__}")
        logger.warning("queue: pair %s failed: %s: %s", pair, type(exc).__name__, exc)
    tally.pairs += 1
    return tally


def _late_task_done(work: QueueWork, pair: Pair, future: Future) -> None:
    """A pair task that outlived its pass: log its outcome and write the exchange-call counters it added."""
    try:
        tally = future.result()
    except Exception as exc:
        # Outside the job wrapper: account for it here, as the wrapper would (log and throttled alert).
        logger.exception("queue: pair %s failed after its pass: %s", pair, type(exc).__name__)
        alert_raise(key="queue:execution", text=f"Order queue pair task failed: {type(exc).__name__}: {exc}")
        return
    logger.info("queue: pair %s finished after its pass: %s", pair, tally.summary())
    queue_counts_flush(work=work, moves=tally.moves)


def queue_pass(work: QueueWork, wait: float = PASS_WAIT_SECONDS) -> QueueTally:
    """One pass of rebalance_order_queue over `work`: a task per pair on the queue pool (express orders
    first), waiting up to `wait` seconds for them; then the per-minute counters.

    Pairs whose task from an earlier pass still runs are left as they are (their marks stay). Tasks
    that outlive the wait go on beside the next ticks. The unexpected error of a task that ended
    within the wait propagates (the job wrapper records and alerts); a later one is logged and alerted.
    """
    pool = execution_pool("queue")
    tally = QueueTally()
    ordered, express = _task_order(work)
    pairs = set(work.pairs)
    if pool.inline:
        # One thread: every express order first, then the pairs in the order they became due.
        tasks = [(p, express[p], False) for p in express] + [(p, [], True) for p in work.pairs]
    else:
        tasks = [(p, express.get(p, []), p in pairs) for p in ordered]
    futures: dict[Future, Pair] = {}
    busy = work.busy
    for pair, orders, rebalance in tasks:
        future = pool.submit(pair, queue_pair_task, work=work, pair=pair, express=orders, rebalance=rebalance)
        if future is None:
            busy += 1
        else:
            futures[future] = pair
    # The wait ends with the pass's budget (PASS_BUDGET_SECONDS from the start of its plan): a plan slowed
    # by a busy process (a fan-out's tasks holding the CPU) must not push the job past the next tick,
    # which APScheduler would then skip. The tasks go on beside it either way.
    wait = min(wait, max(0.0, PASS_BUDGET_SECONDS - (time.monotonic() - work.started)))
    done, running = futures_wait(futures, timeout=wait) if futures else (set(), set())
    failure: BaseException | None = None
    for future in done:
        if future.exception() is not None:
            failure = failure or future.exception()
            continue
        tally.merge(future.result())
        tally.pairs += future.result().pairs
    for future in running:
        future.add_done_callback(functools.partial(_late_task_done, work, futures[future]))
    express_late = tally.counts.pop("express_late", 0)
    if express_late:
        tally.errors.append(f"out of time: {express_late} express pairs left for the next tick")
    late = tally.counts.pop("out_of_time", 0)
    if late:
        tally.errors.append(f"out of time: {late} pairs left for the next tick")
    if work.troubled and "trouble_deferred" in tally.counts:
        deferred = tally.counts.pop("trouble_deferred")
        tally.errors.append(f"{', '.join(sorted(work.troubled))} failing: {deferred} pairs deferred")
    tally.counts.pop("trouble_deferred", None)
    if running:
        tally.counts["still executing"] += len(running)
    if busy:
        tally.counts["busy from an earlier pass"] += busy
    queue_pass_finish(work=work, tally=tally)
    if failure is not None:
        raise failure
    return tally
