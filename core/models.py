"""Shared kernel tables: per-minute metric counters written by any process, hashed API tokens."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.utils import timezone


class MetricCounter(models.Model):
    """Per-minute counters written by scheduler processes and summed by /metrics."""

    minute = models.DateTimeField()
    name = models.CharField(max_length=64)
    labels = models.CharField(max_length=200, blank=True, default="")
    value = models.BigIntegerField(default=0)

    class Meta:
        # Created by the scheduler app before this kernel existed; the table keeps its name.
        db_table = "scheduler_metriccounter"
        constraints = [
            models.UniqueConstraint(fields=["minute", "name", "labels"], name="metriccounter_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.name}{{{self.labels}}} @ {self.minute}: {self.value}"


class ApiToken(models.Model):
    """A DRF API token, stored only as the SHA-256 digest of its key; the key is shown once, at issue.

    Keys are 160 random bits, so a fast digest is enough (nothing to brute-force) and a lookup by
    digest stays one indexed query per request.
    """

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, blank=True, default="", help_text="what the token is for")
    prefix = models.CharField(
        max_length=8, editable=False, help_text="the key's first characters, to tell tokens apart"
    )
    digest = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'token'})"
