"""scheduler_probe start lateness and scheduler RSS on SQLite and PostgreSQL beside bare APScheduler (SPEC §9).

Each measurement is a real process: `manage.py runscheduler` with SCHEDULER_PROBE_JOB=1 on a freshly
migrated database (SQLite file in a temporary directory; PostgreSQL database `tradingsite_bench`,
dropped and created again), and, as the same-run baseline, a bare APScheduler BackgroundScheduler
with a MemoryJobStore running a 1 s interval job. All three run concurrently by default (BENCH_MODE=
sequential runs them one after another), each for BENCH_SECONDS (default 300) after a 2 s warm-up
that starts when the process is ready (the runscheduler leader log line). RSS is sampled every second.

Lateness = start of the job body - scheduled time. For runscheduler it comes from JobRun
(started_at - scheduled_at at microsecond precision; the integer lateness_ms column is printed as a
cross-check); for the baseline from time.time() at the job's start and the scheduled run time that
APScheduler reports in EVENT_JOB_SUBMITTED.

Environment: BENCH_SECONDS (300), BENCH_MODE (concurrent | sequential), BENCH_BACKENDS
(sqlite,postgres), BENCH_PG_URL (postgres://postgres@127.0.0.1:5432/tradingsite_bench), BENCH_KEEP=1
keeps the temporary directory with the processes' logs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "bench" / "results"
WARMUP_SECONDS = 2.0
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 60.0
GOAL_P99_MS_POSTGRES = 10.0
LEADER_MARKER = "scheduler started as leader"
BASELINE_MARKER = "baseline scheduler started"
PROBE_JOB_ID = "scheduler_probe"


@dataclass
class Measurement:
    name: str
    lateness_ms: list[float] = field(default_factory=list)  # microsecond precision
    lateness_column_ms: list[int] = field(default_factory=list)  # JobRun.lateness_ms (runscheduler only)
    not_ok: int = 0  # JobRun outcomes other than ok/noop
    rss: list[tuple[float, float]] = field(default_factory=list)  # (wall time, MB)
    window: tuple[float, float] = (0.0, 0.0)
    exit_code: int | None = None
    error: str = ""


# --- statistics -----------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (wall time s, MB) in MB per minute."""
    if len(points) < 2:
        return math.nan
    xs = [t for t, _ in points]
    ys = [v for _, v in points]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 60


