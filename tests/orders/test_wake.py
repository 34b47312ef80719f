"""Intake wakes the queue: a signal's orders are placed at once, not at the queue's next tick (scheduler.wake)."""

from __future__ import annotations

import dataclasses
import time

import pytest
from django.db import connection
from django.utils import timezone

from orders.models import OpenOrder, OrderEvent, PendingOrder
from orders.queue import queue_sweep_reset
from scheduler.models import JobRun
from scheduler.registry import REGISTRY, interval
from scheduler.runner import SchedulerHost
from scheduler.wake import JobWaker, job_wake
from tests.orders.factories import StrategyAccountFactory, paper_market_info
from tests.orders.queue_support import enqueue
from tests.procs import wait_for

QUEUE = next(spec for spec in REGISTRY if spec.id == "rebalance_order_queue")

postgres_only = pytest.mark.skipif(connection.vendor != "postgresql", reason="LISTEN/NOTIFY is PostgreSQL's")


@pytest.fixture
def leader(execution_workers, settings):  # noqa: ANN001
    """A leader host whose queue job ticks once an hour: anything placed within the test was woken."""
    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    queue_sweep_reset()
    host = SchedulerHost(specs=[dataclasses.replace(QUEUE, trigger=interval(hours=1))])
    host._standby_tick()
    assert host.term is not None, "the test host did not become leader"
    yield host
    host.stop_event.set()
    host._shutdown(wait_for_jobs=False)
    host.lock.release()
    queue_sweep_reset()


def _waker(host: SchedulerHost) -> JobWaker:
    return next(t for t in host.leader_threads if isinstance(t, JobWaker))


@postgres_only
def test_an_order_taken_in_is_placed_by_a_wake_run_long_before_the_queue_ticks(leader):  # noqa: ANN001
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    wait_for(lambda: _waker(leader)._conn is not None, timeout=10, what="the waker to LISTEN")
    next_tick = leader.scheduler.get_job("rebalance_order_queue").next_run_time

    started = time.monotonic()
    pending = enqueue(sa, "BUY", "1500")  # commits (transactional_db): the NOTIFY goes out on commit
    wait_for(lambda: OpenOrder.objects.filter(order_key=pending.order_key).exists(), timeout=15, what="placement")
    print(f"queued → placed by a wake-up: {time.monotonic() - started:.3f} s (next tick was {next_tick})")

    assert next_tick - timezone.now() > timezone.timedelta(minutes=50), "the queue ticked meanwhile"
    runs = JobRun.objects.filter(job_id="rebalance_order_queue")
    assert list(runs.values_list("kind", flat=True).distinct()) == [JobRun.Kind.WAKE]
    assert runs.filter(term=leader.term).exists()
    assert not PendingOrder.objects.filter(order_key=pending.order_key).exists()
    assert OrderEvent.objects.filter(order_key=pending.order_key, kind=OrderEvent.Kind.PLACED).count() == 1
    assert _waker(leader).wakes >= 1


@postgres_only
def test_a_wake_is_dropped_while_the_job_runs_and_when_its_tick_is_due_anyway(leader):  # noqa: ANN001
    waker = _waker(leader)
    job = leader.scheduler.get_job("rebalance_order_queue")
    executor = leader.executor
    with executor._lock:
        executor._instances[job.id] += 1  # as APScheduler counts a run in progress
    try:
        assert waker.wake("rebalance_order_queue") is False
    finally:
        with executor._lock:
            executor._instances[job.id] -= 1
    assert waker.wake("rebalance_order_queue", now=job.next_run_time - timezone.timedelta(milliseconds=50)) is False
    assert waker.wake("prune_job_history") is False  # not wakeable, and not scheduled here
    assert not JobRun.objects.filter(kind=JobRun.Kind.WAKE).exists()


@pytest.mark.skipif(connection.vendor == "postgresql", reason="the SQLite fallback")
@pytest.mark.django_db(transaction=True)
def test_on_sqlite_a_wake_up_sends_nothing_and_the_tick_places_the_order(execution_workers, settings):  # noqa: ANN001
    from orders.jobs import rebalance_order_queue

    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    queue_sweep_reset()
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    job_wake("rebalance_order_queue")  # outside a transaction: a no-op here, not an error
    pending = enqueue(sa, "BUY", "1500")
    assert PendingOrder.objects.filter(pk=pending.pk).exists()
    rebalance_order_queue()
    wait_for(lambda: OpenOrder.objects.filter(order_key=pending.order_key).exists(), timeout=15, what="placement")


@postgres_only
def test_with_sharding_on_each_process_wakes_its_own_shard_scheduler(execution_workers, settings):  # noqa: ANN001
    """The queue runs per shard owner, not on the leader: the wake-up reaches the owner's shard scheduler."""
    from scheduler.shards import shard_owner_install

    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    settings.SCHEDULER_SHARDING = "auto"
    queue_sweep_reset()
    host = SchedulerHost(specs=[dataclasses.replace(QUEUE, trigger=interval(hours=1))])
    try:
        host._shard_tick()  # not the leader: only the owner, the shard scheduler and the shard threads
        assert host.sharded and host.term is None
        waker = next(t for t in host.shard_threads if isinstance(t, JobWaker))
        wait_for(lambda: len(host.shard_owner.owned()) == host.shard_owner.count, timeout=15, what="all shards")
        wait_for(lambda: waker._conn is not None, timeout=10, what="the waker to LISTEN")
        paper_market_info(market_type="SPOT", symbol="ETH/USDT")
        sa = StrategyAccountFactory(strategy__market_type="SPOT")

        pending = enqueue(sa, "BUY", "1500")
        wait_for(lambda: OpenOrder.objects.filter(order_key=pending.order_key).exists(), timeout=15, what="placement")

        runs = JobRun.objects.filter(job_id="rebalance_order_queue")
        assert list(runs.values_list("kind", flat=True).distinct()) == [JobRun.Kind.WAKE]
        assert all(shards for shards in runs.values_list("shards", flat=True)), "a shard run names its shards"
        assert host.scheduler is None, "no leader scheduler was involved"
        assert OrderEvent.objects.filter(order_key=pending.order_key, kind=OrderEvent.Kind.PLACED).count() == 1
        assert waker.wakes >= 1
    finally:
        host.stop_event.set()
        host._shutdown(wait_for_jobs=False)
        if host.shard_owner is not None:
            host.shard_owner.locks.close()  # the advisory locks go with their connection
        host.lock.release()
        shard_owner_install(None)
        queue_sweep_reset()
