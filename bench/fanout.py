"""Execution engine fan-out and reconciliation against the serial engine in the same run (issue 12, SPEC §9).

Setup: a fresh PostgreSQL database (ts_bench_fanout_<pid> on BENCH_PG_ADMIN_URL's server, dropped at
the end unless BENCH_KEEP=1), migrated; `manage.py runsimexchange` on a free 127.0.0.1 port against
it, with a SimFault latency of 100 ms (every call, phase "before") on create_order, fetch_order,
fetch_open_orders and cancel_order of BINANCE. Real ccxt (binanceusdm) talks to it through
EXCHANGE_URL_OVERRIDES. The simulator's engine account is the API key and it serves the
followers' keys from a keys file (`runsimexchange --keys`; FOLLOWER_KEY_PREFIX…, signature checked
as usual): each follower is an exchange account of its own there (own orders, balances,
open-order listing), as it would be on Binance.

This process is the leader: Django on the same database (DJANGO_DEBUG off), MarketInfo and
PriceQuote loaded by the precision_cache_update and update_price_cache jobs. Each run starts from
fresh data (every table but migrations, market data and the simulator's exchange and fault rows
truncated), seeds N followers of one BINANCE FUTURES strategy (bulk_create: user, accounts with
their own key, StrategyAccounts, 1,000 USDT allocated, leverage 1), creates their ccxt instances
(the leader's warm state; timed, not part of the figures), and runs the queue as the scheduler
does: an in-process leader (SchedulerHost, APScheduler, DjangoJobStore) with rebalance_order_queue
on its 1 s interval, the execution pools and, for the concurrent engine, the JobWaker that runs the
queue at once when intake NOTIFYs (the serial baseline has no waker, as before issue 12). One
webhook signal (ETH/USDT BUY, qty_per 10; MARKET, or LIMIT 5 % under the last price so it rests)
goes through the real endpoint (django.test.Client, POST /api/webhook/) half a second
into a tick (the mean phase of a signal arriving at a random time).

Figures per (order type, N), each against the serial engine (EXECUTION_WORKERS=0, the queue as it
was before issue 12) on fresh data in the same run; ratio = value / baseline:
  first/median/p99/last ack — seconds from the webhook's return to each order's `placed` event
    (OrderEvent.created_at: written when the exchange's acknowledgement is recorded);
  skipped ticks — scheduled runs (JobRun rows) that started more than 1.5 s after the one before,
    from the webhook until the last acknowledgement; wake runs — WAKE runs of the queue meanwhile;
  RSS — of this process (the queue's), sampled every 0.2 s over that window: start, end, max;
  exchange calls — ccxt HTTP requests in the window, those that timed out, create call p50/p99;
  CPU seconds of this process, of the simulator and of the local PostgreSQL server's processes in the
  window (where the time went; PostgreSQL's NaN when the server is not on this machine).
Simulator ceiling (first, on fresh data): 16 MARKET creates sent straight through the followers'
gateways, all at once against one after another. The simulator locks per account (a SimAccount
row), so creates of different accounts run side by side, but each costs it tens of milliseconds of
CPU on a machine it shares with the engine: this line says how much of a fan-out figure is the
simulated exchange rather than the engine.
Reconciliation: BENCH_RECONCILE_ACCOUNTS accounts × 5 live LIMIT orders (SimOrder and OpenOrder
rows bulk-created to match), one `update_open_orders` run, timed until its last account market is
done (RECONCILE_WORKERS=32 against 0, each on fresh data; the time includes the account markets the
job leaves running beside it after its 18 s wait).

Environment: BENCH_FANOUT_N ("100,1000"), BENCH_FANOUT_TYPES ("MARKET,LIMIT"),
BENCH_FANOUT_SERIAL_MAX (1000: a larger N, or more reconciled accounts, run without the serial baseline,
said in the output),
BENCH_RECONCILE_ACCOUNTS (1000; 0 skips), BENCH_FANOUT_SCHEDULERS (3: the sharded row's scheduler
processes, bench.fanout_shards; 0 skips it), BENCH_FANOUT_WORKERS (48) and BENCH_RECONCILE_WORKERS (32):
the pool sizes measured against 0, BENCH_FANOUT_PHASE (0.5 s), BENCH_SIM_DB_THREADS (32: the
simulator's --db-threads, so the simulated exchange is not what is measured), BENCH_PG_ADMIN_URL
(postgres://postgres@127.0.0.1:5432/postgres), BENCH_KEEP=1 keeps the database and the server log.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psutil
import requests

from bench.support import ROOT, bench_env, header, line, migrate, pg_recreate

SIM_KEY = "bench-fanout-sim-key-4f1c2a"
SIM_SECRET = "bench-fanout-sim-secret-9e07b3d5"  # noqa: S105 - the local simulator's own key pair
FOLLOWER_KEY_PREFIX = "bench-fanout-follower-"
CALIBRATION_CREATES = 16
SYMBOL = "ETH/USDT"
ALLOCATED = Decimal(1000)
QTY_PER = Decimal(10)
LIMIT_BELOW = Decimal("0.95")
LATENCY_MS = 100
LATENCY_ENDPOINTS = ("create_order", "fetch_order", "fetch_open_orders", "cancel_order")
RECONCILE_ORDERS = 5
TICK_SECONDS = 1.0
SKIPPED_GAP = 1.5
SEEN_ROUNDS = 5  # acks_wait's look-back, in polling rounds of 0.2 s
READY_TIMEOUT = 120.0
# Tables that survive the reset between runs: schema, market data, the simulator's exchange and faults.
KEEP_TABLES = {
    "django_migrations",
    "django_content_type",
    "auth_permission",
    "auth_group",
    "auth_group_permissions",
    "exchanges_marketinfo",
    "exchanges_pricequote",
    "exchanges_simexchange",
    "exchanges_simfault",
}
GOAL_ALL_100 = 1.0  # s: N=100, all acknowledged
GOAL_P99_1000 = 3.0  # s: N=1000, p99
GOAL_RECONCILE = 10.0  # s: 1,000 accounts
GOAL_RSS_MB = 400.0


def log(message: str) -> None:
    print(f"# {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), as bench.lateness."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --- the simulated exchange ------------------------------------------------------------------------


def follower_keys(n: int) -> list[str]:
    """The first `n` followers' API keys: one simulator account each, all signed with SIM_SECRET. Every run
    starts from truncated simulator tables, so a key reused by the next run is a fresh account there."""
    return [f"{FOLLOWER_KEY_PREFIX}{i:05d}" for i in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_simexchange(env: dict[str, str], port: int, log_path: Path, *, followers: int) -> subprocess.Popen:
    """`manage.py runsimexchange` serving SIM_KEY and `followers` follower keys (--keys), one account each."""
    keys_path = log_path.with_name("simexchange-keys.txt")
    keys_path.write_text("".join(f"{key}:{SIM_SECRET}\n" for key in follower_keys(followers)))
    with log_path.open("w") as handle:
        proc = subprocess.Popen(  # noqa: S603 - our own manage.py
            [
                sys.executable,
                str(ROOT / "manage.py"),
                "runsimexchange",
                "--port",
                str(port),
                "--api-key",
                SIM_KEY,
                "--api-secret",
                SIM_SECRET,
                "--seed",
                "1",
                "--keys",
                str(keys_path),
                "--db-threads",
                os.environ.get("BENCH_SIM_DB_THREADS", "32"),
            ],
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"runsimexchange exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/fapi/v1/ping", timeout=1).status_code == 200:
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("runsimexchange did not answer within the ready timeout")


def stop_process(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


# --- data ------------------------------------------------------------------------------------------


def data_reset() -> None:
    """Every table but KEEP_TABLES emptied; the leader's in-process state (ccxt instances, pools, sweep) too."""
    from django.db import connection

    from exchanges import ccxt_gateway
    from orders.execution import execution_pools_close
    from orders.queue import queue_sweep_reset

    execution_pools_close(30)
    tables = [t for t in connection.introspection.table_names() if t not in KEEP_TABLES]
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE " + ", ".join(connection.ops.quote_name(t) for t in tables) + " CASCADE")
    ccxt_gateway.caches_clear()
    queue_sweep_reset()


