"""The execution engine (orders.execution): the queue's exchange calls run on a worker pool, pairs of
different accounts at the same time, one pair one call at a time, a pass never waiting for slow calls,
and a SIGKILL in the middle of a batch losing and doubling nothing."""

from __future__ import annotations

import threading
import time
from collections import Counter
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from core.counters import counters_buffer_add, counters_buffer_flush
from core.models import MetricCounter
from exchanges.models import SimOrder
from exchanges.paper import PaperGateway
from orders import selectors
from orders.execution import ExecutionPools, execution_pool
from orders.faults import crash_disable_all
from orders.jobs import rebalance_order_queue, update_open_orders
from orders.models import OpenOrder, PendingOrder, QueueDirty
from orders.queue import queue_sweep_reset, queue_work_load
from scheduler.models import JobRun
from tests import procs
from tests.orders.factories import StrategyAccountFactory, paper_market_info
from tests.orders.queue_support import bucket_occupancy, enqueue, invariant_problems


@pytest.fixture(autouse=True)
def _clean(settings):  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    queue_sweep_reset()
    crash_disable_all()
    yield
    queue_sweep_reset()


class Tracker:
    """Counts create_order calls in flight, overall and per (account, symbol), and the highest of each."""

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None):
        self.delay = delay
        self.gate = gate
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.per_pair: Counter = Counter()
        self.most_per_pair = 0
        self.calls = 0

    def factory(self, account: Any) -> Any:
        tracker = self
        inner = PaperGateway(f"account-{account.pk}")

        class Slow:
            exchange = inner.exchange

            def __getattr__(self, name: str) -> Any:
                return getattr(inner, name)

            def create_order(self, request: Any) -> Any:
                key = (account.pk, request.symbol)
                with tracker.lock:
                    tracker.calls += 1
                    tracker.now += 1
                    tracker.per_pair[key] += 1
                    tracker.most = max(tracker.most, tracker.now)
                    tracker.most_per_pair = max(tracker.most_per_pair, tracker.per_pair[key])
                try:
                    if tracker.gate is not None:
                        assert tracker.gate.wait(10), "the test never released the slow create"
                    time.sleep(tracker.delay)
                    return inner.create_order(request)
                finally:
                    with tracker.lock:
                        tracker.now -= 1
                        tracker.per_pair[key] -= 1

        return Slow()


def _followers(n: int, orders: int = 2) -> list[Any]:
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    accounts = []
    for i in range(n):
        sa = StrategyAccountFactory(strategy__market_type="SPOT")
        for j in range(orders):
            enqueue(sa, "BUY", f"{1500 + 10 * i + j}")
        accounts.append(sa)
    return accounts


def test_pairs_of_different_accounts_reach_the_exchange_at_once_one_pair_one_call_at_a_time(
    execution_workers, monkeypatch
):  # noqa: ANN001
    followers = _followers(8)
    tracker = Tracker(delay=0.15)
    monkeypatch.setattr("orders.queue.gateway_for", tracker.factory)

    started = time.monotonic()
    rebalance_order_queue()
    assert execution_pool("queue").drain(30)
    elapsed = time.monotonic() - started
    print(f"16 creates of 0.15 s over 8 accounts: {elapsed:.2f} s (one after another: 2.40 s)")

    assert tracker.calls == 16
    assert tracker.most >= 2, "no two accounts' calls were ever in flight together"
    assert tracker.most_per_pair == 1, "two calls of one (account, symbol) ran at the same time"
    account_ids = [sa.account_id for sa in followers]
    assert OpenOrder.objects.filter(account_id__in=account_ids).count() == 16
    assert not PendingOrder.objects.exists()
    # Every logical order reached the exchange exactly once.
    per_client_id = Counter(SimOrder.objects.values_list("client_order_id", flat=True))
    assert len(per_client_id) == 16 and set(per_client_id.values()) == {1}
    assert invariant_problems(account_ids) == []
    for sa in followers:
        assert bucket_occupancy(sa.account_id) == {"db:BUY": 2, "ex:BUY": 2}


