"""The drill's verdict: invariants read from the database (and the simulator's tables) and measured figures.

Runs in the drill process once every other process has stopped. Exchange state is read from the Sim*
tables directly, never through the engine's API, whose lazy matching step would move the exchange on
while it is being compared.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db.models import Count, Sum

from core.models import MetricCounter
from drill.chaos import ChaosEvent, Transition
from exchanges.models import SimFault, SimOrder, SimPosition
from orders.invariants import live_order_mismatches, order_invariant_problems
from orders.models import OpenOrder, OrderEvent, PendingOrder
from positions.fills import position_matches_fills
from positions.models import Position
from scheduler.models import JobRun

SIM_OPEN = ("NEW", "PARTIALLY_FILLED")
ONE_SECOND_JOBS = ("scheduler_probe", "rebalance_order_queue")
EXAMPLES = 3


@dataclass
class Check:
    name: str
    problems: list[str]
    note: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class Gap:
    job_id: str
    across_max: float | None  # longest gap that spans a takeover or a chaos event
    across_start_max: float | None  # the same, between the runs' actual starts
    steady_max: float | None  # longest gap otherwise
    steady_over_2s: int
    after_long_run: int  # of those, gaps after a run whose body took over 1 s (the next ticks were skipped)
    runs: int
    where: str = ""  # when the longest steady gap started


@dataclass
class Figures:
    takeovers: list[tuple[ChaosEvent, float | None]] = field(default_factory=list)
    gaps: list[Gap] = field(default_factory=list)
    orders: dict[str, int] = field(default_factory=dict)
    jobruns: dict[str, Counter] = field(default_factory=dict)
    job_errors: list[str] = field(default_factory=list)
    faults_fired: Counter = field(default_factory=Counter)
    suppressed: Counter = field(default_factory=Counter)


# --- invariants ----------------------------------------------------------------------------------


def check_order_histories(*, account_ids: list[int], posted_keys: set[str]) -> Check:
    problems = order_invariant_problems(account_ids=account_ids)
    seen = {str(k) for k in OrderEvent.objects.filter(account_id__in=account_ids).values_list("order_key", flat=True)}
    problems += [f"{key}: accepted by the API but has no events" for key in sorted(posted_keys - seen)]
    return Check("every logical order in exactly one place, complete history", problems)


def check_live_orders(*, accounts: dict[str, int], api_key: str) -> Check:
    problems: list[str] = []
    total = 0
    for exchange, account_id in sorted(accounts.items()):
        on_exchange = {
            str(pk)
            for pk in SimOrder.objects.filter(
                exchange=exchange, account=api_key, market_type="FUTURES", status__in=SIM_OPEN
            ).values_list("pk", flat=True)
        }
        rows = set(OpenOrder.objects.filter(account_id=account_id).values_list("exchange_order_id", flat=True))
        total += len(on_exchange)
        problems += live_order_mismatches(open_rows=rows, on_exchange=on_exchange, scope=exchange)
    return Check("exchange live orders = OpenOrder rows", problems, note=f"{total} live")


def check_positions(*, accounts: dict[str, int], api_key: str) -> Check:
    problems = [
        f"strategy account {sa} {symbol}: position {qty.normalize()} != Σ fills {total.normalize()}"
        for sa, symbol, qty, total in position_matches_fills()
    ]
    # The exchange's net position per symbol is what every strategy on the account holds together.
    for exchange, account_id in sorted(accounts.items()):
        ours: dict[str, Decimal] = {}
        for symbol, qty in Position.objects.filter(strategy_account__account_id=account_id).values_list(
            "symbol", "quantity"
        ):
            ours[symbol] = ours.get(symbol, Decimal(0)) + qty
        theirs = {
            p.symbol.split(":")[0]: p.quantity for p in SimPosition.objects.filter(exchange=exchange, account=api_key)
        }
        for symbol in sorted(set(ours) | set(theirs)):
            mine, exch = ours.get(symbol, Decimal(0)), theirs.get(symbol, Decimal(0))
            if mine != exch:
                problems.append(f"{exchange} {symbol}: Σ positions {mine.normalize()} != exchange {exch.normalize()}")
    return Check("every position = Σ its fills (and = the exchange's)", problems)


def check_jobruns() -> Check:
    # Runs of per-account jobs by several shard owners share a scheduled time but cover disjoint shards.
    duplicates = (
        JobRun.objects.values("job_id", "scheduled_at").annotate(n=Count("id")).filter(n__gt=1).order_by("scheduled_at")
    )
    problems = []
    for d in duplicates[:5000]:
        shard_sets = JobRun.objects.filter(job_id=d["job_id"], scheduled_at=d["scheduled_at"]).values_list(
            "shards", flat=True
        )
        covered = [s for text in shard_sets for s in (text.split(",") if text else ["all"])]
        if len(covered) != len(set(covered)):
            problems.append(f"{d['job_id']} @ {d['scheduled_at']:%H:%M:%S.%f}: {d['n']} runs ({sorted(shard_sets)})")
    return Check("no (job, scheduled time) in JobRun twice", problems, note=f"{JobRun.objects.count()} runs")


def examples(check: Check) -> str:
    shown = "; ".join(check.problems[:EXAMPLES])
    more = f" (+{len(check.problems) - EXAMPLES} more)" if len(check.problems) > EXAMPLES else ""
    return shown + more


# --- figures -------------------------------------------------------------------------------------


def takeovers(events: list[ChaosEvent], transitions: list[Transition]) -> list[tuple[ChaosEvent, float | None]]:
    """Seconds from each chaos event to the start of the next leadership term (None: no new term)."""
    out = []
    for event in events:
        if event.kind == "sigkill_shard_owner":  # no new term: its shards moved to the other schedulers
            out.append((event, event.moved_after))
            continue
        later = [t for t in transitions if event.term_before is not None and t.term > event.term_before]
        out.append((event, (later[0].since - event.at) if later else None))
    return out


def one_second_gaps(*, job_id: str, start: datetime, end: datetime, events: list[ChaosEvent]) -> Gap:
    runs = list(
        JobRun.objects.filter(job_id=job_id, kind=JobRun.Kind.SCHEDULED, scheduled_at__gte=start, scheduled_at__lte=end)
        .order_by("scheduled_at")
        .values_list("scheduled_at", "term", "duration_ms", "started_at")
    )
    across: float | None = None
    across_start: float | None = None
    steady: float | None = None
    over, long_runs, where = 0, 0, ""
    moments = [e.at for e in events]
    for (t0, term0, took0, s0), (t1, term1, _, s1) in zip(runs, runs[1:], strict=False):
        gap = (t1 - t0).total_seconds()
        chaotic = term0 != term1 or any(t0.timestamp() - 1 <= m <= t1.timestamp() for m in moments)
        if chaotic:
            across = gap if across is None else max(across, gap)
            started = (s1 - s0).total_seconds()
            across_start = started if across_start is None else max(across_start, started)
        else:
            if steady is None or gap > steady:
                steady, where = gap, f"{t0:%H:%M:%S}"
            over += gap > 2.0
            long_runs += gap > 2.0 and (took0 or 0) > 1000
    return Gap(job_id, across, across_start, steady, over, long_runs, len(runs), where)


def order_figures(*, account_ids: list[int]) -> dict[str, int]:
    kinds = (
        OrderEvent.objects.filter(account_id__in=account_ids)
        .values("kind")
        .annotate(n=Count("order_key", distinct=True))
    )
    figures = {f"orders with event {row['kind']}": row["n"] for row in kinds}
    figures["left queued"] = PendingOrder.objects.filter(status=PendingOrder.Status.QUEUED).count()
    figures["left submitting"] = PendingOrder.objects.filter(status=PendingOrder.Status.SUBMITTING).count()
    figures["left live"] = OpenOrder.objects.count()
    return figures


def jobrun_figures(*, start: datetime) -> tuple[dict[str, Counter], list[str]]:
    by_job: dict[str, Counter] = {}
    for row in JobRun.objects.filter(scheduled_at__gte=start).values("job_id", "outcome").annotate(n=Count("id")):
        by_job.setdefault(row["job_id"], Counter())[row["outcome"]] += row["n"]
    errors = (
        JobRun.objects.filter(scheduled_at__gte=start, outcome__in=[JobRun.Outcome.ERROR, JobRun.Outcome.OVERRUN])
        .values("job_id", "outcome", "summary")
        .annotate(n=Count("id"))
        .order_by("-n")[:8]
    )
    lines = [f"{e['n']:>4} × {e['job_id']} {e['outcome']}: {e['summary'][:150]}" for e in errors]
    return by_job, lines


def fault_figures() -> Counter:
    fired: Counter = Counter()
    for row in SimFault.objects.values("kind", "endpoint").annotate(n=Sum("fired")):
        fired[f"{row['kind']} {row['endpoint'] or '*'}"] += row["n"] or 0
    return fired


def suppressed_figures() -> Counter:
    rows = MetricCounter.objects.filter(name="suppressed_duplicates").values("labels").annotate(n=Sum("value"))
    return Counter({row["labels"] or "-": row["n"] for row in rows})


def collect(
    *,
    start: datetime,
    end: datetime,
    account_ids: list[int],
    events: list[ChaosEvent],
    transitions: list[Transition],
) -> Figures:
    jobruns, errors = jobrun_figures(start=start)
    return Figures(
        takeovers=takeovers(events, transitions),
        gaps=[one_second_gaps(job_id=j, start=start, end=end, events=events) for j in ONE_SECOND_JOBS],
        orders=order_figures(account_ids=account_ids),
        jobruns=jobruns,
        job_errors=errors,
        faults_fired=fault_figures(),
        suppressed=suppressed_figures(),
    )


def settled(*, since: datetime) -> tuple[bool, str]:
    """Whether the queue and reconciliation have converged: nothing in flight, nothing dirty due, and a
    clean update_open_orders run started after `since`. Returns (converged, what is still pending)."""
    from django.utils import timezone

    from orders.models import QueueDirty

    waiting: list[str] = []
    submitting = PendingOrder.objects.filter(status=PendingOrder.Status.SUBMITTING).count()
    cancelling = OpenOrder.objects.filter(status=OpenOrder.Status.CANCELLING).count()
    dirty = QueueDirty.objects.filter(marked_at__lte=timezone.now()).count()
    if submitting:
        waiting.append(f"{submitting} submitting")
    if cancelling:
        waiting.append(f"{cancelling} cancelling")
    if dirty:
        waiting.append(f"{dirty} dirty pairs")
    clean: Any = (
        JobRun.objects.filter(job_id="update_open_orders", started_at__gt=since, outcome=JobRun.Outcome.OK)
        .exclude(summary__contains="failed")
        .exclude(summary__contains="skipped")
        .exists()
    )
    if not clean:
        waiting.append("no clean reconciliation yet")
    return not waiting, ", ".join(waiting)
