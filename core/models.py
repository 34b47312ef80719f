"""Shared kernel tables: per-minute metric counters written by any process."""

from __future__ import annotations

from django.db import models


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