def test_a_pass_whose_plan_spent_its_budget_starts_its_tasks_and_returns_without_waiting_for_them(
    execution_workers, monkeypatch
):  # noqa: ANN001
    followers = _followers(2, orders=1)
    tracker = Tracker(delay=0.1)  # well within the usual wait
    monkeypatch.setattr("orders.queue.gateway_for", tracker.factory)
    # As when a busy process slowed the plan past the budget: waiting the usual 0.5 s for the tasks
    # could then hold the job past the next tick, which APScheduler would skip.
    monkeypatch.setattr("orders.queue.PASS_BUDGET_SECONDS", 0.0)

    rebalance_order_queue()

    run = JobRun.objects.filter(job_id="rebalance_order_queue").order_by("-id").first()
    assert "2 still executing" in run.summary, run.summary
    assert execution_pool("queue").drain(30)
    assert tracker.calls == 2
    account_ids = [sa.account_id for sa in followers]
    assert OpenOrder.objects.filter(account_id__in=account_ids).count() == 2
    assert not PendingOrder.objects.exists()
    assert invariant_problems(account_ids) == []


def test_a_pass_does_not_wait_for_a_slow_call_and_the_next_pass_leaves_the_busy_pair_alone(
    execution_workers, monkeypatch
):  # noqa: ANN001
    (sa,) = _followers(1, orders=1)
    gate = threading.Event()
    tracker = Tracker(gate=gate)
    monkeypatch.setattr("orders.queue.gateway_for", tracker.factory)

    started = time.monotonic()
    rebalance_order_queue()
    returned_after = time.monotonic() - started
    first = JobRun.objects.filter(job_id="rebalance_order_queue").order_by("-id").first()
    print(f"the pass returned after {returned_after:.2f} s with its create still in flight")
    assert returned_after < 5, "the pass waited for its exchange call"
    assert "1 still executing" in first.summary, first.summary
    assert tracker.calls == 1

    time.sleep(0.01)  # a later scheduled time for the second MANUAL run
    rebalance_order_queue()
    second = JobRun.objects.filter(job_id="rebalance_order_queue").order_by("-id").first()
    assert second.pk != first.pk
    assert "1 busy from an earlier pass" in second.summary, second.summary
    assert tracker.calls == 1, "a second pass sent the same pair's order again"
    # The busy pair is left out before its rows are read: a pass after a large fan-out stays cheap.
    work = queue_work_load(now=timezone.now())
    assert work is not None and work.busy == 1
    assert work.pairs == [] and work.rows == {} and work.express == []

    gate.set()
    assert execution_pool("queue").drain(30)
    assert OpenOrder.objects.filter(account_id=sa.account_id).count() == 1
    assert SimOrder.objects.count() == 1
    assert invariant_problems([sa.account_id]) == []


def test_counts_of_tasks_that_outlive_their_pass_are_written_by_the_next_pass_in_one_statement(
    execution_workers, monkeypatch
):  # noqa: ANN001
    """A thousand follower tasks ending together must not queue on one counter row (an upsert each):
    they buffer their counts in memory, and the next pass (or the pools' stop) writes them at once."""
    _followers(2, orders=1)
    gate = threading.Event()
    tracker = Tracker(gate=gate)
    monkeypatch.setattr("orders.queue.gateway_for", tracker.factory)

    def moves() -> int:
        return sum(MetricCounter.objects.filter(name="queue_moves").values_list("value", flat=True))

    rebalance_order_queue()
    gate.set()
    assert execution_pool("queue").drain(30)
    assert tracker.calls == 2 and OpenOrder.objects.count() == 2
    assert moves() == 0, "a late task wrote its own counter row"

    time.sleep(0.01)  # a later scheduled time for the second MANUAL run
    with CaptureQueriesContext(connection) as queries:
        rebalance_order_queue()
    upserts = [q["sql"] for q in queries if "scheduler_metriccounter" in q["sql"] and "INSERT" in q["sql"]]
    assert moves() == 2
    assert len(upserts) == 1, upserts

    # What tasks count after the last pass is written when the pools stop (leadership ends).
    counters_buffer_add(name="queue_moves", value=3)
    ExecutionPools().stop()
    assert moves() == 5
    assert counters_buffer_flush() == 0