def market_data_refresh() -> None:
    """MarketInfo (precision_cache_update) and fresh PriceQuote rows (update_price_cache), as the leader keeps them."""
    from exchanges.models import MarketInfo
    from positions.jobs import precision_cache_update, update_price_cache

    if not MarketInfo.objects.filter(exchange="BINANCE", market_type="FUTURES", symbol=SYMBOL).exists():
        precision_cache_update()
    update_price_cache()


def last_price() -> Decimal:
    from exchanges.models import PriceQuote

    return PriceQuote.objects.get(exchange="BINANCE", market_type="FUTURES", symbol=SYMBOL).price


@dataclass
class Followers:
    group_name: str
    token: str
    account_ids: list[int]
    strategy_account_ids: list[int]
    keys: list[str]


def followers_seed(n: int) -> Followers:
    """One FUTURES strategy on BINANCE with `n` followers, each an account with its own simulator key."""
    from django.contrib.auth import get_user_model

    from accounts.models import Account, MarketType, StrategyAccount, StrategyCapital
    from accounts.services import strategy_create

    tag = secrets.token_hex(4)
    user = get_user_model().objects.create_user(username=f"bench-{tag}", password=secrets.token_urlsafe(18))
    token = secrets.token_urlsafe(24)
    strategy = strategy_create(
        name=f"fanout {tag}", group_name=f"fanout-{tag}", market_type=MarketType.FUTURES, webhook_token=token
    )
    keys = follower_keys(n)
    accounts = Account.objects.bulk_create(
        [
            Account(user=user, name=f"follower {i}", exchange="BINANCE", api_key=key, api_secret=SIM_SECRET)
            for i, key in enumerate(keys)
        ],
        batch_size=500,
    )
    links = StrategyAccount.objects.bulk_create(
        [StrategyAccount(strategy=strategy, account=a, leverage=Decimal(1)) for a in accounts], batch_size=500
    )
    StrategyCapital.objects.bulk_create(
        [StrategyCapital(strategy_account=sa, allocated_capital=ALLOCATED) for sa in links], batch_size=500
    )
    return Followers(
        group_name=strategy.group_name,
        token=token,
        account_ids=[a.pk for a in accounts],
        strategy_account_ids=[sa.pk for sa in links],
        keys=keys,
    )


def gateways_warm(account_ids: list[int]) -> float:
    """Create every follower's ccxt instance (markets shared), as a running leader has them; seconds taken."""
    from accounts.models import Account
    from exchanges.gateway import MarketType
    from exchanges.services import gateway_for

    started = time.perf_counter()
    for account in Account.objects.filter(pk__in=account_ids).iterator():
        gateway_for(account)._client(MarketType.FUTURES)  # type: ignore[attr-defined]
    return time.perf_counter() - started


