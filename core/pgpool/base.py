"""Django's PostgreSQL backend whose pooled threads (core.pgpool) share the process's connection pool.

Why not Django's own pool: it exists for psycopg 3 only, and this project runs psycopg2 (its
session-level advisory locks and LISTEN connections stay on threads of their own, never pooled).
A pooled connection is configured once, as Django configures a new one; a thread that takes it
runs Django's usual per-connection set-up (autocommit, time zone), which costs no round trip on
a connection already set that way.
"""

from __future__ import annotations

from typing import Any

from django.db.backends.postgresql import base as postgresql

from core.pgpool import connection_pool, pool_owning, pooled_thread


class DatabaseWrapper(postgresql.DatabaseWrapper):
    pooled = True

    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        if not pooled_thread():
            return super().get_new_connection(conn_params)
        return connection_pool(self.alias).take(lambda: super(DatabaseWrapper, self).get_new_connection(conn_params))

    def _close(self) -> None:
        # Whichever thread closes it (a stopping executor closes its workers' connections): back to its pool.
        pool = pool_owning(self.alias, self.connection) if self.connection is not None else None
        if pool is None:
            super()._close()  # type: ignore[misc]  # django-stubs omit the private hook
            return
        with self.wrap_database_errors:
            pool.give(self.connection)
