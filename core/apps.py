"""Core app config: the shared kernel every domain app builds on (imports no other app)."""

from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "core"
    verbose_name = "Core"
