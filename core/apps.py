"""Core app config: the shared kernel every domain app builds on (imports no other app)."""

from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Core"

    def ready(self) -> None:
        from core import checks  # noqa: F401  (registers the FIELD_ENCRYPTION_KEY check)
