"""update_open_orders: reconciliation against the PAPER exchange, faults, lost orders, triggers, breakers."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine

from exchanges import services as exchange_services
from exchanges.gateway import (
    Auth,
    ExchangeGateway,
    MarketType,
    OrderRequest,
    OrderState,
    OrderType,
    RateLimited,
    Side,
)
from exchanges.models import SimFault
from exchanges.paper import PaperGateway
from exchanges.simulator.engine import default_engine
from notifications.models import AlertThrottle
from orders.circuit import BREAKER_MAX_SECONDS, Breaker, breaker_next
from orders.jobs import update_open_orders
from orders.models import CircuitState, OpenOrder, OrderEvent, PendingOrder
from orders.transitions import cancel_complete
from positions.fills import position_matches_fills
from positions.models import Fill, Position, Trade
from scheduler.models import JobRun
from tests.orders.factories import OpenOrderFactory, StrategyAccountFactory

pytestmark = pytest.mark.django_db

D = Decimal
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
EX = "PAPER"


@pytest.fixture(autouse=True)
def _ledger_invariant():
    yield
    assert position_matches_fills() == []


@pytest.fixture
def clock():
    with time_machine.travel(T0, tick=False) as traveller:
        yield traveller


class CallCounter(Counter):
    """Calls by method name; `by_symbol`: by (name, symbol) for the calls that name one."""

    def __init__(self) -> None:
        super().__init__()
        self.by_symbol: Counter = Counter()


class SpyGateway:
    """A PaperGateway that counts its calls (one CallCounter per test)."""

    def __init__(self, inner: ExchangeGateway, calls: Counter):
        self._inner, self.calls = inner, calls
        self.exchange = inner.exchange

    def __getattr__(self, name: str):
        attr = getattr(self._inner, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.calls[name] += 1
            if "symbol" in kwargs and isinstance(self.calls, CallCounter):
                self.calls.by_symbol[(name, kwargs["symbol"])] += 1  # the symbol asked (None: every symbol)
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def calls(monkeypatch) -> CallCounter:
    counter = CallCounter()
    paper = exchange_services.GATEWAY_FACTORIES["PAPER"]
    monkeypatch.setitem(exchange_services.GATEWAY_FACTORIES, "PAPER", lambda acc: SpyGateway(paper(acc), counter))
    return counter


def paper(sa) -> PaperGateway:  # noqa: ANN001
    return PaperGateway(f"account-{sa.account_id}", exchange=EX)


def place(sa, side: str, order_type: str, qty: str, *, price=None, stop=None, **row) -> OpenOrder:  # noqa: ANN001, ANN003
    """Place an order on the PAPER exchange and create the OpenOrder row the queue would have made."""
    order = OpenOrderFactory.build(
        strategy_account=sa,
        side=side,
        order_type=order_type,
        quantity=D(qty),
        price=D(price) if price else None,
        stop_price=D(stop) if stop else None,
        **row,
    )
    state = paper(sa).create_order(
        OrderRequest(
            symbol=order.symbol,
            market_type=MarketType(order.market_type),
            side=Side(side),
            order_type=OrderType(order_type),
            quantity=order.quantity,
            price=order.price,
            stop_price=order.stop_price,
            client_order_id=order.client_order_id,
        )
    )
    order.exchange_order_id = state.exchange_order_id
    order.conditional = state.conditional
    order.save()
    return order


def kinds(order: OpenOrder) -> list[str]:
    return list(OrderEvent.objects.filter(order_key=order.order_key).order_by("id").values_list("kind", flat=True))


def run(clock, seconds: int = 29):  # noqa: ANN001
    clock.shift(seconds)
    update_open_orders()
    return JobRun.objects.filter(job_id="update_open_orders").latest("id")


def row_snapshot(order: OpenOrder) -> tuple:
    row = OpenOrder.objects.get(pk=order.pk)
    return (row.status, row.filled_quantity, row.missing_runs, row.exchange_order_id, row.order_type)


# --- breaker arithmetic (pure) --------------------------------------------------------------


def test_breaker_opens_on_the_third_failed_run_and_doubles_to_a_ten_minute_cap():
    now = T0
    b = Breaker()
    b = breaker_next(b, failed=True, now=now)
    b = breaker_next(b, failed=True, now=now)
    assert not b.is_open(now) and b.failures == 2
    b = breaker_next(b, failed=True, now=now)
    assert b.is_open(now) and b.cooldown_seconds == 60 and b.opened_until == now + timedelta(seconds=60)
    cooldowns = []
    for _ in range(6):
        now = b.opened_until  # the trial run after the cool-down fails again
        assert not b.is_open(now)
        b = breaker_next(b, failed=True, now=now)
        cooldowns.append(b.cooldown_seconds)
    assert cooldowns == [120, 240, 480, 600, 600, 600] and BREAKER_MAX_SECONDS == 600
    assert breaker_next(b, failed=False, now=now) == Breaker()


def test_breaker_counts_failures_in_a_row_only():
    b = breaker_next(breaker_next(Breaker(), failed=True, now=T0), failed=True, now=T0)
    b = breaker_next(b, failed=False, now=T0)
    b = breaker_next(b, failed=True, now=T0)
    assert b.failures == 1 and not b.is_open(T0)


# --- fills through the job ---------------------------------------------------------------------


def test_partial_then_complete_fill_recorded_once_and_the_row_ends_after_its_fill(clock, calls):
    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    order = place(sa, "BUY", "LIMIT", "8", price="2900")
    assert update_open_orders().summary.startswith("1/1 account markets, 1 orders: 0 fills")
    assert row_snapshot(order)[0] == "NEW"

    default_engine.price_script(EX, "ETH/USDT", ["2890"])
    jr = run(clock)  # one match step fills 5 of 8 (liquidity)
    assert "1 fills, 0 filled" in jr.summary
    assert row_snapshot(order)[:2] == ("PARTIALLY_FILLED", D("5"))
    assert Position.objects.get(strategy_account=sa).quantity == D("5")

    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    run(clock)  # nothing new on the exchange: nothing written
    assert Fill.objects.count() == 1 and kinds(order) == ["partially_filled"]

    default_engine.price_script(EX, "ETH/USDT", ["2890"])
    jr = run(clock)
    assert "1 filled" in jr.summary
    assert not OpenOrder.objects.filter(pk=order.pk).exists()
    assert kinds(order) == ["partially_filled", "filled"]
    assert Trade.objects.get().cumulative_filled == D("8")
    assert list(Fill.objects.order_by("id").values_list("delta_qty", flat=True)) == [D("5"), D("3")]
    # Regular rows only: one open-orders call per run, no conditional list; a lookup only once
    # the order had left the open set.
    assert calls["fetch_open_orders"] == 4 and calls["fetch_order"] == 1


def test_open_orders_are_listed_per_symbol_up_to_a_few_symbols_then_in_one_call(clock, calls):
    """Binance weighs a listing of every symbol 40 (futures) or 80 (spot), one symbol's 1 or 6."""
    few = StrategyAccountFactory()
    for symbol in ("ETH/USDT", "BTC/USDT"):
        place(few, "BUY", "LIMIT", "0.1", price="100", symbol=symbol)
    many = StrategyAccountFactory()
    for symbol in ("ETH/USDT", "BTC/USDT", "SOL/USDT", "XRP/USDT"):
        qty, price = ("1000", "0.01") if symbol == "XRP/USDT" else ("10", "1")
        place(many, "BUY", "LIMIT", qty, price=price, symbol=symbol)

    jr = run(clock)

    assert jr.outcome == "ok", jr.summary
    assert calls.by_symbol[("fetch_open_orders", "ETH/USDT")] == 1
    assert calls.by_symbol[("fetch_open_orders", "BTC/USDT")] == 1
    assert calls.by_symbol[("fetch_open_orders", None)] == 1, "the four-symbol account is listed in one call"
    assert calls["fetch_open_orders"] == 3
    assert calls["fetch_order"] == 0, "every live order was found in a listing"
    assert OpenOrder.objects.filter(last_seen_at__isnull=False).count() == 6


