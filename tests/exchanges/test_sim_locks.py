"""The simulator engine's locks: one account's writers serialize, different accounts' never wait for each other.

Lock semantics need PostgreSQL (select_for_update is a no-op on SQLite, which serializes every
writer anyway); the fault and sequence tests run on both.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from decimal import Decimal

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from exchanges.gateway import MarketType, OrderStatus
from exchanges.models import SimAccount, SimExchange, SimFault, SimFill, SimOrder
from exchanges.paper import PaperGateway
from exchanges.simulator.engine import MatchReport, SimEngine, StreamCursor
from tests.exchanges.conftest import FakeClock, order

EX = "PAPER"
WAIT = 30.0  # seconds: liveness bound for anything that should finish; never reached when it works


class HeldEngine(SimEngine):
    """Holds the first transaction that locks `held`'s account row open, after the lock, until `release` is set."""

    def __init__(self, held: str, **kwargs):  # noqa: ANN003
        super().__init__(**kwargs)
        self.held = held
        self.holding = threading.Event()
        self.release = threading.Event()
        self._armed = True
        self._guard = threading.Lock()

    def _account_lock(self, exchange: str, account: str):  # noqa: ANN202
        row = super()._account_lock(exchange, account)
        with self._guard:
            hold = self._armed and account == self.held
            if hold:
                self._armed = False
        if hold:
            self.holding.set()
            assert self.release.wait(WAIT), "the test never released the held transaction"
        return row


