"""The 1 s order queue pass at 100,000 queued + live orders over 10,000 pairs on PostgreSQL (SPEC §9).

Setup: a fresh PostgreSQL database (BENCH_PG_URL, default tradingsite_bench_queue; dropped and created,
then `manage.py migrate`), Django set up in-process on it. 100 accounts × 100 symbols (PAPER, SPOT) =
10,000 pairs, 10 orders each, bulk-inserted already converged: per pair 4 LIMIT BUY and 4 LIMIT SELL
(the top 2 of each bucket live, 2 queued) and 1 STOP_LIMIT BUY + 1 STOP_MARKET SELL (live): 60,000
OpenOrder and 40,000 PendingOrder rows, ORDER_QUEUE_SLOTS=2. No OrderEvent history is seeded (the
pass never reads it).

The exchange is a counting fake (FakeExchange below) standing in for `orders.queue.gateway_for`: an
in-memory book that knows every seeded live order, answers create/cancel at once and counts every
call. The simulator engine is not used: its database-backed book would put its own writes into the
figures. Exchange latency is therefore zero here; on a real exchange each call costs a round trip.

Every pass is the job's own body, `rebalance_order_queue.__wrapped__()` (without JobRun bookkeeping).
Figures (name, value, baseline, ratio = value / baseline), baselines measured in the same run:
  per-pair ORM  — for each of the 10,000 pairs: query its PendingOrder and OpenOrder model instances
                  (2 queries), then rank them with the same planner the pass uses;
  single SELECT — one plain `SELECT <the pass's columns> FROM orders_pendingorder` and one from
                  orders_openorder, raw cursor fetchall (no model instances, no ranking).
  steady  — nothing dirty, sweep not due: queries, seconds (median of BENCH_STEADY_REPEAT), exchange calls;
  churn   — 1 % of pairs (100) dirty, one queued order in each re-prioritised above the live ones, so
            each pair needs one demotion and one promotion: passes until converged, total seconds,
            exchange calls (against the 200 moves needed), queries;
  sweep   — a forced full sweep of every pair with the pass budget lifted (median of BENCH_SWEEP_REPEAT),
            plus how many pairs the job's real budget (PASS_BUDGET_SECONDS) covers.

Environment: BENCH_PG_URL, BENCH_QUEUE_ACCOUNTS (100), BENCH_QUEUE_SYMBOLS (100), BENCH_STEADY_REPEAT
(200), BENCH_SWEEP_REPEAT (3), BENCH_BASELINE_REPEAT (1), BENCH_KEEP=1 keeps the database.
"""

from __future__ import annotations

import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from bench.support import bench_env, django_start, header, line, median_seconds, migrate, pg_recreate, statements

ORDERS_PER_PAIR = 10
SLOTS = 2
CHURN_SHARE = 0.01
CHUNK = 5000
SIGNAL_AT = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
GOAL_SWEEP_VS_SELECT = 3.0  # the full sweep costs at most 3× the single SELECT of the same rows …
GOAL_SWEEP_VS_PER_PAIR = 20.0  # … and is at least 20× faster than the per-pair ORM baseline
# (side, order_type, price, stop_price, live) per pair, converged for 2 slots per bucket:
# BUY ranks the higher price first, SELL the lower; each stop is alone in its bucket.
LAYOUT = (
    ("BUY", "LIMIT", "100", None, True),
    ("BUY", "LIMIT", "99", None, True),
    ("BUY", "LIMIT", "98", None, False),
    ("BUY", "LIMIT", "97", None, False),
    ("SELL", "LIMIT", "101", None, True),
    ("SELL", "LIMIT", "102", None, True),
    ("SELL", "LIMIT", "103", None, False),
    ("SELL", "LIMIT", "104", None, False),
    ("BUY", "STOP_LIMIT", "111", "110", True),
    ("SELL", "STOP_MARKET", None, "90", True),
)


class FakeExchange:
    """An in-memory exchange for every account: a book of live orders and a count of calls by method."""

    exchange = "PAPER"

    def __init__(self) -> None:
        self.calls: Counter = Counter()
        self.book: dict[str, Any] = {}  # exchange_order_id → OrderState of live orders
        self._ids = itertools.count(1)

    def gateway(self, account_like: Any) -> FakeGateway:  # stands in for exchanges.services.gateway_for
        return FakeGateway(self, f"account-{account_like.pk}")

    @property
    def total(self) -> int:
        return sum(self.calls.values())


