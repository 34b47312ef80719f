"""The 1 s queue pass stays cheap: one query when nothing is dirty, a constant number for a sweep of any size."""

from __future__ import annotations

import itertools
from decimal import Decimal

import pytest
import time_machine
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from orders.jobs import rebalance_order_queue
from orders.models import OpenOrder
from orders.queue import queue_sweep_reset, queue_work_load
from tests.orders.factories import StrategyAccountFactory
from tests.orders.queue_support import T0

pytestmark = pytest.mark.django_db

_seq = itertools.count()


@pytest.fixture(autouse=True)
def _fresh_sweep(settings):  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    queue_sweep_reset()
    yield
    queue_sweep_reset()


def add_converged_pairs(sa, n: int) -> None:  # noqa: ANN001
    """n pairs, each with one live order in a bucket of two slots and nothing queued: nothing to do."""
    base = next(_seq) * 100_000
    OpenOrder.objects.bulk_create(
        [
            OpenOrder(
                strategy_account=sa,
                account_id=sa.account_id,
                symbol=f"S{base + i}/USDT",
                market_type="SPOT",
                side="BUY",
                order_type="LIMIT",
                price=Decimal("1"),
                quantity=Decimal("1"),
                signal_at=T0,
                queue_seq=base + i,
                placement_no=1,
                client_order_id=f"c{base + i}",
                exchange_order_id=str(base + i),
            )
            for i in range(n)
        ],
        batch_size=500,
    )


def sweep_queries() -> int:
    queue_sweep_reset()
    with CaptureQueriesContext(connection) as captured:
        result = rebalance_order_queue.__wrapped__()  # the body, without the JobRun bookkeeping
    assert result.noop, result.summary
    return len(captured.captured_queries)


def test_steady_state_is_one_query_and_a_sweep_costs_the_same_at_10_and_1000_pairs(django_assert_num_queries):  # noqa: ANN001
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    with time_machine.travel(T0, tick=False) as clock:
        add_converged_pairs(sa, 10)
        at_10 = sweep_queries()
        with django_assert_num_queries(1):
            assert queue_work_load(now=timezone.now()) is None
        with django_assert_num_queries(1):
            assert rebalance_order_queue.__wrapped__().noop

        add_converged_pairs(sa, 990)
        assert OpenOrder.objects.count() == 1000
        clock.shift(60)  # a new minute: the congestion metric is written again, as in the first sweep
        at_1000 = sweep_queries()
        with django_assert_num_queries(1):
            assert queue_work_load(now=timezone.now()) is None
        with django_assert_num_queries(1):
            assert rebalance_order_queue.__wrapped__().noop
    assert at_10 == at_1000, (at_10, at_1000)
    assert at_1000 <= 10
