"""Notification state: the per-key alert throttle."""

from __future__ import annotations

from django.db import models


class AlertThrottle(models.Model):
    """Last time an alert with this key was sent; survives a leader takeover."""

    key = models.CharField(max_length=200, primary_key=True)
    last_sent_at = models.DateTimeField()
    suppressed = models.IntegerField(default=0)

    def __str__(self) -> str:
        return f"{self.key} @ {self.last_sent_at}"
