"""The drill's verdict: invariants read from the database (and the simulator's tables) and measured figures.

Runs in the drill process once every other process has stopped. Exchange state is read from the Sim*
tables directly, never through the engine's API, whose lazy matching step would move the exchange on
while it is being compared.
"""

from __future__ import annotations

import re
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path

from django.db.models import Count, Sum

from core.models import MetricCounter
from drill.chaos import ChaosEvent, Transition
from drill.load import FanSignal
from drill.seed import ExchangeAccount
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
    rate_limits: Counter = field(default_factory=Counter)  # refusals by "EXCHANGE HTTP" and client reactions


# --- invariants ----------------------------------------------------------------------------------


def check_order_histories(*, account_ids: list[int], posted_keys: set[str]) -> Check:
    problems = order_invariant_problems(account_ids=account_ids)
    seen = {str(k) for k in OrderEvent.objects.filter(account_id__in=account_ids).values_list("order_key", flat=True)}
    problems += [f"{key}: accepted by the API but has no events" for key in sorted(posted_keys - seen)]
    return Check("every logical order in exactly one place, complete history", problems)


def check_live_orders(*, accounts: list[ExchangeAccount]) -> Check:
    problems: list[str] = []
    total = 0
    for account in accounts:
        on_exchange = {
            str(pk)
            for pk in SimOrder.objects.filter(
                exchange=account.exchange, account=account.key, market_type="FUTURES", status__in=SIM_OPEN
            ).values_list("pk", flat=True)
        }
        rows = set(OpenOrder.objects.filter(account_id=account.account_id).values_list("exchange_order_id", flat=True))
        total += len(on_exchange)
        problems += live_order_mismatches(
            open_rows=rows, on_exchange=on_exchange, scope=f"{account.exchange} account {account.account_id}"
        )
    return Check("exchange live orders = OpenOrder rows", problems, note=f"{total} live on {len(accounts)} accounts")


def check_positions(*, accounts: list[ExchangeAccount]) -> Check:
    problems = [
        f"strategy account {sa} {symbol}: position {qty.normalize()} != Σ fills {total.normalize()}"
        for sa, symbol, qty, total in position_matches_fills()
    ]
    # The exchange's net position per symbol is what every strategy on the account holds together.
    for account in accounts:
        ours: dict[str, Decimal] = {}
        for symbol, qty in Position.objects.filter(strategy_account__account_id=account.account_id).values_list(
            "symbol", "quantity"
        ):
            ours[symbol] = ours.get(symbol, Decimal(0)) + qty
        theirs = {
            p.symbol.split(":")[0]: p.quantity
            for p in SimPosition.objects.filter(exchange=account.exchange, account=account.key)
        }
        for symbol in sorted(set(ours) | set(theirs)):
            mine, exch = ours.get(symbol, Decimal(0)), theirs.get(symbol, Decimal(0))
            if mine != exch:
                problems.append(
                    f"{account.exchange} account {account.account_id} {symbol}: Σ positions {mine.normalize()} "
                    f"!= exchange {exch.normalize()}"
                )
    held = sum(1 for a in accounts if SimPosition.objects.filter(exchange=a.exchange, account=a.key).exists())
    return Check("every position = Σ its fills (and = the exchange's)", problems, note=f"{held} accounts hold one")


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


# --- the fan-out ---------------------------------------------------------------------------------

ENDED_OK = ("filled", "cancelled", "rejected")
LIVE_LAST = ("placed", "partially_filled", "triggered")
WAITING_LAST = ("queued", "requeued")


@dataclass(frozen=True)
class Interval:
    start: datetime
    end: datetime | None  # None: still live


def _max_overlap(intervals: Iterable[Interval]) -> int:
    """Most intervals live at one moment; one ending at the instant another starts does not overlap it."""
    points: list[tuple[float, int]] = []
    for interval in intervals:
        points.append((interval.start.timestamp(), 1))
        if interval.end is not None:
            points.append((interval.end.timestamp(), -1))
    live = peak = 0
    for _, step in sorted(points):  # at a tie the end (-1) sorts before the start (+1)
        live += step
        peak = max(peak, live)
    return peak


def _interval(row: SimOrder) -> Interval:
    return Interval(row.created_at, None if row.status in SIM_OPEN else row.updated_at)


