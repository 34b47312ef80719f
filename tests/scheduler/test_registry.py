"""The registry equals SPEC §2.1 row for row; functions import, are wrapped, and job state pickles."""

from __future__ import annotations

import pickle

import pytest
from apscheduler.job import Job
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.util import ref_to_obj

from scheduler.reconcile import job_function
from scheduler.registry import PROBE_JOB, REGISTRY, catch_up_specs, cron, interval, registry_specs

# SPEC §2.1, transcribed: id -> (trigger, grace s, budget s, function).
SPEC_TABLE = {
    "rebalance_order_queue": (interval(seconds=1), 2, 0.8, "orders.jobs:rebalance_order_queue"),
    "update_open_orders": (interval(seconds=29), 29, 20, "orders.jobs:update_open_orders"),
    "update_price_cache": (interval(seconds=31), 31, 20, "positions.jobs:update_price_cache"),
    "calculate_unrealized_pnl": (interval(seconds=307), 300, 60, "positions.jobs:calculate_unrealized_pnl"),
    "check_websocket_health": (interval(seconds=60), 60, 20, "orders.jobs:check_websocket_health"),
    "securities_token_refresh": (interval(hours=6), 3600, 120, "accounts.jobs:securities_token_refresh"),
    "precision_cache_update": (cron(hour=3, minute=7), 3600, 900, "positions.jobs:precision_cache_update"),
    "symbol_validator_refresh": (cron(minute=15), 600, 300, "positions.jobs:symbol_validator_refresh"),
    "send_daily_summary": (cron(hour=21, minute=3), 3600, 300, "reporting.jobs:send_daily_summary"),
    "calculate_daily_performance": (
        cron(hour=0, minute=0, second=13),
        3600,
        900,
        "positions.jobs:calculate_daily_performance",
    ),
    "auto_rebalance_accounts": (cron(minute=17), 600, 300, "reporting.jobs:auto_rebalance_accounts"),
    # System jobs (SPEC §2.1, below the table).
    "prune_job_history": (cron(hour=4, minute=41), 3600, 300, "scheduler.jobs:prune_job_history"),
    "scheduler_probe": (interval(seconds=1), 2, 0.8, "scheduler.jobs:scheduler_probe"),
}

# SPEC §2.2, on becoming leader, in the order they run: id -> (step, condition or None for always).
LEADER_CATCH_UPS = {
    "precision_cache_update": (1, "exchanges.selectors:market_info_is_stale"),
    "update_price_cache": (2, None),
    "calculate_daily_performance": (3, None),
    "send_daily_summary": (4, "reporting.summary:summary_catch_up_due"),
}


@pytest.mark.parametrize("spec", [*REGISTRY, PROBE_JOB], ids=lambda s: s.id)
def test_row_equals_its_spec_line(spec):
    trigger, grace, budget, func = SPEC_TABLE[spec.id]
    assert (spec.trigger, spec.grace, spec.budget, spec.func) == (trigger, grace, budget, func)
    assert spec.enabled
    assert spec.name == spec.id.replace("_", " ").title()


@pytest.mark.parametrize("spec", [*REGISTRY, PROBE_JOB], ids=lambda s: s.id)
def test_function_importable_wrapped_and_job_state_pickles(spec):
    func = ref_to_obj(spec.func)
    assert func is job_function(spec)
    assert func.__wrapped__ is not func  # functools.wraps at module level
    scheduler = BackgroundScheduler(timezone="Asia/Seoul")
    job = Job(
        scheduler,
        id=spec.id,
        func=spec.func,
        trigger=spec.trigger.build("Asia/Seoul"),
        executor="default",
        args=(),
        kwargs={},
        name=spec.name,
        misfire_grace_time=spec.grace,
        coalesce=True,
        max_instances=1,
        next_run_time=None,
    )
    state = pickle.loads(pickle.dumps(job.__getstate__()))  # noqa: S301 -- our own bytes
    restored = Job.__new__(Job)
    restored.__setstate__(state)
    assert restored.func is func
    assert str(restored.trigger) == spec.trigger_text("Asia/Seoul")
    assert (restored.misfire_grace_time, restored.coalesce, restored.max_instances) == (spec.grace, True, 1)


def test_probe_job_registered_only_when_enabled():
    assert "scheduler_probe" not in {s.id for s in registry_specs(probe=False, overrides={})}
    assert "scheduler_probe" in {s.id for s in registry_specs(probe=True, overrides={})}


def test_registry_equals_the_spec_table_exactly():
    # Every SPEC §2.1 row is registered (business jobs and system jobs), and nothing else.
    assert sorted(s.id for s in REGISTRY) == sorted(set(SPEC_TABLE) - {PROBE_JOB.id})
    assert len({s.id for s in REGISTRY}) == len(REGISTRY)


def test_leader_catch_ups_equal_spec_2_2():
    declared = {s.id: (s.on_leader.step, s.on_leader.when) for s in REGISTRY if s.on_leader is not None}
    assert declared == LEADER_CATCH_UPS
    assert [s.id for s in catch_up_specs()] == list(LEADER_CATCH_UPS)
    for _, when in LEADER_CATCH_UPS.values():
        assert when is None or callable(ref_to_obj(when))