def test_only_rows_missing_from_the_open_sets_are_looked_up(clock, calls):
    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    place(sa, "BUY", "LIMIT", "1", price="2900")
    place(sa, "SELL", "LIMIT", "1", price="3100")
    place(sa, "BUY", "STOP_LIMIT", "1", price="3110", stop="3100")
    update_open_orders()
    assert calls == Counter({"fetch_open_orders": 2})  # one regular list, one conditional list


# --- errors never end or change a row -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["timeout", "http_429", "maintenance", "http_5xx"])
@pytest.mark.parametrize("endpoint", ["fetch_open_orders", "fetch_order"])
def test_exchange_errors_never_end_or_change_an_order(clock, kind, endpoint):
    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    live = place(sa, "BUY", "LIMIT", "1", price="2900")
    gone = OpenOrderFactory(strategy_account=sa, exchange_order_id="999999")  # would need a lookup
    before = [row_snapshot(live), row_snapshot(gone)]
    default_engine.fault_add(kind, exchange=EX, endpoint=endpoint, remaining=None)

    jr = run(clock)
    jr2 = run(clock)
    assert [row_snapshot(live), row_snapshot(gone)] == before
    assert kinds(live) == [] and kinds(gone) == []
    assert f"failed {sa.account_id}/SPOT" in jr.summary
    assert jr2.outcome == JobRun.Outcome.OK
    assert CircuitState.objects.get(scope="exchange:PAPER:SPOT").failures == 2


