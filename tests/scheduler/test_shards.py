"""Account shards across three real runscheduler processes on PostgreSQL: fair spread, failover after
SIGKILL within seconds, and no (job, run) or order action twice."""

from __future__ import annotations

import json
import math
import signal
import time
from collections import Counter
from typing import Any

import pytest

from tests.procs import ProcDB, manage, spawn, wait_for

pytestmark = [pytest.mark.subprocess, pytest.mark.postgres]

SHARDS = 16
ACCOUNTS = 24
SHARD_CLASS = 0x7368

HELD = (
    "SELECT l.shard, l.pid, l.term FROM scheduler_shardlease l JOIN pg_locks k ON k.locktype = 'advisory' "
    "AND k.granted AND k.classid = %s AND k.objid = l.shard AND k.pid = l.backend_pid "
    "AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)

SEED = f"""
from tests.orders.factories import StrategyAccountFactory, paper_market_info
from tests.orders.queue_support import enqueue
paper_market_info(market_type="SPOT", symbol="ETH/USDT")
ids = []
for _ in range({ACCOUNTS}):
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    for price in ("2000", "2010", "2020"):
        enqueue(sa, "BUY", price)
    ids.append(sa.account_id)
print("IDS=" + ",".join(map(str, ids)))
"""

MORE = """
from accounts.models import StrategyAccount
from tests.orders.queue_support import enqueue
for sa in StrategyAccount.objects.all():
    enqueue(sa, "BUY", "2500")
    enqueue(sa, "BUY", None, order_type="MARKET", quantity="0.01")
"""

CHECK = """
import json
from tests.orders.queue_support import invariant_problems
print("PROBLEMS=" + json.dumps(invariant_problems([{ids}])))
"""


def query(db: ProcDB, sql: str, params: tuple = ()) -> list[tuple]:
    """db.query, retried while the shared test server is out of connections for a moment."""
    import psycopg2

    for attempt in range(50):
        try:
            return db.query(sql, params)
        except psycopg2.OperationalError:
            if attempt == 49:
                raise
            time.sleep(0.2)
    return []


def scalar(db: ProcDB, sql: str, params: tuple = ()) -> Any:
    rows = query(db, sql, params)
    return rows[0][0] if rows else None


def shell(db: ProcDB, code: str) -> str:
    for _ in range(20):
        result = manage("shell", "-c", code, env=db.env())
        if "too many clients" not in result.stderr:
            break
        time.sleep(0.5)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def held(db: ProcDB) -> dict[int, int]:
    """shard → scheduler pid, for the shards whose lease holder holds the shard's advisory lock now."""
    return {shard: pid for shard, pid, _ in query(db, HELD, (SHARD_CLASS,))}


def settled(db: ProcDB, ids: list[int]) -> bool:
    """Every account has its two best BUYs live (2500 and 2020) and nothing in flight or queued to place."""
    live = query(db, "SELECT account_id, price FROM orders_openorder WHERE order_type = 'LIMIT'")
    by_account: dict[int, set] = {}
    for account_id, price in live:
        by_account.setdefault(account_id, set()).add(int(price))
    busy = scalar(
        db, "SELECT count(*) FROM orders_pendingorder WHERE status = 'SUBMITTING' OR order_type = 'MARKET'"
    ) + scalar(db, "SELECT count(*) FROM orders_openorder WHERE status = 'CANCELLING'")
    return busy == 0 and all(by_account.get(i) == {2500, 2020} for i in ids)


def test_three_schedulers_share_shards_and_take_over_a_killed_ones_shards(proc_pg_db):
    db = proc_pg_db
    out = shell(db, SEED)
    ids = [int(x) for x in next(x for x in out.splitlines() if x.startswith("IDS=")).removeprefix("IDS=").split(",")]
    env = {
        "ACCOUNT_SHARDS": str(SHARDS),
        "ORDER_QUEUE_SLOTS": "2",
        "SCHEDULER_THREADS": "4",  # few database connections: the server is shared
        "EXECUTION_WORKERS": "4",
        "RECONCILE_WORKERS": "2",
    }
    procs = [spawn(db, name=f"sched{i}", **env) for i in range(3)]
    pids = {p.pid for p in procs}
    fair = math.ceil(SHARDS / 3)
    try:
        # 1. Spread: every shard held, by all three processes, none above its fair share.
        def spread() -> bool:
            owners = held(db)
            counts = Counter(owners.values())
            return len(owners) == SHARDS and set(counts) == pids and max(counts.values()) <= fair

        t0 = time.monotonic()
        wait_for(spread, timeout=60, what="16 shards spread over 3 processes")
        counts = Counter(held(db).values())
        print(f"\nspread after {time.monotonic() - t0:.1f} s: {sorted(counts.values())} (fair share {fair})")
        assert min(counts.values()) >= SHARDS - 2 * fair
        for _ in range(20):  # the shared test server may be out of connections for a moment
            listing = manage("runscheduler", "--shards", env=db.env(ACCOUNT_SHARDS=str(SHARDS)))
            if "too many clients" not in listing.stderr:
                break
            time.sleep(0.5)
        assert listing.returncode == 0, listing.stderr
        print(listing.stdout.splitlines()[-1])
        assert f"{SHARDS} shards; held by" in listing.stdout and "0 free" in listing.stdout
        assert all(f":{pid} " in listing.stdout for pid in pids)

        # Every account's two best orders placed, by the processes that own them.
        wait_for(
            lambda: scalar(db, "SELECT count(*) FROM orders_openorder") == 2 * ACCOUNTS,
            timeout=60,
            what="two live orders per account",
        )
        runners = {
            pid
            for (pid,) in query(db, "SELECT DISTINCT pid FROM scheduler_jobrun WHERE job_id = 'rebalance_order_queue'")
        }
        assert runners == pids, "every process runs the queue for its own shards"

        # 2. More work for every account (a better LIMIT that demotes one, a MARKET order), then SIGKILL
        # the process with the most shards while it is being done.
        shell(db, MORE)
        owners = held(db)
        victim = max(procs, key=lambda p: sum(1 for pid in owners.values() if pid == p.pid))
        lost = sorted(s for s, pid in owners.items() if pid == victim.pid)
        victim.signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.popen.wait(10)
        survivors = pids - {victim.pid}
        wait_for(
            lambda: (h := held(db)) and len(h) == SHARDS and set(h.values()) == survivors,
            timeout=30,
            interval=0.1,
            what="the killed process's shards to move",
        )
        took = time.monotonic() - killed_at
        print(f"shards {lost} moved after SIGKILL in {took:.2f} s; now {sorted(Counter(held(db).values()).values())}")
        assert took < 15, "a dead process's shards move within seconds (goal 5 s)"
        # A holder that may still have been alive (a heartbeat under 2.5 s old) makes its shards wait
        # SHARD_PROBE_MAX_AGE (2 s) before use: say how many did.
        time.sleep(2.5)
        lines = "".join(p.log() for p in procs if p.pid in survivors).splitlines()
        waited = [s for s in lost if any(f"shard {s} taken" in line and "active in" in line for line in lines)]
        print(f"of those, {len(waited)} waited 2 s for their last holder to stop (usable by {took + 2:.2f} s)")

        wait_for(lambda: settled(db, ids), timeout=90, what="every account to settle after the takeover")

        # 3. Nothing twice. Each (job, scheduled time) ran at most once per shard: shard sets disjoint.
        for job_id in ("rebalance_order_queue", "update_open_orders"):
            by_time: dict = {}
            for scheduled_at, shards in query(
                db, "SELECT scheduled_at, shards FROM scheduler_jobrun WHERE job_id = %s", (job_id,)
            ):
                covered = [int(s) for s in shards.split(",")] if shards else list(range(SHARDS))
                by_time.setdefault(scheduled_at, []).extend(covered)
            doubles = {t: c for t, c in by_time.items() if len(c) != len(set(c))}
            assert doubles == {}, f"{job_id}: a shard ran twice at one scheduled time"
        # Each exchange order was created once and acknowledged by exactly one `placed` event.
        placed = query(
            db, "SELECT details->>'client_order_id', count(*) FROM orders_orderevent WHERE kind = 'placed' GROUP BY 1"
        )
        assert [row for row in placed if row[1] != 1] == []
        created = {cid for (cid,) in query(db, "SELECT client_order_id FROM exchanges_simorder")}
        assert {cid for cid, _ in placed} == created
        # Each MARKET order filled once; no event of any order doubled by two owners.
        fills = query(
            db, "SELECT order_key, count(*) FROM orders_orderevent WHERE kind = 'filled' GROUP BY 1 HAVING count(*) > 1"
        )
        assert fills == []
        assert scalar(db, "SELECT count(*) FROM orders_orderevent WHERE kind = 'filled'") == ACCOUNTS
        out = shell(db, CHECK.format(ids=",".join(map(str, ids))))
        problems = json.loads(next(x for x in out.splitlines() if x.startswith("PROBLEMS=")).removeprefix("PROBLEMS="))
        assert problems == []
        demoted = scalar(db, "SELECT count(*) FROM orders_orderevent WHERE kind = 'demoted'")
        print(f"orders: {len(placed)} placements, {demoted} demotions, {ACCOUNTS} market fills; 0 doubled")
    finally:
        codes = [p.stop() for p in procs if p.popen.poll() is None]
    assert codes == [0, 0]


# --- one process's owner, in-process ---------------------------------------------------------------


@pytest.fixture
def _pg_only():
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("needs PostgreSQL (set DATABASE_URL=postgres://...)")


@pytest.mark.django_db(transaction=True)
def test_owner_takes_its_fair_share_releases_to_a_peer_and_stops_on_a_stale_probe(_pg_only, settings, staff_client):
    from django.test import Client

    from scheduler.shards import ShardOwner

    settings.ACCOUNT_SHARDS = 4
    busy: set[int] = set()
    first = ShardOwner(instance_id="a", host="alpha", pid=1, busy=lambda shard, _: shard in busy)
    second = ShardOwner(instance_id="b", host="beta", pid=2, busy=lambda shard, _: False)
    try:
        first.tick()
        assert sorted(first.owned()) == [0, 1, 2, 3]
        assert all(first.owns_account(account_id) for account_id in range(8))
        body = staff_client.get("/api/system/scheduler/status").json()
        assert [(s["shard"], s["held"], s["host"], s["pid"], s["term"]) for s in body["shards"]] == [
            (shard, True, "alpha", 1, 1) for shard in range(4)
        ]

        # A peer joins: the fair share halves; the first gives up two (one still busy: kept until idle).
        second.tick()
        assert second.owned() == {}
        busy.add(3)
        first.tick()
        assert sorted(first.owned()) == [0, 1]  # no new work on 2 and 3 from now on
        second.tick()
        assert sorted(second.owned()) == [2]  # 3 is still locked: its last task has not finished
        busy.clear()
        first.tick()
        second.tick()
        assert sorted(second.owned()) == [2, 3]
        assert second.owned()[3] == 2  # a new term for the shard's new owner
        settings.METRICS_TOKEN = "shard-metrics"
        metrics = Client().get("/metrics", HTTP_AUTHORIZATION="Bearer shard-metrics").content.decode()
        assert 'scheduler_shards_owned{host="beta",pid="2"} 2.0' in metrics
        assert "scheduler_shards_free 0.0" in metrics

        # An owner whose last successful probe is too old touches nothing (a partitioned process).
        settings.SHARD_PROBE_MAX_AGE = 0.0
        time.sleep(0.01)
        assert first.owned() == {} and not first.owns_account(0)
    finally:
        first.locks.close()
        second.locks.close()


@pytest.mark.django_db(transaction=True)
def test_a_shard_whose_holder_may_still_run_is_used_only_after_that_holder_stopped(_pg_only, settings):
    from django.utils import timezone

    from scheduler.models import SchedulerInstance
    from scheduler.shards import ShardOwner

    settings.ACCOUNT_SHARDS = 2
    settings.SHARD_PROBE_MAX_AGE = 1.0
    first = ShardOwner(instance_id="a", host="alpha", pid=1, busy=lambda *_: False)
    second = ShardOwner(instance_id="b", host="beta", pid=2, busy=lambda *_: False)
    try:
        first.tick()
        assert sorted(first.owned()) == [0, 1]
        now = timezone.now()
        SchedulerInstance.objects.create(
            instance_id="a", host="alpha", pid=1, role="standby", started_at=now, last_heartbeat=now
        )
        first.locks.close()  # its lock connection is cut; the process lives on (for up to 1 s more)
        second.tick()
        assert second.owned() == {}, "taken, but not used while its last holder may still act on it"
        time.sleep(1.1)
        assert first.owned() == {}, "the old holder stopped: its last good probe is too old"
        second.tick()
        assert sorted(second.owned()) == [0, 1]
    finally:
        first.locks.close()
        second.locks.close()