def check_fanout(*, signals: list[FanSignal], followers: list[ExchangeAccount], slots: int, converged: bool) -> Check:
    """Every follower's order of each fan-out signal reached the exchange at most once at a time and only
    through a placement its history records, and none was lost: each ends filled, cancelled, rejected
    with a reason, live (placed), or queued behind full slots. A follower never holds more than `slots`
    live LIMIT orders per (symbol, side) on the exchange at any moment (from the exchange's own rows).

    When the drill did not converge, an order still in flight (submitting with its row, or queued while
    its pair still waits for the queue) is counted in the note, not as a problem: the other checks
    judge its rows, and the "did not converge" note says the run ended early."""
    problems: list[str] = []
    states: Counter = Counter()
    by_id = {str(f.account_id): f for f in followers}
    for signal in signals:
        if signal.replay_differs:
            problems.append(f"signal {signal.delivery_id[:8]}: the redelivery replied other orders than the first")
        if signal.kind == "CANCEL" or signal.status not in (200, 201, 202):
            continue
        for account_id in sorted(by_id):
            got = len(signal.orders.get(account_id, []))
            if got != 1:
                problems.append(
                    f"signal {signal.delivery_id[:8]} {signal.kind}: follower {account_id} got {got} orders"
                )
        problems += [
            f"signal {signal.delivery_id[:8]}: orders for account {a}, not a follower"
            for a in signal.orders
            if a not in by_id
        ]
    orders = {key: (signal, account) for signal in signals for account, keys in signal.orders.items() for key in keys}
    histories: dict[str, list[tuple[str, dict]]] = {}
    for order_key, kind, details in (
        OrderEvent.objects.filter(order_key__in=list(orders)).order_by("id").values_list("order_key", "kind", "details")
    ):
        histories.setdefault(str(order_key), []).append((kind, details or {}))
    pending = {
        str(k): s for k, s in PendingOrder.objects.filter(order_key__in=list(orders)).values_list("order_key", "status")
    }
    live_rows = {
        str(k) for k in OpenOrder.objects.filter(order_key__in=list(orders)).values_list("order_key", flat=True)
    }
    full = _full_buckets(followers, slots)
    exchange_rows = _follower_rows(followers)
    for key, (signal, account_id) in sorted(orders.items()):
        follower = by_id.get(account_id)
        if follower is None:
            continue
        history = histories.get(key, [])
        where = f"{signal.kind} {signal.symbol} order {key[:8]} of follower {account_id}"
        if not history:
            problems.append(f"{where}: accepted, no events (lost)")
            states["no events"] += 1
            continue
        rows = exchange_rows.get((follower.exchange, follower.key, f"ts{uuid.UUID(key).hex[:24]}"), [])
        submitted = {str(d.get("client_order_id")) for kind, d in history if kind == "submitting"}
        for row in rows:
            if row.client_order_id not in submitted:
                problems.append(f"{where}: {row.client_order_id} on the exchange, placed by no recorded submission")
        peak = _max_overlap(_interval(r) for r in rows)
        if peak > 1:
            problems.append(f"{where}: live on the exchange {peak} times at once ({len(rows)} placements)")
        last, details = history[-1]
        state = last
        if last in ENDED_OK:
            if last == "rejected" and not (details.get("reason") or details.get("status")):
                problems.append(f"{where}: rejected without a reason")
            if last == "filled" and not rows:
                problems.append(f"{where}: filled but never on the exchange")
        elif last in LIVE_LAST:
            if key not in live_rows:
                problems.append(f"{where}: {last} but no OpenOrder row")
            elif any(r.status in SIM_OPEN for r in rows):
                pass
            elif converged:
                problems.append(f"{where}: {last} here, no longer live on the exchange")
            else:  # its fill or cancel not yet recorded
                state = f"{last} (in flight at the end)"
        elif last == "demoted" and not converged and key in live_rows:
            state = "demoted (in flight at the end)"
        elif last in WAITING_LAST:
            if pending.get(key) != PendingOrder.Status.QUEUED:
                problems.append(f"{where}: {last} but no queued row")
            elif signal.kind != "LIMIT" or (follower.account_id, signal.symbol, signal.side) not in full:
                if converged:
                    problems.append(f"{where}: still queued after settling with a free slot")
                else:
                    state = f"{last} (in flight at the end)"
            else:
                state = f"{last} (slots full)"
        elif last == "submitting" and not converged and pending.get(key) == PendingOrder.Status.SUBMITTING:
            state = "submitting (in flight at the end)"
        else:
            problems.append(f"{where}: ends {last} (not placed, filled, cancelled or rejected)")
        states[state] += 1
    for (exchange, api_key, symbol, side), intervals in _limit_intervals(exchange_rows).items():
        peak = _max_overlap(intervals)
        if peak > slots:
            problems.append(
                f"{exchange} {api_key[:18]} {symbol} {side}: {peak} LIMIT orders live at once (slots {slots})"
            )
    accepted = [s for s in signals if s.status in (200, 201, 202)]
    note = f"{len(accepted)} signals to {len(followers)} followers, {len(orders)} follower orders: " + ", ".join(
        f"{k} {v}" for k, v in states.most_common()
    )
    return Check("fan-out: each follower order placed once, none lost, slots kept", problems, note=note)


def _follower_rows(followers: list[ExchangeAccount]) -> dict[tuple[str, str, str], list[SimOrder]]:
    """The followers' regular orders on the exchange by (exchange, key, client order id prefix `ts` + 24 hex)."""
    rows: dict[tuple[str, str, str], list[SimOrder]] = {}
    for exchange in sorted({f.exchange for f in followers}):
        keys = [f.key for f in followers if f.exchange == exchange]
        for row in SimOrder.objects.filter(exchange=exchange, account__in=keys, parent__isnull=True).only(
            "account", "client_order_id", "symbol", "side", "order_type", "status", "created_at", "updated_at"
        ):
            prefix = row.client_order_id.split("p")[0] if row.client_order_id.startswith("ts") else row.client_order_id
            rows.setdefault((exchange, row.account, prefix), []).append(row)
    return rows


