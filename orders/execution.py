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
from typing import Any

from django.conf import settings

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

    def is_alive(self) -> bool:
        return self._alive
