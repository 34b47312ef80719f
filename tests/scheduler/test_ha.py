"""Real runscheduler processes: one leader, takeover after SIGKILL, connection kills, SIGTERM, downtime."""

from __future__ import annotations

import signal
import time
from datetime import UTC, datetime

import pytest

from tests.procs import ProcDB, manage, spawn, wait_for

pytestmark = pytest.mark.subprocess

PROBE = {"SCHEDULER_PROBE_JOB": "1"}


def leader_pid(db: ProcDB) -> int | None:
    return db.scalar("SELECT pid FROM scheduler_leadership WHERE id = 1")


def term(db: ProcDB) -> int:
    return db.scalar("SELECT term FROM scheduler_leadership WHERE id = 1")


def probe_runs(db: ProcDB, term_: int | None = None) -> int:
    if term_ is None:
        return db.scalar("SELECT count(*) FROM scheduler_jobrun WHERE job_id = 'scheduler_probe'")
    return db.scalar("SELECT count(*) FROM scheduler_jobrun WHERE job_id = 'scheduler_probe' AND term = %s", (term_,))


def as_dt(value) -> datetime:  # noqa: ANN001
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def assert_no_double_runs(db: ProcDB) -> None:
    doubles = db.query(
        "SELECT job_id, scheduled_at, count(*) FROM scheduler_jobrun GROUP BY job_id, scheduled_at HAVING count(*) > 1"
    )
    assert doubles == []
    # Terms never overlap: every run of term t was scheduled before every run of term t+1.
    spans = db.query(
        "SELECT term, min(scheduled_at), max(scheduled_at) FROM scheduler_jobrun "
        "WHERE job_id = 'scheduler_probe' GROUP BY term ORDER BY term"
    )
    for (_, _, last), (_, first, _) in zip(spans, spans[1:], strict=False):
        assert as_dt(last) < as_dt(first)


def longest_gap(db: ProcDB) -> float:
    times = [
        as_dt(row[0])
        for row in db.query(
            "SELECT scheduled_at FROM scheduler_jobrun WHERE job_id = 'scheduler_probe' ORDER BY scheduled_at"
        )
    ]
    return max(((b - a).total_seconds() for a, b in zip(times, times[1:], strict=False)), default=0.0)


def takeover(db: ProcDB) -> None:
    first = spawn(db, **PROBE)
    wait_for(lambda: leader_pid(db) == first.pid, timeout=30, what="the first process to lead")
    second = spawn(db, **PROBE)
    wait_for(
        lambda: db.scalar("SELECT role FROM scheduler_schedulerinstance WHERE pid = %s", (second.pid,)) == "standby",
        timeout=30,
        what="the second process to report standby",
    )
    wait_for(lambda: probe_runs(db, 1) >= 3, timeout=30, what="probe runs under term 1")
    time.sleep(2)
    assert leader_pid(db) == first.pid and term(db) == 1, "the standby must not lead while the leader lives"
    if db.is_pg:
        holders = db.query(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = 1 AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (0x7472,),
        )
        assert len(holders) == 1
        assert holders[0][0] == db.scalar("SELECT backend_pid FROM scheduler_leadership WHERE id = 1")

    first.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    first.popen.wait(10)
    wait_for(lambda: leader_pid(db) == second.pid, timeout=30, what="the standby to take over")
    took = time.monotonic() - killed_at
    print(f"\ntakeover after SIGKILL ({'postgres' if db.is_pg else 'sqlite'}): {took:.2f} s")
    assert term(db) == 2
    wait_for(lambda: probe_runs(db, 2) >= 3, timeout=30, what="probe runs under term 2")
    assert_no_double_runs(db)
    print(f"longest probe gap across the takeover: {longest_gap(db):.2f} s")
    assert second.stop() == 0
    second_log = second.log()
    assert "scheduler standby" in second_log
    assert second_log.count("scheduler started as leader (term 2)") == 1
    assert first.log().count("scheduler started as leader (term 1)") == 1


def test_sqlite_second_process_stays_standby_and_leads_after_kill(proc_sqlite_db):
    takeover(proc_sqlite_db)


@pytest.mark.postgres
def test_postgres_one_leader_and_takeover_after_sigkill(proc_pg_db):
    takeover(proc_pg_db)