def test_not_found_twice_in_open_and_history_ends_the_row_as_lost_with_an_alert(clock):
    sa = StrategyAccountFactory()
    order = OpenOrderFactory(strategy_account=sa, exchange_order_id="999999")
    run(clock)
    assert row_snapshot(order)[2] == 1 and kinds(order) == []  # once is not enough
    assert not AlertThrottle.objects.filter(key__startswith="order_lost").exists()
    jr = run(clock)
    assert "1 lost" in jr.summary
    assert not OpenOrder.objects.filter(pk=order.pk).exists()
    assert kinds(order) == ["lost"]
    assert AlertThrottle.objects.filter(key=f"order_lost:{sa.account_id}").exists()


def test_a_miss_followed_by_a_sighting_resets_the_count(clock):
    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    order = place(sa, "BUY", "LIMIT", "1", price="2900")
    OpenOrder.objects.filter(pk=order.pk).update(missing_runs=1)
    run(clock)
    assert row_snapshot(order)[2] == 0 and kinds(order) == []


# --- circuit breakers through the job ------------------------------------------------------------


def test_three_failed_runs_open_the_exchange_breaker_and_an_open_breaker_skips_its_scope(clock, calls):
    sa = StrategyAccountFactory()
    order = OpenOrderFactory(strategy_account=sa, exchange_order_id="999999")
    default_engine.fault_add("maintenance", exchange=EX, endpoint="fetch_open_orders", remaining=None)
    for _ in range(3):
        run(clock)
    circuit = CircuitState.objects.get(scope="exchange:PAPER:SPOT")
    assert circuit.failures == 3 and circuit.cooldown_seconds == 60
    assert circuit.opened_until == T0 + timedelta(seconds=87 + 60)
    assert AlertThrottle.objects.filter(key="circuit:exchange:PAPER:SPOT").exists()
    assert calls["fetch_open_orders"] == 3

    jr = run(clock)  # within the cool-down: no exchange call, summary says so
    assert "circuit open: exchange:PAPER:SPOT" in jr.summary and calls["fetch_open_orders"] == 3
    jr = run(clock, 60)  # cool-down over: the trial run fails and the cool-down doubles
    assert calls["fetch_open_orders"] == 4
    assert CircuitState.objects.get(scope="exchange:PAPER:SPOT").cooldown_seconds == 120

    SimFault.objects.all().delete()
    run(clock, 121)  # success closes it
    circuit = CircuitState.objects.get(scope="exchange:PAPER:SPOT")
    assert (circuit.failures, circuit.opened_until, circuit.cooldown_seconds) == (0, None, 0)
    assert OpenOrder.objects.get(pk=order.pk).missing_runs == 1  # reconciled again (first miss)


