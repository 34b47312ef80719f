"""Batched placements (issue 12): the orders of a batch are claimed together and recorded together, and a
crash anywhere inside a batch (after the claim, after the k-th acknowledgement, before the batch is
recorded, inside the fill) leaves every order placed exactly once after recovery. Orders a batch did
not send are released at once; a stale claim of a row already claimed sends nothing."""

from __future__ import annotations

from collections import Counter

import pytest
import time_machine
from django.utils import timezone

from exchanges.gateway import Network, RateLimited
from exchanges.models import SimOrder
from exchanges.paper import PaperGateway
from orders.faults import crash_disable_all, crash_enable
from orders.models import OpenOrder, OrderEvent, PendingOrder
from orders.transitions import orders_promote
from positions.fills import position_matches_fills
from positions.models import Fill
from tests.orders.factories import StrategyAccountFactory, paper_market_info
from tests.orders.queue_support import T0, SpyFactory, enqueue, invariant_problems, queue_state_reset, tick

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _clean(settings):  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": 4}
    with queue_state_reset():
        yield


def kinds(order) -> list[str]:  # noqa: ANN001
    return list(OrderEvent.objects.filter(order_key=order.order_key).order_by("id").values_list("kind", flat=True))


def sent_per_order() -> Counter:
    """Simulated exchange orders per logical order (a client order id is `ts` + 24 hex of its order key + `p`n)."""
    return Counter(cid[2:26] for cid in SimOrder.objects.values_list("client_order_id", flat=True))


# The express batch (two MARKET orders) is met first, then the batch of four LIMIT promotions:
# the 3rd acknowledgement is the first of the promotions, with three of them claimed and not yet sent.
CASES = [
    ("promote.after_submitting_commit", 1),
    ("promote.after_submitting_commit", 2),
    ("promote.after_exchange_ack", 1),
    ("promote.after_exchange_ack", 3),
    ("promote.after_exchange_ack", 5),
    ("promote.before_batch_record", 1),
    ("promote.before_batch_record", 2),
    ("fill.after_trade_upsert", 2),
]


@pytest.mark.parametrize(("point", "hit"), CASES)
def test_a_crash_inside_a_batch_leaves_every_order_placed_exactly_once_after_recovery(point, hit):  # noqa: ANN001
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    with time_machine.travel(T0, tick=False) as clock:
        limits = [enqueue(sa, "BUY", f"{2000 + 10 * i}") for i in range(4)]
        markets = [enqueue(sa, "BUY", None, order_type="MARKET", quantity="0.01") for _ in range(2)]
        crash_enable(point, "raise", hit=hit)
        crashed = tick(clock)
        assert crashed.outcome == "error" and point in crashed.summary, crashed.summary
        crash_disable_all()
        # Later ticks and the reconciliation job finish what the crash left: SUBMITTING rows are
        # looked up (2 s), a not-found one re-queued after two lookups 30 s apart, then placed again.
        for _ in range(14):
            tick(clock, seconds=5, reconcile=True)
    assert invariant_problems([sa.account_id]) == []
    assert not PendingOrder.objects.exists()
    sent = sent_per_order()
    for order in limits + markets:
        assert sent[order.order_key.hex[:24]] == 1, (order.order_key, sent)
        assert kinds(order).count("placed") == 1, kinds(order)
    assert OpenOrder.objects.filter(account_id=sa.account_id).count() == 4
    for market in markets:
        assert kinds(market)[-1] == "filled" and kinds(market).count("filled") == 1, kinds(market)
        assert Fill.objects.filter(trade__order_key=market.order_key).count() == 1
    assert position_matches_fills() == []