class FakeGateway:
    """The ExchangeGateway protocol over FakeExchange: creates and cancels succeed at once."""

    def __init__(self, exchange: FakeExchange, account_key: str) -> None:
        self._ex = exchange
        self.exchange = exchange.exchange
        self.account_key = account_key

    def _state(self, request: Any, exchange_order_id: str) -> Any:
        from django.utils import timezone

        from exchanges.gateway import OrderState, OrderStatus

        return OrderState(
            exchange_order_id=exchange_order_id,
            client_order_id=request.client_order_id,
            symbol=request.symbol,
            market_type=request.market_type,
            side=request.side,
            order_type=request.order_type,
            status=OrderStatus.NEW,
            quantity=request.quantity,
            filled_quantity=Decimal(0),
            average_price=None,
            price=request.price,
            stop_price=request.stop_price,
            fee=Decimal(0),
            fee_currency="",
            updated_at=timezone.now(),
            conditional=request.conditional,
        )

    def create_order(self, request: Any) -> Any:
        self._ex.calls["create_order"] += 1
        state = self._state(request, f"f{next(self._ex._ids)}")
        self._ex.book[state.exchange_order_id] = state
        return state

    def _find(self, exchange_order_id: str | None, client_order_id: str | None) -> Any:
        from exchanges.gateway import NotFound

        if exchange_order_id in self._ex.book:
            return self._ex.book[exchange_order_id]
        for state in self._ex.book.values():
            if client_order_id and state.client_order_id == client_order_id:
                return state
        raise NotFound(f"no order {exchange_order_id or client_order_id}")

    def cancel_order(
        self, *, exchange_order_id: str | None = None, client_order_id: str | None = None, **_: Any
    ) -> Any:
        from exchanges.gateway import OrderStatus

        self._ex.calls["cancel_order"] += 1
        state = self._find(exchange_order_id, client_order_id)
        del self._ex.book[state.exchange_order_id]
        return replace(state, status=OrderStatus.CANCELED)

    def fetch_order(self, *, exchange_order_id: str | None = None, client_order_id: str | None = None, **_: Any) -> Any:
        self._ex.calls["fetch_order"] += 1
        return self._find(exchange_order_id, client_order_id)

    def fetch_open_orders(self, market_type: Any, *, conditional: bool = False, symbol: str | None = None) -> list:
        self._ex.calls["fetch_open_orders"] += 1
        return [
            s
            for s in self._ex.book.values()
            if s.market_type == market_type and s.conditional == conditional and symbol in (None, s.symbol)
        ]

    def load_markets(self, market_type: Any) -> list:
        self._ex.calls["load_markets"] += 1
        return []

    def fetch_last_prices(self, market_type: Any, symbols: list[str] | None = None) -> dict:
        self._ex.calls["fetch_last_prices"] += 1
        return {}

    def fetch_balance(self, market_type: Any) -> Any:
        # The queue pass never asks for a balance; if it ever does, the benchmark must say so loudly.
        raise AssertionError("the queue benchmark's fake exchange has no balances")


# --- seed -----------------------------------------------------------------------------------------


