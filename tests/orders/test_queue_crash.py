"""Crash safety of the queue (SPEC §4.1): after a crash at any crash point, later runs leave every logical
order in exactly one place with a complete history, and the exchange's live orders equal the OpenOrder rows.

In-process (exception mode) for every crash point, and SIGKILL of a real `runscheduler --run` process.
"""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
import time_machine

from orders.faults import CRASH_POINTS, crash_disable_all, crash_enable
from orders.models import OpenOrder, OrderEvent, PendingOrder
from tests import procs
from tests.orders.factories import StrategyAccountFactory, paper_market_info
from tests.orders.queue_support import T0, enqueue, invariant_problems, queue_state_reset, tick

# Which crash points each scenario passes, in the order it meets them.
SCENARIOS = {
    # Three buys for two slots: one batch of two promotions (claimed together, recorded together).
    "limit": ("promote.after_submitting_commit", "promote.after_exchange_ack", "promote.before_batch_record"),
    "express": (
        "promote.after_submitting_commit",
        "promote.after_exchange_ack",
        "promote.before_batch_record",
        "fill.after_trade_upsert",
    ),
    "demote": ("demote.after_cancelling_commit", "demote.after_cancel_ack"),
}
CASES = [(point, scenario) for scenario, points in SCENARIOS.items() for point in points]


def test_every_crash_point_is_covered():
    assert {point for point, _ in CASES} == set(CRASH_POINTS)


@pytest.fixture(autouse=True)
def _clean(settings):  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    with queue_state_reset():
        yield


def live_buy_prices() -> list[Decimal]:
    prices = OpenOrder.objects.filter(order_type="LIMIT", side="BUY").values_list("price", flat=True)
    return sorted(price for price in prices if price is not None)  # LIMIT orders have one


@pytest.mark.django_db
@pytest.mark.parametrize(("point", "scenario"), CASES)
def test_a_crash_at_any_point_leaves_every_order_in_exactly_one_place(point, scenario):  # noqa: ANN001
    paper_market_info(market_type="SPOT", symbol="ETH/USDT")
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    with time_machine.travel(T0, tick=False) as clock:
        for price in ("2000", "2010", "2020") if scenario != "demote" else ("2000", "2010"):
            enqueue(sa, "BUY", price)
        if scenario == "express":
            market = enqueue(sa, "BUY", None, order_type="MARKET", quantity="0.01")
        if scenario == "demote":
            tick(clock)
            assert live_buy_prices() == [Decimal("2000"), Decimal("2010")]
            enqueue(sa, "BUY", "2030")

        crash_enable(point, "raise")
        crashed = tick(clock)
        assert crashed.outcome == "error" and point in crashed.summary, crashed.summary
        crash_disable_all()

        # Later ticks (and the reconciliation job) finish what the crash interrupted: lookups
        # need 2 s, a not-found re-queue two lookups 30 s apart, then a backoff.
        for _ in range(12):
            tick(clock, seconds=5, reconcile=True)
        assert invariant_problems([sa.account_id]) == []
        expected = [Decimal("2010"), Decimal("2030")] if scenario == "demote" else [Decimal("2010"), Decimal("2020")]
        assert live_buy_prices() == expected
        assert not PendingOrder.objects.filter(status="SUBMITTING").exists()
        if scenario == "express":
            kinds = list(
                OrderEvent.objects.filter(order_key=market.order_key).order_by("id").values_list("kind", flat=True)
            )
            assert kinds[-1] == "filled" and kinds.count("filled") == 1, kinds
        if scenario == "demote":
            assert PendingOrder.objects.filter(price=Decimal("2000"), status="QUEUED").exists()


# --- SIGKILL of a real process -----------------------------------------------------------------------


def _shell(db: procs.ProcDB, code: str) -> str:
    result = procs.manage("shell", "-c", code, env=db.env())
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def _run_queue(db: procs.ProcDB, **env: str) -> procs.subprocess.CompletedProcess:
    return procs.manage("runscheduler", "--run", "rebalance_order_queue", env=db.env(**env))


def _age(db: procs.ProcDB, seconds: int) -> None:
    """Let time pass for the queue's own clocks (lookups, backoffs) without sleeping."""
    _shell(
        db,
        "from datetime import timedelta; from django.db.models import F; "
        "from orders.models import PendingOrder, OpenOrder, QueueDirty; "
        f"d = timedelta(seconds={seconds}); "
        "PendingOrder.objects.filter(submitting_at__isnull=False).update(submitting_at=F('submitting_at') - d); "
        "PendingOrder.objects.filter(last_lookup_at__isnull=False).update(last_lookup_at=F('last_lookup_at') - d); "
        "PendingOrder.objects.filter(next_attempt_at__isnull=False).update(next_attempt_at=F('next_attempt_at') - d); "
        "OpenOrder.objects.filter(next_cancel_at__isnull=False).update(next_cancel_at=F('next_cancel_at') - d); "
        "QueueDirty.objects.update(marked_at=F('marked_at') - d)",
    )


def _problems(db: procs.ProcDB, account_id: int) -> list[str]:
    out = _shell(
        db,
        "import json; from tests.orders.queue_support import invariant_problems; "
        f"print('PROBLEMS=' + json.dumps(invariant_problems([{account_id}])))",
    )
    line = next(x for x in out.splitlines() if x.startswith("PROBLEMS="))
    return json.loads(line.removeprefix("PROBLEMS="))


def _kill_and_recover(db: procs.ProcDB, point: str) -> None:
    seeded = _shell(
        db,
        "from tests.orders.queue_support import seed_queue_scenario; "
        "print('ACCOUNT=%d' % seed_queue_scenario(buys=3, sells=3)['account_id'])",
    )
    account_id = int(next(x for x in seeded.splitlines() if x.startswith("ACCOUNT=")).removeprefix("ACCOUNT="))
    if point.startswith("demote."):
        assert _run_queue(db).returncode == 0
        _shell(
            db,
            "from accounts.models import StrategyAccount; from tests.orders.queue_support import enqueue; "
            f"enqueue(StrategyAccount.objects.get(account_id={account_id}), 'BUY', '2500')",
        )
    killed = _run_queue(db, ORDER_CRASH_POINTS=f"{point}:kill")
    assert killed.returncode == -9, (killed.returncode, killed.stdout[-2000:], killed.stderr[-2000:])
    for _ in range(5):
        _age(db, 40)
        result = _run_queue(db)
        assert result.returncode == 0, result.stderr[-3000:]
    assert _problems(db, account_id) == []
    submitting = db.scalar("SELECT COUNT(*) FROM orders_pendingorder WHERE status = 'SUBMITTING'")
    live = db.scalar("SELECT COUNT(*) FROM orders_openorder WHERE side = 'BUY'")
    assert (submitting, live) == (0, 2)
    if point.startswith("demote."):
        best = db.query("SELECT price FROM orders_openorder WHERE side = 'BUY' ORDER BY price DESC")
        assert Decimal(str(best[0][0])) == Decimal("2500")


KILL_POINTS = [
    "promote.after_submitting_commit",
    "promote.after_exchange_ack",
    "promote.before_batch_record",
    "demote.after_cancelling_commit",
]


@pytest.mark.subprocess
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_a_crash_point_on_sqlite_then_recovery(proc_sqlite_db, point):  # noqa: ANN001
    _kill_and_recover(proc_sqlite_db, point)


@pytest.mark.subprocess
@pytest.mark.postgres
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_at_a_crash_point_on_postgres_then_recovery(proc_pg_db, point):  # noqa: ANN001
    _kill_and_recover(proc_pg_db, point)