def test_orders_a_batch_did_not_send_are_released_at_once_and_placed_next(monkeypatch):  # noqa: ANN001
    spy = SpyFactory()
    monkeypatch.setattr("orders.queue.gateway_for", spy)
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    with time_machine.travel(T0, tick=False) as clock:
        limits = [enqueue(sa, "BUY", f"{2000 + 10 * i}") for i in range(4)]
        spy.inject("create_order", lambda: Network("connect timeout"))  # the first create never left
        tick(clock)
        # One create was tried; the exchange then counts as in trouble: the other three were never sent.
        assert spy.count("create_order") == 1
        statuses = Counter(PendingOrder.objects.values_list("status", flat=True))
        assert statuses == {"SUBMITTING": 1, "QUEUED": 3}, statuses
        released = [o for o in limits if PendingOrder.objects.get(order_key=o.order_key).status == "QUEUED"]
        for order in released:
            assert kinds(order) == ["queued", "submitting", "requeued"], kinds(order)
            requeued = OrderEvent.objects.filter(order_key=order.order_key, kind="requeued").get()
            assert requeued.details["reason"].startswith("not sent")
        tick(clock, seconds=3)  # after the trouble retry: the released three are placed at once
        for order in released:
            assert kinds(order)[-1] == "placed", kinds(order)
        for _ in range(10):
            tick(clock, seconds=10)  # the unknown one: two lookups 30 s apart, re-queued, placed
    assert invariant_problems([sa.account_id]) == []
    assert not PendingOrder.objects.exists()
    creates = [kw["request"].client_order_id for name, kw in spy.spies[sa.account_id].calls if name == "create_order"]
    assert len(creates) == len(set(creates)) == 5, creates  # the timed-out one again under a new id
    assert OpenOrder.objects.filter(account_id=sa.account_id).count() == 4


def test_a_stale_claim_of_rows_already_claimed_sends_nothing():
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    orders = [enqueue(sa, "BUY", f"{2000 + 10 * i}") for i in range(3)]
    stale = list(PendingOrder.objects.filter(pk__in=[o.pk for o in orders]).order_by("pk"))
    spy = SpyFactory()
    spy.inject("create_order", lambda: Network("reply lost"), after=True, times=3)  # on the exchange, reply lost
    gateway = spy(sa.account)
    first = orders_promote(rows=list(PendingOrder.objects.order_by("pk")), gateway=gateway, now=timezone.now())
    assert set(first.values()) == {"submitting"}
    assert set(PendingOrder.objects.values_list("status", flat=True)) == {"SUBMITTING"}
    # A claim made from rows read before the first one (as a late pass would hold): nothing is sent.
    again = orders_promote(rows=stale, gateway=gateway, now=timezone.now())
    assert set(again.values()) == {"skipped"}
    assert spy.count("create_order") == 3
    assert sent_per_order() == Counter({o.order_key.hex[:24]: 1 for o in orders})
    assert all(kinds(o) == ["queued", "submitting"] for o in orders)
    assert isinstance(gateway.inner, PaperGateway)


def test_a_create_our_rate_budget_held_back_is_queued_again_at_once_never_looked_up(monkeypatch):  # noqa: ANN001
    spy = SpyFactory()
    monkeypatch.setattr("orders.queue.gateway_for", spy)
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    with time_machine.travel(T0, tick=False) as clock:
        limits = [enqueue(sa, "BUY", f"{2000 + 10 * i}") for i in range(3)]
        held = RateLimited("BINANCE SPOT create_order: request budget spent here; next call in 3.00 s", code="budget")
        spy.inject("create_order", lambda: held)  # refused by our own client: it never left the process
        tick(clock)
        assert spy.count("create_order") == 1
        # Nothing can be on the exchange: all three are QUEUED again now (no SUBMITTING row to look up).
        assert set(PendingOrder.objects.values_list("status", flat=True)) == {"QUEUED"}
        for order in limits:
            assert kinds(order) == ["queued", "submitting", "requeued"], kinds(order)
        reasons = OrderEvent.objects.filter(kind="requeued").values_list("details__reason", flat=True)
        assert any("request budget spent here" in r for r in reasons)
        tick(clock, seconds=3)  # the trouble retry is over: placed, each under its next client id
        for order in limits:
            assert kinds(order)[-1] == "placed", kinds(order)
    assert spy.count("fetch_order") == 0
    assert invariant_problems([sa.account_id]) == []
    assert OpenOrder.objects.filter(account_id=sa.account_id).count() == 3
    assert sent_per_order() == Counter({o.order_key.hex[:24]: 1 for o in limits})
