"""The declarative job registry (SPEC §2.1): one reviewed table, plus validated overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from django.conf import settings

INTERVAL_FIELDS = ("weeks", "days", "hours", "minutes", "seconds")
CRON_FIELDS = ("year", "month", "day", "week", "day_of_week", "hour", "minute", "second")


@dataclass(frozen=True)
class Trigger:
    kind: str  # "interval" | "cron"
    fields: tuple[tuple[str, Any], ...]

    def as_dict(self) -> dict[str, Any]:
        return dict(self.fields)

    def build(self, timezone: str) -> BaseTrigger:
        if self.kind == "interval":
            return IntervalTrigger(timezone=ZoneInfo(timezone), **self.as_dict())
        return CronTrigger(timezone=ZoneInfo(timezone), **self.as_dict())


def interval(**fields: int) -> Trigger:
    return Trigger("interval", tuple(sorted(fields.items())))


def cron(**fields: int | str) -> Trigger:
    return Trigger("cron", tuple(sorted(fields.items())))


@dataclass(frozen=True)
class CatchUp:
    """A job that also runs once, as a CATCHUP JobRun, when a leadership term starts (SPEC §2.2).

    `step` orders the catch-ups of a term, lowest first. `when`, if set, is a "module:function"
    reference called with `now=` (aware UTC) that says whether the catch-up is due; None: always.
    The domain that owns the job owns the condition; the scheduler imports neither.
    """

    step: int
    when: str | None = None


@dataclass(frozen=True)
class JobSpec:
    id: str
    name: str
    func: str  # "module:function", resolving to the wrapped job function
    trigger: Trigger
    grace: int  # misfire_grace_time, seconds
    budget: float  # seconds; a longer run is an overrun
    enabled: bool = True
    on_leader: CatchUp | None = None  # run once when a term starts, before the leader announcement
    wakeable: bool = False  # may be run at once between ticks on a wake-up (scheduler.wake.job_wake)
    # Per-account work: with sharding on (PostgreSQL), run by every process that owns account shards,
    # each on its own scheduler and for its own shards' accounts only (scheduler.shards).
    sharded: bool = False

    def trigger_text(self, timezone: str | None = None) -> str:
        return str(self.trigger.build(timezone or settings.SCHEDULER_TIMEZONE))


# Business jobs are added here by their domains as their real functions land.
REGISTRY: tuple[JobSpec, ...] = (
    JobSpec(
        id="prune_job_history",
        name="Prune Job History",
        func="scheduler.jobs:prune_job_history",
        trigger=cron(hour=4, minute=41),
        grace=3600,
        budget=300,
    ),
    JobSpec(
        id="rebalance_order_queue",
        name="Rebalance Order Queue",
        func="orders.jobs:rebalance_order_queue",
        trigger=interval(seconds=1),
        grace=2,
        budget=0.8,
        wakeable=True,  # intake wakes it: a signal's orders go out at once, not at the next tick
        sharded=True,
    ),
    JobSpec(
        id="update_open_orders",
        name="Update Open Orders",
        func="orders.jobs:update_open_orders",
        trigger=interval(seconds=29),
        grace=29,
        budget=20,
        sharded=True,
    ),
    JobSpec(
        id="update_price_cache",
        name="Update Price Cache",
        func="positions.jobs:update_price_cache",
        trigger=interval(seconds=31),
        grace=31,
        budget=20,
        on_leader=CatchUp(step=2),
    ),
    JobSpec(
        id="calculate_unrealized_pnl",
        name="Calculate Unrealized Pnl",
        func="positions.jobs:calculate_unrealized_pnl",
        trigger=interval(seconds=307),
        grace=300,
        budget=60,
    ),
    JobSpec(
        id="check_websocket_health",
        name="Check Websocket Health",
        func="orders.jobs:check_websocket_health",
        trigger=interval(seconds=60),
        grace=60,
        budget=20,
    ),
    JobSpec(
        id="securities_token_refresh",
        name="Securities Token Refresh",
        func="accounts.jobs:securities_token_refresh",
        trigger=interval(hours=6),
        grace=3600,
        budget=120,
    ),
    JobSpec(
        id="precision_cache_update",
        name="Precision Cache Update",
        func="positions.jobs:precision_cache_update",
        trigger=cron(hour=3, minute=7),
        grace=3600,
        budget=900,
        on_leader=CatchUp(step=1, when="exchanges.selectors:market_info_is_stale"),
    ),
    JobSpec(
        id="symbol_validator_refresh",
        name="Symbol Validator Refresh",
        func="positions.jobs:symbol_validator_refresh",
        trigger=cron(minute=15),
        grace=600,
        budget=300,
    ),
    JobSpec(
        id="send_daily_summary",
        name="Send Daily Summary",
        func="reporting.jobs:send_daily_summary",
        trigger=cron(hour=21, minute=3),
        grace=3600,
        budget=300,
        on_leader=CatchUp(step=4, when="reporting.summary:summary_catch_up_due"),
    ),
    JobSpec(
        id="calculate_daily_performance",
        name="Calculate Daily Performance",
        func="positions.jobs:calculate_daily_performance",
        trigger=cron(hour=0, minute=0, second=13),
        grace=3600,
        budget=900,
        on_leader=CatchUp(step=3),
    ),
    JobSpec(
        id="auto_rebalance_accounts",
        name="Auto Rebalance Accounts",
        func="reporting.jobs:auto_rebalance_accounts",
        trigger=cron(minute=17),
        grace=600,
        budget=300,
    ),
)

PROBE_JOB = JobSpec(
    id="scheduler_probe",
    name="Scheduler Probe",
    func="scheduler.jobs:scheduler_probe",
    trigger=interval(seconds=1),
    grace=2,
    budget=0.8,
)


class OverrideError(ValueError):
    """A SCHEDULER_JOB_OVERRIDES entry that cannot be applied; the message names job and field."""


def _apply_override(spec: JobSpec, override: Any) -> JobSpec:
    if not isinstance(override, dict):
        raise OverrideError(f"SCHEDULER_JOB_OVERRIDES[{spec.id!r}]: must be an object, got {override!r}")
    allowed = INTERVAL_FIELDS if spec.trigger.kind == "interval" else CRON_FIELDS
    trigger_fields = spec.trigger.as_dict()
    grace, enabled = spec.grace, spec.enabled
    for field, value in override.items():
        where = f"SCHEDULER_JOB_OVERRIDES[{spec.id!r}].{field}"
        if field == "grace":
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise OverrideError(f"{where}: must be a positive whole number of seconds, got {value!r}")
            grace = value
        elif field == "enabled":
            if not isinstance(value, bool):
                raise OverrideError(f"{where}: must be true or false, got {value!r}")
            enabled = value
        elif field in allowed:
            if isinstance(value, bool) or not isinstance(value, int | str):
                raise OverrideError(f"{where}: must be a number or a cron expression, got {value!r}")
            if spec.trigger.kind == "interval" and (not isinstance(value, int) or value < 0):
                raise OverrideError(f"{where}: must be a whole number >= 0, got {value!r}")
            trigger_fields[field] = value
        else:
            raise OverrideError(
                f"{where}: unknown field (allowed: grace, enabled, {', '.join(allowed)}); "
                "only trigger fields, grace and enabled may be overridden"
            )
    trigger = Trigger(spec.trigger.kind, tuple(sorted(trigger_fields.items())))
    try:
        built: BaseTrigger = trigger.build(settings.SCHEDULER_TIMEZONE)
    except (TypeError, ValueError) as exc:
        raise OverrideError(f"SCHEDULER_JOB_OVERRIDES[{spec.id!r}]: invalid trigger: {exc}") from None
    # IntervalTrigger silently turns a zero interval into 1 s; refuse it instead.
    if isinstance(built, IntervalTrigger) and timedelta(**trigger.as_dict()) <= timedelta(0):
        raise OverrideError(f"SCHEDULER_JOB_OVERRIDES[{spec.id!r}]: the interval must be longer than zero")
    return dataclasses.replace(spec, trigger=trigger, grace=grace, enabled=enabled)


def registry_specs(*, overrides: Any = None, probe: bool | None = None) -> list[JobSpec]:
    """The registry as configured: the code table, the probe job when enabled, overrides applied.

    Raises OverrideError naming the job and field when an override is invalid.
    """
    specs = list(REGISTRY)
    if settings.SCHEDULER_PROBE_JOB if probe is None else probe:
        specs.append(PROBE_JOB)
    overrides = settings.SCHEDULER_JOB_OVERRIDES if overrides is None else overrides
    if isinstance(overrides, str):
        raise OverrideError(f"SCHEDULER_JOB_OVERRIDES: {overrides}")
    if not isinstance(overrides, dict):
        raise OverrideError("SCHEDULER_JOB_OVERRIDES: must be a JSON object keyed by job id")
    by_id = {spec.id: spec for spec in specs}
    for job_id, override in overrides.items():
        if job_id not in by_id:
            raise OverrideError(f"SCHEDULER_JOB_OVERRIDES[{job_id!r}]: no such job in the registry")
        by_id[job_id] = _apply_override(by_id[job_id], override)
    return list(by_id.values())


def catch_up_specs() -> list[JobSpec]:
    """The configured rows declaring a leader catch-up, in step order (disabled rows included)."""
    declared = [(spec.on_leader.step, spec) for spec in registry_specs_lenient() if spec.on_leader is not None]
    return [spec for _, spec in sorted(declared, key=lambda pair: pair[0])]


def registry_spec(job_id: str) -> JobSpec | None:
    for spec in registry_specs_lenient():
        if spec.id == job_id:
            return spec
    return None


def registry_specs_lenient() -> list[JobSpec]:
    """The configured registry for readers (web, status); falls back to the code table on a bad override."""
    try:
        return registry_specs()
    except OverrideError:
        return registry_specs(overrides={})
