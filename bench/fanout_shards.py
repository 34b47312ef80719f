"""The fan-out and reconciliation of bench.fanout with the accounts sharded across several schedulers (issue 15).

Run by bench.fanout (BENCH_FANOUT_SCHEDULERS, default 3; 0 skips), on the same database, simulator
(its pid passed in: bench.fanout runs as __main__, so its module globals are not these) and 100 ms
latency fault, against the single-process figures of the same run. Each scheduler is a process of
its own (`python -m bench.fanout_shards --scheduler`): a SchedulerHost with the registry's
rebalance_order_queue (1 s) for the fan-out, or update_open_orders (29 s) for reconciliation, and
the threads the single-process leader of bench.fanout has (execution pools, JobWaker) plus the
ClientWarmer, so that both sides start with their followers' ccxt clients built. Sharding is on
(PostgreSQL): every process owns a fair share of ACCOUNT_SHARDS and places and reconciles only its
own accounts. Each process's REST calls leave from an address of its own (EXCHANGE_SOURCE_ADDRESS
127.0.0.2, .3, ...): the simulator counts Binance's request weight per address, so each has its own
egress budget, as on several hosts.

Fan-out: fresh data and N followers, then the schedulers start; once every shard is held, spread
over all of them, and their logs have been quiet for QUIET seconds (clients built), one webhook
signal goes through the real endpoint in this process. Its NOTIFY wakes every process's queue. The
figures are those of bench.fanout (seconds from the webhook's return to each `placed` event), with
skipped ticks counted per process, RSS the largest of the processes, CPU the sum of them.

Reconciliation: fresh data, accounts x 5 live orders seeded first, then the schedulers start; each
reconciles its own accounts at its first update_open_orders tick (29 s after its start). Per process:
from its run's start to the moment the last OpenOrder of its accounts was seen by the exchange
(`last_seen_at` moved; polled every 0.1 s); the figure is the slowest process.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.support import ROOT

QUIET = 3.0  # s without new log lines: the schedulers have built their clients and settled
READY_TIMEOUT = 120.0
# Pool sizes per process: the single process's in all (3 x 16 against 48, 3 x 11 against 32), so the row
# compares the split rather than more threads; each process's threads share 6 connections
# (core.pgpool), so three processes, the leader and the simulator fit PostgreSQL's 100 connections.
SHARD_ENV = {
    "EXECUTION_WORKERS": "16",
    "RECONCILE_WORKERS": "11",
    "EXECUTION_DB_CONNECTIONS": "6",
    "SCHEDULER_THREADS": "6",
    "ACCOUNT_SHARDS": "16",
}
SHARD_LOCK_CLASS = 0x7368


def log(message: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


@dataclass
class Schedulers:
    """Running scheduler processes and their logs."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def start(self, env: dict[str, str], count: int, work: Path, *, jobs: str) -> None:
        work.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            path = work / f"scheduler-{i}.log"
            child = {**env, **SHARD_ENV, "EXCHANGE_SOURCE_ADDRESS": f"127.0.0.{2 + i}", "LOG_LEVEL": "INFO"}
            child["BENCH_SHARD_JOBS"] = jobs
            child.pop("SCHEDULER_SHARDING", None)
            with path.open("w") as handle:
                self.procs.append(
                    subprocess.Popen(  # noqa: S603 - this module
                        [sys.executable, "-m", "bench.fanout_shards", "--scheduler"],
                        cwd=ROOT,
                        env=child,
                        stdout=handle,
                        stderr=subprocess.STDOUT,
                        stdin=subprocess.DEVNULL,
                        start_new_session=True,
                    )
                )
            self.logs.append(path)

    def check(self) -> None:
        for proc, path in zip(self.procs, self.logs, strict=True):
            if proc.poll() is not None:
                raise RuntimeError(f"scheduler {proc.pid} exited with {proc.returncode}: {path.read_text()[-2000:]}")

    def wait_ready(self, shards: int) -> float:
        """Every shard held and spread over every process, then the logs quiet; seconds it took."""
        from django.db import connection

        started = time.monotonic()
        deadline = started + READY_TIMEOUT
        pids = set(self.pids)
        while True:
            self.check()
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT l.shard, l.pid FROM scheduler_shardlease l JOIN pg_locks k ON k.locktype = 'advisory' "
                    "AND k.granted AND k.classid = %s AND k.objid = l.shard AND k.pid = l.backend_pid "
                    "AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                    [SHARD_LOCK_CLASS],
                )
                held = dict(cursor.fetchall())
            fair = math.ceil(shards / len(pids))
            counts = [sum(1 for pid in held.values() if pid == p) for p in pids]
            if len(held) == shards and all(0 < c <= fair for c in counts):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"shards not spread within {READY_TIMEOUT:.0f} s: {held}")
            time.sleep(0.2)
        sizes = [-1] * len(self.logs)
        calm_since = time.monotonic()
        while time.monotonic() < deadline:
            self.check()
            now = [p.stat().st_size for p in self.logs]
            if now != sizes:
                sizes, calm_since = now, time.monotonic()
            elif time.monotonic() - calm_since >= QUIET:
                break
            time.sleep(0.2)
        return time.monotonic() - started

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            with_times = psutil.Process(pid).cpu_times()
            total += with_times.user + with_times.system
        return total

    def rss_mb(self) -> list[float]:
        return [psutil.Process(pid).memory_info().rss / 2**20 for pid in self.pids]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


