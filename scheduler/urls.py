"""Scheduler URLs: status API, health, metrics."""

urlpatterns: list = []
