"""The 1 s queue against real ccxt and the dialect server: a silent exchange costs one short timeout."""

from __future__ import annotations

import time
from decimal import Decimal

import pytest

from exchanges.models import SimFault, SimOrder
from exchanges.simulator.catalog import catalog_market
from exchanges.simulator.engine import default_engine
from orders.jobs import rebalance_order_queue
from orders.models import OpenOrder, OrderEvent, PendingOrder
from orders.queue import queue_sweep_reset
from scheduler.models import JobRun
from tests.exchanges import ccxt_sim_support
from tests.exchanges.ccxt_sim_support import API_KEY, API_SECRET
from tests.orders.factories import AccountFactory, MarketInfoFactory, StrategyAccountFactory
from tests.orders.queue_support import enqueue

sim_server = ccxt_sim_support.sim_server
sim_urls = ccxt_sim_support.sim_urls

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def binance_spot(sim_urls):  # noqa: ANN001, ANN201
    queue_sweep_reset()
    market = catalog_market("SPOT", "BTC/USDT")
    MarketInfoFactory(
        exchange="BINANCE",
        market_type="SPOT",
        symbol="BTC/USDT",
        tick_size=market.tick_size,
        step_size=market.step_size,
        min_qty=market.min_qty,
        min_notional=market.min_notional,
    )
    account = AccountFactory(exchange="BINANCE", api_key=API_KEY, api_secret=API_SECRET)
    yield StrategyAccountFactory(account=account, strategy__market_type="SPOT")
    queue_sweep_reset()


def _run() -> tuple[JobRun | None, float]:
    started = time.monotonic()
    rebalance_order_queue()
    took = time.monotonic() - started
    return JobRun.objects.filter(job_id="rebalance_order_queue").order_by("-id").first(), took


def test_a_silent_exchange_costs_the_queue_one_short_timeout_and_the_order_once(binance_spot, settings):  # noqa: ANN001
    # Found by the drill: the queue waited out ccxt's own timeout (3 s there, 10 s by default) inside
    # the 1 s job, and the ticks after it were skipped. Now its calls give up at EXCHANGE_QUEUE_TIMEOUT_MS.
    settings.EXCHANGE_HTTP_TIMEOUT_MS = 10_000  # every other caller's timeout: longer than the held reply
    settings.EXCHANGE_QUEUE_TIMEOUT_MS = 500
    order = enqueue(binance_spot, "BUY", "60000", symbol="BTC/USDT", quantity="0.001")
    rebalance_order_queue()  # warm-up pass: markets load once per process (outside the policy)
    assert OpenOrder.objects.filter(order_key=order.order_key).exists()

    second = enqueue(binance_spot, "BUY", "60001", symbol="BTC/USDT", quantity="0.001")
    # The exchange accepts the order and holds its reply 3 s (the dialect server's timeout fault).
    default_engine.fault_add(SimFault.Kind.TIMEOUT, exchange="BINANCE", endpoint="create_order", phase="after")
    run, took = _run()
    print(f"queue pass against a reply held 3 s: {took:.2f} s (job run {run.duration_ms} ms)")
    assert took < 2.5  # gave up at its own 0.5 s timeout, not at the server's 3 s or ccxt's 10 s
    assert PendingOrder.objects.get(order_key=second.order_key).status == PendingOrder.Status.SUBMITTING
    assert SimOrder.objects.filter(client_order_id__isnull=False).count() == 2

    time.sleep(2.2)  # TROUBLE_RETRY and LOOKUP_DELAY: the next pass looks the order up
    _run()
    assert OpenOrder.objects.filter(order_key=second.order_key).exists()
    assert SimOrder.objects.count() == 2  # found by its client id, never sent again
    kinds = list(OrderEvent.objects.filter(order_key=second.order_key).values_list("kind", flat=True).order_by("id"))
    assert kinds == ["queued", "submitting", "placed"]
    assert SimFault.objects.get().fired == 1
    assert Decimal(str(OpenOrder.objects.get(order_key=second.order_key).price)) == Decimal("60001")
