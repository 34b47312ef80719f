"""The leader catch-up service (SPEC §2.2): declared rows run in step order as CATCHUP runs of the term."""

from __future__ import annotations

import dataclasses
import threading
from types import SimpleNamespace

import pytest

from scheduler import registry
from scheduler.models import JobControl, JobRun
from scheduler.registry import PROBE_JOB, CatchUp
from scheduler.services import catch_up_run, leader_catch_up, leadership_begin_term

pytestmark = pytest.mark.django_db

DUE = {"probe": True}
REGISTRY_CODE = registry.REGISTRY


def probe_due(*, now) -> bool:  # noqa: ANN001
    return DUE["probe"]


@pytest.fixture
def declared(monkeypatch):  # noqa: ANN001, ANN201
    """The registry reduced to the probe job, declared as a leader catch-up with a switchable condition."""
    DUE["probe"] = True
    spec = dataclasses.replace(PROBE_JOB, on_leader=CatchUp(step=1, when="tests.scheduler.test_catch_up:probe_due"))
    monkeypatch.setattr(registry, "REGISTRY", (spec,))
    monkeypatch.setattr(registry.settings, "SCHEDULER_PROBE_JOB", False, raising=False)
    return spec


def _leader() -> SimpleNamespace:
    term = leadership_begin_term(instance_id="test:1", host="test", pid=1, backend_pid=None)
    return SimpleNamespace(term=term, stop_event=threading.Event())


def test_a_due_catch_up_runs_as_a_catchup_run_of_the_term(declared):  # noqa: ANN001
    host = _leader()
    assert leader_catch_up(host=host) == ["scheduler_probe"]
    run = JobRun.objects.get()
    assert (run.job_id, run.kind, run.term, run.outcome) == (
        "scheduler_probe",
        JobRun.Kind.CATCHUP,
        host.term,
        JobRun.Outcome.NOOP,
    )


def test_not_due_paused_or_undeclared_does_not_run(declared):  # noqa: ANN001
    host = _leader()
    DUE["probe"] = False
    assert catch_up_run(host=host, job_id="scheduler_probe") is False
    DUE["probe"] = True
    JobControl.objects.create(job_id="scheduler_probe", paused=True, pause_reason="test")
    assert catch_up_run(host=host, job_id="scheduler_probe") is False
    assert catch_up_run(host=host, job_id="no_such_job") is False
    assert catch_up_run(host=SimpleNamespace(term=None), job_id="scheduler_probe") is False
    assert not JobRun.objects.exists()


def test_a_stopping_host_or_a_stale_term_runs_nothing(declared):  # noqa: ANN001
    stale = _leader()
    _leader()  # another process took over
    leader_catch_up(host=stale)
    assert not JobRun.objects.exists()  # the claim is refused by term
    host = _leader()
    host.stop_event.set()
    assert leader_catch_up(host=host) == []
    assert not JobRun.objects.exists()


def crashing_condition(*, now) -> bool:  # noqa: ANN001
    raise RuntimeError("condition query failed")


def test_a_crashing_catch_up_does_not_stop_the_next(declared, monkeypatch):  # noqa: ANN001
    prune = next(spec for spec in REGISTRY_CODE if spec.id == "prune_job_history")
    first = dataclasses.replace(
        prune, on_leader=CatchUp(step=0, when="tests.scheduler.test_catch_up:crashing_condition")
    )
    monkeypatch.setattr(registry, "REGISTRY", (first, declared))
    assert leader_catch_up(host=_leader()) == ["scheduler_probe"]
    assert list(JobRun.objects.values_list("job_id", flat=True)) == ["scheduler_probe"]