def seed(n_accounts: int, n_symbols: int, fake: FakeExchange) -> list[tuple[int, str, str]]:
    """Accounts, symbols' MarketInfo and 10 converged orders per pair; returns the pairs in order."""
    from django.contrib.auth import get_user_model
    from django.db import transaction

    from accounts.models import Account, Strategy, StrategyAccount
    from exchanges.gateway import MarketType, OrderState, OrderStatus, OrderType, Side
    from exchanges.models import MarketInfo
    from orders.models import OpenOrder, PendingOrder
    from orders.services import client_order_id_for

    user = get_user_model().objects.create(username="bench")
    strategy = Strategy.objects.create(name="bench", group_name="bench", market_type="SPOT")
    accounts = Account.objects.bulk_create(
        [Account(user=user, name=f"bench-{i}", exchange="PAPER") for i in range(n_accounts)]
    )
    sas = StrategyAccount.objects.bulk_create([StrategyAccount(strategy=strategy, account=a) for a in accounts])
    symbols = [f"B{i:04d}/USDT" for i in range(n_symbols)]
    MarketInfo.objects.bulk_create(
        [
            MarketInfo(
                exchange="PAPER",
                market_type="SPOT",
                symbol=s,
                tick_size=Decimal("0.01"),
                step_size=Decimal("0.001"),
                min_qty=Decimal("0.001"),
                min_notional=Decimal("5"),
                updated_at=SIGNAL_AT,
            )
            for s in symbols
        ]
    )
    seq = itertools.count(1)
    pending: list[PendingOrder] = []
    live: list[OpenOrder] = []

    def flush(force: bool = False) -> None:
        if pending and (force or len(pending) >= CHUNK):
            PendingOrder.objects.bulk_create(pending, batch_size=CHUNK)
            pending.clear()
        if live and (force or len(live) >= CHUNK):
            OpenOrder.objects.bulk_create(live, batch_size=CHUNK)
            live.clear()

    pairs = []
    with transaction.atomic():
        for sa in sas:
            for symbol in symbols:
                pairs.append((sa.account_id, "SPOT", symbol))
                for side, order_type, price, stop, is_live in LAYOUT:
                    n = next(seq)
                    fields = {
                        "strategy_account_id": sa.pk,
                        "account_id": sa.account_id,
                        "symbol": symbol,
                        "market_type": "SPOT",
                        "side": side,
                        "order_type": order_type,
                        "price": Decimal(price) if price else None,
                        "stop_price": Decimal(stop) if stop else None,
                        "quantity": Decimal("1"),
                        "signal_at": SIGNAL_AT,
                        "queue_seq": n,
                    }
                    if not is_live:
                        pending.append(PendingOrder(**fields))
                        continue
                    order = OpenOrder(**fields, placement_no=1, exchange_order_id=f"s{n}", status="NEW")
                    order.client_order_id = client_order_id_for(order_key=order.order_key, placement_no=1)
                    order.conditional = order_type != "LIMIT"
                    live.append(order)
                    fake.book[order.exchange_order_id] = OrderState(
                        exchange_order_id=order.exchange_order_id,
                        client_order_id=order.client_order_id,
                        symbol=symbol,
                        market_type=MarketType.SPOT,
                        side=Side(side),
                        order_type=OrderType(order_type),
                        status=OrderStatus.NEW,
                        quantity=order.quantity,
                        filled_quantity=Decimal(0),
                        average_price=None,
                        price=order.price,
                        stop_price=order.stop_price,
                        fee=Decimal(0),
                        fee_currency="",
                        updated_at=SIGNAL_AT,
                        conditional=order.conditional,
                    )
                flush()
        flush(force=True)
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")  # fresh statistics, as autovacuum would have them on a live database
    return pairs


# --- baselines ------------------------------------------------------------------------------------


def per_pair_orm(pairs: list[tuple[int, str, str]]) -> tuple[int, int]:
    """For each pair: its PendingOrder and OpenOrder model instances (2 queries), ranked by the pass's planner.

    Returns (pairs with a non-empty plan, rows read).
    """
    from django.utils import timezone

    from accounts.models import Account
    from orders import selectors
    from orders.models import OpenOrder, PendingOrder
    from orders.queue import _entries
    from orders.ranking import plan_pair
    from orders.selectors import OPEN_FIELDS, PENDING_FIELDS, PairRows, queue_slots_for

    now = timezone.now()
    accounts = Account.objects.in_bulk({p[0] for p in pairs})
    ticks = selectors.market_ticks(keys={(a.exchange, "SPOT") for a in accounts.values()})
    not_empty = rows_read = 0
    for account_id, market_type, symbol in pairs:
        where = {"account_id": account_id, "market_type": market_type, "symbol": symbol}
        pending = list(PendingOrder.objects.filter(**where))
        live = list(OpenOrder.objects.filter(**where))
        rows_read += len(pending) + len(live)
        rows = PairRows(
            pending=[{f: getattr(o, f) for f in PENDING_FIELDS} for o in pending],
            open=[{f: getattr(o, f) for f in OPEN_FIELDS} for o in live],
        )
        account = accounts[account_id]
        entries, _, _ = _entries(rows, now)
        slots = queue_slots_for(exchange=account.exchange, market_type=market_type)
        tick = ticks.get((account.exchange, market_type, symbol), (None, None))[0]
        not_empty += not plan_pair(entries, slots=slots, tick=tick).empty
    return not_empty, rows_read


def single_select() -> int:
    """One plain SELECT of the pass's columns from each order table, fetched as tuples. Returns rows read."""
    from django.db import connection

    from orders.selectors import OPEN_FIELDS, PENDING_FIELDS

    n = 0
    with connection.cursor() as cursor:
        for table, columns in (("orders_pendingorder", PENDING_FIELDS), ("orders_openorder", OPEN_FIELDS)):
            cursor.execute(f"SELECT {', '.join(columns)} FROM {table}")  # noqa: S608 - constant names
            n += len(cursor.fetchall())
    return n


# --- the pass -------------------------------------------------------------------------------------


