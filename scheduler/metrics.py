"""GET /metrics: Prometheus text computed from the database on every scrape (SPEC §2.5)."""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import cast

from django.conf import settings
from django.db.models import Count, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from core.models import MetricCounter
from scheduler.models import JobRun, Leadership, SchedulerInstance
from scheduler.selectors import STANDBY_HEARTBEAT_MAX_AGE, scheduler_running, scheduler_shards

logger = logging.getLogger(__name__)

WINDOW = timedelta(minutes=15)
BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
PREFIX = "tradingsite_"

# MetricCounter name -> (metric name, help); each summed over the window by its labels.
WINDOW_COUNTERS = {
    "suppressed_duplicates": (
        "scheduler_suppressed_duplicates_15m",
        "Runs skipped because the (job, scheduled time) was already claimed, the term was stale or the job busy",
    ),
    "job_overruns": ("scheduler_job_overruns_15m", "Runs longer than their budget"),
    "job_errors": ("scheduler_job_errors_15m", "Runs that raised"),
    "exchange_calls": ("exchange_calls_15m", "Calls to an exchange, by exchange"),
    "exchange_errors": ("exchange_errors_15m", "Failed calls to an exchange, by exchange"),
    "queue_moves": ("queue_moves_15m", "Orders moved by the order queue"),
}
CONGESTION = "queue_congested_pairs"
LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


def parse_labels(text: str) -> dict[str, str]:
    """MetricCounter.labels ("job=x" or "a=1,b=2") as a dict; malformed parts are dropped."""
    labels = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if sep and LABEL_NAME.match(key) and not key.startswith("__"):
            labels[key] = value.strip()
    return labels


