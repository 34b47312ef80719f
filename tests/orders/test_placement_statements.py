"""Statements per placement on our tables (issue 12: ≤ 12): an express MARKET order placed and filled at
once, a batch of LIMIT promotions in one pair, and a 100-follower webhook fan-out intake.

Counted with tests/orders/statements.py. A queue pass is measured in its two halves: the plan
(`queue_work_load`, a fixed cost per pass: dirty marks, express orders, the pairs' rows, accounts,
market ticks, breakers) and the execution (`queue_pass`: claims, exchange calls, recording, fills, the
pairs' dirty marks), whose statements on our tables, without the per-pass per-minute counters, are
the placement's. The figures are printed (run with -s to see them) and bounded from above.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
import time_machine
from django.utils import timezone

from accounts.models import StrategyCapital
from orders.faults import crash_disable_all
from orders.jobs import rebalance_order_queue
from orders.models import OpenOrder, OrderEvent, PendingOrder, QueueDirty, SignalOrder, WebhookDelivery
from orders.queue import queue_pass, queue_sweep_reset, queue_work_load
from orders.webhook import WebhookRejectedError, WebhookSignal, webhook_payload_hash, webhook_receive
from positions.models import Fill
from tests.orders.factories import (
    AccountFactory,
    StrategyAccountFactory,
    UserFactory,
    btc_futures_market,
    paper_market_info,
    strategy_link,
    webhook_strategy,
)
from tests.orders.queue_support import T0, enqueue, invariant_problems
from tests.orders.statements import StatementLog, statements_counted

pytestmark = pytest.mark.django_db

D = Decimal


@pytest.fixture(autouse=True)
def _clean(settings, monkeypatch):  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": 8}
    # The inline pass's time limits would leave orders for the next tick on a busy machine: the count
    # is of a pass that does all its work.
    monkeypatch.setattr("orders.queue.PASS_BUDGET_SECONDS", 60.0)
    monkeypatch.setattr("orders.queue.PASS_LIMIT_SECONDS", 60.0)
    queue_sweep_reset()
    crash_disable_all()
    yield
    queue_sweep_reset()


def _measured_pass(clock) -> tuple[StatementLog, StatementLog]:  # noqa: ANN001
    """One queue pass after a steady one (its first-run sweep spent): (plan, execution) statements."""
    with statements_counted() as plan:
        work = queue_work_load(now=timezone.now())
    assert work is not None
    with statements_counted() as execution:
        queue_pass(work)
    return plan, execution


def _show(label: str, plan: StatementLog, execution: StatementLog, per: int) -> None:
    print(f"\n{label}")
    print("  plan (per pass): " + plan.summary("", 1).removeprefix(": "))
    print("  execution: " + execution.summary("", per).removeprefix(": "))
    for name, n in sorted(execution.tables().items()):
        print(f"    {n:3d}  {name}")


def _followers(n: int) -> list:
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    return [StrategyAccountFactory(strategy__market_type="SPOT") for _ in range(n)]


@pytest.mark.parametrize("n", [1, 10])
def test_express_market_orders_placed_and_filled_at_once(n):  # noqa: ANN001
    followers = _followers(n)
    with time_machine.travel(T0, tick=False) as clock:
        rebalance_order_queue.__wrapped__()  # the first-run sweep, on an empty queue
        clock.shift(1)
        markets = [enqueue(sa, "BUY", None, order_type="MARKET", quantity="0.01") for sa in followers]
        clock.shift(1)
        plan, execution = _measured_pass(clock)
        clock.shift(1)
        # Nothing left for the next pass: the batch cleared the pair's mark (before: a pass more per pair).
        assert queue_work_load(now=timezone.now()) is None
    for market in markets:
        kinds = list(
            OrderEvent.objects.filter(order_key=market.order_key).order_by("id").values_list("kind", flat=True)
        )
        assert kinds == ["queued", "submitting", "placed", "filled"], kinds
        assert Fill.objects.filter(trade__order_key=market.order_key).count() == 1
    assert not OpenOrder.objects.exists() and not PendingOrder.objects.exists()
    assert invariant_problems([sa.account_id for sa in followers]) == []
    _show(f"(a) {n} express MARKET order(s), each placed and filled at once", plan, execution, n)
    # Before batching: 25 on SQLite, 28 on PostgreSQL per order, and the pair left dirty for another pass.
    assert execution.ours <= 12 * n, execution.tables()


@pytest.mark.parametrize("k", [1, 6])
def test_a_batch_of_limit_promotions_in_one_pair(k):  # noqa: ANN001
    (sa,) = _followers(1)
    with time_machine.travel(T0, tick=False) as clock:
        rebalance_order_queue.__wrapped__()
        clock.shift(1)
        for i in range(k):
            enqueue(sa, "BUY", f"{2000 + 10 * i}")
        clock.shift(1)
        plan, execution = _measured_pass(clock)
        clock.shift(1)
        # Nothing left for the next pass: the batch cleared the pair's mark (before: a pass more per pair).
        assert queue_work_load(now=timezone.now()) is None
    assert OpenOrder.objects.filter(account_id=sa.account_id).count() == k
    assert not PendingOrder.objects.exists()
    assert not QueueDirty.objects.exists()
    assert invariant_problems([sa.account_id]) == []
    _show(f"(b) {k} LIMIT promotion(s) in one pair", plan, execution, k)
    # Before batching: 11 + 8 per further order on SQLite (51 for six), 13 + 10 on PostgreSQL (63).
    assert execution.ours <= 12, execution.tables()


def _fan_out_strategy(n: int):  # noqa: ANN202
    user = UserFactory()
    strategy = webhook_strategy(group_name="fan", market_type="FUTURES", token="tv-secret-fan-123")
    for _ in range(n):
        strategy_link(strategy, AccountFactory(user=user, exchange="PAPER"), capital="10000")
    btc_futures_market(max_qty=D("100"))
    return strategy


@pytest.mark.parametrize("order_type", ["MARKET", "LIMIT"])
def test_a_100_follower_webhook_fan_out_intake(order_type):  # noqa: ANN001
    n = 100
    strategy = _fan_out_strategy(n)
    payload = {"symbol": "BTC/USDT", "side": "BUY", "order_type": order_type, "qty_per": 10, "id": "alert-1"}
    signal = WebhookSignal(
        delivery_id="alert-1",
        symbol="BTC/USDT",
        side="BUY",
        order_type=order_type,
        price=D("39000") if order_type == "LIMIT" else None,
        qty_per=D("10"),
    )
    with statements_counted() as log:
        reply = webhook_receive(
            strategy=strategy, signal=signal, payload_hash=webhook_payload_hash(payload), now=timezone.now()
        )
    assert not reply.duplicate
    assert PendingOrder.objects.count() == n
    assert OrderEvent.objects.filter(kind="queued").count() == n
    assert SignalOrder.objects.count() == n
    assert QueueDirty.objects.count() == n
    print("\n" + log.summary(f"(c) webhook {order_type} fan-out intake to {n} followers"))
    for name, c in sorted(log.tables().items()):
        print(f"    {c:3d}  {name}")
    # Before: one market-rule read per follower, and one price read per follower for MARKET (211 and 111).
    assert log.ours <= 20, log.tables()

    # The same alert again replays the first reply and writes nothing.
    before = (PendingOrder.objects.count(), OrderEvent.objects.count(), SignalOrder.objects.count())
    again = webhook_receive(
        strategy=strategy, signal=signal, payload_hash=webhook_payload_hash(payload), now=timezone.now()
    )
    assert again.duplicate and again.body == reply.body
    assert (PendingOrder.objects.count(), OrderEvent.objects.count(), SignalOrder.objects.count()) == before


def test_one_bad_follower_of_100_rejects_the_fan_out_with_nothing_written():
    strategy = _fan_out_strategy(100)
    StrategyCapital.objects.filter(pk=StrategyCapital.objects.order_by("pk").last().pk).update(allocated_capital=D("0"))
    signal = WebhookSignal(delivery_id="alert-2", symbol="BTC/USDT", side="BUY", order_type="MARKET", qty_per=D("10"))
    with pytest.raises(WebhookRejectedError) as rejected:
        webhook_receive(strategy=strategy, signal=signal, payload_hash="h", now=timezone.now())
    assert len(rejected.value.account_errors) == 1
    assert not PendingOrder.objects.exists() and not OrderEvent.objects.exists()
    assert not SignalOrder.objects.exists() and not QueueDirty.objects.exists()
    assert not WebhookDelivery.objects.exists()