# --- processes ------------------------------------------------------------------------------------
def _wait_for_marker(proc: subprocess.Popen, log_path: Path, marker: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if marker in log_path.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was ready")
        time.sleep(0.1)
    raise RuntimeError(f"not ready after {READY_TIMEOUT:.0f} s (no {marker!r} in its log)")


def run_process(m: Measurement, argv: list[str], env: dict[str, str], log_path: Path, marker: str, seconds: float):
    """Start the process, wait until ready, sample its RSS each second through the window, SIGTERM it."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        _wait_for_marker(proc, log_path, marker)
        ps = psutil.Process(proc.pid)
        start = time.time() + WARMUP_SECONDS
        m.window = (start, start + seconds)
        tick = time.time()
        while True:
            now = time.time()
            if now >= m.window[0]:
                m.rss.append((now, ps.memory_info().rss / 2**20))
            if now >= m.window[1] or proc.poll() is not None:
                break
            tick += 1.0
            time.sleep(max(0.0, min(tick, m.window[1]) - time.time()))
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} during the run")
        proc.send_signal(signal.SIGTERM)
        m.exit_code = proc.wait(timeout=STOP_TIMEOUT)
        if m.exit_code != 0:
            m.error = f"exited with {m.exit_code} after SIGTERM"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def django_env(database_url: str, var_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("SCHEDULER_JOB_OVERRIDES", "SCHEDULER_PROBE_SLEEP", "ORDER_CRASH_POINTS"):
        env.pop(name, None)  # knobs that would skew or break the measured process
    env.update(
        DATABASE_URL=database_url,
        TRADINGSITE_VAR_DIR=str(var_dir),
        SCHEDULER_PROBE_JOB="1",
        PYTHONUNBUFFERED="1",
        LOG_LEVEL="INFO",
    )
    return env


def migrate(env: dict[str, str]) -> None:
    result = subprocess.run(  # noqa: S603 - our own manage.py
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode:
        raise RuntimeError(f"migrate failed:\n{result.stdout}{result.stderr}")


def _to_utc(value: datetime | str) -> datetime:
    if isinstance(value, str):  # SQLite stores naive UTC text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def collect_jobruns(m: Measurement, rows: list[tuple]) -> None:
    """rows: (scheduled_at, started_at, lateness_ms, outcome) of SCHEDULED probe runs."""
    for scheduled, started, column, outcome in rows:
        scheduled, started = _to_utc(scheduled), _to_utc(started)
        if not m.window[0] <= scheduled.timestamp() < m.window[1]:
            continue
        m.lateness_ms.append((started - scheduled).total_seconds() * 1000)
        m.lateness_column_ms.append(column)
        m.not_ok += outcome not in ("ok", "noop")


PROBE_SQL = (
    "SELECT scheduled_at, started_at, lateness_ms, outcome FROM scheduler_jobrun "
    "WHERE job_id = %s AND kind = 'SCHEDULED' ORDER BY scheduled_at"
)


def _pg_connect(config: dict, dbname: str):  # noqa: ANN202
    import psycopg2

    conn = psycopg2.connect(
        dbname=dbname,
        user=config.get("USER") or None,
        password=config.get("PASSWORD") or None,
        host=config.get("HOST") or None,
        port=config.get("PORT") or None,
        connect_timeout=3,
    )
    conn.autocommit = True
    return conn


@dataclass
class Target:
    """One measured process: prepare() sets up its database; collect() reads its runs after the window."""

    name: str
    work: Path
    pg_url: str = ""

    @property
    def var_dir(self) -> Path:
        return self.work / self.name

    @property
    def log_path(self) -> Path:
        return self.var_dir / "process.log"

    def prepare(self) -> tuple[list[str], dict[str, str], str]:
        self.var_dir.mkdir(exist_ok=True)
        if self.name == "baseline":
            argv = [sys.executable, "-m", "bench.lateness", "--baseline-child", str(self.var_dir / "runs.json")]
            return argv, dict(os.environ, PYTHONUNBUFFERED="1"), BASELINE_MARKER
        if self.name == "sqlite":
            env = django_env(f"sqlite:///{self.var_dir / 'db.sqlite3'}", self.var_dir)
        else:
            self._pg_recreate()
            env = django_env(self.pg_url, self.var_dir)
        migrate(env)
        return [sys.executable, "manage.py", "runscheduler"], env, LEADER_MARKER

    def collect(self, m: Measurement) -> None:
        if self.name == "baseline":
            for scheduled, started in json.loads((self.var_dir / "runs.json").read_text())["runs"]:
                if m.window[0] <= scheduled < m.window[1]:
                    m.lateness_ms.append((started - scheduled) * 1000)
        elif self.name == "sqlite":
            with sqlite3.connect(self.var_dir / "db.sqlite3") as conn:
                collect_jobruns(m, conn.execute(PROBE_SQL.replace("%s", "?"), [PROBE_JOB_ID]).fetchall())
        else:
            conn = _pg_connect(self._pg_config(), self._pg_config()["NAME"])
            try:
                with conn.cursor() as cursor:
                    cursor.execute(PROBE_SQL, [PROBE_JOB_ID])
                    collect_jobruns(m, cursor.fetchall())
            finally:
                conn.close()

    def _pg_config(self) -> dict:
        import environ

        return environ.Env.db_url_config(self.pg_url)

    def _pg_recreate(self) -> None:
        from psycopg2 import sql

        config = self._pg_config()
        admin = _pg_connect(config, "postgres")
        try:
            with admin.cursor() as cursor:
                name = sql.Identifier(config["NAME"])
                cursor.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
                cursor.execute(sql.SQL("CREATE DATABASE {}").format(name))
        finally:
            admin.close()


def measure(target: Target, prepared: tuple[list[str], dict[str, str], str], seconds: float) -> Measurement:
    m = Measurement(target.name)
    argv, env, marker = prepared
    try:
        run_process(m, argv, env, target.log_path, marker, seconds)
        target.collect(m)
    except Exception as exc:
        m.error = f"{exc} (log: {target.log_path})"
    return m


def baseline_child(out: str) -> None:
    """Bare APScheduler, configured like the host (20 threads, coalesce, max_instances=1), MemoryJobStore."""
    from apscheduler.events import EVENT_JOB_SUBMITTED
    from apscheduler.executors.pool import ThreadPoolExecutor
    from apscheduler.jobstores.memory import MemoryJobStore
    from apscheduler.schedulers.background import BackgroundScheduler

    starts: list[float] = []
    scheduled: list[float] = []

    def probe() -> None:
        starts.append(time.time())

    def on_submitted(event) -> None:  # noqa: ANN001
        scheduled.extend(t.timestamp() for t in event.scheduled_run_times)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    scheduler = BackgroundScheduler(
        jobstores={"default": MemoryJobStore()},
        executors={"default": ThreadPoolExecutor(20)},
        job_defaults={"coalesce": True, "max_instances": 1},
        timezone="Asia/Seoul",
    )
    scheduler.add_listener(on_submitted, EVENT_JOB_SUBMITTED)
    scheduler.add_job(probe, "interval", seconds=1, id=PROBE_JOB_ID, misfire_grace_time=2)
    scheduler.start()
    print(BASELINE_MARKER, flush=True)
    stop.wait()
    scheduler.shutdown(wait=True)
    # max_instances=1 and one run time per submission: the k-th submission is the k-th start.
    n = min(len(scheduled), len(starts))
    Path(out).write_text(json.dumps({"runs": list(zip(sorted(scheduled)[:n], sorted(starts)[:n], strict=True))}))


# --- report ---------------------------------------------------------------------------------------
def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _ratio(value: float | None, baseline: float | None) -> str:
    if value is None or baseline is None or math.isnan(value) or math.isnan(baseline) or baseline == 0:
        return "-"
    return f"{value / baseline:.1f}x"


def figures(m: Measurement) -> dict[str, float]:
    rss = [mb for _, mb in m.rss]
    return {
        "runs": float(len(m.lateness_ms)),
        "lateness_p50_ms": percentile(m.lateness_ms, 0.50),
        "lateness_p99_ms": percentile(m.lateness_ms, 0.99),
        "lateness_max_ms": max(m.lateness_ms, default=math.nan),
        "rss_start_mb": rss[0] if rss else math.nan,
        "rss_end_mb": rss[-1] if rss else math.nan,
        "rss_max_mb": max(rss, default=math.nan),
        "rss_slope_mb_per_min": slope_per_minute(m.rss),
    }


def report(results: list[Measurement], baseline: Measurement, seconds: float, mode: str) -> list[str]:
    base = figures(baseline)
    lines = [
        f"# scheduler_probe start lateness over {seconds:.0f} s ({mode}; {WARMUP_SECONDS:.0f} s warm-up excluded); "
        "baseline: bare APScheduler + MemoryJobStore in the same run; RSS of each process",
        f"{'name':36} {'value':>10} {'baseline':>10} {'ratio':>8}",
    ]
    for m in results:
        if m.error and not m.lateness_ms:
            lines.append(f"{'error[' + m.name + ']':36} {m.error}")
            continue
        own = figures(m)
        for key, value in own.items():
            shown = str(int(value)) if key == "runs" else _fmt(value)
            base_shown = str(int(base[key])) if key == "runs" and not math.isnan(base[key]) else _fmt(base[key])
            # A ratio of two slopes near zero (or of opposite signs) says nothing.
            ratio = "-" if key == "rss_slope_mb_per_min" else _ratio(value, base[key])
            lines.append(f"{key + '[' + m.name + ']':36} {shown:>10} {base_shown:>10} {ratio:>8}")
        column_p99 = percentile([float(v) for v in m.lateness_column_ms], 0.99)
        lines.append(f"{'lateness_column_p99_ms[' + m.name + ']':36} {_fmt(column_p99):>10} {'-':>10} {'-':>8}")
        lines.append(f"{'runs_not_ok[' + m.name + ']':36} {m.not_ok:>10} {'-':>10} {'-':>8}")
        if m.error:
            lines.append(f"{'error[' + m.name + ']':36} {m.error}")
        if m.name == "postgres":
            p99 = own["lateness_p99_ms"]
            verdict = "met" if p99 <= GOAL_P99_MS_POSTGRES else "NOT met"
            lines.append(f"# goal lateness_p99_ms[postgres] <= {GOAL_P99_MS_POSTGRES:.0f} ms: {verdict} ({p99:.2f} ms)")
    if baseline.error:
        lines.append(f"{'error[baseline]':36} {baseline.error}")
    return lines


def main() -> int:
    seconds = float(os.environ.get("BENCH_SECONDS", "300"))
    mode = os.environ.get("BENCH_MODE", "concurrent")
    backends = [b.strip() for b in os.environ.get("BENCH_BACKENDS", "sqlite,postgres").split(",") if b.strip()]
    pg_url = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/tradingsite_bench")
    if mode not in ("concurrent", "sequential") or not set(backends) <= {"sqlite", "postgres"}:
        print("BENCH_MODE is concurrent|sequential; BENCH_BACKENDS a list of sqlite,postgres", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tradingsite-bench-"))
    targets = [Target("baseline", work)] + [Target(name, work, pg_url) for name in backends]
    total = seconds if mode == "concurrent" else seconds * len(targets)
    names = ", ".join(t.name for t in targets)
    print(f"# lateness: {names} for {seconds:.0f} s each, {mode} (about {total / 60:.1f} min)", flush=True)
    done: dict[str, Measurement] = {}
    prepared = {}
    for target in targets:  # databases are created and migrated before any window opens
        try:
            prepared[target.name] = target.prepare()
        except Exception as exc:
            done[target.name] = Measurement(target.name, error=f"setup failed: {exc}")
    runnable = [t for t in targets if t.name in prepared]
    if mode == "concurrent":
        threads = [
            threading.Thread(target=lambda t=t: done.__setitem__(t.name, measure(t, prepared[t.name], seconds)))
            for t in runnable
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for target in runnable:
            done[target.name] = measure(target, prepared[target.name], seconds)
    results = [done[k] for k in ("sqlite", "postgres") if k in done]
    lines = report(results, done["baseline"], seconds, mode)
    print("\n".join(lines))
    RESULTS_DIR.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    result_path = RESULTS_DIR / f"lateness-{stamp}.json"
    payload = {
        "seconds": seconds,
        "mode": mode,
        "figures": {m.name: figures(m) for m in done.values()},
        "measurements": [asdict(m) for m in done.values()],
    }
    result_path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"# raw samples: {result_path.relative_to(ROOT)}")
    failed = [m.name for m in done.values() if m.error]
    if os.environ.get("BENCH_KEEP") == "1" or failed:
        print(f"# logs kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--baseline-child":
        baseline_child(sys.argv[2])
    else:
        sys.exit(main())