def run_pass() -> Any:
    from orders.jobs import rebalance_order_queue

    return rebalance_order_queue.__wrapped__()


def churn_start(pairs: list[tuple[int, str, str]]) -> list[tuple[int, str, str]]:
    """Every 1/CHURN_SHARE-th pair: its worst queued BUY gets priority -1 (outranks both live BUYs), pair marked."""
    from django.db import transaction
    from django.utils import timezone

    from orders.models import PendingOrder
    from orders.services import queue_mark_dirty

    step = round(1 / CHURN_SHARE)
    chosen = pairs[::step]
    with transaction.atomic():
        for account_id, market_type, symbol in chosen:
            worst = (
                PendingOrder.objects.filter(account_id=account_id, market_type=market_type, symbol=symbol, side="BUY")
                .filter(order_type="LIMIT")
                .order_by("price")
                .values_list("pk", flat=True)
                .first()
            )
            PendingOrder.objects.filter(pk=cast(int, worst)).update(priority=-1)  # each pair has LIMIT BUYs
        queue_mark_dirty(pairs=chosen, now=timezone.now())
    return chosen


def churn_converged(chosen: list[tuple[int, str, str]]) -> bool:
    from orders.models import OpenOrder

    promoted = OpenOrder.objects.filter(priority=-1, side="BUY", order_type="LIMIT", status="NEW").values_list(
        "account_id", "market_type", "symbol"
    )
    return set(promoted) == set(chosen)


