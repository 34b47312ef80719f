"""core.pgpool: engine worker threads share a few connections and hold none over an exchange call."""

from __future__ import annotations

import threading
import time

import pytest
from django.db import connection, connections

from core.executors import KeyedPool
from core.pgpool import ConnectionPool, connection_pool, connection_pools_close_idle, connection_release


@pytest.fixture
def pool_of(settings):
    """The process's pool, rebuilt with `size` connections (EXECUTION_DB_CONNECTIONS)."""

    def make(size: int) -> ConnectionPool:
        settings.EXECUTION_DB_CONNECTIONS = size
        connection_pools_close_idle()
        pool = connection_pool()
        assert pool.size == size and not pool.taken
        return pool

    return make


def _backends() -> int:
    """Connections to the test database other than this thread's own."""
    return len(_sessions())


def _backends_settled(*, at_most: int, timeout: float = 5.0) -> int:
    """_backends() once it is `at_most` or less, or after `timeout` seconds: PostgreSQL lists a backend
    until its process has exited, which happens just after the client closes the connection."""
    deadline = time.monotonic() + timeout
    while True:
        count = _backends()
        if count <= at_most or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def _sessions() -> list[tuple]:
    """The other client sessions on the test database. Client connections only: an autovacuum worker on
    the test database (after the write-heavy tests before this one) is a backend too."""
    with connections["default"].cursor() as cursor:
        cursor.execute(
            "SELECT pid, application_name, state, left(query, 80) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid() AND backend_type = 'client backend'"
        )
        return cursor.fetchall()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_many_engine_threads_share_the_pool_and_hold_no_connection_while_they_wait_on_an_exchange(pool_of):
    shared = pool_of(3)
    before = _backends()
    waiting = threading.Barrier(9)  # 8 tasks "on the exchange" at once, and this thread
    resume = threading.Event()
    seen: list[int] = []

    def task(n: int) -> int:
        with connection.cursor() as cursor:  # database work before the call: a pooled connection
            cursor.execute("SELECT %s", [n])
            seen.append(cursor.fetchone()[0])
        connection_release()  # what CcxtGateway._call does before every request
        waiting.wait(10)
        resume.wait(10)
        with connection.cursor() as cursor:  # recording the reply: a connection again
            cursor.execute("SELECT %s", [n * 10])
            return int(cursor.fetchone()[0])

    pool = KeyedPool(8, name="test-pgpool")
    try:
        futures = [pool.submit(n, task, n) for n in range(8)]
        waiting.wait(10)
        during = _backends() - before  # all 8 wait on the "exchange"
        held_during = shared.taken  # connections threads hold while they wait
        resume.set()
        results = sorted(f.result(10) for f in futures)  # type: ignore[union-attr]
        assert shared.taken == 0  # every connection was given back
    finally:
        pool.close()
    assert sorted(seen) == list(range(8))
    assert results == [n * 10 for n in range(8)]
    print(f"connections held while 8 threads waited on the exchange: {during}")
    assert held_during == 0, "a thread kept its connection over the exchange call"
    assert during <= 3, "more connections than EXECUTION_DB_CONNECTIONS"
    left = _backends_settled(at_most=before)  # a closed connection's server process ends a moment later
    assert left - before <= 0, f"closing the pool left pooled connections open: {_sessions()}"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_broken_pooled_connection_is_discarded_with_the_idle_ones(pool_of):
    pool = pool_of(2)
    opened: list[object] = []

    def connect() -> object:
        conn = connection.get_new_connection(connection.get_connection_params())
        opened.append(conn)
        return conn

    first, second = pool.take(connect), pool.take(connect)
    pool.give(first)
    assert pool.idle_count() == 1
    second.close()  # as psycopg2 leaves a connection whose server went away
    pool.give(second)
    assert pool.idle_count() == 0 and first.closed  # the idle one went too: it would be broken alike
    third = pool.take(connect)  # both slots free again: a new connection
    assert third not in (first, second) and not third.closed
    pool.give(third)
    assert connection_pools_close_idle() == 1 and third.closed
