"""Price refresh for 2,000 symbols and shared ccxt markets, each against a baseline in the same run (SPEC §9).

Setup: a temporary SQLite database migrated in-process, and `manage.py runsimexchange` as a
separate process on it (127.0.0.1, a free port) whose catalog is grown with generated symbols
(SIMULATOR_SYNTHETIC_SYMBOLS) so that Binance spot lists BENCH_SYMBOLS (2,000) symbols. Real ccxt
talks to it through EXCHANGE_URL_OVERRIDES. Nothing leaves 127.0.0.1.

Figures (one line each: name, value, baseline, ratio = value / baseline):
  price refresh — the project's path, exchanges.services.price_cache_refresh: one bulk
    `fetch_last_prices` for (BINANCE, SPOT) and one chunked bulk upsert into PriceQuote; against
    a per-symbol baseline: one /api/v3/ticker/price?symbol= call (Binance's cheapest per-symbol
    price) and one PriceQuote save (update_or_create) per symbol. Exchange calls are HTTP requests
    counted at ccxt's transport; seconds are the median of BENCH_REPEAT passes (the baseline runs
    once: it is the slow side). ccxt's rate limiter is off for both (BENCH_RATE_LIMIT=1 turns it
    on; the baseline then waits for Binance's request weights like a real account would).
  markets memory — 10 account ccxt instances sharing one market load (CcxtGateway: one key-less
    loader, set_markets on each account's instance) against 10 instances that each load markets;
    Python heap retained (tracemalloc, after gc) and HTTP calls.

Environment: BENCH_SYMBOLS (2000), BENCH_REPEAT (5), BENCH_RATE_LIMIT (0), BENCH_KEEP=1 keeps the
temporary directory (database, server log).
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import requests

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "bench-sim-key-0123456789"
API_SECRET = "bench-sim-secret-abcdefghijklmnop"  # noqa: S105 — the local simulator's own credential
ACCOUNTS = 10
READY_TIMEOUT = 120.0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ratio(value: float, baseline: float) -> str:
    return "-" if not baseline else f"{value / baseline:.3g}x"


def _fmt(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def line(name: str, value: float, baseline: float) -> str:
    return f"{name:42} {_fmt(value):>10} {_fmt(baseline):>10} {_ratio(value, baseline):>10}"


class HttpCounter:
    """Counts ccxt's HTTP requests (sync ccxt sends every request through Exchange.fetch)."""

    def __init__(self) -> None:
        self.calls = 0

    @contextmanager
    def installed(self) -> Iterator[HttpCounter]:
        import ccxt

        original = ccxt.Exchange.fetch

        def fetch(exchange: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return original(exchange, *args, **kwargs)

        ccxt.Exchange.fetch = fetch
        try:
            yield self
        finally:
            ccxt.Exchange.fetch = original

    def take(self) -> int:
        calls, self.calls = self.calls, 0
        return calls


@contextmanager
def statements() -> Iterator[list[str]]:
    """Every SQL statement the default connection runs inside the block."""
    from django.db import connection

    seen: list[str] = []

    def record(execute: Callable, sql: str, params: Any, many: bool, context: Any) -> Any:
        seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(record):
        yield seen


def start_server(env: dict[str, str], work: Path) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log_path = work / "runsimexchange.log"
    argv = [
        sys.executable,
        "manage.py",
        "runsimexchange",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--api-secret",
        API_SECRET,
        "--seed",
        "1",
        # The per-symbol baseline makes thousands of calls a minute, past Binance's real weight limit:
        # the figure compares our call pattern, not how long the server's limiter makes it wait.
        "--no-rate-limits",
    ]
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"runsimexchange exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{base}/api/v3/ping", timeout=1).status_code == 200:
                return proc, base, log_path
        except requests.RequestException:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("runsimexchange did not answer within the ready timeout")


def bench_price_refresh(counter: HttpCounter, repeat: int, rate_limit: bool) -> tuple[list[str], int]:
    from django.utils import timezone

    from exchanges.ccxt_gateway import CcxtGateway
    from exchanges.gateway import MarketType
    from exchanges.models import PriceQuote
    from exchanges.services import PublicAccess, gateway_for, price_cache_refresh

    gateway = cast(CcxtGateway, gateway_for(PublicAccess(exchange="BINANCE")))  # BINANCE's factory is ccxt's
    client = gateway._client(MarketType.SPOT)  # markets loaded once, outside both timings
    client.enableRateLimit = rate_limit
    counter.take()

    seconds, calls, queries, stored = [], [], [], 0
    for _ in range(repeat):
        with statements() as seen:
            t0 = time.perf_counter()
            stored = price_cache_refresh(exchange="BINANCE", market_type=MarketType.SPOT, now=timezone.now())
            seconds.append(time.perf_counter() - t0)
        calls.append(counter.take())
        queries.append(len(seen))

    # Baseline: what a per-symbol implementation does — ask for each price, save each row.
    symbols = sorted(PriceQuote.objects.filter(exchange="BINANCE", market_type="SPOT").values_list("symbol", flat=True))
    PriceQuote.objects.filter(exchange="BINANCE", market_type="SPOT").delete()
    with statements() as seen:
        t0 = time.perf_counter()
        for symbol in symbols:
            reply = client.publicGetTickerPrice({"symbol": client.market(symbol)["id"]})
            PriceQuote.objects.update_or_create(
                exchange="BINANCE",
                market_type="SPOT",
                symbol=symbol,
                defaults={"price": Decimal(str(reply["price"])), "as_of": timezone.now()},
            )
        base_seconds = time.perf_counter() - t0
    base_calls, base_queries = counter.take(), len(seen)
    assert PriceQuote.objects.filter(exchange="BINANCE", market_type="SPOT").count() == stored == len(symbols)

    lines = [
        line("price_refresh_exchange_calls", calls[-1], base_calls),
        line("price_refresh_seconds", statistics.median(seconds), base_seconds),
        line("price_refresh_db_statements", queries[-1], base_queries),
    ]
    return lines, stored