def main() -> int:  # noqa: PLR0915 - one straight script of measurements
    url = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/tradingsite_bench_queue")
    n_accounts = int(os.environ.get("BENCH_QUEUE_ACCOUNTS", "100"))
    n_symbols = int(os.environ.get("BENCH_QUEUE_SYMBOLS", "100"))
    steady_repeat = int(os.environ.get("BENCH_STEADY_REPEAT", "200"))
    sweep_repeat = int(os.environ.get("BENCH_SWEEP_REPEAT", "3"))
    baseline_repeat = int(os.environ.get("BENCH_BASELINE_REPEAT", "1"))
    work = Path(tempfile.mkdtemp(prefix="tradingsite-bench-queue-"))
    env = bench_env(url, work)
    env["ORDER_QUEUE_SLOTS"] = str(SLOTS)
    started = time.monotonic()
    pg_recreate(url)
    migrate(env)
    django_start(env)

    from orders import queue as queue_module
    from orders.queue import queue_sweep_reset

    fake = FakeExchange()
    queue_module.gateway_for = fake.gateway  # the pass builds every gateway through this name
    seed_seconds = time.perf_counter()
    pairs = seed(n_accounts, n_symbols, fake)
    seed_seconds = time.perf_counter() - seed_seconds
    n_orders = len(pairs) * ORDERS_PER_PAIR
    print(
        f"# queue: PostgreSQL, {n_orders} orders ({len(fake.book)} live, {n_orders - len(fake.book)} queued) over "
        f"{len(pairs)} pairs, {SLOTS} slots per bucket, counting fake exchange (zero latency); "
        f"seeded in {seed_seconds:.1f} s",
        flush=True,
    )

    # Baselines.
    with statements() as seen:
        base_not_empty, base_rows = per_pair_orm(pairs)
    per_pair_queries = len(seen)
    per_pair_seconds = median_seconds(lambda: per_pair_orm(pairs), baseline_repeat)
    assert base_not_empty == 0, f"seed not converged: {base_not_empty} pairs have moves"
    assert base_rows == n_orders, (base_rows, n_orders)
    with statements() as seen:
        assert single_select() == n_orders
    select_queries = len(seen)
    select_seconds = median_seconds(single_select, 5)

    # Full sweep, forced, budget lifted: every pair is planned; nothing moves.
    budget = queue_module.PASS_BUDGET_SECONDS
    queue_module.PASS_BUDGET_SECONDS = float("inf")
    sweep_times = []
    for _ in range(sweep_repeat):
        queue_sweep_reset()
        with statements() as seen:
            t0 = time.perf_counter()
            result = run_pass()
            sweep_times.append(time.perf_counter() - t0)
        assert result.noop, result.summary
    sweep_queries = len(seen)
    sweep_seconds = statistics.median(sweep_times)
    sweep_calls = fake.total
    queue_module.PASS_BUDGET_SECONDS = budget
    # The job as it runs: how far a sweep gets within the pass budget (the rest is left for later ticks).
    queue_sweep_reset()
    t0 = time.perf_counter()
    result = run_pass()
    budgeted_seconds = time.perf_counter() - t0
    left = 0
    for error in result.summary.split("; "):
        if "out of time:" in error:
            left = int(error.split("out of time:")[1].split()[0])
    budgeted_pairs = len(pairs) - left

    # Steady state: right after that sweep, nothing dirty and no sweep due for 60 s.
    with statements() as seen:
        result = run_pass()
    assert result.noop, result.summary
    steady_queries = len(seen)
    calls_before = fake.total
    steady_seconds = median_seconds(run_pass, steady_repeat)
    steady_calls = fake.total - calls_before

    # Churn: 1 % of pairs dirty, each needing one demotion (pass n) and one promotion (a later pass).
    chosen = churn_start(pairs)
    calls_before = fake.total
    churn_times: list[float] = []
    churn_queries = 0
    while not churn_converged(chosen) and len(churn_times) < 20:
        with statements() as seen:
            t0 = time.perf_counter()
            run_pass()
            churn_times.append(time.perf_counter() - t0)
        churn_queries += len(seen)
    churn_calls = fake.total - calls_before
    converged = churn_converged(chosen)
    with statements() as seen:
        after = run_pass()
    after_queries = len(seen)

    needed = 2 * len(chosen)
    lines = [
        header(),
        line("queue_steady_queries[vs per-pair ORM]", steady_queries, per_pair_queries),
        line("queue_steady_queries[vs single SELECT]", steady_queries, select_queries),
        line("queue_steady_seconds[vs per-pair ORM]", steady_seconds, per_pair_seconds),
        line("queue_steady_seconds[vs single SELECT]", steady_seconds, select_seconds),
        line(f"queue_steady_exchange_calls[{steady_repeat} passes]", steady_calls, None),
        line(f"queue_churn_seconds[{len(chosen)} dirty, vs per-pair ORM]", sum(churn_times), per_pair_seconds),
        line(f"queue_churn_seconds[{len(chosen)} dirty, vs single SELECT]", sum(churn_times), select_seconds),
        line("queue_churn_pass_max_seconds[vs pass budget]", max(churn_times), budget),
        line("queue_churn_passes", len(churn_times), None),
        line("queue_churn_exchange_calls[vs moves needed]", churn_calls, needed),
        line("queue_churn_queries[vs per-pair ORM]", churn_queries, per_pair_queries),
        line("queue_sweep_seconds[vs per-pair ORM]", sweep_seconds, per_pair_seconds),
        line("queue_sweep_seconds[vs single SELECT]", sweep_seconds, select_seconds),
        line("queue_sweep_queries[vs per-pair ORM]", sweep_queries, per_pair_queries),
        line("queue_sweep_queries[vs single SELECT]", sweep_queries, select_queries),
        line("queue_sweep_exchange_calls", sweep_calls, None),
        line(f"queue_sweep_budgeted_pairs[{budget} s budget, vs all]", budgeted_pairs, len(pairs)),
        line("queue_sweep_budgeted_seconds[vs pass budget]", budgeted_seconds, budget),
    ]
    print("\n".join(lines))
    ok_steady = steady_queries == 1 and steady_calls == 0
    vs_select = sweep_seconds / select_seconds
    faster = per_pair_seconds / sweep_seconds
    print(f"# goal steady state 1 query, 0 exchange calls: {'met' if ok_steady else 'NOT met'}")
    print(
        f"# goal sweep <= {GOAL_SWEEP_VS_SELECT:.0f}x single SELECT: "
        f"{'met' if vs_select <= GOAL_SWEEP_VS_SELECT else 'NOT met'} ({vs_select:.2f}x)"
    )
    print(
        f"# goal sweep >= {GOAL_SWEEP_VS_PER_PAIR:.0f}x faster than per-pair ORM: "
        f"{'met' if faster >= GOAL_SWEEP_VS_PER_PAIR else 'NOT met'} ({faster:.1f}x)"
    )
    print(
        f"# churn converged: {'yes' if converged else 'NO'} after {len(churn_times)} passes "
        f"({', '.join(f'{t:.3f}' for t in churn_times)} s; calls {dict(sorted(fake.calls.items()))}); "
        f"next pass {after_queries} queries ({after.summary})"
    )
    print(f"# wall time {time.monotonic() - started:.0f} s")

    from django.db import connections

    connections.close_all()
    if os.environ.get("BENCH_KEEP") != "1":
        pg_recreate(url, drop_only=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0 if converged and ok_steady else 1


if __name__ == "__main__":
    sys.exit(main())