class RssPeak:
    """Largest RSS of each process, sampled every 0.2 s between `sample` calls by the caller's loop."""

    def __init__(self, schedulers: Schedulers) -> None:
        self.schedulers = schedulers
        self.peak = 0.0

    def sample(self) -> None:
        self.peak = max([self.peak, *self.schedulers.rss_mb()])


def skipped_ticks(since: float, until: float, gap: float) -> tuple[int, float]:
    """Scheduled queue runs more than `gap` s apart, per process (pid), between `since` and `until`."""
    from datetime import UTC, datetime

    from scheduler.models import JobRun

    runs = JobRun.objects.filter(
        job_id="rebalance_order_queue",
        kind=JobRun.Kind.SCHEDULED,
        started_at__gte=datetime.fromtimestamp(since - 3, UTC),
        started_at__lte=datetime.fromtimestamp(until + 1, UTC),
    ).order_by("started_at")
    by_pid: dict[int, list[float]] = {}
    for pid, at in runs.values_list("pid", "started_at"):
        by_pid.setdefault(pid, []).append(at.timestamp())
    gaps = [b - a for starts in by_pid.values() for a, b in zip(starts, starts[1:], strict=False)]
    return sum(1 for g in gaps if g > gap), max(gaps, default=0.0)


def sharded_fanout_run(
    *, order_type: str, n: int, count: int, phase: float, env: dict[str, str], work: Path, sim_pid: int
) -> Any:
    """bench.fanout's fan-out with `count` scheduler processes sharing the accounts; a FanoutResult."""
    import json

    from django.test import Client

    from bench import fanout

    result = fanout.FanoutResult(order_type=order_type, n=n, workers=-count)
    fanout.data_reset()
    followers = fanout.followers_seed(n)
    fanout.market_data_refresh()
    payload = fanout.signal_payload(followers, order_type)
    client = Client()
    client.get("/api/webhook/")
    schedulers = Schedulers()
    schedulers.start(env, count, work / f"fanout-{order_type.lower()}-{n}", jobs="rebalance_order_queue")
    peak = RssPeak(schedulers)
    timeout = 60 + n * 0.3
    try:
        result.warm_seconds = schedulers.wait_ready(int(SHARD_ENV["ACCOUNT_SHARDS"]))
        time.sleep(phase)  # the processes tick at phases of their own: the signal meets them wherever
        cpu0 = (schedulers.cpu(), fanout.cpu_seconds(sim_pid))
        pg0 = fanout.postgres_cpu()
        posted = time.time()
        response = client.post("/api/webhook/", data=json.dumps(payload), content_type="application/json")
        returned = time.time()
        result.webhook_seconds = returned - posted
        if response.status_code != 202:
            raise RuntimeError(f"webhook answered {response.status_code}: {response.content[:500]!r}")

        def poll() -> None:
            schedulers.check()
            peak.sample()

        acked, ended = fanout.acks_wait(followers, n, returned=returned, timeout=timeout, poll=poll)
        finished = time.time()
        result.cpu = (schedulers.cpu() - cpu0[0], fanout.cpu_seconds(sim_pid) - cpu0[1])
        result.postgres_cpu = fanout.postgres_cpu_since(pg0)
    finally:
        schedulers.stop()
    from scheduler.models import JobRun

    result.wake_runs = JobRun.objects.filter(job_id="rebalance_order_queue", kind=JobRun.Kind.WAKE).count()
    result.acks = sorted(acked.values())
    result.ended_otherwise = len(ended)
    result.not_acked = n - len(acked)
    result.skipped_ticks, result.longest_gap = skipped_ticks(returned, finished, fanout.SKIPPED_GAP)
    result.rss = (math.nan, math.nan, peak.peak)
    if result.not_acked:
        result.errors.append(f"{result.not_acked} of {n} not acknowledged within {timeout:.0f} s")
    errors = JobRun.objects.filter(job_id="rebalance_order_queue", outcome=JobRun.Outcome.ERROR)
    result.errors += [f"queue run {r.kind}: {r.summary[:120]}" for r in errors[:3]]
    return result


