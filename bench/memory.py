"""RSS of a process holding the ccxt gateways of 1,000 accounts, against the per-instance copies of before (SPEC §9).

Setup: a temporary SQLite database migrated in-process and `manage.py runsimexchange` on it
(127.0.0.1, a free port); real ccxt talks to it through EXCHANGE_URL_OVERRIDES. Each figure is
measured in a fresh child process (Django set up, nothing else running) that builds the gateways
of BENCH_ACCOUNTS accounts — 60 % Binance, 40 % Bybit, each with its USDⓈ-M / linear instance and
every fourth also a spot one — loads the markets once per (exchange, market type), and makes one
signed call per instance (fetch_balance), so every instance has used its HTTP session as the
scheduler's do. RSS is read from /proc after a gc.

  value    — the project's path: CcxtGateway._client (instances share the template's markets
             through set_markets_from_exchange and its read-only describe() tables).
  baseline — the path before, in the same run: one instance per account with its own describe()
             tables and set_markets(shared dict), which deep-copies every market into each instance.

Two catalogs: the simulator's own (7 futures / 8 spot markets, as the scheduler measured 449 MB
with) and a real-sized one (BENCH_MARKETS generated symbols, ~ Binance USDⓈ-M's 500+), where the
baseline runs fewer accounts (BENCH_BASELINE_ACCOUNTS) and is scaled per account, since its
copies would not fit.

Environment: BENCH_ACCOUNTS (1000), BENCH_MARKETS (500), BENCH_BASELINE_ACCOUNTS (100 for the
real-sized catalog), BENCH_KEEP=1 keeps the temporary directory.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from bench.support import ROOT, bench_env, header, line, migrate

API_KEY = "bench-sim-key-0123456789"
API_SECRET = "bench-sim-secret-abcdefghijklmnop"  # noqa: S105 — the local simulator's own credential
READY_TIMEOUT = 120.0
GOAL_RSS_MB = 400.0
SCHEDULER_MEASURED_MB = 449.0  # the scheduler at 1,000 accounts before this change (issue 12)


def _rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for row in status:
            if row.startswith("VmRSS:"):
                return int(row.split()[1]) / 1024
    return float("nan")


def _accounts(n: int) -> list[tuple[str, str, list[str]]]:
    """(family, account key, market types) per account: 60 % Binance, 40 % Bybit, every fourth with spot too."""
    rows = []
    for i in range(n):
        family = "binance" if i % 5 < 3 else "bybit"
        markets = ["FUTURES", "SPOT"] if i % 4 == 0 else ["FUTURES"]
        rows.append((family, f"account-{i + 1}", markets))
    return rows


def child(mode: str, n: int) -> None:
    """Build the gateways of `n` accounts in this process and print its RSS as JSON."""
    import django

    django.setup()
    from exchanges import ccxt_gateway
    from exchanges.ccxt_gateway import CcxtGateway
    from exchanges.gateway import MarketType

    gc.collect()
    start = _rss_mb()
    gateways = []
    clients: list[Any] = []
    loaded: dict[tuple[str, MarketType], Any] = {}
    for family, key, markets in _accounts(n):
        gateway = CcxtGateway(family, MarketType.SPOT, API_KEY, API_SECRET, account_key=key, retries=0)
        gateways.append(gateway)
        for raw in markets:
            market_type = MarketType(raw)
            if mode == "shared":
                client = gateway._client(market_type)
            else:
                # Before: an instance with its own describe() tables, set_markets copying the shared list.
                template = loaded.get((family, market_type))
                if template is None:
                    template = loaded[(family, market_type)] = gateway._loaded_template(market_type)
                client = ccxt_gateway._make_exchange(family, market_type, API_KEY, API_SECRET, False)
                client.set_markets(template.markets)
            clients.append(client)
            client.fetch_balance()
    gc.collect()
    end = _rss_mb()
    print(json.dumps({"start": start, "end": end, "instances": len(clients)}))


def _start_server(env: dict[str, str], work: Path, markets: int) -> tuple[subprocess.Popen, str]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = work / f"runsimexchange-{markets}.log"
    argv = [sys.executable, "manage.py", "runsimexchange", "--port", str(port), "--seed", "1", "--no-rate-limits"]
    argv += ["--api-key", API_KEY, "--api-secret", API_SECRET]
    server_env = {**env, "SIMULATOR_SYNTHETIC_SYMBOLS": str(markets)}
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=server_env, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"runsimexchange exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
        try:
            if requests.get(f"{base}/api/v3/ping", timeout=1).status_code == 200:
                return proc, base
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("runsimexchange did not answer within the ready timeout")


def _measure(env: dict[str, str], base: str, mode: str, n: int) -> dict[str, float]:
    child_env = {**env, "EXCHANGE_URL_OVERRIDES": json.dumps({"BINANCE": base, "BYBIT": base})}
    result = subprocess.run(  # noqa: S603 — this module
        [sys.executable, "-m", "bench.memory", "--child", mode, str(n)],
        cwd=ROOT,
        env=child_env,
        capture_output=True,
        text=True,
        check=False,
        timeout=1800,
    )
    if result.returncode:
        raise RuntimeError(f"child {mode} {n} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    accounts = int(os.environ.get("BENCH_ACCOUNTS", "1000"))
    big = int(os.environ.get("BENCH_MARKETS", "500"))
    baseline_big = int(os.environ.get("BENCH_BASELINE_ACCOUNTS", "100"))
    keep = os.environ.get("BENCH_KEEP") == "1"
    work = Path(tempfile.mkdtemp(prefix="tradingsite-bench-memory-"))
    env = bench_env(f"sqlite:///{work / 'db.sqlite3'}", work)
    failed = False
    try:
        migrate(env)
        print(f"# ccxt gateways of {accounts} accounts in one process: RSS (MB) after gc, fresh child each")
        print(header())
        for markets, baseline_n in ((0, accounts), (big, min(baseline_big, accounts))):
            proc, base = _start_server(env, work, markets)
            try:
                shared = _measure(env, base, "shared", accounts)
                before = _measure(env, base, "baseline", baseline_n)
            finally:
                proc.terminate()
                proc.wait(30)
            label = "simulator catalog" if not markets else f"{markets} extra markets"
            per_shared = (shared["end"] - shared["start"]) / accounts
            per_before = (before["end"] - before["start"]) / baseline_n
            scaled_before = before["start"] + per_before * accounts
            note = "" if baseline_n == accounts else f" (baseline measured at {baseline_n}, scaled)"
            print(line(f"rss_mb[{accounts} accounts, {label}]", shared["end"], scaled_before) + note)
            print(line(f"gateway_kb_per_account[{label}]", per_shared * 1024, per_before * 1024))
            print(f"#   {shared['instances']} ccxt instances; process before gateways {shared['start']:.0f} MB")
            if not markets and accounts == 1000:
                saved = (per_before - per_shared) * accounts
                estimate = SCHEDULER_MEASURED_MB - saved
                verdict = "met" if estimate < GOAL_RSS_MB else "NOT met"
                print(
                    f"# scheduler at {accounts} accounts: measured {SCHEDULER_MEASURED_MB:.0f} MB before; "
                    f"gateways now {saved:.0f} MB smaller → about {estimate:.0f} MB; goal < {GOAL_RSS_MB:.0f} MB: "
                    f"{verdict}"
                )
    except Exception as exc:
        failed = True
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        if keep or failed:
            print(f"# kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tradingsite.settings")
        child(sys.argv[2], int(sys.argv[3]))
        sys.exit(0)
    sys.exit(main())
