"""The simulated exchange's own ceiling: N MARKET creates from N distinct accounts, at once against one after another.

Run: `DATABASE_URL=postgres://... python -m bench.simcreates` (PostgreSQL: SQLite serializes every
writer whatever the engine does). The simulator's tables (Sim*) of that database are emptied first;
nothing else is touched. Two layers, each on fresh accounts:
  engine — N SimEngine.order_create calls, one per account, handed at once to a pool of
           BENCH_SIMCREATES_THREADS threads (one database connection each): what the engine's
           locks allow;
  server — `runsimexchange` on a free port (`--keys`: one API key per client, one engine account
           each; `--db-threads` from
           BENCH_SIMCREATES_DB_THREADS when set) and N client threads, each sending one Binance
           USDⓈ-M MARKET create through its own CcxtGateway: the server's executor and HTTP path too,
           with a latency fault of BENCH_SIMCREATES_LATENCY_MS (100, as bench.fanout) on every create.
Printed per (layer, N): seconds per create one after another (p50, max, sum) as the baseline, then
the same N all at once (p50, max, wall time until the last is done), with the ratio to the baseline;
and the database sessions waiting for a lock (pg_stat_activity, sampled every 5 ms while the N run
at once: the largest count and the mean), which is what an exchange-wide lock shows and CPU load
does not. On a loaded 2-core machine the times are CPU-bound; the lock waits are not.
Environment: BENCH_SIMCREATES_N ("16,64"), BENCH_SIMCREATES_LAYERS ("engine,server"),
BENCH_SIMCREATES_THREADS (16), BENCH_SIMCREATES_DB_THREADS (unset: the command's default),
BENCH_SIMCREATES_LATENCY_MS (100; 0 for none). Mind
PostgreSQL's max_connections: the pool and the server each hold up to their thread count.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYMBOL = "ETH/USDT"
PRICE = "3000"
QUANTITY = Decimal("0.05")
SIM_TABLES = (
    "simfill",
    "simorder",
    "simbalance",
    "simposition",
    "simaccount",
    "simfault",
    "simpricepath",
    "simexchange",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def p50(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def sim_reset() -> None:
    """Every simulator table emptied (those this code version has), the price of SYMBOL fixed on both exchanges."""
    from django.db import connection

    from exchanges.simulator.engine import default_engine

    existing = set(connection.introspection.table_names())
    tables = [f"exchanges_{t}" for t in SIM_TABLES if f"exchanges_{t}" in existing]
    with connection.cursor() as cursor:
        cursor.execute("TRUNCATE " + ", ".join(tables) + " CASCADE")
    for exchange in ("PAPER", "BINANCE"):
        default_engine.price_script(exchange, SYMBOL, [PRICE])


def at_once(calls: list[Callable[[], None]], threads: int) -> tuple[list[float], float]:
    """The calls handed at once to `threads` threads; (seconds from the hand-over to each call's end, wall)."""
    from core.executors import DbExecutor

    took: list[float] = []
    errors: list[BaseException] = []

    def run(call: Callable[[], None], t0: float) -> None:
        try:
            call()
            took.append(time.perf_counter() - t0)
        except BaseException as exc:  # reported below
            errors.append(exc)

    pool = DbExecutor(threads, thread_name_prefix="bench")
    try:
        t0 = time.perf_counter()
        for future in [pool.submit(run, call, t0) for call in calls]:
            future.result(300)
        wall = time.perf_counter() - t0
    finally:
        pool.close()  # and every connection its threads opened
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(calls)} creates failed; first: {errors[0]!r}")
    return took, wall