def _retained(build: Callable[[], Any]) -> tuple[float, Any]:
    """MB of Python heap that `build()` allocates and still holds (its result kept alive)."""
    gc.collect()
    tracemalloc.start()
    try:
        kept = build()
        gc.collect()
        current, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return current / 1_048_576, kept


def bench_markets_memory(counter: HttpCounter) -> list[str]:
    from exchanges import ccxt_gateway
    from exchanges.ccxt_gateway import CcxtGateway, _make_exchange
    from exchanges.gateway import MarketType

    spot = MarketType.SPOT
    # Warm ccxt's class-level lazy state so neither side pays it.
    _make_exchange("binance", spot, API_KEY, API_SECRET, False)
    ccxt_gateway.caches_clear()
    counter.take()

    def shared() -> list[Any]:
        gateways = [CcxtGateway("binance", spot, API_KEY, API_SECRET, account_key=f"m{i}") for i in range(ACCOUNTS)]
        return [g._client(spot) for g in gateways]

    def unshared() -> list[Any]:
        clients = [_make_exchange("binance", spot, API_KEY, API_SECRET, False) for _ in range(ACCOUNTS)]
        for client in clients:
            client.load_markets()
        return clients

    shared_mb, shared_clients = _retained(shared)
    shared_calls = counter.take()
    n_markets = len(shared_clients[0].markets)
    del shared_clients
    ccxt_gateway.caches_clear()
    unshared_mb, unshared_clients = _retained(unshared)
    unshared_calls = counter.take()
    assert all(len(c.markets) == n_markets for c in unshared_clients)
    del unshared_clients
    return [
        line(f"markets_memory_mb[{ACCOUNTS} accounts]", shared_mb, unshared_mb),
        line(f"markets_load_calls[{ACCOUNTS} accounts]", shared_calls, unshared_calls),
    ]


def main() -> int:
    n_symbols = int(os.environ.get("BENCH_SYMBOLS", "2000"))
    repeat = int(os.environ.get("BENCH_REPEAT", "5"))
    rate_limit = os.environ.get("BENCH_RATE_LIMIT", "0") == "1"
    work = Path(tempfile.mkdtemp(prefix="tradingsite-bench-prices-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_SETTINGS")}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "tradingsite.settings",
            "DATABASE_URL": f"sqlite:///{work / 'db.sqlite3'}",
            "TRADINGSITE_VAR_DIR": str(work),
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "WARNING",
        }
    )
    # The catalog is the same code in both processes: size it before Django reads settings.
    from exchanges.simulator.catalog import SPOT_MARKETS

    env["SIMULATOR_SYNTHETIC_SYMBOLS"] = str(max(0, n_symbols - len(SPOT_MARKETS)))
    os.environ.update(env)

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from exchanges import ccxt_gateway

    call_command("migrate", verbosity=0)
    proc, base, log_path = start_server(env, work)
    failed = False
    try:
        settings.EXCHANGE_URL_OVERRIDES = {"BINANCE": base, "BYBIT": base}
        ccxt_gateway.caches_clear()
        counter = HttpCounter()
        with counter.installed():
            price_lines, stored = bench_price_refresh(counter, repeat, rate_limit)
            memory_lines = bench_markets_memory(counter)
        limiter = "on" if rate_limit else "off"
        print(
            f"# price refresh: BINANCE SPOT, {stored} symbols, runsimexchange + real ccxt, SQLite; "
            f"value = bulk call + bulk upsert (median of {repeat}), baseline = per-symbol call + save "
            f"(1 pass); ccxt rate limiter {limiter}"
        )
        print(f"{'name':42} {'value':>10} {'baseline':>10} {'ratio':>10}")
        print("\n".join(price_lines))
        print(
            f"# markets: {ACCOUNTS} account instances, value = one shared load + set_markets, "
            "baseline = each instance loads; tracemalloc heap retained"
        )
        print("\n".join(memory_lines))
    except Exception as exc:
        failed = True
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait(10)
        if code != 0:
            failed = True
            print(f"runsimexchange exited with {code}; log: {log_path}", file=sys.stderr)
    if os.environ.get("BENCH_KEEP") == "1" or failed:
        print(f"# kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
