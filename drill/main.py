"""The drill's course: database, processes, seed, load and chaos, settle, stop, verdict (SPEC §9).

    python -m drill [--seconds 300] [--settle 150] [--rate 4] [--followers 50] [--fan-every 12] [--seed N] [--keep]

Exit status: 0 when every invariant holds, 1 when one is violated, 2 when the drill itself could not
run (a process did not start, the database was unreachable). Progress goes to stderr, the table to
stdout. Everything listens on 127.0.0.1; every wait is bounded; every child is stopped on the way
out, Ctrl-C and exceptions included.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import requests

from drill.procs import (
    DEFAULT_DB_PREFIX,
    DEFAULT_PG_ADMIN_URL,
    ROOT,
    Child,
    DrillDatabase,
    Sql,
    Supervisor,
    free_port,
    wait_until,
)

logger = logging.getLogger("drill")

API_KEY = "drill-sim-key-7c1f0e"
API_SECRET = "drill-sim-secret-2b9d41a8e6"  # noqa: S105 - the simulator's own key pair, 127.0.0.1 only
START_TIMEOUT = 90.0
HTTP_TIMEOUT_MS = 3000  # ccxt's per-request timeout in the drill: a timeout fault costs 3 s, not 10
EXIT_VIOLATED, EXIT_BROKEN = 1, 2
RECONCILE_ASK_EVERY = 10.0  # seconds between two "run now" requests of update_open_orders while settling
SCHEDULERS = 2  # runscheduler processes kept running (a killed leader is replaced)
SIM_DB_THREADS = 16  # runsimexchange --db-threads (halved with three or more schedulers: connections)
FAN_QUIET_END = 15.0  # no fan-out signal in the load's last seconds: its orders get time to be placed

# Rate-limit faults. Once a minute the chaos spends the rest of the minute's Binance request weight from
# 127.0.0.1 (chaos.BURST_*), so our clients meet 429 -1003 with Retry-After and must hold back (a second
# refusal in a row bans the address for a few seconds: HTTP 418). The simulator's Bybit per-UID order
# limit is below the clients' budget, so a burst of one account's orders gets 10006; Binance's
# per-account order limit equals the budget (EXCHANGE_RATE_LIMITS), which holds those calls back
# (waiting up to EXCHANGE_RATE_WAIT_MAX). Chaos adds 429 faults (with Retry-After) on top. The
# per-account limits stay above the load's own average order rate (~1.2/s per account), or the queue
# would never drain. Binance's IP weight limit is 9,000 per minute, not the real 2,400: one
# reconciliation of 26 Binance accounts (one all-symbol open-orders call each, weight 40) costs 1,040,
# and settling asks for one every 10 s. The clients' IP budget is twice that, because the gateway
# counts every call at its SPOT weight today (twice the USDⓈ-M one for these calls): with less, the
# budget refuses reconciliations and the circuit breaker opens for 60 s.
SIM_RATE_LIMITS = (
    "binance_futures_orders_per_10s=15",
    "binance_futures_weight_per_minute=9000",
    "binance_ban_after=2",
    "binance_ban_seconds=4",
    "bybit_orders_per_second=3",
)
_BINANCE_BUDGET = [
    {"scope": "ip", "unit": "weight", "limit": 18000, "seconds": 60},
    {"scope": "account", "unit": "orders", "limit": 15, "seconds": 10},
]
_BYBIT_BUDGET = [{"scope": "account", "unit": "orders", "limit": 4, "seconds": 1}]
# Both market types: the gateway books a call against its instance's market type (SPOT for every
# account today), whatever market the call trades; with SPOT's weights, hence the generous IP budget.
CLIENT_RATE_LIMITS = {
    "BINANCE:FUTURES": _BINANCE_BUDGET,
    "BINANCE:SPOT": _BINANCE_BUDGET,
    "BYBIT:FUTURES": _BYBIT_BUDGET,
    "BYBIT:SPOT": _BYBIT_BUDGET,
}


class DrillInterrupted(Exception):
    """SIGTERM or SIGINT reached the drill; the `finally` blocks stop everything."""


@dataclass
class Options:
    seconds: float
    settle: float
    rate: float
    seed: int
    keep: bool
    pg_admin_url: str
    followers: int = 50
    fan_every: float = 12.0
    db_prefix: str = DEFAULT_DB_PREFIX
    schedulers: int = SCHEDULERS


@dataclass
class Run:
    options: Options
    db: DrillDatabase
    var_dir: Path
    supervisor: Supervisor
    base_sim: str = ""
    base_web: str = ""
    notes: list[str] = field(default_factory=list)


def parse(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m drill", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("DRILL_SECONDS", 300)),
        help="load and chaos duration (default DRILL_SECONDS or 300)",
    )
    parser.add_argument("--settle", type=float, default=150.0, help="most seconds to wait for convergence (150)")
    parser.add_argument("--rate", type=float, default=4.0, help="load actions per second (4)")
    parser.add_argument("--seed", type=int, default=None, help="load, chaos and price-walk seed (random)")
    parser.add_argument(
        "--followers",
        type=int,
        default=int(os.environ.get("DRILL_FOLLOWERS", 50)),
        help="accounts of the fan-out strategy, each its own exchange key (default DRILL_FOLLOWERS or 50; 0: none)",
    )
    parser.add_argument("--fan-every", type=float, default=12.0, help="seconds between two fan-out signals (12)")
    parser.add_argument("--keep", action="store_true", help="keep the database and the logs")
    parser.add_argument(
        "--pg-admin-url",
        default=os.environ.get("DRILL_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL),
        help="a PostgreSQL URL to create the drill database from",
    )
    parser.add_argument(
        "--db-prefix",
        default=os.environ.get("DRILL_DB_PREFIX", DEFAULT_DB_PREFIX),
        help=f"the drill database's name before _<8 hex> (DRILL_DB_PREFIX, {DEFAULT_DB_PREFIX})",
    )
    parser.add_argument(
        "--schedulers",
        type=int,
        default=int(os.environ.get("DRILL_SCHEDULERS", SCHEDULERS)),
        help="runscheduler processes (DRILL_SCHEDULERS, default 2; 3: account shards spread, non-leaders killed too)",
    )
    args = parser.parse_args(argv)
    if args.seconds < 20:
        parser.error("--seconds must be at least 20 (two leader kills need room)")
    return Options(
        seconds=args.seconds,
        settle=max(args.settle, 5.0),
        rate=max(0.5, min(args.rate, 50.0)),
        seed=args.seed if args.seed is not None else secrets.randbelow(1_000_000),
        keep=args.keep,
        pg_admin_url=args.pg_admin_url,
        followers=max(0, args.followers),
        fan_every=max(2.0, args.fan_every),
        db_prefix=args.db_prefix,
        schedulers=max(2, args.schedulers),
    )


def main(argv: list[str] | None = None) -> int:
    options = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s drill: %(message)s", stream=sys.stderr)

    def interrupted(signum: int, frame: Any) -> None:
        raise DrillInterrupted(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGINT, interrupted)

    db = DrillDatabase.fresh_name(options.pg_admin_url, options.db_prefix)
    var_dir = Path(tempfile.mkdtemp(prefix="tradingsite-drill-"))
    (var_dir / "logs").mkdir()
    supervisor = Supervisor(log_dir=var_dir / "logs", env={})
    run = Run(options=options, db=db, var_dir=var_dir, supervisor=supervisor)
    code = EXIT_BROKEN
    created = False
    try:
        db.create()
        created = True
        code = _drill(run)
    except DrillInterrupted as exc:
        logger.error("interrupted by %s; stopping every process", exc)
        code = 130
    except Exception:
        logger.exception("the drill could not run")
        for child in supervisor.children:
            if not child.alive() and not child.killed:
                logger.error(
                    "%s (pid %s) exited %s; its log ends:\n%s",
                    child.name,
                    child.pid,
                    child.popen.returncode,
                    child.log_tail(),
                )
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        supervisor.stop_all(timeout=40)
        _close_django()
        if created and not options.keep:
            try:
                db.drop()
            except Exception as exc:
                logger.error("could not drop database %s: %s", db.name, exc)
        if options.keep or code != 0:
            logger.info("logs kept in %s%s", var_dir / "logs", f"; database {db.name} kept" if options.keep else "")
        else:
            shutil.rmtree(var_dir, ignore_errors=True)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return code


def _close_django() -> None:
    if "django.db" in sys.modules:
        from django.db import connections

        connections.close_all()


def _django_setup(env: dict[str, str]) -> None:
    os.environ.update(env)
    os.environ["LOG_LEVEL"] = "WARNING"  # the drill's own Django: quiet; the children log at INFO
    import django

    django.setup()
    # Django's LOGGING replaced the root handler (at WARNING): the drill's progress keeps its own.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s drill: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _migrate(run: Run) -> None:
    result = run.supervisor.run("migrate", "--noinput", "-v", "0", timeout=300)
    if result.returncode:
        raise RuntimeError(f"migrate failed:\n{result.stdout}{result.stderr}")


def _ping(url: str, headers: dict[str, str] | None = None) -> bool:
    try:
        return requests.get(url, headers=headers, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _started(child: Child, predicate: Any, what: str) -> None:
    def ready() -> bool:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited {child.popen.returncode} before it was ready:\n{child.log_tail()}")
        return bool(predicate())

    wait_until(ready, timeout=START_TIMEOUT, interval=0.3, what=what)


def _leader_thread_present(module: str) -> bool:
    """Whether a leader-only thread from `module` (or its package) is registered (SPEC §2.4)."""
    from scheduler.runner import LEADER_THREADS

    return any(path.split(":")[0] == module or path.startswith(f"{module}.") for path in LEADER_THREADS)


# --- the processes: every child the drill runs is started here -------------------------------------


def _start_simexchange(run: Run, *, port: int, price_seed: int, keys_path: Path) -> Child:
    """runsimexchange: the load's key pair (--api-key), the followers' (--keys), the rate-limit faults."""
    limits = [arg for item in SIM_RATE_LIMITS for arg in ("--rate-limit", item)]
    sim = run.supervisor.manage(
        "simexchange",
        "runsimexchange",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--api-secret",
        API_SECRET,
        "--keys",
        str(keys_path),
        "--seed",
        str(price_seed),
        "--db-threads",
        str(SIM_DB_THREADS if run.options.schedulers <= 2 else SIM_DB_THREADS // 2),
        *limits,
    )
    _started(sim, lambda: _ping(f"{run.base_sim}/api/v3/ping"), "runsimexchange")
    return sim


def _start_web(run: Run, *, port: int, token: str) -> Child:
    web = run.supervisor.spawn(
        "web", [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port), "tradingsite.asgi:application"]
    )
    _started(web, lambda: _ping(f"{run.base_web}/api/orders/", {"Authorization": f"Token {token}"}), "daphne")
    return web


def _spawn_scheduler(run: Run) -> Child:
    return run.supervisor.manage("scheduler", "runscheduler")


def _start_schedulers(run: Run, sql: Sql) -> list[Child]:
    """`options.schedulers` runscheduler processes; returns once one of them leads."""
    schedulers = [_spawn_scheduler(run) for _ in range(run.options.schedulers)]
    _started(
        schedulers[0],
        lambda: sql.scalar(
            "SELECT count(*) FROM scheduler_schedulerinstance WHERE role = 'leader' "
            "AND last_heartbeat > now() - interval '5 seconds'"
        ),
        "a scheduler leader",
    )
    return schedulers


def _schedulers_refill(run: Run) -> None:
    """Back to `options.schedulers` living schedulers (chaos killed some and may not have replaced them)."""
    while len(run.supervisor.living("scheduler")) < run.options.schedulers:
        _spawn_scheduler(run)


def _drill(run: Run) -> int:
    options = run.options
    sim_port, web_port = free_port(), free_port()
    run.base_sim, run.base_web = f"http://127.0.0.1:{sim_port}", f"http://127.0.0.1:{web_port}"
    env = {
        "DJANGO_SETTINGS_MODULE": "tradingsite.settings",
        "DATABASE_URL": run.db.url,
        "TRADINGSITE_VAR_DIR": str(run.var_dir),
        "EXCHANGE_URL_OVERRIDES": json.dumps({"BINANCE": run.base_sim, "BYBIT": run.base_sim}),
        "EXCHANGE_HTTP_TIMEOUT_MS": str(HTTP_TIMEOUT_MS),
        "EXCHANGE_RATE_LIMITS": json.dumps(CLIENT_RATE_LIMITS),
        "SCHEDULER_PROBE_JOB": "1",
        # The load generator is one user from one address at a chosen rate: the intake throttles
        # (issue 13) would measure themselves, not the system.
        "THROTTLE_ORDERS_RATE": "off",
        "THROTTLE_WEBHOOK_STRATEGY_RATE": "off",
        "THROTTLE_WEBHOOK_IP_RATE": "off",
        "PYTHONUNBUFFERED": "1",
        "LOG_LEVEL": "INFO",
    }
    if options.schedulers >= 2:  # always: the drill runs two at least
        # Each scheduler holds a connection per busy pool worker, stream worker and job thread besides
        # its locks, waker and warmer (about 24, the leader 35, at the defaults), and chaos starts a
        # replacement while a killed one's connections are still going: smaller pools keep them, the
        # simulator, the web process and the drill within PostgreSQL's default 100 connections (an
        # operator's own values win).
        for name, value in (
            ("EXECUTION_WORKERS", "4"),
            ("RECONCILE_WORKERS", "2"),
            ("SCHEDULER_THREADS", "6"),
            ("USER_STREAMS", json.dumps({"db_workers": 2, "reconcile_workers": 2})),
        ):
            env[name] = os.environ.get(name, value)
    run.supervisor.env = env
    logger.info(
        "database %s, seed %s, %s s of load and chaos at %s actions/s, fan-out to %d followers every %.0f s",
        run.db.name,
        options.seed,
        options.seconds,
        options.rate,
        options.followers,
        options.fan_every,
    )
    _migrate(run)
    _django_setup(env)

    # Imported once Django is set up on the drill database.
    from django.utils import timezone

    from drill import checks, report
    from drill.chaos import Chaos, LeaderMonitor, faults_off
    from drill.load import FanOutGenerator, LoadGenerator, webhook_available
    from drill.seed import SYMBOLS, follower_keys, seed
    from exchanges.gateway import MarketType
    from exchanges.models import MarketInfo, PriceQuote
    from exchanges.simulator.engine import default_engine
    from orders.selectors import queue_slots_for
    from scheduler.services import jobcommand_request

    price_seed = options.seed % 100_000
    followers = follower_keys(options.followers)
    keys_path = run.var_dir / "simexchange-keys.txt"
    keys_path.write_text("".join(f"{pair.key}:{pair.secret}\n" for pair in followers))
    sim = _start_simexchange(run, port=sim_port, price_seed=price_seed, keys_path=keys_path)
    seeded = seed(api_key=API_KEY, api_secret=API_SECRET, followers=followers)
    for job_id in ("precision_cache_update", "update_price_cache"):
        result = run.supervisor.run("runscheduler", "--run", job_id, timeout=180)
        if result.returncode:
            raise RuntimeError(f"runscheduler --run {job_id} failed:\n{result.stdout}{result.stderr}")
    markets = MarketInfo.objects.filter(market_type="FUTURES", symbol__in=SYMBOLS).count()
    quotes = PriceQuote.objects.filter(market_type="FUTURES", symbol__in=SYMBOLS).count()
    if markets < 2 * len(SYMBOLS) or quotes < 2 * len(SYMBOLS):
        raise RuntimeError(f"market data incomplete after the refresh: {markets} MarketInfo, {quotes} PriceQuote rows")
    web = _start_web(run, port=web_port, token=seeded.token)
    sql = Sql(run.db)
    _start_schedulers(run, sql)
    webhook = any((ROOT / "orders").glob("webhook*.py")) and webhook_available(run.base_web)
    streams = _leader_thread_present("orders.streams")
    if not webhook:
        run.notes.append("no POST /api/webhook/ in this tree: webhooks not exercised")
    if not streams:
        run.notes.append("no user-data streams among LEADER_THREADS: ws_drop/ws_silent not injected")

    # --- load and chaos -------------------------------------------------------------------------
    start_wall = timezone.now()
    deadline = time.monotonic() + options.seconds
    monitor = LeaderMonitor(run.db, deadline=deadline + options.settle + 120)
    monitor.start()
    load = LoadGenerator(
        base_url=run.base_web,
        token=seeded.token,
        routes=seeded.routes,
        webhook_tokens=seeded.webhook_tokens,
        seed=options.seed,
        price_seed=price_seed,
        rate=options.rate,
        deadline=deadline,
        webhook=webhook,
    )
    fanout = FanOutGenerator(
        base_url=run.base_web,
        token=seeded.fan_token,
        followers=len(seeded.followers),
        seed=options.seed + 2,
        price_seed=price_seed,
        every=options.fan_every,
        deadline=deadline - FAN_QUIET_END,
    )
    chaos = Chaos(
        db=run.db,
        supervisor=run.supervisor,
        monitor=monitor,
        spawn_scheduler=lambda: _spawn_scheduler(run),
        seconds=options.seconds,
        seed=options.seed + 1,
        streams=streams,
        sim_url=run.base_sim,
        sim_auth=(API_KEY, API_SECRET),
        kill_any=run.options.schedulers > 2,
    )
    generators: list[LoadGenerator | FanOutGenerator] = [load, fanout] if webhook and seeded.followers else [load]
    for thread in (*generators, chaos):
        thread.start()
    try:
        while time.monotonic() < deadline and any(t.is_alive() for t in (*generators, chaos)):
            time.sleep(0.5)
            for child in (sim, web):
                if not child.alive():
                    raise RuntimeError(f"{child.name} exited {child.popen.returncode} mid-drill:\n{child.log_tail()}")
    finally:
        for thread in (*generators, chaos):
            thread.stop()
        for thread in (*generators, chaos):
            if thread.ident is not None:  # started
                thread.join(35)

    # --- settle: faults off, prices frozen, load stopped; wait for convergence --------------------
    disarmed = faults_off(sql)
    for exchange in ("BINANCE", "BYBIT"):
        for symbol in SYMBOLS:
            price = default_engine.price_get(exchange, MarketType.FUTURES, symbol)
            default_engine.price_script(exchange, symbol, [price])
    freeze = timezone.now()
    logger.info(
        "load and chaos over; %d faults disarmed, prices frozen; settling (at most %.0f s)", disarmed, options.settle
    )
    _schedulers_refill(run)
    settle_deadline = time.monotonic() + options.settle
    converged, waiting = False, ""
    asked = 0.0
    time.sleep(1.0)  # the first matching step at the frozen prices happens on the next exchange call
    while time.monotonic() < settle_deadline:
        converged, waiting = checks.settled(since=freeze + timedelta(seconds=1))
        if converged:
            break
        if "no clean reconciliation" in waiting and time.monotonic() - asked > RECONCILE_ASK_EVERY:
            # "Run now" through the leader's command poller (as an operator would), rather than
            # waiting up to 29 s for the next scheduled reconciliation.
            jobcommand_request(job_id="update_open_orders", action="run", reason="drill: settle")
            asked = time.monotonic()
            logger.info("settling: waiting for %s; asked the leader to run update_open_orders now", waiting)
        time.sleep(1.0)
    settle_took = options.settle - max(0.0, settle_deadline - time.monotonic())
    if converged:
        run.notes.append(f"converged {settle_took:.0f} s after the load stopped")
    else:
        run.notes.append(f"did not converge within {options.settle:.0f} s of settling: {waiting}")

    # --- stop, then judge -------------------------------------------------------------------------
    end_wall = timezone.now()
    unexpected = [
        f"{c.name} pid {c.pid} exited {c.popen.returncode} on its own"
        for c in run.supervisor.children
        if c.name == "scheduler" and not c.killed and not c.alive()
    ]
    codes = run.supervisor.stop(run.supervisor.living("scheduler"), timeout=45)
    codes.update(run.supervisor.stop([c for c in (web, sim) if c.alive()], timeout=20))
    monitor.stop_event.set()
    monitor.join(5)
    sql.close()
    bad_exits = unexpected + [f"{name} exited {code} on SIGTERM" for name, code in codes.items() if code != 0]

    accounts = seeded.exchange_accounts()
    account_ids = sorted(a.account_id for a in accounts)
    slots = queue_slots_for(exchange="BINANCE", market_type="FUTURES")
    results = [
        checks.check_order_histories(
            account_ids=account_ids, posted_keys=set(load.keys_all) | set(fanout.stats.orders())
        ),
        checks.check_live_orders(accounts=accounts),
        checks.check_positions(accounts=accounts),
        checks.check_fanout(signals=fanout.stats.signals, followers=seeded.followers, slots=slots, converged=converged),
        checks.check_jobruns(),
        checks.Check("schedulers exit 0 on SIGTERM, none dies on its own", bad_exits),
    ]
    figures = checks.collect(
        start=start_wall - timedelta(seconds=2),
        end=end_wall,
        account_ids=account_ids,
        events=chaos.stats.events,
        transitions=monitor.transitions,
        simulator_logs=[c.log_path for c in run.supervisor.children if c.name == "simexchange"],
        client_logs=[c.log_path for c in run.supervisor.children if c.name == "scheduler"],
    )
    header = (
        f"drill: {options.seconds:.0f} s load+chaos, settle ≤ {options.settle:.0f} s, {options.rate:g} actions/s, "
        f"seed {options.seed}, database {run.db.name} (PostgreSQL), "
        f"{len([c for c in run.supervisor.children if c.name == 'scheduler'])} scheduler processes in all"
    )
    report.render(
        checks=results,
        figures=figures,
        load=load.stats,
        fanout=fanout.stats,
        chaos=chaos.stats,
        header=header,
        notes=run.notes,
    )
    _close_django()
    return 0 if all(c.ok for c in results) else EXIT_VIOLATED