class LockWaits:
    """Samples, in a thread of its own, how many sessions of this database wait for a lock."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.statements: Counter[str] = Counter()  # what the waiters were running, per sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from django.db import connection

        try:
            with connection.cursor() as cursor:
                while not self._stop.is_set():
                    cursor.execute(
                        "SELECT left(query, 60) FROM pg_stat_activity"
                        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                    )
                    waiting = [row[0] for row in cursor.fetchall()]
                    self.samples.append(len(waiting))
                    self.statements.update(waiting)
                    time.sleep(0.005)
        finally:
            connection.close()

    def __enter__(self) -> LockWaits:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def one_after_another(calls: list[Callable[[], None]]) -> list[float]:
    took = []
    for call in calls:
        t0 = time.perf_counter()
        call()
        took.append(time.perf_counter() - t0)
    return took


def engine_creates(n: int, tag: str) -> list[Callable[[], None]]:
    from exchanges.gateway import MarketType, OrderRequest, OrderType, Side
    from exchanges.simulator.engine import default_engine

    def create(i: int) -> None:
        request = OrderRequest(
            symbol=SYMBOL,
            market_type=MarketType.FUTURES,
            side=Side.BUY,
            order_type=OrderType.MARKET,
            quantity=QUANTITY,
            client_order_id=f"bench-{tag}-{i}",
        )
        default_engine.order_create("PAPER", f"bench-{tag}-{i}", request)

    return [functools.partial(create, i) for i in range(n)]


def server_creates(n: int, tag: str, base: str) -> list[Callable[[], None]]:
    from bench.fanout import FOLLOWER_KEY_PREFIX, SIM_SECRET
    from exchanges.ccxt_gateway import CcxtGateway
    from exchanges.gateway import MarketType, OrderRequest, OrderType, Side

    gateways = []
    for i in range(n):
        key = f"{FOLLOWER_KEY_PREFIX}{tag}{i:04d}"
        gateway = CcxtGateway("binance", MarketType.FUTURES, key, SIM_SECRET, account_key=key, retries=0)
        gateway.load_markets(MarketType.FUTURES)  # warm: not timed
        gateways.append(gateway)

    def create(gateway: CcxtGateway, i: int) -> None:
        gateway.create_order(
            OrderRequest(
                symbol=SYMBOL,
                market_type=MarketType.FUTURES,
                side=Side.BUY,
                order_type=OrderType.MARKET,
                quantity=QUANTITY,
                client_order_id=f"bench{tag}{i}",
            )
        )

    return [functools.partial(create, g, i) for i, g in enumerate(gateways)]


def line(name: str, value: float, baseline: float) -> str:
    return f"{name:<44} {value:>9.4f} {baseline:>9.4f} {value / baseline:>8.2f}x"


def measure(layer: str, n: int, base: str, threads: int) -> list[str]:
    sim_reset()
    latency = int(os.environ.get("BENCH_SIMCREATES_LATENCY_MS", "100"))
    if layer == "server" and latency:
        from exchanges.simulator.engine import default_engine

        default_engine.fault_add(
            "latency", exchange="BINANCE", endpoint="create_order", remaining=None, latency_ms=latency
        )
    make = (lambda tag: engine_creates(n, tag)) if layer == "engine" else (lambda tag: server_creates(n, tag, base))
    serial = one_after_another(make("s"))
    calls = make("c")
    with LockWaits() as waits:
        concurrent, wall = at_once(calls, threads if layer == "engine" else n)
    mean_waits = sum(waits.samples) / max(len(waits.samples), 1)
    return [
        line(f"{layer}_create_p50_s[{n} at once]", p50(concurrent), p50(serial)),
        line(f"{layer}_create_max_s[{n} at once]", max(concurrent), max(serial)),
        line(f"{layer}_all_done_s[{n} at once]", wall, sum(serial)),
        f"{layer}_lock_waiters[{n} at once]".ljust(44) + f" max {max(waits.samples, default=0)}, mean {mean_waits:.2f}"
        f" ({len(waits.samples)} samples)",
        *(f"#   waiting {count}x in: {statement}" for statement, count in waits.statements.most_common(3)),
    ]


def main() -> int:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradingsite.settings")
    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from bench.fanout import free_port, stop_process
    from exchanges import ccxt_gateway

    if connection.vendor != "postgresql":
        log("bench.simcreates needs PostgreSQL: set DATABASE_URL=postgres://...")
        return 2
    call_command("migrate", verbosity=0)
    sizes = [int(s) for s in os.environ.get("BENCH_SIMCREATES_N", "16,64").split(",")]
    layers = os.environ.get("BENCH_SIMCREATES_LAYERS", "engine,server").split(",")
    threads = int(os.environ.get("BENCH_SIMCREATES_THREADS", "16"))
    out = [f"{'figure':<44} {'value':>9} {'serial':>9} {'ratio':>9}"]
    proc = None
    base = ""
    try:
        if "server" in layers:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            env = dict(os.environ, DJANGO_SETTINGS_MODULE="tradingsite.settings")
            log_path = Path(tempfile.gettempdir()) / f"bench-simcreates-{os.getpid()}.log"
            proc = start_server(env, port, log_path, n=max(sizes))
            settings.EXCHANGE_URL_OVERRIDES = {"BINANCE": base}
            ccxt_gateway.caches_clear()
        for layer in layers:
            for n in sizes:
                log(f"{layer}: {n} creates one after another, then {n} at once ...")
                out.extend(measure(layer, n, base, threads))
    finally:
        if proc is not None:
            stop_process(proc)
    print("\n".join(out))
    return 0


def start_server(env: dict[str, str], port: int, log_path: Path, *, n: int) -> subprocess.Popen:
    """`manage.py runsimexchange` serving the keys of server_creates (tags "s" and "c", `n` each), ready."""
    import requests

    from bench.fanout import FOLLOWER_KEY_PREFIX, SIM_SECRET

    keys_path = log_path.with_suffix(".keys")
    keys_path.write_text(
        "".join(f"{FOLLOWER_KEY_PREFIX}{tag}{i:04d}:{SIM_SECRET}\n" for tag in ("s", "c") for i in range(n))
    )
    command = [sys.executable, str(ROOT / "manage.py"), "runsimexchange", "--port", str(port), "--keys", str(keys_path)]
    if os.environ.get("BENCH_SIMCREATES_DB_THREADS"):
        command += ["--db-threads", os.environ["BENCH_SIMCREATES_DB_THREADS"]]
    with log_path.open("w") as handle:
        proc = subprocess.Popen(  # noqa: S603 - our own manage.py
            command,
            cwd=ROOT,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 120
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
    raise RuntimeError("runsimexchange did not answer within 120 s")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