def test_calls_our_own_rate_budget_holds_back_never_count_against_the_exchange(clock, monkeypatch):  # noqa: ANN001
    sa = StrategyAccountFactory()
    order = OpenOrderFactory(strategy_account=sa, exchange_order_id="999999")
    held: Counter = Counter()

    class HeldBack(SpyGateway):
        def fetch_open_orders(self, *args, **kwargs):  # noqa: ANN002, ANN003
            held["fetch_open_orders"] += 1
            raise RateLimited("PAPER SPOT fetch_open_orders: request budget spent here", code="budget")

    factory = exchange_services.GATEWAY_FACTORIES["PAPER"]
    monkeypatch.setitem(exchange_services.GATEWAY_FACTORIES, "PAPER", lambda acc: HeldBack(factory(acc), Counter()))
    for _ in range(4):
        jr = run(clock)
        assert "held back by the local rate budget" in jr.summary, jr.summary
    assert held["fetch_open_orders"] == 4  # tried every run: no breaker opened, nothing skipped for it
    assert not CircuitState.objects.filter(failures__gt=0).exists()
    assert OpenOrder.objects.get(pk=order.pk).missing_runs == 0  # and the order was left as it was


def test_an_auth_failure_opens_only_that_accounts_breaker(clock, monkeypatch):
    bad = StrategyAccountFactory()
    good = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    good_order = place(good, "BUY", "LIMIT", "1", price="2900")
    bad_order = place(bad, "BUY", "LIMIT", "1", price="2900")
    paper_factory = exchange_services.GATEWAY_FACTORIES["PAPER"]

    class Refusing:
        exchange = EX

        def fetch_open_orders(self, *args, **kwargs):
            raise Auth("API-key invalid", code="-2015", exchange=EX)

        fetch_order = fetch_open_orders

    monkeypatch.setitem(
        exchange_services.GATEWAY_FACTORIES,
        "PAPER",
        lambda acc: Refusing() if acc.pk == bad.account_id else paper_factory(acc),
    )
    default_engine.price_script(EX, "ETH/USDT", ["2800"])
    for _ in range(3):
        run(clock)
    assert CircuitState.objects.get(scope=f"account:{bad.account_id}").opened_until is not None
    assert not CircuitState.objects.filter(scope="exchange:PAPER:SPOT").exists()
    assert not OpenOrder.objects.filter(pk=good_order.pk).exists()  # the other account was reconciled
    assert kinds(good_order) == ["filled"]
    assert OpenOrder.objects.get(pk=bad_order.pk).status == "NEW" and kinds(bad_order) == []
    jr = run(clock)
    assert f"circuit open: account:{bad.account_id}" in jr.summary


# --- conditional orders -------------------------------------------------------------------------


def test_a_triggered_stop_is_linked_to_its_spawned_order_never_taken_for_a_fill(clock):
    sa = StrategyAccountFactory(strategy__market_type="FUTURES")
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    stop = place(sa, "BUY", "STOP_LIMIT", "1", price="3050", stop="3100", market_type="FUTURES")
    assert stop.conditional
    update_open_orders()
    assert row_snapshot(stop)[0] == "NEW"

    default_engine.price_script(EX, "ETH/USDT", ["3150"])  # stop fires; the child LIMIT 3050 rests
    jr = run(clock)
    assert "1 triggered" in jr.summary and "0 filled" in jr.summary
    row = OpenOrder.objects.get(pk=stop.pk)
    assert row.status == "TRIGGERED" and row.order_type == "LIMIT" and not row.conditional
    assert row.spawned_order_id and row.exchange_order_id == row.spawned_order_id
    assert row.spawned_client_order_id == f"{stop.client_order_id}-T"
    assert kinds(stop) == ["triggered"]
    assert not Fill.objects.exists() and not Trade.objects.exists()

    run(clock)  # tracked as the spawned order: found in the regular open list, nothing changes
    assert kinds(stop) == ["triggered"] and row_snapshot(stop)[2] == 0

    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    run(clock)
    assert not OpenOrder.objects.filter(pk=stop.pk).exists()
    assert kinds(stop) == ["triggered", "filled"]
    trade = Trade.objects.get()
    assert trade.order_key == stop.order_key and trade.exchange_order_id == row.spawned_order_id
    assert Position.objects.get(strategy_account=sa).quantity == D("1")


