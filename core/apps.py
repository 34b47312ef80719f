"""Core app config: the shared kernel every domain app builds on (imports no other app)."""

from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Core"

    def ready(self) -> None:
        from django.db.backends.signals import connection_created

        from core import checks  # noqa: F401  (registers the FIELD_ENCRYPTION_KEY check)
        from core.db import on_connection_created

        # Before any query: MoneyField columns on SQLite compare through the "decimal" collation.
        connection_created.connect(on_connection_created, dispatch_uid="core.db.sqlite_money")
