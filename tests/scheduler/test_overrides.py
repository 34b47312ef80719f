"""SCHEDULER_JOB_OVERRIDES: only trigger fields, grace and enabled; a bad one stops the process."""

from __future__ import annotations

import pytest
from django.core.management import CommandError, call_command
from django_apscheduler.models import DjangoJob

from scheduler.registry import OverrideError, registry_specs


def specs(overrides):
    return {s.id: s for s in registry_specs(overrides=overrides, probe=True)}


def test_override_changes_trigger_grace_and_enabled():
    spec = specs({"scheduler_probe": {"seconds": 5, "grace": 9, "enabled": False}})["scheduler_probe"]
    assert spec.trigger.as_dict() == {"seconds": 5}
    assert (spec.grace, spec.enabled, spec.budget) == (9, False, 0.8)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"no_such_job": {"seconds": 5}}, "'no_such_job'"),
        ({"scheduler_probe": {"budget": 5}}, "'scheduler_probe'].budget"),
        ({"scheduler_probe": {"func": "os:system"}}, "'scheduler_probe'].func"),
        ({"scheduler_probe": {"hour": 3}}, "'scheduler_probe'].hour"),
        ({"prune_job_history": {"hour": 25}}, "'prune_job_history'"),
        ({"scheduler_probe": {"grace": -1}}, "'scheduler_probe'].grace"),
        ({"scheduler_probe": {"enabled": "no"}}, "'scheduler_probe'].enabled"),
        ({"scheduler_probe": {"seconds": 0}}, "'scheduler_probe'"),
        ({"scheduler_probe": 5}, "'scheduler_probe'"),
        ("invalid JSON: Expecting value", "SCHEDULER_JOB_OVERRIDES"),
    ],
)
def test_bad_override_names_job_and_field(overrides, named):
    with pytest.raises(OverrideError) as excinfo:
        registry_specs(overrides=overrides, probe=True)
    assert named in str(excinfo.value)


@pytest.mark.django_db
@pytest.mark.parametrize("option", [["--check"], []])
def test_runscheduler_refuses_bad_override_before_scheduling(settings, option):
    settings.SCHEDULER_JOB_OVERRIDES = {"prune_job_history": {"minute": "61"}}
    with pytest.raises(CommandError) as excinfo:
        call_command("runscheduler", *option)
    assert "prune_job_history" in str(excinfo.value) or option == ["--check"]
    assert DjangoJob.objects.count() == 0


@pytest.mark.django_db
def test_check_names_a_bad_setting(settings, capsys):
    settings.SCHEDULER_TIMEZONE = "Mars/Olympus"
    with pytest.raises(CommandError):
        call_command("runscheduler", "--check")
    assert "SCHEDULER_TIMEZONE" in capsys.readouterr().err


@pytest.mark.django_db
def test_check_passes_on_a_migrated_database(capsys):
    call_command("runscheduler", "--check")
    assert "OK" in capsys.readouterr().out