def test_a_triggered_stop_market_records_trigger_and_fill_in_one_run(clock):
    sa = StrategyAccountFactory(strategy__market_type="FUTURES")
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    stop = place(sa, "SELL", "STOP_MARKET", "2", stop="2900", market_type="FUTURES")
    default_engine.price_script(EX, "ETH/USDT", ["2890"])
    run(clock)
    assert kinds(stop) == ["triggered", "filled"]
    fill = Fill.objects.get()
    assert fill.delta_qty == D("-2") and fill.price == D("2890")
    assert Position.objects.get(strategy_account=sa).quantity == D("-2")


# --- cancels --------------------------------------------------------------------------------------


def test_a_confirmed_demotion_cancel_requeues_the_remaining_quantity(clock):
    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    order = place(sa, "BUY", "LIMIT", "8", price="2900", priority=3)
    default_engine.price_script(EX, "ETH/USDT", ["2890"])
    clock.shift(2)
    state = paper(sa).cancel_order(
        symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=order.exchange_order_id
    )  # after one partial fill of 5
    OpenOrder.objects.filter(pk=order.pk).update(status="CANCELLING", cancel_requested_by="DEMOTION")
    assert state.filled_quantity == D("5")

    run(clock)
    assert not OpenOrder.objects.filter(pk=order.pk).exists()
    pending = PendingOrder.objects.get(order_key=order.order_key)
    assert (pending.status, pending.quantity, pending.signal_at, pending.queue_seq, pending.priority) == (
        "QUEUED",
        D("3"),
        order.signal_at,
        order.queue_seq,
        3,
    )
    assert kinds(order) == ["partially_filled", "requeued"]  # the fill is recorded before the re-queue
    assert Position.objects.get(strategy_account=sa).quantity == D("5")


def test_a_confirmed_user_cancel_ends_the_order_and_cancel_complete_is_idempotent(clock):
    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    order = place(sa, "BUY", "LIMIT", "1", price="2900")
    state: OrderState = paper(sa).cancel_order(
        symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=order.exchange_order_id
    )
    OpenOrder.objects.filter(pk=order.pk).update(status="CANCELLING", cancel_requested_by="USER")
    order.refresh_from_db()
    outcome = cancel_complete(order=order, state=state, now=T0)
    assert outcome.ended == "cancelled"
    assert cancel_complete(order=order, state=state, now=T0).ended == ""  # the queue's copy of the reply: no-op
    assert not PendingOrder.objects.exists() and not OpenOrder.objects.exists()
    assert kinds(order) == ["cancelled"]
    assert OrderEvent.objects.get(order_key=order.order_key).details["by"] == "user"


def test_an_order_cancelled_on_the_exchange_side_ends_as_cancelled(clock):
    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    order = place(sa, "BUY", "LIMIT", "1", price="2900")
    paper(sa).cancel_order(symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=order.exchange_order_id)
    jr = run(clock)
    assert "1 cancelled" in jr.summary
    assert kinds(order) == ["cancelled"]
    assert OrderEvent.objects.get(order_key=order.order_key).details["by"] == "exchange"


def test_no_live_orders_is_a_noop(clock):
    update_open_orders()
    assert JobRun.objects.get(job_id="update_open_orders").outcome == JobRun.Outcome.NOOP


# --- SUBMITTING rows ------------------------------------------------------------------------------


def test_submitting_rows_resolve_by_client_order_id_through_the_queue_resolver(clock):
    from orders.services import client_order_id_for
    from tests.orders.factories import PendingOrderFactory

    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    placed = PendingOrderFactory(strategy_account=sa, status="SUBMITTING", placement_no=1, submitting_at=T0)
    placed.client_order_id = client_order_id_for(order_key=placed.order_key, placement_no=1)
    placed.save()
    # The create reached the exchange but its reply was lost.
    paper(sa).create_order(
        OrderRequest(
            "ETH/USDT",
            MarketType.SPOT,
            Side.BUY,
            OrderType.LIMIT,
            D("1"),
            price=D("2900"),
            client_order_id=placed.client_order_id,
        )
    )
    never = PendingOrderFactory(strategy_account=sa, status="SUBMITTING", placement_no=1, submitting_at=T0)
    never.client_order_id = client_order_id_for(order_key=never.order_key, placement_no=1)
    never.save()

    jr = run(clock)
    assert "submitting not_found 1, placed 1" in jr.summary
    live = OpenOrder.objects.get(order_key=placed.order_key)
    assert live.client_order_id == placed.client_order_id and live.status == "NEW"
    assert PendingOrder.objects.get(order_key=never.order_key).status == "SUBMITTING"  # one miss is not enough