class HttpTimer:
    """Times every ccxt HTTP request of this process (sync ccxt sends each through Exchange.fetch)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float, str]] = []  # ("POST /fapi/v1/order", seconds, error class or "")
        self.lock = threading.Lock()

    @contextmanager
    def installed(self) -> Iterator[HttpTimer]:
        import ccxt

        original = ccxt.Exchange.fetch
        timer = self

        def fetch(exchange: Any, url: str, method: str = "GET", *args: Any, **kwargs: Any) -> Any:
            name = f"{method} {urlparse(url).path}"
            t0 = time.perf_counter()
            error = ""
            try:
                return original(exchange, url, method, *args, **kwargs)
            except Exception as exc:
                error = type(exc).__name__
                raise
            finally:
                with timer.lock:
                    timer.calls.append((name, time.perf_counter() - t0, error))

        ccxt.Exchange.fetch = fetch
        try:
            yield self
        finally:
            ccxt.Exchange.fetch = original

    def take(self) -> list[tuple[str, float, str]]:
        with self.lock:
            calls, self.calls = self.calls, []
        return calls


CREATE = "POST /fapi/v1/order"


# --- the 1 s job and the memory sampler ------------------------------------------------------------


class Ticker:
    """The queue as the scheduler runs it: an in-process leader (scheduler.runner.SchedulerHost) whose only
    job is rebalance_order_queue on its 1 s interval, with the execution pools and, when `wake`, the
    JobWaker (intake's NOTIFY runs the queue at once). Tick times are read back from its SCHEDULED
    JobRun rows (APScheduler writes none for a tick it skips), so a skipped tick shows as a gap."""

    def __init__(self, *, wake: bool) -> None:
        self.wake = wake
        self.errors: list[str] = []
        self.host: Any = None
        self.thread: threading.Thread | None = None
        self.since = time.time()

    def start(self) -> None:
        from scheduler import runner
        from scheduler.registry import REGISTRY

        threads = ["orders.execution:ExecutionPools"] + (["scheduler.wake:JobWaker"] if self.wake else [])
        runner.LEADER_THREADS[:] = threads  # only what the queue needs (no streams, outbox, catch-ups)
        runner.LEADER_HOOKS[:] = []
        spec = next(s for s in REGISTRY if s.id == "rebalance_order_queue")
        self.host = runner.SchedulerHost(specs=[spec])
        self.since = time.time()
        self.thread = threading.Thread(target=self._run, name="bench-leader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.host.run()
        except Exception as exc:
            self.errors.append(f"leader: {type(exc).__name__}: {exc}")

    @property
    def starts(self) -> list[float]:
        """Wall start time of each scheduled run of the queue since start()."""
        from datetime import UTC, datetime

        from scheduler.models import JobRun

        runs = JobRun.objects.filter(
            job_id="rebalance_order_queue",
            kind=JobRun.Kind.SCHEDULED,
            started_at__gte=datetime.fromtimestamp(self.since, UTC),
        ).order_by("scheduled_at")
        return [at.timestamp() for at in runs.values_list("started_at", flat=True)]

    @property
    def wake_runs(self) -> int:
        from scheduler.models import JobRun

        return JobRun.objects.filter(job_id="rebalance_order_queue", kind=JobRun.Kind.WAKE).count()

    def wait_tick(self) -> float:
        """Block until the next scheduled run starts; its wall start time."""
        seen = len(self.starts)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            starts = self.starts
            if len(starts) > seen:
                return starts[-1]
            time.sleep(0.01)
        raise RuntimeError("the queue job did not tick within 30 s (is the leader up?)")

    def stop(self) -> None:
        from django.db import connection

        from scheduler.models import JobRun

        if self.host is not None:
            self.host.stop_event.set()
        if self.thread is not None:
            self.thread.join(60)
        if self.host is not None:
            self.host.lock.release()
        errors = JobRun.objects.filter(job_id="rebalance_order_queue", outcome=JobRun.Outcome.ERROR)
        self.errors += [f"queue run {r.kind}: {r.summary[:120]}" for r in errors[:3]]
        connection.close()


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of a process (this one by default) and its threads."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def postgres_cpu() -> dict[int, float]:
    """User + system CPU seconds of each PostgreSQL server process on this machine, by pid ({} when none is
    visible: a remote server). With `postgres_cpu_since`, the database's share of a window's CPU."""
    times = {}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        if proc.info["name"] == "postgres" and proc.info["cpu_times"] is not None:
            times[proc.pid] = proc.info["cpu_times"].user + proc.info["cpu_times"].system
    return times


def postgres_cpu_since(before: dict[int, float]) -> float:
    """CPU seconds the PostgreSQL processes used since `before` (those that ended meanwhile uncounted;
    NaN without a local server)."""
    now = postgres_cpu()
    return sum(t - before.get(pid, 0.0) for pid, t in now.items()) if now else math.nan


# The simulator's pid, for its CPU time over each run.
SIM: dict[str, int] = {}
# The pools' sizes measured against 0 (serial): the product defaults unless BENCH_FANOUT_WORKERS /
# BENCH_RECONCILE_WORKERS say otherwise.
WORKERS = {"queue": 16, "reconcile": 8}
# The sharded runs (bench.fanout_shards): how many scheduler processes (0: none), their environment and logs.
SHARDED: dict[str, Any] = {"count": 3}
# Seconds per create sent straight to the simulator: "serial" one after another, "concurrent" 16 at once.
CALIBRATION: dict[str, list[float]] = {}


class RssSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="bench-rss", daemon=True)
        self.process = psutil.Process()
        self.samples: list[tuple[float, float]] = []  # (wall time, MB)
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            self.samples.append((time.time(), self.process.memory_info().rss / 2**20))
            self.stop_event.wait(0.2)

    def window(self, start: float, end: float) -> tuple[float, float, float]:
        inside = [mb for t, mb in self.samples if start <= t <= end] or [self.samples[-1][1]]
        return inside[0], inside[-1], max(inside)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(5)


# --- the fan-out -----------------------------------------------------------------------------------


@dataclass
class FanoutResult:
    order_type: str
    n: int
    workers: int
    webhook_seconds: float = math.nan
    acks: list[float] = field(default_factory=list)  # seconds after the webhook returned
    not_acked: int = 0
    ended_otherwise: int = 0  # rejected or failed
    skipped_ticks: int = 0
    longest_gap: float = 0.0
    rss: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    warm_seconds: float = math.nan
    calls: list[tuple[str, float, str]] = field(default_factory=list)  # exchange HTTP requests after the webhook
    cpu: tuple[float, float] = (math.nan, math.nan)  # CPU seconds of (this process, the simulator) in the window
    postgres_cpu: float = math.nan  # CPU seconds of the local PostgreSQL server in the window
    errors: list[str] = field(default_factory=list)
    wake_runs: int = 0  # WAKE runs of the queue (intake's NOTIFY) in the window

    def figure(self, name: str) -> float:
        acks = self.acks
        return {
            "first_ack_s": min(acks, default=math.nan),
            "median_ack_s": percentile(acks, 0.5),
            "p99_ack_s": percentile(acks, 0.99),
            "last_ack_s": max(acks, default=math.nan) if not self.not_acked else math.nan,
            "acknowledged": len(acks),
            "skipped_ticks": self.skipped_ticks,
            "wake_runs": self.wake_runs,
            "longest_tick_gap_s": self.longest_gap,
            "rss_start_mb": self.rss[0],
            "rss_end_mb": self.rss[1],
            "rss_max_mb": self.rss[2],
            "exchange_calls": len(self.calls),
            "exchange_timeouts": sum(1 for _, _, error in self.calls if error == "RequestTimeout"),
            "create_call_p50_s": percentile([t for name, t, _ in self.calls if name == CREATE], 0.5),
            "create_call_p99_s": percentile([t for name, t, _ in self.calls if name == CREATE], 0.99),
            "leader_cpu_s": self.cpu[0],
            "simulator_cpu_s": self.cpu[1],
            "postgres_cpu_s": self.postgres_cpu,
        }[name]


def signal_payload(followers: Followers, order_type: str) -> dict[str, Any]:
    """The webhook body of the benchmark's signal: BUY SYMBOL at qty_per QTY_PER (a LIMIT rests LIMIT_BELOW)."""
    payload: dict[str, Any] = {
        "group_name": followers.group_name,
        "token": followers.token,
        "symbol": SYMBOL,
        "side": "BUY",
        "order_type": order_type,
        "qty_per": str(QTY_PER),
    }
    if order_type == "LIMIT":
        payload["price"] = str((last_price() * LIMIT_BELOW).quantize(Decimal("0.01"), rounding=ROUND_DOWN))
    return payload


def acks_wait(
    followers: Followers, n: int, *, returned: float, timeout: float, poll: Callable[[], None] = lambda: None
) -> tuple[dict[str, float], set[str]]:
    """Poll the followers' order events until all `n` orders are placed or ended otherwise (or `timeout`):
    (order key → seconds from `returned` to its `placed` event, keys rejected or failed). `poll` runs each round."""
    from orders.models import OrderEvent

    lo, hi = min(followers.account_ids), max(followers.account_ids)
    events = OrderEvent.objects.filter(account_id__gte=lo, account_id__lte=hi)
    acked: dict[str, float] = {}
    failed: set[str] = set()
    ended: set[str] = set()
    # This process is the one measured, so each round reads only the events of the last few rounds
    # (by id), not all of them again: ids are taken at insert and a transaction may commit after a
    # later one, so the window reaches back SEEN_ROUNDS rounds (~1 s) rather than to the last id seen.
    seen = deque([0], maxlen=SEEN_ROUNDS)
    kinds = (OrderEvent.Kind.PLACED, OrderEvent.Kind.REJECTED, OrderEvent.Kind.FAILED)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        poll()
        new = events.filter(pk__gt=seen[0], kind__in=kinds).order_by("pk")
        top = seen[-1]
        for pk, kind, key, at in new.values_list("pk", "kind", "order_key", "created_at"):
            top = max(top, pk)
            if kind == OrderEvent.Kind.PLACED:
                acked.setdefault(str(key), at.timestamp() - returned)
            else:
                failed.add(str(key))
        seen.append(top)
        ended = failed - set(acked)
        if len(acked) + len(ended) >= n:
            break
        time.sleep(0.2)
    return acked, ended


def fanout_run(
    *, order_type: str, n: int, workers: int, phase: float, sampler: RssSampler, timer: HttpTimer
) -> FanoutResult:
    """Fresh data, N followers, one webhook signal; the 1 s job until every order is acknowledged (or a timeout)."""
    from django.conf import settings
    from django.test import Client

    from orders.execution import execution_pool

    result = FanoutResult(order_type=order_type, n=n, workers=workers)
    data_reset()
    followers = followers_seed(n)
    market_data_refresh()  # the jobs refresh what active accounts use
    result.warm_seconds = gateways_warm(followers.account_ids)
    settings.EXECUTION_WORKERS = workers
    execution_pool("queue")  # sized now, so no pass pays for it
    payload = signal_payload(followers, order_type)
    client = Client()
    # A first request imports the URLconf and the views: a running web process has done that already.
    client.get("/api/webhook/")  # 405, after the URLconf and the view are loaded
    ticker = Ticker(wake=bool(workers))  # the serial baseline is the queue as it was: ticks only
    ticker.start()
    timeout = 60 + n * (0.3 if workers else 0.6)  # generous: the simulator bounds both modes
    try:
        ticker.wait_tick()
        tick = ticker.wait_tick()
        time.sleep(max(0.0, tick + phase - time.time()))
        timer.take()
        cpu0 = (cpu_seconds(), cpu_seconds(SIM["pid"]))
        pg0 = postgres_cpu()
        posted = time.time()
        response = client.post("/api/webhook/", data=json.dumps(payload), content_type="application/json")
        returned = time.time()
        result.webhook_seconds = returned - posted
        if response.status_code != 202:
            raise RuntimeError(f"webhook answered {response.status_code}: {response.content[:500]!r}")
        keys = {key for ks in response.json()["orders"].values() for key in ks}
        if len(keys) != n:
            raise RuntimeError(f"webhook queued {len(keys)} orders for {n} followers")
        acked, ended = acks_wait(followers, n, returned=returned, timeout=timeout)
        finished = time.time()
        result.cpu = (cpu_seconds() - cpu0[0], cpu_seconds(SIM["pid"]) - cpu0[1])
        result.postgres_cpu = postgres_cpu_since(pg0)
    finally:
        result.wake_runs = ticker.wake_runs
        ticker.stop()
        execution_pool("queue").drain(60)
    result.calls = timer.take()
    result.acks = sorted(acked.values())
    result.ended_otherwise = len(ended)
    result.not_acked = n - len(acked)
    starts = [t for t in ticker.starts if returned - TICK_SECONDS - SKIPPED_GAP <= t <= finished + TICK_SECONDS]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    result.skipped_ticks = sum(1 for g in gaps if g > SKIPPED_GAP)
    result.longest_gap = max(gaps, default=0.0)
    result.rss = sampler.window(returned, finished)
    result.errors = ticker.errors
    if result.not_acked:
        result.errors.append(f"{result.not_acked} of {n} not acknowledged within {timeout:.0f} s")
    return result


# --- the simulator's own ceiling -------------------------------------------------------------------


def simulator_calibrate(at_once: int = CALIBRATION_CREATES) -> tuple[list[float], list[float]]:
    """Seconds of `at_once` MARKET creates sent straight through the gateways, one after another and then
    all at once (one thread each): what the simulated exchange itself allows, without the queue."""
    from accounts.models import Account
    from exchanges.gateway import MarketType, OrderRequest, OrderType, Side
    from exchanges.services import gateway_for

    data_reset()
    followers = followers_seed(at_once)
    market_data_refresh()
    gateways_warm(followers.account_ids)
    quantity = (ALLOCATED * QTY_PER / 100 / last_price()).quantize(Decimal("0.001"), rounding=ROUND_DOWN)
    accounts = list(Account.objects.filter(pk__in=followers.account_ids))

    def create(account: Account, tag: str) -> float:
        from django.db import connection

        request = OrderRequest(
            symbol=SYMBOL,
            market_type=MarketType.FUTURES,
            side=Side.BUY,
            order_type=OrderType.MARKET,
            quantity=quantity,
            client_order_id=f"cal{tag}{account.pk}",
        )
        t0 = time.perf_counter()
        try:
            gateway_for(account).create_order(request)
        finally:
            connection.close()
        return time.perf_counter() - t0

    serial = [create(a, "s") for a in accounts]
    concurrent: list[float] = []
    threads = [threading.Thread(target=lambda a=a: concurrent.append(create(a, "c"))) for a in accounts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return serial, concurrent


# --- reconciliation --------------------------------------------------------------------------------


def reconcile_seed(accounts: int, orders: int) -> tuple[list[int], Decimal]:
    """`accounts` followers, each with `orders` resting BUY LIMIT orders live on the simulator and as OpenOrders."""
    from django.utils import timezone

    from exchanges.models import SimOrder
    from orders.models import OpenOrder

    followers = followers_seed(accounts)
    market_data_refresh()
    price = (last_price() * Decimal("0.5")).quantize(Decimal("0.01"), rounding=ROUND_DOWN)
    now = timezone.now()
    quantity = Decimal("0.01")
    sim_rows = []
    for key in followers.keys:
        for j in range(orders):
            sim_rows.append(
                SimOrder(
                    exchange="BINANCE",
                    account=key,
                    market_type="FUTURES",
                    symbol=SYMBOL,
                    side="BUY",
                    order_type="LIMIT",
                    client_order_id=f"bench-{secrets.token_hex(8)}-{j}",
                    quantity=quantity,
                    price=price - j,
                    fee_currency="USDT",
                    created_at=now,
                    updated_at=now,
                )
            )
    sim_rows = SimOrder.objects.bulk_create(sim_rows, batch_size=1000)
    seq = time.time_ns()
    open_rows = []
    for index, sim in enumerate(sim_rows):
        i = index // orders
        open_rows.append(
            OpenOrder(
                client_order_id=sim.client_order_id,
                placement_no=1,
                strategy_account_id=followers.strategy_account_ids[i],
                account_id=followers.account_ids[i],
                symbol=SYMBOL,
                market_type="FUTURES",
                side="BUY",
                order_type="LIMIT",
                price=sim.price,
                quantity=quantity,
                signal_at=now,
                queue_seq=seq + index,
                exchange_order_id=str(sim.pk),
                status=OpenOrder.Status.NEW,
                last_seen_at=now,
            )
        )
    OpenOrder.objects.bulk_create(open_rows, batch_size=1000)
    return followers.account_ids, price


@dataclass
class ReconcileResult:
    workers: int
    accounts: int
    seconds: float = math.nan
    rss: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    summary: str = ""
    warm_seconds: float = math.nan
    calls: int = 0
    cpu: tuple[float, float] = (math.nan, math.nan)
    postgres_cpu: float = math.nan


def reconcile_run(*, accounts: int, workers: int, sampler: RssSampler, timer: HttpTimer) -> ReconcileResult:
    from django.conf import settings

    from orders.execution import execution_pool
    from orders.jobs import update_open_orders
    from scheduler.models import JobRun

    result = ReconcileResult(workers=workers, accounts=accounts)
    data_reset()
    account_ids, _ = reconcile_seed(accounts, RECONCILE_ORDERS)
    result.warm_seconds = gateways_warm(account_ids)
    settings.RECONCILE_WORKERS = workers
    pool = execution_pool("reconcile")
    timer.take()
    cpu0 = (cpu_seconds(), cpu_seconds(SIM["pid"]))
    pg0 = postgres_cpu()
    started = time.time()
    t0 = time.perf_counter()
    update_open_orders()
    pool.drain(600)
    result.seconds = time.perf_counter() - t0
    result.cpu = (cpu_seconds() - cpu0[0], cpu_seconds(SIM["pid"]) - cpu0[1])
    result.postgres_cpu = postgres_cpu_since(pg0)
    result.calls = len(timer.take())
    result.rss = sampler.window(started, time.time())
    run = JobRun.objects.filter(job_id="update_open_orders").order_by("-id").first()
    result.summary = run.summary if run else ""
    return result


# --- report ----------------------------------------------------------------------------------------

FANOUT_FIGURES = (
    "first_ack_s",
    "median_ack_s",
    "p99_ack_s",
    "last_ack_s",
    "acknowledged",
    "skipped_ticks",
    "wake_runs",
    "longest_tick_gap_s",
    "rss_start_mb",
    "rss_end_mb",
    "rss_max_mb",
    "exchange_calls",
    "exchange_timeouts",
    "create_call_p50_s",
    "create_call_p99_s",
    "leader_cpu_s",
    "simulator_cpu_s",
    "postgres_cpu_s",
)


def _shown(value: float) -> float:
    return int(value) if isinstance(value, int) else value


# Not measured for the sharded runs: their exchange calls happen in other processes (no HttpTimer
# there), and their RSS is sampled as the largest process's peak only.
NOT_SHARDED_FIGURES = {
    "rss_start_mb",
    "rss_end_mb",
    "exchange_calls",
    "exchange_timeouts",
    "create_call_p50_s",
    "create_call_p99_s",
}


def fanout_lines(value: FanoutResult, baseline: FanoutResult | None) -> list[str]:
    lines = []
    for name in FANOUT_FIGURES:
        if value.workers < 0 and name in NOT_SHARDED_FIGURES:
            continue
        own = value.figure(name)
        base = baseline.figure(name) if baseline is not None else None
        where = f"N={value.n}" + (f",{-value.workers} schedulers" if value.workers < 0 else "")
        label = f"fanout_{value.order_type.lower()}_{name}[{where}]"
        if isinstance(own, float) and math.isnan(own):
            lines.append(f"{label:52} {'-':>10} {'-' if base is None else _fmt_nan(base):>10} {'-':>10}")
            continue
        if base is not None and isinstance(base, float) and math.isnan(base):
            base = None
        lines.append(line(label, _shown(own), base))
    return lines


def _fmt_nan(value: float) -> str:
    from bench.support import fmt

    return "-" if isinstance(value, float) and math.isnan(value) else fmt(value)


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def goals(fanouts: dict[tuple[str, int, int], FanoutResult], reconciles: dict[int, ReconcileResult]) -> list[str]:
    lines = []
    for (order_type, n, workers), r in sorted(fanouts.items()):
        if workers <= 0:
            continue  # the serial baselines and the sharded runs (reported beside the single process)
        if n == 100:
            last = r.figure("last_ack_s")
            lines.append(
                f"# goal {order_type} N=100 all acknowledged <= {GOAL_ALL_100:.0f} s after the webhook returns: "
                f"{verdict(not math.isnan(last) and last <= GOAL_ALL_100)} "
                f"({'-' if math.isnan(last) else f'{last:.3f} s'}; {len(r.acks)}/{n} acknowledged)"
            )
        if n == 1000:
            p99 = r.figure("p99_ack_s")
            ok = not math.isnan(p99) and p99 <= GOAL_P99_1000 and not r.not_acked
            lines.append(
                f"# goal {order_type} N=1000 p99 acknowledged <= {GOAL_P99_1000:.0f} s: {verdict(ok)} "
                f"({'-' if math.isnan(p99) else f'{p99:.3f} s'}; {len(r.acks)}/{n} acknowledged)"
            )
    concurrent_reconcile = [r for w, r in reconciles.items() if w > 0]
    for rr in concurrent_reconcile:
        if rr.accounts == 1000:
            lines.append(
                f"# goal reconciliation of 1000 accounts <= {GOAL_RECONCILE:.0f} s: "
                f"{verdict(rr.seconds <= GOAL_RECONCILE)} ({rr.seconds:.2f} s)"
            )
    concurrent = [r for (_, _, w), r in fanouts.items() if w > 0]
    if concurrent:
        skipped = sum(r.skipped_ticks for r in concurrent)
        lines.append(f"# goal 0 skipped ticks (concurrent runs): {verdict(skipped == 0)} ({skipped})")
        rss = max([r.rss[2] for r in concurrent] + [rr.rss[2] for rr in concurrent_reconcile])
        lines.append(
            f"# goal RSS < {GOAL_RSS_MB:.0f} MB (concurrent runs): {verdict(rss < GOAL_RSS_MB)} ({rss:.0f} MB max)"
        )
    return lines


# --- main ------------------------------------------------------------------------------------------


def _sizes(name: str, default: str) -> list[int]:
    return [int(x) for x in os.environ.get(name, default).split(",") if x.strip()]


def main() -> int:
    sizes = _sizes("BENCH_FANOUT_N", "100,1000")
    types = [t.strip().upper() for t in os.environ.get("BENCH_FANOUT_TYPES", "MARKET,LIMIT").split(",") if t.strip()]
    serial_max = int(os.environ.get("BENCH_FANOUT_SERIAL_MAX", "1000"))
    reconcile_accounts = int(os.environ.get("BENCH_RECONCILE_ACCOUNTS", "1000"))
    phase = float(os.environ.get("BENCH_FANOUT_PHASE", "0.5"))
    WORKERS["queue"] = int(os.environ.get("BENCH_FANOUT_WORKERS", "48"))
    WORKERS["reconcile"] = int(os.environ.get("BENCH_RECONCILE_WORKERS", "32"))
    SHARDED["count"] = int(os.environ.get("BENCH_FANOUT_SCHEDULERS", "3"))
    if min(WORKERS.values()) < 1:
        print("BENCH_FANOUT_WORKERS and BENCH_RECONCILE_WORKERS are pool sizes (>= 1)", file=sys.stderr)
        return 2
    keep = os.environ.get("BENCH_KEEP") == "1"
    admin_url = os.environ.get("BENCH_PG_ADMIN_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    db_url = urlparse(admin_url)._replace(path=f"/ts_bench_fanout_{os.getpid()}").geturl()

    from cryptography.fernet import Fernet

    work = Path(tempfile.mkdtemp(prefix="tradingsite-bench-fanout-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = bench_env(db_url, work)
    env.update(
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        FIELD_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        EXCHANGE_URL_OVERRIDES=json.dumps({"BINANCE": base, "BYBIT": base}),
        EXECUTION_WORKERS=str(WORKERS["queue"]),
        RECONCILE_WORKERS=str(WORKERS["reconcile"]),
        # This process is the single scheduler of the value and baseline runs: it owns every account.
        # (The sharded runs' processes have sharding on: bench.fanout_shards.)
        SCHEDULER_SHARDING="off",
    )
    SHARDED.update(env=env, work=work)
    log(f"database {db_url.rsplit('/', 1)[1]}, simulator on {base}, work dir {work}")
    pg_recreate(db_url)
    proc: subprocess.Popen | None = None
    failed = False
    try:
        migrate(env)
        followers = max([*sizes, reconcile_accounts, CALIBRATION_CREATES])
        proc = start_simexchange(env, port, work / "runsimexchange.log", followers=followers)
        SIM["pid"] = proc.pid
        from bench.support import django_start

        django_start(env)
        failed = _measure(
            sizes=sizes, types=types, serial_max=serial_max, reconcile_accounts=reconcile_accounts, phase=phase
        )
    except Exception as exc:
        failed = True
        traceback.print_exc()
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if "django.db" in sys.modules:
            from django.db import connections

            from orders.execution import execution_pools_close

            execution_pools_close(30)
            connections.close_all()
        if proc is not None:
            code = stop_process(proc)
            if code != 0:
                print(f"runsimexchange exited with {code}; log: {work / 'runsimexchange.log'}", file=sys.stderr)
        if keep:
            print(f"# kept database {db_url.rsplit('/', 1)[1]} and {work}")
        else:
            pg_recreate(db_url, drop_only=True)
            if failed:
                print(f"# kept {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


def _measure(*, sizes: list[int], types: list[str], serial_max: int, reconcile_accounts: int, phase: float) -> bool:
    from exchanges.simulator.engine import default_engine

    for endpoint in LATENCY_ENDPOINTS:
        default_engine.fault_add(
            "latency", exchange="BINANCE", endpoint=endpoint, remaining=None, latency_ms=LATENCY_MS
        )
    sampler = RssSampler()
    sampler.start()
    timer = HttpTimer()
    fanouts: dict[tuple[str, int, int], FanoutResult] = {}
    reconciles: dict[int, ReconcileResult] = {}
    failed = False
    with timer.installed():
        try:
            failed = _runs(fanouts, reconciles, sizes, types, serial_max, reconcile_accounts, phase, sampler, timer)
        finally:
            sampler.stop()
    print(_report(fanouts, reconciles, sizes, types, serial_max, reconcile_accounts, phase))
    return failed


def _runs(
    fanouts: dict[tuple[str, int, int], FanoutResult],
    reconciles: dict[int, ReconcileResult],
    sizes: list[int],
    types: list[str],
    serial_max: int,
    reconcile_accounts: int,
    phase: float,
    sampler: RssSampler,
    timer: HttpTimer,
) -> bool:
    """Every run, concurrent first then its serial baseline; True when one failed or left orders unacknowledged."""
    failed = False
    log("simulator calibration: 16 creates one after another, then 16 at once ...")
    calibration = _guarded(simulator_calibrate)
    if calibration is not None:
        CALIBRATION["serial"], CALIBRATION["concurrent"] = calibration
    for order_type in types:
        for n in sizes:
            for workers in (WORKERS["queue"], 0):
                if not workers and n > serial_max:
                    continue
                log(f"fan-out {order_type} N={n} EXECUTION_WORKERS={workers} ...")
                r = _guarded(
                    fanout_run, order_type=order_type, n=n, workers=workers, phase=phase, sampler=sampler, timer=timer
                )
                if r is None:
                    failed = True
                    continue
                fanouts[(order_type, n, workers)] = r
                failed = failed or bool(r.not_acked)
                log(
                    f"  webhook {r.webhook_seconds:.2f} s, ccxt warm-up {r.warm_seconds:.1f} s, "
                    f"{r.figure('exchange_calls')} exchange calls ({r.figure('exchange_timeouts')} timed out, "
                    f"create p50 {r.figure('create_call_p50_s'):.3f} s p99 {r.figure('create_call_p99_s'):.3f} s), "
                    f"{len(r.acks)}/{n} acknowledged, last {r.figure('last_ack_s'):.2f} s, "
                    f"{r.skipped_ticks} skipped ticks{'; ' + '; '.join(r.errors[:3]) if r.errors else ''}"
                )
    count = SHARDED["count"]
    if count:
        from bench.fanout_shards import sharded_fanout_run, sharded_reconcile_run

        for order_type in types:
            for n in sizes:
                log(f"fan-out {order_type} N={n} on {count} sharded schedulers ...")
                r = _guarded(
                    sharded_fanout_run,
                    order_type=order_type,
                    n=n,
                    count=count,
                    phase=phase,
                    env=SHARDED["env"],
                    work=SHARDED["work"],
                    sim_pid=SIM["pid"],
                )
                if r is None:
                    failed = True
                    continue
                fanouts[(order_type, n, -count)] = r
                failed = failed or bool(r.not_acked)
                log(
                    f"  ready in {r.warm_seconds:.1f} s, {len(r.acks)}/{n} acknowledged, "
                    f"last {r.figure('last_ack_s'):.2f} s, {r.skipped_ticks} skipped ticks"
                    f"{'; ' + '; '.join(r.errors[:3]) if r.errors else ''}"
                )
        if reconcile_accounts:
            log(f"reconcile {reconcile_accounts} accounts x {RECONCILE_ORDERS} on {count} sharded schedulers ...")
            rr = _guarded(
                sharded_reconcile_run,
                accounts=reconcile_accounts,
                count=count,
                env=SHARDED["env"],
                work=SHARDED["work"],
                sim_pid=SIM["pid"],
            )
            if rr is None:
                failed = True
            else:
                reconciles[-count] = rr
                log(f"  {rr.seconds:.2f} s: {rr.summary}")
    if reconcile_accounts:
        for workers in (WORKERS["reconcile"], 0):
            if not workers and reconcile_accounts > serial_max:
                continue
            log(f"reconcile {reconcile_accounts} accounts x {RECONCILE_ORDERS} RECONCILE_WORKERS={workers} ...")
            rr = _guarded(reconcile_run, accounts=reconcile_accounts, workers=workers, sampler=sampler, timer=timer)
            if rr is None:
                failed = True
                continue
            reconciles[workers] = rr
            log(
                f"  {rr.seconds:.2f} s, {rr.calls} exchange calls, CPU s leader {rr.cpu[0]:.1f} "
                f"simulator {rr.cpu[1]:.1f} PostgreSQL {rr.postgres_cpu:.1f}, "
                f"ccxt warm-up {rr.warm_seconds:.1f} s: {rr.summary}"
            )
    return failed


def _guarded(fn: Callable[..., Any], **kwargs: Any) -> Any:
    try:
        return fn(**kwargs)
    except Exception as exc:
        traceback.print_exc()
        log(f"  failed: {type(exc).__name__}: {exc}")
        return None


def _report(
    fanouts: dict[tuple[str, int, int], FanoutResult],
    reconciles: dict[int, ReconcileResult],
    sizes: list[int],
    types: list[str],
    serial_max: int,
    reconcile_accounts: int,
    phase: float,
) -> str:
    out = [
        f"# fan-out: one webhook signal to N followers (BINANCE FUTURES {SYMBOL}, each its own simulator account), "
        f"runsimexchange + real ccxt, {LATENCY_MS} ms latency on {', '.join(LATENCY_ENDPOINTS)}, PostgreSQL; "
        f"rebalance_order_queue every {TICK_SECONDS:.0f} s on an in-process leader (JobWaker on for the value, "
        f"off for the baseline), webhook {phase:g} s into a tick; "
        f"value = EXECUTION_WORKERS={WORKERS['queue']}, "
        "baseline = EXECUTION_WORKERS=0 (serial) on fresh data in the same run; "
        "seconds from the webhook's return to each order's `placed` event",
        header(),
    ]
    if CALIBRATION.get("concurrent"):
        concurrent, serial = CALIBRATION["concurrent"], CALIBRATION["serial"]
        out.append(
            "# simulator ceiling: 16 MARKET creates straight through the gateways, all at once "
            "(value) against one after another (baseline), no queue"
        )
        out.append(line("simulator_create_p50_s[16 at once]", percentile(concurrent, 0.5), percentile(serial, 0.5)))
        out.append(line("simulator_create_max_s[16 at once]", max(concurrent), max(serial)))
    for order_type in types:
        for n in sizes:
            value = fanouts.get((order_type, n, WORKERS["queue"]))
            baseline = fanouts.get((order_type, n, 0))
            if value is None:
                out.append(f"# fan-out {order_type} N={n}: no result (see the errors above)")
                continue
            if n > serial_max:
                out.append(f"# {order_type} N={n}: serial baseline not run (N > BENCH_FANOUT_SERIAL_MAX={serial_max})")
            out.extend(fanout_lines(value, baseline))
    count = SHARDED["count"]
    sharded = {(t, n): r for (t, n, w), r in fanouts.items() if w == -count}
    if sharded:
        out.append(
            f"# sharded: the same signal with the followers' accounts sharded over {count} scheduler processes "
            f"(bench.fanout_shards; per process EXECUTION_WORKERS=16, RECONCILE_WORKERS=11, own egress address); "
            f"value = {count} schedulers, baseline = the single process (EXECUTION_WORKERS={WORKERS['queue']}) above; "
            "RSS is the largest process's, CPU the processes' sum"
        )
        for (order_type, n), r in sorted(sharded.items()):
            out.extend(fanout_lines(r, fanouts.get((order_type, n, WORKERS["queue"]))))
    if reconciles:
        value_r, base_r = reconciles.get(WORKERS["reconcile"]), reconciles.get(0)
        out.append(
            f"# reconciliation: {reconcile_accounts} accounts x {RECONCILE_ORDERS} live orders, one update_open_orders "
            "until its last account market is done; "
            f"value = RECONCILE_WORKERS={WORKERS['reconcile']}, baseline = RECONCILE_WORKERS=0"
        )
        label = f"[{reconcile_accounts}x{RECONCILE_ORDERS}]"
        if reconcile_accounts > serial_max:
            out.append(
                f"# serial baseline not run ({reconcile_accounts} accounts > BENCH_FANOUT_SERIAL_MAX={serial_max})"
            )
        if value_r is not None:
            base_s = base_r.seconds if base_r is not None else None
            out.append(line(f"reconcile_seconds{label}", value_r.seconds, base_s))
            out.append(line(f"reconcile_rss_max_mb{label}", value_r.rss[2], base_r.rss[2] if base_r else None))
            out.append(line(f"reconcile_exchange_calls{label}", value_r.calls, base_r.calls if base_r else None))
            out.append(line(f"reconcile_leader_cpu_s{label}", value_r.cpu[0], base_r.cpu[0] if base_r else None))
            out.append(line(f"reconcile_simulator_cpu_s{label}", value_r.cpu[1], base_r.cpu[1] if base_r else None))
            base_pg = base_r.postgres_cpu if base_r else None
            out.append(line(f"reconcile_postgres_cpu_s{label}", value_r.postgres_cpu, base_pg))
            out.append(f"# reconcile job summary (when the job returned): {value_r.summary[:200]}")
        shard_r = reconciles.get(-count) if count else None  # -0 is the serial baseline's key
        if shard_r is not None:
            out.append(
                f"# reconciliation on {count} sharded schedulers (value; each its own accounts at its first tick, "
                "the slowest process) against the single process (baseline)"
            )
            own = value_r.seconds if value_r is not None else None
            out.append(line(f"reconcile_seconds{label}[{count} schedulers]", shard_r.seconds, own))
            out.append(
                line(
                    f"reconcile_rss_max_mb{label}[{count} schedulers]",
                    shard_r.rss[2],
                    value_r.rss[2] if value_r else None,
                )
            )
            out.append(f"# per process: {shard_r.summary[:400]}")
    out.extend(goals(fanouts, reconciles))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
