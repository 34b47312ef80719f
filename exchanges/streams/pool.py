"""A bounded thread pool that runs one key's calls in order and different keys side by side, round-robin.

The stream manager keys its database work by account: one account whose update takes seconds
(a row lock, a slow disk) holds one worker and its own later updates, never another account's.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

from django.db import close_old_connections

from core.executors import DbExecutor

logger = logging.getLogger(__name__)


class KeyedSerialPool:
    """`submit(key, fn)` returns a Future; calls of one key run one at a time in submission order.

    Each key with work has exactly one entry in the executor's FIFO at a time: after one call
    it goes to the back of the line if more of its calls wait, so a key with a backlog of a
    hundred calls delays any other key by at most one call, and a blocked call holds one worker.
    Calls run with close_old_connections around them (they run outside APScheduler); the
    DbExecutor underneath closes the workers' connections on `close()`.
    """

    def __init__(self, max_workers: int, *, name: str):
        if max_workers < 1:
            raise ValueError(f"KeyedSerialPool {name} needs at least one worker, not {max_workers}")
        self.name = name
        self.max_workers = max_workers
        self._executor = DbExecutor(max_workers, thread_name_prefix=name)
        self._queues: dict[Hashable, deque[tuple[Future, Callable[[], Any]]]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, key: Hashable, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"pool {self.name} is closed")
            queue = self._queues.get(key)
            if queue is not None:
                queue.append((future, lambda: fn(*args, **kwargs)))
                return future
            self._queues[key] = deque([(future, lambda: fn(*args, **kwargs))])
        self._schedule(key)
        return future

    def pending(self, key: Hashable) -> int:
        """Calls of `key` not finished yet (the running one included)."""
        with self._lock:
            return len(self._queues.get(key, ()))

    def _schedule(self, key: Hashable) -> None:
        try:
            self._executor.submit(self._run_one, key)
        except RuntimeError:  # shut down: nothing of this key will run
            self._abandon(key)

    def _run_one(self, key: Hashable) -> None:
        with self._lock:
            future, call = self._queues[key][0]
        if future.set_running_or_notify_cancel():
            close_old_connections()
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting caller
                future.set_exception(exc)
            else:
                future.set_result(result)
            finally:
                close_old_connections()
        with self._lock:
            queue = self._queues[key]
            queue.popleft()
            more = bool(queue)
            if not more:
                del self._queues[key]
        if more:
            self._schedule(key)  # to the back of the line: the other keys go first

    def _abandon(self, key: Hashable) -> None:
        with self._lock:
            queue = self._queues.pop(key, deque())
        for future, _call in queue:
            future.cancel()

    def close(self) -> None:
        """Refuse new calls, cancel the waiting ones, wait for the running ones and close their connections."""
        with self._lock:
            self._closed = True
            keys = list(self._queues)
        self._executor.close()
        for key in keys:
            self._abandon(key)