def test_a_late_task_of_a_fan_out_follower_places_its_market_order_without_reading_the_pair_again(
    execution_workers, monkeypatch
):  # noqa: ANN001
    """A pair whose planned rows are only its express orders (a follower of a fan-out) knows them after
    the batch from its outcomes; a pair with other rows still reads them again when its task starts late."""
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    followers = [StrategyAccountFactory(strategy__market_type="SPOT") for _ in range(4)]
    for sa in followers:
        enqueue(sa, "BUY", None, order_type="MARKET")
    mixed = StrategyAccountFactory(strategy__market_type="SPOT")
    enqueue(mixed, "BUY", None, order_type="MARKET")
    enqueue(mixed, "BUY", "1500")
    monkeypatch.setattr("orders.queue.STALE_ROWS_SECONDS", -1.0)  # every task starts "late"
    reads: list[list] = []
    original = selectors.queue_rows_for_pairs

    def counted(**kwargs: Any) -> Any:
        if threading.current_thread().name.startswith("exec-queue"):
            reads.append(list(kwargs.get("pairs", [])))
        return original(**kwargs)

    monkeypatch.setattr("orders.queue.selectors.queue_rows_for_pairs", counted)

    rebalance_order_queue()
    assert execution_pool("queue").drain(30)

    mixed_pair = (mixed.account_id, "SPOT", "ETH/USDT")
    assert reads == [[mixed_pair]], reads
    ids = [sa.account_id for sa in followers]
    assert SimOrder.objects.filter(order_type="MARKET").count() == 5
    assert not PendingOrder.objects.filter(account_id__in=ids).exists()
    assert not QueueDirty.objects.filter(account_id__in=ids).exists(), "a follower's pair stayed marked"
    assert OpenOrder.objects.filter(account_id=mixed.account_id, order_type="LIMIT").count() == 1
    assert invariant_problems([*ids, mixed.account_id]) == []


# --- SIGKILL in the middle of a batch ------------------------------------------------------------