def test_the_steady_state_costs_the_same_queries_for_one_or_many_live_orders(clock):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    sa = StrategyAccountFactory()
    place(sa, "BUY", "LIMIT", "1", price="2900")
    run(clock)
    clock.shift(29)
    with CaptureQueriesContext(connection) as one:
        update_open_orders()
    for i in range(5):
        place(sa, "BUY", "LIMIT", "1", price=str(2800 + i))
    run(clock)
    clock.shift(29)
    with CaptureQueriesContext(connection) as six:
        update_open_orders()
    assert len(six.captured_queries) == len(one.captured_queries)


def test_a_run_reads_submitting_rows_once_not_per_account_market_and_reads_no_account_again(clock):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    for _ in range(3):
        place(StrategyAccountFactory(), "BUY", "LIMIT", "1", price="2900")
    clock.shift(29)
    with CaptureQueriesContext(connection) as queries:
        update_open_orders()

    tables = [q["sql"] for q in queries.captured_queries]
    assert sum(PendingOrder._meta.db_table in sql for sql in tables) == 1  # the job's, for every account market
    accounts = "accounts_account"
    assert sum(f'FROM "{accounts}"' in sql for sql in tables) == 1  # the job's in_bulk; the rows reuse it
    assert OpenOrder.objects.filter(last_seen_at__isnull=False).count() == 3


def test_a_crash_after_the_trade_upsert_writes_nothing_and_the_next_run_records_the_fill_once(clock):
    from orders.faults import CrashPointError, crash_disable_all, crash_enable
    from scheduler.runs import JobFailedError

    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    order = place(sa, "BUY", "LIMIT", "1", price="2900")
    default_engine.price_script(EX, "ETH/USDT", ["2890"])
    crash_enable("fill.after_trade_upsert")
    try:
        with pytest.raises(JobFailedError, match=CrashPointError.__name__):
            run(clock)
    finally:
        crash_disable_all()
    assert not Trade.objects.exists() and not Fill.objects.exists() and not Position.objects.exists()
    assert row_snapshot(order)[:2] == ("NEW", D("0")) and kinds(order) == []

    run(clock)
    run(clock)
    assert Fill.objects.count() == 1 and Position.objects.get(strategy_account=sa).quantity == D("1")
    assert kinds(order) == ["filled"]


def test_close_log_lines_say_side_quantity_price_and_call_a_demotion_routine(clock, caplog):  # noqa: ANN001
    sa = StrategyAccountFactory()
    default_engine.price_script(EX, "ETH/USDT", ["3000"])
    lines = {}
    for by in ("DEMOTION", "USER"):
        order = place(sa, "BUY", "LIMIT", "1.5", price="2900")
        state = paper(sa).cancel_order(
            symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=order.exchange_order_id
        )
        OpenOrder.objects.filter(pk=order.pk).update(status="CANCELLING", cancel_requested_by=by)
        order.refresh_from_db()
        caplog.clear()
        with caplog.at_level("INFO", logger="orders.transitions"):
            cancel_complete(order=order, state=state, now=T0)
        [record] = [r for r in caplog.records if r.name == "orders.transitions"]
        lines[by] = (record.levelname, record.getMessage())
    level, message = lines["DEMOTION"]
    assert level == "INFO"
    assert "BUY 1.5 ETH/USDT SPOT LIMIT @ 2900 demoted: cancelled on the exchange, re-queued (0 filled)" in message
    assert "CANCELED" not in message and "000000" not in message
    level, message = lines["USER"]
    assert level == "INFO" and "BUY 1.5 ETH/USDT SPOT LIMIT @ 2900 cancelled at the user's request" in message
