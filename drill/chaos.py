"""The drill's chaos: leader SIGKILLs (with a replacement standby), pg_terminate_backend, exchange faults,
and rate-limit bursts (the rest of a minute's Binance request weight spent from the same IP).

A `LeaderMonitor` thread watches the Leadership row every 0.1 s so takeovers are timed from the
database's own `since`. The `Chaos` thread plays a schedule fixed at the start (a function of the
run length and the seed) and stops at its deadline; every fault row it adds is bounded by a count
or switched off at the end of its window, and `faults_off` disarms whatever is left.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from drill.procs import Child, DrillDatabase, Sql, Supervisor

logger = logging.getLogger("drill")

LEADER_LOCK_APP = "tradingsite-leader-lock"
FAULT_EVERY = (3.0, 6.0)  # seconds between two fault injections
FAULT_WINDOW = (3.0, 8.0)  # how long a probability fault stays armed
MIN_EVENT_GAP = 8.0  # seconds between two process or connection events
# A rate-limit burst starts between these seconds of a wall-clock minute (the simulator counts Binance
# weight per epoch-aligned minute) and stops before the minute rolls over, so the 429s it causes ask
# for the rest of that minute at most, and it comes early enough in the load that the block is over
# when the settling starts. Any 40 s of load (5 s in to 15 s before the end of a 60 s drill) holds
# such a moment.
BURST_WINDOW = (30.0, 54.0)
BURST_STOP_AT = 57.0
BURST_MAX_REQUESTS = 1000
BURST_THREADS = 6  # the weight to spend is thousands: in parallel, as a busy neighbour would
# Signed, weight 30, and no database work in the simulator (a burst must not slow it down for the others).
BURST_PATH = "/fapi/v1/positionSide/dual"
BURST_WEIGHT = 30


@dataclass
class Transition:
    term: int
    pid: int | None
    since: float  # epoch seconds (Leadership.since)
    seen_at: float


@dataclass
class ChaosEvent:
    at: float  # epoch seconds
    kind: str  # "sigkill" | "sigkill_shard_owner" | "terminate_lock" | "terminate_all"
    term_before: int | None
    detail: str
    moved_after: float | None = None  # sigkill_shard_owner: seconds until every account shard was held again


@dataclass
class ChaosStats:
    events: list[ChaosEvent] = field(default_factory=list)
    faults: Counter = field(default_factory=Counter)  # "kind endpoint phase" → rules added
    errors: list[str] = field(default_factory=list)
    bursts: list[str] = field(default_factory=list)  # one line per rate-limit burst


class LeaderMonitor(threading.Thread):
    """Records every change of Leadership.term with its holder and start time."""

    def __init__(self, db: DrillDatabase, *, deadline: float):
        super().__init__(name="drill-leader-monitor", daemon=True)
        self.sql = Sql(db)
        self.deadline = deadline
        self.stop_event = threading.Event()
        self.transitions: list[Transition] = []
        self.lock = threading.Lock()

    def current(self) -> Transition | None:
        with self.lock:
            return self.transitions[-1] if self.transitions else None

    def run(self) -> None:
        last_term = None
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            try:
                row = self.sql.rows(
                    "SELECT term, pid, EXTRACT(EPOCH FROM since) FROM scheduler_leadership WHERE id = 1"
                )
            except Exception as exc:  # the database may be briefly unreachable; keep watching
                logger.debug("leader monitor: %s", exc)
                row = []
            if row and row[0][0] != last_term and row[0][2] is not None:
                term, pid, since = row[0]
                last_term = term
                with self.lock:
                    self.transitions.append(Transition(int(term), pid, float(since), time.time()))
                logger.info("leadership term %s: pid %s", term, pid)
            self.stop_event.wait(0.1)
        self.sql.close()


def _schedule(seconds: float, rng: random.Random) -> list[tuple[float, str]]:
    """(offset, kind) of process and connection events: ~one SIGKILL per 40 s (at least 2), ~one
    connection kill per 60 s (at least 1), at least MIN_EVENT_GAP apart, none in the last 8 s."""
    kills = max(2, int(seconds // 40))
    terminations = max(1, int(seconds // 60))
    events = [(seconds * (i + 0.5) / kills, "sigkill") for i in range(kills)]
    kinds = ("terminate_all", "terminate_lock")
    events += [(seconds * (i + 1) / (terminations + 1), kinds[i % 2]) for i in range(terminations)]
    events = [(at + rng.uniform(-2, 2), kind) for at, kind in sorted(events)]
    spaced: list[tuple[float, str]] = []
    for at, kind in events:
        at = max(at, 5.0, spaced[-1][0] + MIN_EVENT_GAP if spaced else 0.0)
        if at <= seconds - 8:
            spaced.append((at, kind))
    return spaced


# (kind, endpoint, phase, latency_ms) the fault loop draws from; endpoint "" is every endpoint.
FAULT_MENU = (
    ("timeout", "create_order", "before", 3500),
    ("timeout", "create_order", "after", 3500),
    ("timeout", "cancel_order", "before", 3500),
    ("timeout", "cancel_order", "after", 3500),
    ("timeout", "fetch_open_orders", "before", 3500),
    ("timeout", "fetch_order", "before", 3500),
    ("http_5xx", "create_order", "before", 0),
    ("http_5xx", "create_order", "after", 0),
    ("http_5xx", "cancel_order", "after", 0),
    ("http_5xx", "fetch_open_orders", "before", 0),
    ("http_429", "create_order", "before", 0),
    ("http_429", "cancel_order", "before", 0),
    ("http_429", "fetch_open_orders", "before", 0),
    ("http_429", "fetch_order", "before", 0),
    ("maintenance", "", "before", 0),
    ("maintenance", "create_order", "before", 0),
    ("maintenance", "cancel_order", "before", 0),
    ("latency", "fetch_open_orders", "before", 800),
    ("latency", "create_order", "before", 600),
)
WS_MENU = (("ws_drop", "ws", "before", 0), ("ws_silent", "ws", "before", 0))


class Chaos(threading.Thread):
    """Plays the SIGKILL / pg_terminate_backend schedule and the fault loop until `seconds` have passed."""

    def __init__(
        self,
        *,
        db: DrillDatabase,
        supervisor: Supervisor,
        monitor: LeaderMonitor,
        spawn_scheduler: Callable[[], Child],
        seconds: float,
        seed: int,
        streams: bool,
        sim_url: str = "",
        sim_auth: tuple[str, str] = ("", ""),
        kill_any: bool = False,
    ):
        super().__init__(name="drill-chaos", daemon=True)
        self.sim_url = sim_url  # "": no rate-limit bursts
        self.sim_auth = sim_auth  # (API key, secret) the bursts sign with
        # With account shards over several schedulers every other SIGKILL hits a scheduler that is not
        # the leader (its shards move, leadership does not).
        self.kill_any = kill_any
        self._kills = 0
        self.db = db
        self.sql = Sql(db)
        self.supervisor = supervisor
        self.monitor = monitor
        self.spawn_scheduler = spawn_scheduler
        self.seconds = seconds
        self.rng = random.Random(seed)  # noqa: S311 - chaos shape, not security
        self.menu = FAULT_MENU + (WS_MENU if streams else ())
        self.stop_event = threading.Event()
        self.stats = ChaosStats()
        self._armed: list[tuple[float, int]] = []  # (disarm at, fault id) of probability faults

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        from exchanges.simulator.engine import default_engine

        start = time.monotonic()
        events = _schedule(self.seconds, self.rng)
        # One rate-limit burst per minute of load, at the first moment in BURST_WINDOW after 5 s into it;
        # none in the last 15 s.
        bursts = [m * 60 + 5.0 for m in range(int(self.seconds // 60) or 1)] if self.sim_url else []
        next_fault = start + self.rng.uniform(*FAULT_EVERY)
        try:
            while not self.stop_event.is_set() and time.monotonic() - start < self.seconds:
                now = time.monotonic()
                if events and now - start >= events[0][0]:
                    _, kind = events.pop(0)
                    self._event(kind)
                second = time.time() % 60
                if bursts and now - start > self.seconds - 15:
                    self.stats.errors.append(f"{len(bursts)} rate-limit burst(s) skipped: no moment left")
                    bursts.clear()
                if bursts and now - start >= bursts[0] and BURST_WINDOW[0] <= second <= BURST_WINDOW[1]:
                    bursts.pop(0)
                    self._rate_burst()
                if now >= next_fault:
                    self._fault(default_engine)
                    next_fault = now + self.rng.uniform(*FAULT_EVERY)
                self._disarm(now, force=False)
                self.stop_event.wait(0.1)
        except Exception as exc:
            logger.exception("chaos thread failed")
            self.stats.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            self._disarm(time.monotonic(), force=True)
            self.sql.close()
            _close_thread_connections()

    # --- process and connection events ------------------------------------------------------------

    def _leader_child(self) -> Child | None:
        current = self.monitor.current()
        if current is None or current.pid is None:
            return None
        child = self.supervisor.by_pid(current.pid)
        return child if child is not None and child.alive() else None

    def _event(self, kind: str) -> None:
        current = self.monitor.current()
        term = current.term if current else None
        if kind == "sigkill":
            self._kills += 1
            leader = self._leader_child()
            others = [c for c in self.supervisor.living("scheduler") if leader is None or c.pid != leader.pid]
            if self.kill_any and self._kills % 2 == 0 and others:
                victim = self.rng.choice(others)
                at = time.time()
                self.supervisor.kill(victim)
                moved = self._shards_held_again(at)
                self.stats.events.append(ChaosEvent(at, "sigkill_shard_owner", term, f"pid {victim.pid}", moved))
                logger.info("chaos: SIGKILL non-leader scheduler pid %s; its shards moved in %s s", victim.pid, moved)
                replacement = self.spawn_scheduler()
                logger.info("chaos: replacement scheduler pid %s", replacement.pid)
                return
            if leader is None:
                logger.warning("chaos: no live leader of ours to kill (term %s); skipped", term)
                self.stats.errors.append(f"sigkill skipped: no live leader (term {term})")
                return
            at = time.time()
            self.supervisor.kill(leader)
            self.stats.events.append(ChaosEvent(at, kind, term, f"pid {leader.pid}"))
            logger.info("chaos: SIGKILL leader pid %s (term %s)", leader.pid, term)
            replacement = self.spawn_scheduler()
            logger.info("chaos: replacement scheduler pid %s", replacement.pid)
            return
        schedulers = [c.pid for c in self.supervisor.living("scheduler")]
        ports = self.supervisor.ports_of(schedulers, remote_port=self.db.port)
        rows = self.sql.rows(
            "SELECT pid, client_port, application_name FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid()"
        )
        if kind == "terminate_lock":
            targets = [pid for pid, port, app in rows if app == LEADER_LOCK_APP and port in ports]
        else:
            targets = [pid for pid, port, _ in rows if port in ports]
        at = time.time()
        for pid in targets:
            self.sql.rows("SELECT pg_terminate_backend(%s)", (pid,))
        self.stats.events.append(ChaosEvent(at, kind, term, f"{len(targets)} backends"))
        logger.info("chaos: %s terminated %d backends (term %s)", kind, len(targets), term)

    # --- rate-limit bursts ---------------------------------------------------------------------------

    def _rate_burst(self) -> None:
        """Spend what is left of this minute's Binance USDⓈ-M request weight from 127.0.0.1, as another
        tool on the same address would: our clients then meet 429s (Retry-After: the rest of the minute)
        and, if they call on regardless, the 418 ban."""
        import requests

        refused: list[requests.Response] = []
        sent = [0]
        lock = threading.Lock()

        def spend() -> None:
            with requests.Session() as session:
                while not refused and time.time() % 60 < BURST_STOP_AT:
                    with lock:
                        if sent[0] >= BURST_MAX_REQUESTS:
                            return
                        sent[0] += 1
                    reply = session.get(self._signed(BURST_PATH), headers={"X-MBX-APIKEY": self.sim_auth[0]}, timeout=5)
                    if reply.status_code in (418, 429):
                        refused.append(reply)

        try:
            used = requests.get(f"{self.sim_url}/fapi/v1/ping", timeout=5).headers.get("X-MBX-USED-WEIGHT-1M", "?")
            started = time.time() % 60
            workers = [threading.Thread(target=spend, daemon=True) for _ in range(BURST_THREADS)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(30)
            outcome = (
                f"HTTP {refused[0].status_code}, Retry-After {refused[0].headers.get('Retry-After', '-')} s "
                f"({len(refused)} of the refusals counted below were the burst's own)"
                if refused
                else "never refused (the minute ran out first)"
            )
            line = (
                f"weight used {used} at :{started:02.0f}, {sent[0]} requests of weight {BURST_WEIGHT}, then {outcome}"
            )
        except requests.RequestException as exc:
            line = f"failed: {type(exc).__name__}: {exc}"
        self.stats.bursts.append(line)
        logger.info("chaos: rate-limit burst: %s", line)

    def _signed(self, path: str) -> str:
        query = f"timestamp={int(time.time() * 1000)}"
        signature = hmac.new(self.sim_auth[1].encode(), query.encode(), hashlib.sha256).hexdigest()
        return f"{self.sim_url}{path}?{query}&signature={signature}"

    def _shards_held_again(self, since: float, timeout: float = 30.0) -> float | None:
        """Seconds from `since` until every account shard's lock is held again by a live process (None: not in time)."""
        from scheduler.shards import SHARD_LOCK_CLASS, shard_count

        while time.time() - since < timeout:
            held = self.sql.scalar(
                "SELECT count(DISTINCT objid) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = %s "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                (SHARD_LOCK_CLASS,),
            )
            if held == shard_count():
                return time.time() - since
            time.sleep(0.05)
        return None

    # --- exchange faults --------------------------------------------------------------------------

    def _fault(self, engine) -> None:  # noqa: ANN001
        kind, endpoint, phase, latency_ms = self.rng.choice(self.menu)
        exchange = self.rng.choice(("BINANCE", "BYBIT", ""))
        if (kind == "maintenance" and not endpoint) or self.rng.random() < 0.3:
            # A window: every matching call fails with this probability until it is disarmed.
            probability = Decimal("1") if kind == "maintenance" and not endpoint else Decimal("0.4")
            fault_id = engine.fault_add(
                kind,
                exchange=exchange,
                endpoint=endpoint,
                phase=phase,
                remaining=None,
                probability=probability,
                latency_ms=latency_ms,
            )
            self._armed.append((time.monotonic() + self.rng.uniform(*FAULT_WINDOW), fault_id))
        else:
            engine.fault_add(
                kind,
                exchange=exchange,
                endpoint=endpoint,
                phase=phase,
                remaining=self.rng.randint(1, 4),
                latency_ms=latency_ms,
            )
        self.stats.faults[f"{kind} {endpoint or '*'} {phase}"] += 1
        logger.info("chaos: fault %s on %s %s (%s)", kind, exchange or "*", endpoint or "*", phase)

    def _disarm(self, now: float, *, force: bool) -> None:
        due = [fault_id for until, fault_id in self._armed if force or until <= now]
        if due:
            # remaining = 0 keeps the row (and its `fired` count) for the report.
            self.sql.rows("UPDATE exchanges_simfault SET remaining = 0 WHERE id = ANY(%s)", (due,))
            self._armed = [(until, fault_id) for until, fault_id in self._armed if fault_id not in due]


def faults_off(sql: Sql) -> int:
    """Disarm every fault row (kept for the report); returns how many were still armed."""
    rows = sql.rows("UPDATE exchanges_simfault SET remaining = 0 WHERE remaining IS NULL OR remaining > 0 RETURNING id")
    return len(rows)


def _close_thread_connections() -> None:
    from django.db import connections

    connections.close_all()