def _limit_intervals(
    rows: dict[tuple[str, str, str], list[SimOrder]],
) -> dict[tuple[str, str, str, str], list[Interval]]:
    out: dict[tuple[str, str, str, str], list[Interval]] = {}
    for (exchange, key, _), orders in rows.items():
        for row in orders:
            if row.order_type == "LIMIT":
                out.setdefault((exchange, key, row.symbol.split(":")[0], row.side), []).append(_interval(row))
    return out


def _full_buckets(followers: list[ExchangeAccount], slots: int) -> set[tuple[int, str, str]]:
    """(account id, symbol, side) of the followers whose LIMIT slots are all taken now."""
    counts = Counter(
        OpenOrder.objects.filter(account_id__in=[f.account_id for f in followers], order_type="LIMIT").values_list(
            "account_id", "symbol", "side"
        )
    )
    return {bucket for bucket, n in counts.items() if n >= slots}


# --- rate limits, from the processes' logs ------------------------------------------------------------

SIM_REFUSAL = re.compile(r"sim (\w+) rate limit: \S+ refused with HTTP (\d+) \(([^)]*)\)")
CLIENT_BACKOFF = re.compile(r"(\w+) (?:FUTURES|SPOT) rate limited: no calls for")
CLIENT_BUDGET = re.compile(r"request budget spent here")


def rate_limit_figures(*, simulator_logs: Iterable[Path], client_logs: Iterable[Path]) -> Counter:
    """429s/418s (Bybit: 10006 in an HTTP 200, 403 per IP) the simulator sent, by exchange and status, and
    the clients' reactions: back-offs after a refusal and calls their own budgets held back."""
    figures: Counter = Counter()
    for path in simulator_logs:
        for line in _lines(path):
            match = SIM_REFUSAL.search(line)
            if match:
                exchange, status, why = match.groups()
                label = {"200": "10006"}.get(status, status) if exchange == "BYBIT" else status
                figures[f"{exchange} {label}{' ban' if why == 'ban' else ''}"] += 1
    for path in client_logs:
        for line in _lines(path):
            match = CLIENT_BACKOFF.search(line)
            if match:
                figures[f"client back-off {match.group(1)}"] += 1
            elif CLIENT_BUDGET.search(line):
                figures["client budget held a call"] += 1
    return figures


def _lines(path: Path) -> Iterable[str]:
    try:
        with path.open(errors="replace") as handle:
            yield from handle
    except OSError:
        return


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
    simulator_logs: Iterable[Path] = (),
    client_logs: Iterable[Path] = (),
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
        rate_limits=rate_limit_figures(simulator_logs=simulator_logs, client_logs=client_logs),
    )


# Work deferred at most this far ahead (a pair's retry after an exchange error, an order's backoff) still
# counts as pending: it will reach the exchange while the checks read it.
SETTLE_AHEAD = timedelta(seconds=30)


def settled(*, since: datetime, now: datetime | None = None) -> tuple[bool, str]:
    """Whether the queue and reconciliation have converged: nothing in flight, no MARKET order still
    queued, no pair due now or deferred within SETTLE_AHEAD, and clean update_open_orders runs
    started after `since` that cover every account (with account shards, every shard: each process
    reconciles its own). Returns (converged, what is still pending)."""
    from django.conf import settings
    from django.utils import timezone

    from orders.models import QueueDirty

    now = now or timezone.now()
    waiting: list[str] = []
    submitting = PendingOrder.objects.filter(status=PendingOrder.Status.SUBMITTING).count()
    cancelling = OpenOrder.objects.filter(status=OpenOrder.Status.CANCELLING).count()
    market = PendingOrder.objects.filter(status=PendingOrder.Status.QUEUED, express=True).count()
    dirty = QueueDirty.objects.filter(marked_at__lte=now + SETTLE_AHEAD).count()
    if submitting:
        waiting.append(f"{submitting} submitting")
    if cancelling:
        waiting.append(f"{cancelling} cancelling")
    if market:
        waiting.append(f"{market} market orders queued")
    if dirty:
        waiting.append(f"{dirty} dirty pairs")
    runs = (
        JobRun.objects.filter(job_id="update_open_orders", started_at__gt=since, outcome=JobRun.Outcome.OK)
        .exclude(summary__contains="failed")
        .exclude(summary__contains="skipped")
    )
    covered: set[int] = set()
    clean = False
    for shards in runs.values_list("shards", flat=True):
        if not shards:
            clean = True  # a run over every account
            break
        covered |= {int(s) for s in shards.split(",")}
    clean = clean or covered >= set(range(int(settings.ACCOUNT_SHARDS)))
    if not clean:
        waiting.append(
            f"no clean reconciliation of every shard yet ({len(covered)} covered)"
            if covered
            else "no clean reconciliation yet"
        )
    return not waiting, ", ".join(waiting)