def _shell(db: procs.ProcDB, code: str) -> str:
    result = procs.manage("shell", "-c", code, env=db.env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _kill_mid_batch_and_recover(db: procs.ProcDB) -> None:
    seeded = _shell(
        db,
        "from tests.orders.queue_support import seed_queue_scenario; "
        "print('ACCOUNTS=' + ','.join(str(seed_queue_scenario(buys=3, sells=0)['account_id']) for _ in range(6)))",
    )
    line = next(x for x in seeded.splitlines() if x.startswith("ACCOUNTS="))
    account_ids = [int(x) for x in line.removeprefix("ACCOUNTS=").split(",")]
    # The first exchange acknowledgement kills the process while the other accounts' calls are in flight.
    killed = procs.manage(
        "runscheduler",
        "--run",
        "rebalance_order_queue",
        env=db.env(ORDER_CRASH_POINTS="promote.after_exchange_ack:kill", EXECUTION_WORKERS="6"),
    )
    assert killed.returncode == -9, (killed.returncode, killed.stdout[-2000:], killed.stderr[-2000:])
    age = (
        "from datetime import timedelta; from django.db.models import F; "
        "from orders.models import PendingOrder, QueueDirty; d = timedelta(seconds=40); "
        "PendingOrder.objects.filter(submitting_at__isnull=False).update(submitting_at=F('submitting_at') - d); "
        "PendingOrder.objects.filter(last_lookup_at__isnull=False).update(last_lookup_at=F('last_lookup_at') - d); "
        "PendingOrder.objects.filter(next_attempt_at__isnull=False).update(next_attempt_at=F('next_attempt_at') - d); "
        "QueueDirty.objects.update(marked_at=F('marked_at') - d)"
    )
    for _ in range(5):
        _shell(db, age)
        result = procs.manage("runscheduler", "--run", "rebalance_order_queue", env=db.env(EXECUTION_WORKERS="6"))
        assert result.returncode == 0, result.stderr[-3000:]
    out = _shell(
        db,
        "import json; from tests.orders.queue_support import invariant_problems; "
        f"print('PROBLEMS=' + json.dumps(invariant_problems({account_ids})))",
    )
    assert next(x for x in out.splitlines() if x.startswith("PROBLEMS=")) == "PROBLEMS=[]"
    assert db.scalar("SELECT COUNT(*) FROM orders_pendingorder WHERE status = 'SUBMITTING'") == 0
    assert db.scalar("SELECT COUNT(*) FROM orders_openorder") == 12  # two slots on each of six accounts
    # No logical order was sent twice: one simulated order per client order id.
    assert db.scalar("SELECT COUNT(*) FROM exchanges_simorder") == db.scalar(
        "SELECT COUNT(DISTINCT client_order_id) FROM exchanges_simorder"
    )


@pytest.mark.subprocess
def test_sigkill_in_the_middle_of_a_batch_on_sqlite_loses_and_doubles_nothing(proc_sqlite_db):  # noqa: ANN001
    _kill_mid_batch_and_recover(proc_sqlite_db)


@pytest.mark.subprocess
@pytest.mark.postgres
def test_sigkill_in_the_middle_of_a_batch_on_postgres_loses_and_doubles_nothing(proc_pg_db):  # noqa: ANN001
    _kill_mid_batch_and_recover(proc_pg_db)


# --- Reconciliation per account market, concurrently ---------------------------------------------


def test_update_open_orders_reconciles_account_markets_at_the_same_time(execution_workers, monkeypatch):  # noqa: ANN001
    from exchanges import services as exchange_services
    from exchanges.simulator.engine import default_engine
    from positions.fills import position_matches_fills
    from positions.models import Fill
    from tests.orders.test_reconcile import place

    paper = exchange_services.GATEWAY_FACTORIES["PAPER"]
    lock = threading.Lock()
    state = {"now": 0, "most": 0, "calls": 0}

    class SlowReads:
        def __init__(self, inner: Any):
            self._inner = inner
            self.exchange = inner.exchange

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def fetch_open_orders(self, *args: Any, **kwargs: Any) -> Any:
            with lock:
                state["calls"] += 1
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            try:
                time.sleep(0.2)
                return self._inner.fetch_open_orders(*args, **kwargs)
            finally:
                with lock:
                    state["now"] -= 1

    monkeypatch.setitem(exchange_services.GATEWAY_FACTORIES, "PAPER", lambda account: SlowReads(paper(account)))
    default_engine.price_script("PAPER", "ETH/USDT", ["3000"])
    followers = [StrategyAccountFactory() for _ in range(6)]
    orders = [place(sa, "BUY", "LIMIT", "1", price="2900") for sa in followers]
    default_engine.price_script("PAPER", "ETH/USDT", ["2890"])
    time.sleep(1.1)  # one MATCH_INTERVAL of engine time: the next read runs a matching step

    started = time.monotonic()
    result = update_open_orders()
    print(f"6 account markets with a 0.2 s open-orders read: {time.monotonic() - started:.2f} s (serial: 1.2 s)")

    assert result.summary.startswith("6/6 account markets, 6 orders: 6 fills, 6 filled"), result.summary
    assert state["calls"] == 6 and state["most"] >= 2, state
    assert not OpenOrder.objects.filter(pk__in=[o.pk for o in orders]).exists()
    assert Fill.objects.count() == 6
    assert position_matches_fills() == []


# --- One poisoned pair ---------------------------------------------------------------------------


def test_a_poisoned_order_ends_rejected_with_an_alert_while_every_other_pair_keeps_moving(db, monkeypatch, settings):  # noqa: ANN001
    """Issue 13: an order whose create fails inside the client (here decimal.InvalidOperation, as the
    PAPER engine raised on an unrepresentable price) is refused for good after one lookup, with its
    event and an alert; the other accounts' orders are placed in the same passes and no run fails."""
    from datetime import timedelta
    from decimal import InvalidOperation

    import time_machine

    from notifications.models import AlertThrottle
    from orders.models import OrderEvent

    followers = _followers(3, orders=1)
    poisoned = followers[0]
    poison_key = PendingOrder.objects.get(account_id=poisoned.account_id).order_key
    real = PaperGateway

    class Poisoned:
        def __init__(self, inner: Any):
            self._inner = inner
            self.exchange = inner.exchange

        def __getattr__(self, name: str) -> Any:
            return getattr(self._inner, name)

        def create_order(self, request: Any) -> Any:
            raise InvalidOperation([InvalidOperation])

    def factory(account: Any) -> Any:
        gateway = real(f"account-{account.pk}")
        return Poisoned(gateway) if account.pk == poisoned.account_id else gateway

    monkeypatch.setattr("orders.queue.gateway_for", factory)
    with time_machine.travel(timezone_now(), tick=False) as clock:
        for _ in range(4):
            rebalance_order_queue()
            clock.shift(timedelta(seconds=40))  # past the lookup delay and the not-found gap
    runs = list(JobRun.objects.filter(job_id="rebalance_order_queue").values_list("outcome", flat=True))
    assert "error" not in runs, runs
    kinds = list(OrderEvent.objects.filter(order_key=poison_key).order_by("id").values_list("kind", flat=True))
    assert kinds == ["queued", "submitting", "rejected"], kinds
    assert not PendingOrder.objects.filter(order_key=poison_key).exists()
    assert AlertThrottle.objects.filter(key=f"queue:rejected:{poison_key}").exists()
    for sa in followers[1:]:
        assert OpenOrder.objects.filter(account_id=sa.account_id).count() == 1
    assert invariant_problems([sa.account_id for sa in followers]) == []


def timezone_now() -> Any:
    from django.utils import timezone

    return timezone.now()