def sharded_reconcile_run(*, accounts: int, count: int, env: dict[str, str], work: Path, sim_pid: int) -> Any:
    """bench.fanout's reconciliation with `count` scheduler processes, each of its own accounts; a ReconcileResult."""
    from django.utils import timezone

    from bench import fanout
    from orders.models import OpenOrder
    from scheduler.models import JobRun, ShardLease

    result = fanout.ReconcileResult(workers=-count, accounts=accounts)
    fanout.data_reset()
    account_ids, _ = fanout.reconcile_seed(accounts, fanout.RECONCILE_ORDERS)
    seeded = timezone.now()
    OpenOrder.objects.update(last_seen_at=seeded)
    schedulers = Schedulers()
    # Reconciliation only, as in the single-process run (the queue would demote the seeded orders
    # beyond ORDER_QUEUE_SLOTS).
    schedulers.start(env, count, work / f"reconcile-{accounts}", jobs="update_open_orders")
    peak = RssPeak(schedulers)
    shards = int(SHARD_ENV["ACCOUNT_SHARDS"])
    try:
        schedulers.wait_ready(shards)
        cpu0 = (schedulers.cpu(), fanout.cpu_seconds(sim_pid))
        pg0 = fanout.postgres_cpu()
        owner_of = {shard: pid for shard, pid in ShardLease.objects.values_list("shard", "pid") if pid is not None}
        total: dict[int, int] = {}
        for account_id in account_ids:
            pid = owner_of[account_id % shards]
            total[pid] = total.get(pid, 0) + fanout.RECONCILE_ORDERS
        done_at: dict[int, float] = {}
        deadline = time.monotonic() + 120 + accounts * 0.2
        rows = OpenOrder.objects.filter(last_seen_at__gt=seeded)
        while len(done_at) < len(total) and time.monotonic() < deadline:
            schedulers.check()
            peak.sample()
            seen: dict[int, int] = {}
            for account_id in rows.values_list("account_id", flat=True):
                pid = owner_of[account_id % shards]
                seen[pid] = seen.get(pid, 0) + 1
            for pid, want in total.items():
                if pid not in done_at and seen.get(pid, 0) >= want:
                    done_at[pid] = time.time()
            time.sleep(0.1)
        result.cpu = (schedulers.cpu() - cpu0[0], fanout.cpu_seconds(sim_pid) - cpu0[1])
        result.postgres_cpu = fanout.postgres_cpu_since(pg0)
    finally:
        schedulers.stop()
    if len(done_at) < len(total):
        raise RuntimeError(f"reconciliation of {accounts} accounts did not finish in every process: {done_at}")
    spans = []
    for pid, at in done_at.items():
        run = (
            JobRun.objects.filter(job_id="update_open_orders", pid=pid, started_at__gte=seeded)
            .order_by("started_at")
            .first()
        )
        if run is None:
            raise RuntimeError(f"no update_open_orders run of scheduler {pid}")
        spans.append(at - run.started_at.timestamp())
        result.summary += f"pid {pid}: {at - run.started_at.timestamp():.2f} s, {run.summary[:80]}; "
    result.seconds = max(spans)
    result.rss = (math.nan, math.nan, peak.peak)
    return result


def scheduler_main() -> int:
    """One scheduler process of the sharded runs: the queue and reconciliation, with bench.fanout's threads."""
    import django

    django.setup()
    from django.conf import settings

    from scheduler import runner
    from scheduler.registry import registry_specs

    threads = ["orders.execution:ExecutionPools", "scheduler.wake:JobWaker", "orders.execution:ClientWarmer"]
    runner.LEADER_THREADS[:] = threads
    runner.SHARD_THREADS[:] = threads
    runner.LEADER_HOOKS[:] = []
    settings.DEBUG = False
    jobs = os.environ.get("BENCH_SHARD_JOBS", "rebalance_order_queue,update_open_orders").split(",")
    specs = [s for s in registry_specs() if s.id in jobs]
    host = runner.SchedulerHost(specs=specs)
    host.install_signal_handlers()
    return host.run()


if __name__ == "__main__" and "--scheduler" in sys.argv:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradingsite.settings")
    sys.exit(scheduler_main())
