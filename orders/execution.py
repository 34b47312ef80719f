"""The execution engine: exchange I/O of the queue and the reconciler on bounded worker pools.

Each pool runs at most one task per key: the queue's key is the pair (account, market type,
symbol), so orders of one pair are placed, cancelled and looked up one after another as before,
while different accounts and symbols go to their exchanges at the same time. Row locks are never
held over a call: the transitions commit an intent state (SUBMITTING, CANCELLING) first.

Pools live in the leader process; the leader thread adapter below lets the runner stop them
(letting running calls finish) when leadership ends.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from django.conf import settings
from django.db import DatabaseError

from core.counters import counters_buffer_flush
from core.executors import KeyedPool

logger = logging.getLogger(__name__)

# pool name → the setting that sizes it (0 runs tasks inline in the caller).
POOL_SETTINGS = {"queue": "EXECUTION_WORKERS", "reconcile": "RECONCILE_WORKERS"}

_pools: dict[str, KeyedPool] = {}
_pools_lock = threading.Lock()


def execution_pool(name: str) -> KeyedPool:
    """The process's pool `name` ("queue" or "reconcile"), sized by its setting (rebuilt if that changed)."""
    workers = int(getattr(settings, POOL_SETTINGS[name]))
    with _pools_lock:
        pool = _pools.get(name)
        if pool is not None and pool.max_workers == workers:
            return pool
        _pools[name] = KeyedPool(workers, name=f"exec-{name}")
    if pool is not None:
        pool.close()
    return _pools[name]


def execution_pools_close(timeout: float = 10.0) -> None:
    """Let every task in flight finish (up to `timeout` s), then stop the pools' threads and close their connections."""
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close(timeout)


def execution_shard_busy(*, shard: int, shards: Any) -> bool:
    """Whether a task of this process still works on an account of `shards` (a scheduler.shards.ShardSet).

    The shard owner releases a shard it gave up only once this says no. Queue keys are pairs
    (account id first); reconcile keys are ("reconcile", account id, market type).
    """
    with _pools_lock:
        pools = list(_pools.values())
    for pool in pools:
        for key in pool.keys_in_flight():
            if not isinstance(key, tuple) or not key:
                continue
            account_id = key[1] if key[0] == "reconcile" else key[0]
            if isinstance(account_id, int) and shards.has(account_id):
                return True
    return False


class ExecutionPools:
    """Leader thread adapter (scheduler.runner LEADER_THREADS): the pools start on demand; `stop` drains them."""

    def __init__(self, host: Any = None):
        self.host = host
        self._alive = False

    def start(self) -> None:
        self._alive = True

    def stop(self, timeout: float = 10.0) -> None:
        self._alive = False
        execution_pools_close(timeout)
        # What the last tasks counted (their pass has ended): written now, not by a pass to come.
        try:
            counters_buffer_flush()
        except DatabaseError:
            logger.warning("execution: the buffered counters could not be written", exc_info=True)

    def is_alive(self) -> bool:
        return self._alive


class ClientWarmer:
    """Leader thread, and with account sharding a thread of every process (scheduler.runner): builds the
    exchange clients of the accounts this process trades for (active links of active strategies and
    accounts; with sharding, those of the shards it owns) in the background, so the first signal
    after a start, a failover or a shard move does not pay for them (a ccxt client per account and
    market type: milliseconds each, seconds for a thousand). Newly owned shards are picked up within
    WARM_POLL, new subscriptions within WARM_RESCAN. A gateway without client state to build (no
    `prepare`) is skipped; a failure is logged and retried at the next rescan.
    """

    WARM_POLL = 1.0
    WARM_RESCAN = 60.0

    def __init__(self, host: Any = None):
        self.host = host
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="client-warmer", daemon=True)
        self.warmed: set[tuple[int, str]] = set()  # (account id, market type) built in this process

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive() or self._stop.is_set()

    def _main(self) -> None:
        from django.db import close_old_connections, connections

        from scheduler.shards import shard_owner

        seen: frozenset[int] | None = None
        rescan_at = 0.0
        while not self._stop.is_set():
            try:
                owner = shard_owner()
                shards = frozenset(owner.owned()) if owner is not None else None
                now = time.monotonic()
                if shards != seen or now >= rescan_at:
                    self.warm(owner.shard_set() if owner is not None else None)
                    seen, rescan_at = shards, now + self.WARM_RESCAN
            except Exception:
                logger.exception("client warm-up failed; retried in %.0f s", self.WARM_RESCAN)
                rescan_at = time.monotonic() + self.WARM_RESCAN
            finally:
                close_old_connections()
            self._stop.wait(self.WARM_POLL)
        connections.close_all()

    def warm(self, shards: Any = None) -> int:
        """Build the clients not built yet of the active links (of `shards`, a ShardSet; None: all); how many."""
        from accounts.models import StrategyAccount
        from exchanges.services import gateway_for

        links = StrategyAccount.objects.filter(
            is_active=True, strategy__is_active=True, account__is_active=True
        ).select_related("account", "strategy")
        if shards is not None:
            if not shards.shards:
                return 0
            links = links.filter(shards.q("account_id"))
        built = 0
        for link in links.iterator(chunk_size=500):
            if self._stop.is_set():
                break
            key = (link.account_id, link.strategy.market_type)
            if key in self.warmed:
                continue
            prepare = getattr(gateway_for(link.account), "prepare", None)
            if prepare is not None:
                prepare(link.strategy.market_type)
                built += 1
            self.warmed.add(key)
        if built:
            logger.info("exchange clients built for %d account markets", built)
        return built
