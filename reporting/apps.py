"""Reporting app config: the top layer (daily summary, capital allocation, demo data, dashboards)."""

from django.apps import AppConfig


class ReportingConfig(AppConfig):
    name = "reporting"
    verbose_name = "Reporting"
