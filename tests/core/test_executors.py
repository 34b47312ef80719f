"""core.executors.KeyedPool: its workers exist before the first task, and one key runs one task at a time."""

from __future__ import annotations

import threading

from core.executors import KeyedPool


def _workers(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(f"{name}_")]


def test_every_worker_is_started_with_the_pool_so_a_first_burst_of_tasks_starts_none():
    pool = KeyedPool(6, name="prestarted")
    try:
        assert len(_workers("prestarted")) == 6
        assert pool.in_flight() == 0
        gate = threading.Event()
        futures = [pool.submit(("pair", i), gate.wait, 10) for i in range(6)]
        assert pool.submit(("pair", 0), gate.wait, 10) is None  # one task per key at a time
        assert len(_workers("prestarted")) == 6  # the burst started no thread
        gate.set()
        assert all(f is not None and f.result(10) for f in futures)
        assert pool.drain(10) and pool.in_flight() == 0
    finally:
        pool.close()
    assert _workers("prestarted") == []


def test_an_inline_pool_starts_no_thread_and_runs_each_task_in_the_caller():
    pool = KeyedPool(0, name="inline-pool")
    future = pool.submit("key", threading.current_thread)
    assert future is not None and future.result() is threading.current_thread()
    assert _workers("inline-pool") == []
