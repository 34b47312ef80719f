"""A thread pool for ORM work driven from an asyncio loop, whose DB connections are closed on stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from django.db import connections

logger = logging.getLogger(__name__)


class DbExecutor(ThreadPoolExecutor):
    """Worker threads for ORM calls; `close()` waits for them and closes every connection they opened.

    Connections live per thread and outlive an exited worker (keeping, among others, a test
    database from being dropped). Each call records its thread's connections; once every worker
    has finished (shutdown waits), they are closed from the stopping thread, with Django's
    thread-sharing switch that exists for exactly this hand-over.
    """

    def __init__(self, max_workers: int = 8, *, thread_name_prefix: str = "db"):
        super().__init__(max_workers, thread_name_prefix=thread_name_prefix)
        self._connections: dict[int, Any] = {}
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        def tracked() -> Any:
            try:
                return fn(*args, **kwargs)
            finally:
                opened = connections.all(initialized_only=True)
                with self._lock:
                    self._connections.update((id(conn), conn) for conn in opened)

        return super().submit(tracked)

    def close(self) -> None:
        """Wait for the running calls (a cancelled await does not stop its thread), then close every connection."""
        self.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            opened, self._connections = list(self._connections.values()), {}
        for conn in opened:
            conn.inc_thread_sharing()
            try:
                conn.close()
            except Exception as exc:
                logger.debug("closing a worker's connection failed: %s", exc)
            finally:
                conn.dec_thread_sharing()
