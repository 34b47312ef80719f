"""The simulated exchange's own ceiling: N MARKET creates from N distinct accounts, at once against one after another.

Run: `DATABASE_URL=postgres://... python -m bench.simcreates` (PostgreSQL: SQLite serializes every
writer whatever the engine does). The simulator's tables (Sim*) of that database are emptied first;
nothing else is touched. Two layers, each on fresh accounts:
  engine — N threads, each calling SimEngine.order_create once for its own account (one connection
           each): what the engine's locks allow;
  server — `runsimexchange` on a free port (through bench.fanout's child, which accepts one API key
           per follower: one engine account each) and N threads, each sending one Binance USDⓈ-M
           MARKET create through its own CcxtGateway: the server's executor and HTTP path too.
Printed per (layer, N): seconds per create one after another (p50) as the baseline, then the same N
all at once (p50, max, wall time for all of them), with the ratio to the baseline.
Environment: BENCH_SIMCREATES_N ("16,64"); BENCH_SIMCREATES_LAYERS ("engine,server").
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile
import threading
import time
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


def at_once(calls: list[Callable[[], None]]) -> tuple[list[float], float]:
    """Each call in its own thread, released together; (seconds per call, wall seconds for all)."""
    from django.db import connection

    barrier = threading.Barrier(len(calls) + 1)
    took: list[float] = []
    errors: list[BaseException] = []

    def run(call: Callable[[], None]) -> None:
        try:
            barrier.wait(60)
            t0 = time.perf_counter()
            call()
            took.append(time.perf_counter() - t0)
        except BaseException as exc:  # reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    barrier.wait(60)
    t0 = time.perf_counter()
    for thread in threads:
        thread.join(300)
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} of {len(calls)} creates failed; first: {errors[0]!r}")
    return took, wall


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


def measure(layer: str, n: int, base: str) -> list[str]:
    sim_reset()
    make = (lambda tag: engine_creates(n, tag)) if layer == "engine" else (lambda tag: server_creates(n, tag, base))
    serial = one_after_another(make("s"))
    concurrent, wall = at_once(make("c"))
    return [
        line(f"{layer}_create_p50_s[{n} at once]", p50(concurrent), p50(serial)),
        line(f"{layer}_create_max_s[{n} at once]", max(concurrent), max(serial)),
        line(f"{layer}_all_done_s[{n} at once]", wall, sum(serial)),
    ]


def main() -> int:
    import django

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradingsite.settings")
    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.db import connection

    from bench.fanout import free_port, start_simexchange, stop_process
    from exchanges import ccxt_gateway

    if connection.vendor != "postgresql":
        log("bench.simcreates needs PostgreSQL: set DATABASE_URL=postgres://...")
        return 2
    call_command("migrate", verbosity=0)
    sizes = [int(s) for s in os.environ.get("BENCH_SIMCREATES_N", "16,64").split(",")]
    layers = os.environ.get("BENCH_SIMCREATES_LAYERS", "engine,server").split(",")
    out = [f"{'figure':<44} {'value':>9} {'serial':>9} {'ratio':>9}"]
    proc = None
    base = ""
    try:
        if "server" in layers:
            port = free_port()
            base = f"http://127.0.0.1:{port}"
            env = dict(os.environ, DJANGO_SETTINGS_MODULE="tradingsite.settings")
            proc = start_simexchange(env, port, Path(tempfile.gettempdir()) / f"bench-simcreates-{os.getpid()}.log")
            settings.EXCHANGE_URL_OVERRIDES = {"BINANCE": base}
            ccxt_gateway.caches_clear()
        for layer in layers:
            for n in sizes:
                log(f"{layer}: {n} creates one after another, then {n} at once ...")
                out.extend(measure(layer, n, base))
    finally:
        if proc is not None:
            stop_process(proc)
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