@pytest.mark.postgres
def test_postgres_terminated_connections_keep_jobs_running(proc_pg_db):
    db = proc_pg_db
    procs = [spawn(db, **PROBE), spawn(db, **PROBE)]
    try:
        wait_for(lambda: probe_runs(db) >= 3, timeout=30, what="probe runs")
        for _ in range(2):
            before = probe_runs(db)
            killed = db.query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            assert killed, "there were scheduler connections to terminate"
            wait_for(lambda before=before: probe_runs(db) >= before + 3, timeout=30, what="runs after the kill")
        assert all(p.popen.poll() is None for p in procs)
        assert_no_double_runs(db)
        holders = db.query(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = 1 AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (0x7472,),
        )
        assert holders == [(1,)]
        print(f"\nterms used: {term(db)}; longest probe gap: {longest_gap(db):.2f} s")
    finally:
        assert [p.stop() for p in procs] == [0, 0]


def test_sigterm_lets_the_running_job_finish_and_exits_zero(proc_sqlite_db):
    db = proc_sqlite_db
    proc = spawn(db, SCHEDULER_PROBE_SLEEP="3", **PROBE)
    wait_for(
        lambda: db.scalar(
            "SELECT count(*) FROM scheduler_jobrun WHERE job_id = 'scheduler_probe' AND outcome = 'running'"
        ),
        timeout=30,
        what="a probe run in flight",
    )
    proc.signal(signal.SIGTERM)
    assert proc.popen.wait(40) == 0
    assert db.scalar("SELECT count(*) FROM scheduler_jobrun WHERE outcome = 'running'") == 0
    finished = db.query("SELECT outcome, finished_at FROM scheduler_jobrun WHERE job_id = 'scheduler_probe'")
    assert finished and all(outcome in ("ok", "overrun") and at for outcome, at in finished)
    assert db.scalar("SELECT role FROM scheduler_schedulerinstance WHERE pid = %s", (proc.pid,)) == "stopped"


SHIFT_NEXT_RUN = """
import pickle
from datetime import timedelta
from django_apscheduler.models import DjangoJob
row = DjangoJob.objects.get(id="scheduler_probe")
state = pickle.loads(row.job_state)
state["next_run_time"] = state["next_run_time"] - timedelta(hours=1)
row.job_state = pickle.dumps(state)
row.next_run_time = state["next_run_time"]
row.save()
print(row.next_run_time.isoformat())
"""


def test_downtime_writes_at_most_one_missed_run_not_thousands(proc_sqlite_db):
    db = proc_sqlite_db
    proc = spawn(db, **PROBE)
    wait_for(lambda: probe_runs(db) >= 2, timeout=30, what="probe runs")
    assert proc.stop() == 0
    shifted = manage("shell", "-c", SHIFT_NEXT_RUN, env=db.env(**PROBE))
    assert shifted.returncode == 0, shifted.stderr
    restart = datetime.now(UTC)
    before_runs = probe_runs(db)
    before_exec = db.scalar("SELECT count(*) FROM django_apscheduler_djangojobexecution")
    proc = spawn(db, **PROBE)
    wait_for(lambda: probe_runs(db) >= before_runs + 3, timeout=30, what="probe runs after the restart")
    assert proc.stop() == 0
    old = [
        as_dt(r[0])
        for r in db.query("SELECT scheduled_at FROM scheduler_jobrun WHERE job_id = 'scheduler_probe'")
        if as_dt(r[0]) < restart.replace(tzinfo=UTC)
    ]
    assert len(old) <= before_runs + 1
    new_exec = db.scalar("SELECT count(*) FROM django_apscheduler_djangojobexecution") - before_exec
    missed = db.scalar("SELECT count(*) FROM django_apscheduler_djangojobexecution WHERE status = 'Missed'")
    assert missed <= 1
    assert new_exec < 60, "an hour of 1 s runs must not be replayed"


def test_bad_override_exits_nonzero_naming_it(proc_sqlite_db):
    env = proc_sqlite_db.env(SCHEDULER_JOB_OVERRIDES='{"prune_job_history": {"budget": 3}}')
    for args in (("runscheduler",), ("runscheduler", "--check")):
        result = manage(*args, env=env, timeout=60)
        assert result.returncode != 0
        assert "prune_job_history" in result.stderr and "budget" in result.stderr
    assert proc_sqlite_db.scalar("SELECT count(*) FROM django_apscheduler_djangojob") == 0