class Worker(threading.Thread):
    """Runs `fn` in its own thread (own database connection), keeping its result or error."""

    def __init__(self, fn, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        super().__init__(daemon=True)
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.result = self.error = None

    def run(self) -> None:
        try:
            self.result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:  # handed to the test
            self.error = exc
        finally:
            connection.close()

    def outcome(self):  # noqa: ANN201
        self.join(WAIT)
        assert not self.is_alive(), f"{self.fn.__name__} did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def resting(cid: str, price: str = "2900"):  # noqa: ANN201
    return order("ETH/USDT", "BUY", "LIMIT", "0.1", price=price, client_order_id=cid)


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_accounts_open_transaction_blocks_its_own_creates_but_not_another_accounts(clock: FakeClock):
    engine = HeldEngine("A", clock=clock)
    engine.price_script(EX, "ETH/USDT", ["3000"], start_at=clock.now)
    first_a = Worker(engine.order_create, EX, "A", resting("a1"))
    first_a.start()
    assert engine.holding.wait(WAIT)  # A's create holds its transaction open, its SimAccount locked

    # B's create, lookup, listing and stream cursor complete while A's transaction is open.
    b = Worker(engine.order_create, EX, "B", resting("b1"))
    b.start()
    created_b = b.outcome()
    assert created_b.status == OrderStatus.NEW
    assert first_a.is_alive()
    assert engine.stream_cursor(EX, "B").seq == 1
    assert [o.client_order_id for o in engine.order_list_open(EX, "B", MarketType.SPOT)] == ["b1"]
    engine.balance_set(EX, "B", MarketType.SPOT, "USDT", free=Decimal("500"))

    # A second create of A waits for the first: one account's writers serialize.
    second_a = Worker(engine.order_create, EX, "A", resting("a2"))
    second_a.start()
    second_a.join(1.0)
    assert second_a.is_alive()
    assert not SimOrder.objects.filter(account="A").exists()  # nothing of A committed yet

    engine.release.set()
    assert first_a.outcome().client_order_id == "a1"
    assert second_a.outcome().client_order_id == "a2"
    seqs = dict(SimOrder.objects.filter(account="A").values_list("client_order_id", "update_seq"))
    assert seqs == {"a1": 1, "a2": 2}  # in lock order, numbered per account
    assert SimAccount.objects.get(exchange=EX, account="A").seq == 2
    assert SimAccount.objects.get(exchange=EX, account="B").seq == 1


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_matching_skips_a_busy_account_instead_of_waiting_and_fills_it_at_the_next_step(clock: FakeClock):
    engine = HeldEngine("A", clock=clock)
    engine._armed = False  # the first create is not held
    engine.price_script(EX, "ETH/USDT", ["3000"], start_at=clock.now)
    due = engine.order_create(EX, "A", resting("a-due"))
    engine._armed = True
    held = Worker(engine.order_create, EX, "A", resting("a-held", price="2000"))
    held.start()
    assert engine.holding.wait(WAIT)

    # The price falls through A's resting bid; B's create runs the step, which must not wait for A.
    engine.price_script(EX, "ETH/USDT", ["2800"], start_at=clock.now)
    clock.advance(2)
    b = Worker(engine.order_create, EX, "B", resting("b1", price="2500"))
    b.start()
    assert b.outcome().status == OrderStatus.NEW
    assert held.is_alive()
    assert SimOrder.objects.get(pk=int(due.exchange_order_id)).status == OrderStatus.NEW.value

    engine.release.set()
    held.outcome()
    clock.advance(2)
    report = engine.match(EX)
    assert report.ran and report.fills == 1
    filled = SimOrder.objects.get(pk=int(due.exchange_order_id))
    assert filled.status == OrderStatus.PARTIALLY_FILLED.value or filled.status == OrderStatus.FILLED.value
    assert SimFill.objects.filter(order=filled, price=Decimal("2900")).count() == 1


def _race_one_account(engine: SimEngine, account: str, creates: int, workers: int) -> list[Worker]:
    """`creates` orders of `account` from `workers` threads at once: even ones rest, odd ones are MARKET buys."""
    start = threading.Barrier(workers)

    def place(indexes: list[int]) -> None:
        start.wait(WAIT)
        for i in indexes:
            if i % 2:
                engine.order_create(EX, account, order("ETH/USDT", "BUY", "MARKET", "0.01", client_order_id=f"m{i}"))
            else:
                engine.order_create(EX, account, resting(f"l{i}"))

    threads = [Worker(place, list(range(w, creates, workers))) for w in range(workers)]
    for thread in threads:
        thread.start()
    return threads


@pytest.mark.django_db(transaction=True)
def test_one_accounts_racing_creates_get_unique_gapless_sequence_numbers_and_a_complete_stream(clock: FakeClock):
    engine = SimEngine(clock=clock)
    engine.price_script(EX, "ETH/USDT", ["3000"], start_at=clock.now)
    creates, per_account = 24, 4
    accounts = ["r1", "r2"]
    cursors = {a: engine.stream_cursor(EX, a) for a in accounts}
    assert cursors == {a: StreamCursor() for a in accounts}
    seen: dict[str, list] = {a: [] for a in accounts}
    done = threading.Event()

    def poll(account: str) -> None:
        # A stream reader polling while the creates race: it must see every event once, in order.
        cursor = cursors[account]
        while True:
            finished = done.is_set()
            events, cursor = engine.order_events_since(EX, account, cursor)
            seen[account].extend(events)
            if finished:
                return
            time.sleep(0.005)

    pollers = [Worker(poll, a) for a in accounts]
    for poller in pollers:
        poller.start()
    racers = [t for a in accounts for t in _race_one_account(engine, a, creates, per_account)]
    for racer in racers:
        racer.outcome()
    done.set()
    for poller in pollers:
        poller.outcome()

    for account in accounts:
        orders = list(SimOrder.objects.filter(exchange=EX, account=account))
        assert len(orders) == creates
        # A MARKET order is bumped twice in its create (NEW, then its fill), consecutively: under the lock.
        numbers = []
        for o in orders:
            numbers.extend([o.update_seq - 1, o.update_seq] if o.order_type == "MARKET" else [o.update_seq])
        assert sorted(numbers) == list(range(1, creates + creates // 2 + 1))
        assert SimAccount.objects.get(exchange=EX, account=account).seq == creates + creates // 2
        # Ids grow in the account's commit order: sequence order is id order.
        by_seq = sorted(orders, key=lambda o: o.update_seq)
        assert [o.pk for o in by_seq] == sorted(o.pk for o in orders)

        events = seen[account]
        kinds = [(e.kind, e.order.client_order_id) for e in events]
        assert len(kinds) == len(set(kinds)) == creates + creates // 2  # nothing twice, nothing skipped
        assert {cid for kind, cid in kinds if kind == "NEW"} == {o.client_order_id for o in orders}
        assert {cid for kind, cid in kinds if kind == "TRADE"} == {
            o.client_order_id for o in orders if o.order_type == "MARKET"
        }
        for o in orders:
            if o.order_type == "MARKET":
                assert kinds.index(("NEW", o.client_order_id)) < kinds.index(("TRADE", o.client_order_id))


@pytest.mark.django_db(transaction=True)
def test_a_latency_fault_sleeps_outside_every_transaction(clock: FakeClock):
    in_transaction: list[bool] = []
    engine = SimEngine(clock=clock, sleep=lambda seconds: in_transaction.append(connection.in_atomic_block))
    gateway = PaperGateway("lat", engine=engine)
    engine.price_script(EX, "ETH/USDT", ["3000"], start_at=clock.now)
    for phase in ("before", "after"):
        engine.fault_add(SimFault.Kind.LATENCY, endpoint="create_order", phase=phase, latency_ms=200)
    engine.fault_add(SimFault.Kind.LATENCY, endpoint="cancel_order", latency_ms=200)
    created = gateway.create_order(resting("lat1"))
    gateway.cancel_order(symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=created.exchange_order_id)
    assert in_transaction == [False, False, False]


def test_a_latency_fault_taken_inside_a_callers_transaction_is_logged(db, engine, caplog):  # noqa: ANN001
    gateway = PaperGateway("lat", engine=engine)
    engine.fault_add(SimFault.Kind.LATENCY, endpoint="fetch_balance", latency_ms=100, remaining=2)
    with caplog.at_level(logging.ERROR, logger="exchanges.simulator.engine"):
        gateway.fetch_balance(MarketType.SPOT)  # the test case's own transaction does not count
        assert not caplog.records
        with transaction.atomic():
            gateway.fetch_balance(MarketType.SPOT)
    assert [r.getMessage() for r in caplog.records] == [
        "sim latency of 100 ms on PAPER/fetch_balance taken inside a database transaction: its locks are held meanwhile"
    ]


def test_runsimexchange_refuses_a_thread_count_below_one():
    with pytest.raises(CommandError, match="--db-threads"):
        call_command("runsimexchange", "--db-threads", "0")


@pytest.mark.django_db(transaction=True)
def test_a_counted_fault_fires_exactly_its_count_under_concurrent_calls(clock: FakeClock):
    engine = SimEngine(clock=clock)
    counted = engine.fault_add(SimFault.Kind.HTTP_5XX, endpoint="create_order", remaining=5)
    start = threading.Barrier(12)

    def take(account: str):  # noqa: ANN202
        start.wait(WAIT)
        return engine.fault_take(EX, "create_order", account)

    workers = [Worker(take, f"acct{i}") for i in range(12)]
    for worker in workers:
        worker.start()
    hits = [w.outcome() for w in workers]
    assert sorted(h.fault_id for h in hits if h is not None) == [counted] * 5
    fault = SimFault.objects.get(pk=counted)
    assert (fault.remaining, fault.fired) == (0, 5)
    # An unlimited fault fires for every call and counts them.
    unlimited = engine.fault_add(SimFault.Kind.LATENCY, endpoint="fetch_balance", remaining=None, latency_ms=1)
    for i in range(3):
        hit = engine.fault_take(EX, "fetch_balance", f"acct{i}")
        assert hit is not None and hit.fault_id == unlimited
    assert SimFault.objects.get(pk=unlimited).fired == 3


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_create_never_waits_for_the_exchange_row_and_its_match_step_is_skipped_while_it_is_held(
    clock: FakeClock,
):
    engine = SimEngine(clock=clock)
    engine.price_script(EX, "ETH/USDT", ["3000"], start_at=clock.now)
    engine.exchange_configure(EX, taker_fee_rate=Decimal("0.002"))
    holding, release = threading.Event(), threading.Event()

    def hold_exchange_row() -> None:
        # What a configuration write or another process's match claim holds, kept open.
        with transaction.atomic():
            SimExchange.objects.select_for_update().get(exchange=EX)
            holding.set()
            assert release.wait(WAIT)

    holder = Worker(hold_exchange_row)
    holder.start()
    assert holding.wait(WAIT)
    clock.advance(5)  # a step is due
    created = Worker(engine.order_create, EX, "B", order("ETH/USDT", "BUY", "MARKET", "0.01", client_order_id="b1"))
    created.start()
    state = created.outcome()
    assert holder.is_alive()
    assert state.status == OrderStatus.FILLED and state.fee == Decimal("0.06")  # settings read, unlocked
    assert engine.match(EX) == MatchReport(ran=False)  # claim skipped, not waited for
    release.set()
    holder.outcome()
    assert engine.match(EX).ran


def test_the_served_app_runs_engine_calls_on_its_own_bounded_db_threads():
    from aiohttp import web

    from exchanges.simulator.server import executor_install
    from exchanges.simulator.wire import db_call

    def slow_call() -> str:
        time.sleep(0.2)
        return threading.current_thread().name

    async def serve_and_call() -> list[str]:
        app = web.Application()
        executor_install(app, 3)
        runner = web.AppRunner(app)
        await runner.setup()  # runs on_startup: the executor becomes the loop's default
        try:
            return list(await asyncio.gather(*(db_call(slow_call) for _ in range(7))))
        finally:
            await runner.cleanup()

    names = asyncio.run(serve_and_call())
    assert len(names) == 7 and all(name.startswith("sim-db") for name in names)
    assert len(set(names)) == 3  # seven calls at once, never more than three threads


def test_a_call_sees_its_account_matched_though_another_caller_claimed_the_exchange_step(db, engine, clock):  # noqa: ANN001
    engine.price_script(EX, "ETH/USDT", ["3000"], start_at=clock.now)
    placed = engine.order_create(EX, "A", resting("a1"))  # a bid at 2900 rests
    engine.price_script(EX, "ETH/USDT", ["2800"], start_at=clock.now)
    clock.advance(2)
    # Another caller claimed the exchange's step at this time and has not reached A (or skipped it: busy).
    SimExchange.objects.filter(exchange=EX).update(last_match_at=clock.now)
    assert engine.match(EX) == MatchReport(ran=False)

    def look():  # noqa: ANN202
        return engine.order_get(
            EX, "A", symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=placed.exchange_order_id
        )

    first = look()
    assert first.filled_quantity > 0 and first.average_price == Decimal("2900")
    # One step per account per MATCH_INTERVAL: a second call at the same time fills nothing more.
    assert look().filled_quantity == first.filled_quantity
    assert SimFill.objects.filter(order_id=int(placed.exchange_order_id)).count() == 1
    clock.advance(2)
    assert engine.match(EX).ran


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_the_simulator_process_commits_without_waiting_for_disk_flushes_and_the_platform_does_not():
    """runsimexchange (--synchronous-commit off, its default) opens its connections with
    synchronous_commit=off; the platform's own connections keep PostgreSQL's synchronous commits."""
    from django.db import connections

    from exchanges.simulator.server import commits_unflushed

    def show_in_a_new_connection() -> str:
        seen: list[str] = []

        def read() -> None:
            try:
                with connections["default"].cursor() as cursor:
                    cursor.execute("SHOW synchronous_commit")
                    seen.append(cursor.fetchone()[0])
            finally:
                connections.close_all()

        thread = threading.Thread(target=read)
        thread.start()
        thread.join(WAIT)
        return seen[0]

    assert show_in_a_new_connection() == "on"
    options = connection.settings_dict.setdefault("OPTIONS", {})
    saved = dict(options)
    try:
        assert commits_unflushed() is True
        assert show_in_a_new_connection() == "off"
    finally:
        options.clear()
        options.update(saved)
        connection.close()
    assert show_in_a_new_connection() == "on"
