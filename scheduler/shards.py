"""Account shards: which runscheduler process may touch which accounts (PostgreSQL session advisory locks).

ACCOUNT_SHARDS shards (default 16); an account's shard is `account_id % ACCOUNT_SHARDS`. Every
process holds, on one dedicated autocommit connection (the leader lock's settings: keepalives,
connect and statement timeouts), a member lock (so peers count live processes from pg_locks, at
once when one dies) and the locks of the shards it owns. Every SHARD_POLL (0.5 s) its owner thread
probes the locks it holds, releases shards above its fair share (ceil(shards / live processes)) once
no task of its own still works on them, and takes free shards up to that share, starting a new
ShardLease term for each. `shards_owned()` answers from the last successful probe only while it is
younger than SHARD_PROBE_MAX_AGE (2 s): a process cut off from the database stops touching its
accounts 2 s after its last probe, well before PostgreSQL drops its session (keepalives, about
15 s) and lets another process take them. A lock connection can also be cut while its process
lives (pg_terminate_backend): its locks go at once, so a process that takes a shard whose last
holder may still be running (heartbeat younger than 2.5 s, not stopped) uses it only
SHARD_PROBE_MAX_AGE later, when that holder has stopped touching it. A dead, stopped or
rebalancing holder (which marks the lease released) costs no wait. On SQLite sharding is off: one
process owns everything.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from apscheduler.util import ref_to_obj
from django.conf import settings
from django.db import close_old_connections, connection, connections, transaction
from django.db.models import Q
from django.db.models.functions import Mod
from django.db.models.lookups import In
from django.utils import timezone

from scheduler.locks import lock_connection
from scheduler.models import JobRun, SchedulerInstance, ShardLease

logger = logging.getLogger(__name__)

# A process heartbeats every 2 s: one whose last heartbeat is younger than this may still be running.
PEER_ALIVE_SECONDS = 2.5
SHARD_LOCK_CLASS = 0x7368  # "sh": one lock per shard number
MEMBER_LOCK_CLASS = 0x736D  # "sm": one per live process (its lock connection's backend pid)

# "module:function(shard=, shards=) -> bool": whether this process still has work in flight on a shard's
# accounts (the orders side's execution pools). A shard given up is released only once none says so.
SHARD_BUSY_HOOKS: list[str] = ["orders.execution:execution_shard_busy"]


def sharding_enabled() -> bool:
    """Whether accounts are sharded across scheduler processes: PostgreSQL, unless SCHEDULER_SHARDING=off."""
    return settings.SCHEDULER_SHARDING != "off" and connection.vendor == "postgresql"


def shard_count() -> int:
    return max(1, int(settings.ACCOUNT_SHARDS))


def shard_of(account_id: int, count: int | None = None) -> int:
    """The shard of an account: a stable function of its id."""
    return int(account_id) % (count or shard_count())


@dataclass(frozen=True)
class ShardSet:
    """The shards a per-account run covers, as a filter on account ids."""

    count: int
    shards: frozenset[int]

    def has(self, account_id: int) -> bool:
        return shard_of(account_id, self.count) in self.shards

    def q(self, field: str = "account_id") -> Q:
        """A filter for querysets: `field % count IN shards` (SQL, index-friendly enough for a filter)."""
        return Q(In(Mod(field, self.count), sorted(self.shards)))

    def text(self) -> str:
        return ",".join(str(s) for s in sorted(self.shards))


# --- the lock connection -------------------------------------------------------------------------


class ShardLocks:
    """The shard and member advisory locks of this process, on one dedicated autocommit connection."""

    def __init__(self) -> None:
        self._conn: Any = None
        self.backend_pid: int | None = None

    def _ensure(self) -> Any:
        if self._conn is None or self._conn.closed:
            self._conn = lock_connection(application_name="tradingsite-shard-locks")
            with self._conn.cursor() as cursor:
                cursor.execute("SELECT pg_backend_pid()")
                self.backend_pid = cursor.fetchone()[0]
                cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [MEMBER_LOCK_CLASS, self.backend_pid])
        return self._conn

    def snapshot(self) -> tuple[set[int], set[int], int]:
        """(shards this connection holds, shards anyone holds, live member count), from one pg_locks read."""
        conn = self._ensure()
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT classid::int, objid::int, pid = pg_backend_pid() FROM pg_locks "
                "WHERE locktype = 'advisory' AND granted AND classid IN (%s, %s) AND objsubid = 2 "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                [SHARD_LOCK_CLASS, MEMBER_LOCK_CLASS],
            )
            rows = cursor.fetchall()
        mine = {objid for classid, objid, own in rows if classid == SHARD_LOCK_CLASS and own}
        taken = {objid for classid, objid, _ in rows if classid == SHARD_LOCK_CLASS}
        members = sum(1 for classid, _, _ in rows if classid == MEMBER_LOCK_CLASS)
        return mine, taken, members

    def try_acquire(self, shard: int) -> bool:
        with self._ensure().cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_lock(%s, %s)", [SHARD_LOCK_CLASS, shard])
            return bool(cursor.fetchone()[0])

    def release(self, shard: int) -> None:
        with self._ensure().cursor() as cursor:
            cursor.execute("SELECT pg_advisory_unlock(%s, %s)", [SHARD_LOCK_CLASS, shard])

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already dead
                self._conn.close()
        self._conn = None
        self.backend_pid = None


def shard_lease_begin(*, shard: int, instance_id: str, host: str, pid: int, backend_pid: int | None) -> int:
    """Start a new ownership term of `shard` for the process that just took its lock; returns the term."""
    with transaction.atomic():
        lease, _ = ShardLease.objects.select_for_update().get_or_create(shard=shard)
        lease.term += 1
        lease.instance_id = instance_id
        lease.host = host
        lease.pid = pid
        lease.backend_pid = backend_pid
        lease.since = timezone.now()
        lease.save()
    # A run still marked running on this shard was left by a process that lost it without giving it
    # up (a live owner gives a shard up only once its runs on it ended): close it, as a new leader does.
    for run_id, shards in (
        JobRun.objects.filter(outcome=JobRun.Outcome.RUNNING).exclude(shards="").values_list("id", "shards")
    ):
        if str(shard) in shards.split(","):
            JobRun.objects.filter(pk=run_id, outcome=JobRun.Outcome.RUNNING).update(
                outcome=JobRun.Outcome.ERROR,
                finished_at=lease.since,
                summary=f"abandoned: its process lost shard {shard} before the run finished (term {lease.term})",
            )
    return lease.term


# --- the owner -----------------------------------------------------------------------------------


class ShardOwner:
    """This process's shard ownership: a thread that probes, releases extras and claims free shards every second.

    `owned()` is what every per-account run and task consults before it acts.
    """

    def __init__(
        self,
        *,
        instance_id: str,
        host: str,
        pid: int,
        count: int | None = None,
        locks: ShardLocks | None = None,
        busy: Callable[[int, ShardSet], bool] | None = None,
    ):
        self.instance_id = instance_id
        self.host = host
        self.pid = pid
        self.count = count or shard_count()
        self.locks = locks or ShardLocks()
        self._busy = busy
        self._lock = threading.Lock()
        self._active: dict[int, int] = {}  # shard → term: ours and in use
        self._draining: dict[int, float] = {}  # shard → monotonic time it was given up: no new work
        # shard → (term, monotonic time it becomes active): taken from a holder that may still be alive
        # (its lock connection was cut, say), which stops within SHARD_PROBE_MAX_AGE of losing the lock.
        self._pending: dict[int, tuple[int, float]] = {}
        self._since: dict[int, Any] = {}
        self._running: Counter[int] = Counter()  # shard → sharded runs of this process in flight on it
        self._probed_at = -math.inf
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.changes = 0  # bumped whenever the active set changes (the runner restarts what depends on it)

    # --- what the rest of the process asks -------------------------------------------------------
    def owned(self) -> dict[int, int]:
        """Shard → term of the shards this process may touch now; empty once the last probe is too old."""
        with self._lock:
            if time.monotonic() - self._probed_at > settings.SHARD_PROBE_MAX_AGE:
                return {}
            return dict(self._active)

    def owns_account(self, account_id: int) -> bool:
        return shard_of(account_id, self.count) in self.owned()

    def run_started(self, shards: tuple[int, ...]) -> None:
        with self._lock:
            self._running.update(shards)

    def run_finished(self, shards: tuple[int, ...]) -> None:
        with self._lock:
            self._running.subtract(shards)

    def shard_set(self) -> ShardSet:
        return ShardSet(count=self.count, shards=frozenset(self.owned()))

    # --- the thread --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="shard-owner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop polling (the locks stay held until the process exits, after its runs finished)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _main(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception as exc:
                # The lock connection (or the database) failed mid-round: what we hold is unknown, so
                # stop everything now and start again from a fresh connection on the next round.
                logger.exception("shard owner tick failed")
                self._drop_all(f"round failed: {type(exc).__name__}")
            finally:
                close_old_connections()
            self._stop.wait(settings.SHARD_POLL)
        connections.close_all()  # this thread's own: nothing stays open after the owner stopped

    def _drop_all(self, reason: str) -> None:
        with self._lock:
            lost = sorted(self._active) + sorted(self._draining) + sorted(self._pending)
            self._active.clear()
            self._draining.clear()
            self._pending.clear()
            self._probed_at = -math.inf
            if lost:
                self.changes += 1
        self.locks.close()
        if lost:
            logger.error("shard locks lost (%s): shards %s stopped", reason, lost)

    def tick(self) -> None:
        """One round: probe, give up extras (released once idle), take free shards up to the fair share."""
        try:
            mine, taken, members = self.locks.snapshot()
        except Exception as exc:
            self._drop_all(f"probe failed: {exc}")
            return
        now = time.monotonic()
        with self._lock:
            lost = [s for s in [*self._active, *self._draining, *self._pending] if s not in mine]
            for shard in lost:
                self._active.pop(shard, None)
                self._draining.pop(shard, None)
                self._pending.pop(shard, None)
            for shard, (term, at) in list(self._pending.items()):
                if now >= at:
                    self._pending.pop(shard)
                    self._active[shard] = term
                    self.changes += 1
            if lost:
                self.changes += 1
            self._probed_at = now
            fair = math.ceil(self.count / max(1, members))
            extra = len(self._active) + len(self._pending) - fair
            if extra > 0:
                # Give up the newest-numbered extras: no new work starts on them from now on.
                for shard in sorted(self._active, reverse=True)[:extra]:
                    self._active.pop(shard)
                    self._draining[shard] = now
                self.changes += 1
            draining = dict(self._draining)
        if lost:
            logger.error("shard locks lost: %s", sorted(lost))
        for shard, since in sorted(draining.items()):
            if now - since < settings.SHARD_DRAIN_MAX and self._shard_busy(shard):
                continue
            # Given up on purpose, after our last task on it: its next owner need not wait for us.
            ShardLease.objects.filter(shard=shard, instance_id=self.instance_id).update(instance_id="")
            self.locks.release(shard)
            with self._lock:
                self._draining.pop(shard, None)
            logger.info("shard %s released (fair share %s of %s live processes)", shard, fair, members)
        with self._lock:
            held = len(self._active) + len(self._draining) + len(self._pending)
        free = [s for s in self._claim_order() if s not in taken and s not in mine]
        for shard in free:
            if held >= fair:
                break
            if not self.locks.try_acquire(shard):
                continue
            try:
                wait = self._previous_owner_wait(shard)
                term = shard_lease_begin(
                    shard=shard,
                    instance_id=self.instance_id,
                    host=self.host,
                    pid=self.pid,
                    backend_pid=self.locks.backend_pid,
                )
            except Exception:
                self.locks.release(shard)
                raise
            with self._lock:
                if wait:
                    self._pending[shard] = (term, time.monotonic() + wait)
                else:
                    self._active[shard] = term
                    self.changes += 1
                self._since[shard] = timezone.now()
            held += 1
            if wait:
                logger.info(
                    "shard %s taken (term %s); active in %.1f s, once its last owner stopped", shard, term, wait
                )
            else:
                logger.info("shard %s taken (term %s)", shard, term)

    def _previous_owner_wait(self, shard: int) -> float:
        """Seconds before a shard just taken may be used: SHARD_PROBE_MAX_AGE when its last holder may
        still be running (lost its lock connection but not its process: it stops touching the shard
        within that long of its last good probe), else 0 (it gave the shard up, stopped, or is dead)."""
        previous = ShardLease.objects.filter(shard=shard).values_list("instance_id", flat=True).first()
        if not previous or previous == self.instance_id:
            return 0.0
        alive = (
            SchedulerInstance.objects.filter(
                instance_id=previous, last_heartbeat__gte=timezone.now() - timedelta(seconds=PEER_ALIVE_SECONDS)
            )
            .exclude(role=SchedulerInstance.Role.STOPPED)
            .exists()
        )
        return float(settings.SHARD_PROBE_MAX_AGE) if alive else 0.0

    def _claim_order(self) -> list[int]:
        # Start at a different shard in each process so that simultaneous claimers rarely collide.
        start = (self.locks.backend_pid or self.pid) % self.count
        return [(start + i) % self.count for i in range(self.count)]

    def _shard_busy(self, shard: int) -> bool:
        with self._lock:
            if self._running[shard] > 0:
                return True  # a run of ours (an inline queue pass, say) still covers it
        single = ShardSet(count=self.count, shards=frozenset({shard}))
        try:
            if self._busy is not None:
                return self._busy(shard, single)
            return any(ref_to_obj(path)(shard=shard, shards=single) for path in SHARD_BUSY_HOOKS)
        except Exception:
            logger.exception("shard %s busy check failed; treated as busy", shard)
            return True


# The process's owner, set by the scheduler host when sharding is on (None: this process owns every account).
_owner: ShardOwner | None = None


def shard_owner_install(owner: ShardOwner | None) -> None:
    global _owner
    _owner = owner


def shard_owner() -> ShardOwner | None:
    return _owner


def shards_owned() -> dict[int, int]:
    """Shard → term this process may touch now (empty without an owner: a process that is not a scheduler)."""
    return _owner.owned() if _owner is not None else {}


def shard_account_owned(account_id: int) -> bool:
    """Whether this process may touch the account now: always when sharding is off or no owner runs."""
    if _owner is None:
        return True
    return _owner.owns_account(account_id)


def shard_filter(shards: tuple[int, ...] | None) -> ShardSet | None:
    """The ShardSet of a run's shards (None: the run covers every account)."""
    if shards is None:
        return None
    return ShardSet(count=_owner.count if _owner is not None else shard_count(), shards=frozenset(shards))