class SchedulerCollector:
    """Collects every metric from the database when a registry is scraped; holds no counters itself."""

    def __init__(self, *, now: datetime):
        self.now = now
        self.since = now - WINDOW

    def collect(self) -> Iterator[Metric]:
        yield from self._host()
        yield from self._runs()
        yield self._histogram(
            "duration_ms", "scheduler_job_duration_seconds", "Run durations of runs scheduled in the last 15 minutes"
        )
        yield self._histogram(
            "lateness_ms",
            "scheduler_job_lateness_seconds",
            "Start minus scheduled time of runs scheduled in the last 15 minutes",
        )
        yield from self._counters()

    def _host(self) -> Iterator[Metric]:
        running = GaugeMetricFamily(PREFIX + "scheduler_running", "1 when a live leader schedules on time, else 0")
        running.add_metric([], 1 if scheduler_running(now=self.now) else 0)
        yield running
        term = GaugeMetricFamily(PREFIX + "scheduler_leader_term", "Current leadership term")
        term.add_metric([], Leadership.objects.filter(id=1).values_list("term", flat=True).first() or 0)
        yield term
        instances = GaugeMetricFamily(
            PREFIX + "scheduler_instances", "Scheduler processes with a heartbeat in the last 10 s", labels=["role"]
        )
        live = dict(
            SchedulerInstance.objects.filter(last_heartbeat__gte=self.now - STANDBY_HEARTBEAT_MAX_AGE)
            .values("role")
            .annotate(n=Count("id"))
            .values_list("role", "n")
        )
        for role in SchedulerInstance.Role.values:
            instances.add_metric([role], live.get(role, 0))
        yield instances
        rss = GaugeMetricFamily(
            PREFIX + "scheduler_rss_bytes",
            "Resident memory of each live scheduler process",
            labels=["host", "pid", "role"],
        )
        for host, pid, role, rss_bytes in SchedulerInstance.objects.filter(
            last_heartbeat__gte=self.now - STANDBY_HEARTBEAT_MAX_AGE, rss_bytes__isnull=False
        ).values_list("host", "pid", "role", "rss_bytes"):
            rss.add_metric([host, str(pid), role], cast(int, rss_bytes))  # rss_bytes__isnull=False
        yield rss
        yield from self._shards()

    def _shards(self) -> Iterator[Metric]:
        """Account shard ownership (nothing when sharding is off): term per held shard, shards per process."""
        shards = scheduler_shards()
        if not shards:
            return
        term = GaugeMetricFamily(
            PREFIX + "scheduler_shard_term",
            "Ownership term of each held account shard, labelled with its owner",
            labels=["shard", "host", "pid"],
        )
        owned = GaugeMetricFamily(
            PREFIX + "scheduler_shards_owned", "Account shards each scheduler process holds", labels=["host", "pid"]
        )
        per_owner: dict[tuple[str, str], int] = {}
        for row in shards:
            if row["held"]:
                owner = (str(row["host"]), str(row["pid"]))
                term.add_metric([str(row["shard"]), *owner], row["term"] or 0)
                per_owner[owner] = per_owner.get(owner, 0) + 1
        for owner, n in sorted(per_owner.items()):
            owned.add_metric(list(owner), n)
        free = GaugeMetricFamily(PREFIX + "scheduler_shards_free", "Account shards no live process holds")
        free.add_metric([], sum(1 for row in shards if not row["held"]))
        yield term
        yield owned
        yield free

    def _recent_runs(self):  # noqa: ANN202
        # The scheduled_at index bounds every scan to the window.
        return JobRun.objects.filter(scheduled_at__gte=self.since).order_by()

    def _runs(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily(
            PREFIX + "scheduler_job_runs_15m",
            "Runs scheduled in the last 15 minutes, by job and outcome",
            labels=["job", "outcome"],
        )
        rows = self._recent_runs().values("job_id", "outcome").annotate(n=Count("id")).order_by("job_id", "outcome")
        for row in rows:
            runs.add_metric([row["job_id"], row["outcome"]], row["n"])
        yield runs

    def _histogram(self, field: str, name: str, documentation: str) -> Metric:
        histogram = HistogramMetricFamily(PREFIX + name, documentation, labels=["job"])
        aggregates = {
            f"le_{i}": Count("id", filter=Q(**{f"{field}__lte": int(bound * 1000)}))
            for i, bound in enumerate(BUCKETS_SECONDS)
        }
        rows = (
            self._recent_runs()
            .filter(**{f"{field}__isnull": False})
            .values("job_id")
            .annotate(total=Count("id"), sum_ms=Sum(field), **aggregates)
            .order_by("job_id")
        )
        for row in rows:
            buckets = [(floatToGoString(bound), row[f"le_{i}"]) for i, bound in enumerate(BUCKETS_SECONDS)]
            buckets.append(("+Inf", row["total"]))
            histogram.add_metric([row["job_id"]], buckets, (row["sum_ms"] or 0) / 1000)
        return histogram

    def _counters(self) -> Iterator[Metric]:
        families = {
            counter: Metric(PREFIX + metric_name, documentation, "gauge")
            for counter, (metric_name, documentation) in WINDOW_COUNTERS.items()
        }
        rows = (
            MetricCounter.objects.filter(minute__gte=self.since, name__in=list(WINDOW_COUNTERS))
            .values("name", "labels")
            .annotate(total=Sum("value"))
            .order_by("name", "labels")
        )
        for row in rows:
            family = families[row["name"]]
            family.add_sample(family.name, parse_labels(row["labels"]), row["total"])
        yield from families.values()

        congestion = Metric(
            PREFIX + CONGESTION, "Pairs with 20 or more queued orders, as of the latest minute recorded", "gauge"
        )
        # At most 15 minutes x label sets rows; the latest minute is picked here rather than in a second query.
        congestion_rows = list(
            MetricCounter.objects.filter(minute__gte=self.since, name=CONGESTION)
            .order_by("-minute")
            .values_list("minute", "labels", "value")
        )
        if congestion_rows:
            latest = congestion_rows[0][0]
            for minute, labels, value in congestion_rows:
                if minute == latest:
                    congestion.add_sample(congestion.name, parse_labels(labels), value)
        yield congestion


def _bearer_token(request: HttpRequest) -> str | None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def _unauthorized(error: str = "") -> HttpResponse:
    response = HttpResponse("authentication required\n", status=401, content_type="text/plain")
    response["WWW-Authenticate"] = f'Bearer realm="metrics"{error}'
    return response


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition for staff sessions or `Authorization: Bearer <METRICS_TOKEN>`.

    401 without credentials or with a wrong token, 403 for a signed-in non-staff user.
    Read-only; a fixed number of aggregate queries over 15-minute windows.
    """
    user = request.user
    if not (user.is_active and user.is_staff):
        token = _bearer_token(request)
        expected = settings.METRICS_TOKEN
        if token is not None:
            if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
                logger.warning("metrics: rejected bearer token from %s", request.META.get("REMOTE_ADDR"))
                return _unauthorized(', error="invalid_token"')
        elif user.is_authenticated:
            return HttpResponse("staff only\n", status=403, content_type="text/plain")
        else:
            return _unauthorized()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SchedulerCollector(now=timezone.now()))
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
