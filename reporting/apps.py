"""Reporting: the landing page and the trader dashboard (reads positions, orders, accounts; the top layer)."""

from django.apps import AppConfig


class ReportingConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "reporting"
