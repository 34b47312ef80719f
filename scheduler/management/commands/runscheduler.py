"""runscheduler: host the scheduler (leader or standby), or inspect and run jobs (SPEC §2.6)."""

from __future__ import annotations

import sys
from datetime import timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.conf import settings
from django.core import checks
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone
from django_apscheduler.models import DjangoJob

from core.scrub import secret_register_from_settings
from scheduler.models import SchedulerInstance
from scheduler.poller import run_manual
from scheduler.reconcile import job_function, prune_stale
from scheduler.registry import JobSpec, OverrideError, registry_specs
from scheduler.selectors import scheduler_shards

LEADER_ALIVE = timedelta(seconds=10)


def settings_problems() -> list[str]:
    """Every configuration problem that must stop the scheduler before it schedules anything."""
    problems = []
    try:
        ZoneInfo(settings.SCHEDULER_TIMEZONE)
    except (ZoneInfoNotFoundError, ValueError):
        problems.append(f"SCHEDULER_TIMEZONE: unknown time zone {settings.SCHEDULER_TIMEZONE!r}")
    for name in ("SCHEDULER_STANDBY_POLL", "SCHEDULER_SHUTDOWN_GRACE"):
        if getattr(settings, name) <= 0:
            problems.append(f"{name}: must be greater than 0, got {getattr(settings, name)!r}")
    if settings.SCHEDULER_HISTORY_DAYS < 1:
        problems.append(f"SCHEDULER_HISTORY_DAYS: must be at least 1, got {settings.SCHEDULER_HISTORY_DAYS!r}")
    if settings.SCHEDULER_THREADS < 1:
        problems.append(f"SCHEDULER_THREADS: must be at least 1, got {settings.SCHEDULER_THREADS!r}")
    try:
        for spec in registry_specs():
            try:
                job_function(spec)
            except (ImportError, AttributeError, LookupError, ValueError) as exc:
                problems.append(f"job {spec.id}: {exc}")
    except OverrideError as exc:
        problems.append(str(exc))
    # Checks tagged "secrets" (registered by core): FIELD_ENCRYPTION_KEY must be a usable Fernet key.
    problems += [message.msg for message in checks.run_checks(tags=["secrets"]) if message.is_serious()]
    return problems


def database_problems() -> list[str]:
    try:
        connection = connections[DEFAULT_DB_ALIAS]
        connection.ensure_connection()
        executor = MigrationExecutor(connection)
        pending = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except Exception as exc:
        return [f"database: cannot connect or read migrations: {exc}"]
    if pending:
        names = ", ".join(f"{m.app_label}.{m.name}" for m, _ in pending[:10])
        return [f"database: {len(pending)} unapplied migration(s): {names} (run manage.py migrate)"]
    # Deployment checks tagged "credentials", registered by the apps that own encrypted fields
    # (accounts, notifications): stored credentials must decrypt with FIELD_ENCRYPTION_KEY.
    found = checks.run_checks(tags=["credentials"], include_deployment_checks=True, databases=[DEFAULT_DB_ALIAS])
    return [message.msg for message in found if message.is_serious()]


class Command(BaseCommand):
    help = "Host the scheduler (leader or standby); or --list, --check, --run JOB_ID, --prune-stale."

    def add_arguments(self, parser):  # noqa: ANN001
        parser.add_argument("--list", action="store_true", help="list the registry with next run times and exit")
        parser.add_argument("--check", action="store_true", help="check settings, overrides, database; exit 0 or 1")
        parser.add_argument("--run", metavar="JOB_ID", help="run one job once in the foreground (MANUAL)")
        parser.add_argument("--force", action="store_true", help="with --run: run even while a leader is up")
        parser.add_argument("--prune-stale", action="store_true", help="delete job rows no longer in the registry")
        parser.add_argument("--shards", action="store_true", help="print account shard ownership and exit")

    def handle(self, *args, **options):  # noqa: ANN002, ANN003
        problems = settings_problems()
        if options["check"]:
            problems += database_problems()
            for problem in problems:
                self.stderr.write(f"FAIL {problem}")
            if problems:
                raise CommandError(f"{len(problems)} problem(s) found")
            self.stdout.write("OK settings, overrides, registry, database and migrations")
            return
        if problems:
            raise CommandError("; ".join(problems))
        specs = registry_specs()
        if options["list"]:
            self._list(specs)
        elif options["shards"]:
            self._shards()
        elif options["run"]:
            self._run(specs, options["run"], force=options["force"])
        elif options["prune_stale"]:
            pruned = prune_stale(specs)
            self.stdout.write(f"deleted {len(pruned)} stale job(s): {', '.join(pruned) or '-'}")
        else:
            self._host(specs)

    def _list(self, specs: list[JobSpec]) -> None:
        # Reads the id/next_run_time columns only: nothing outside the leader unpickles job state.
        next_runs = dict(DjangoJob.objects.values_list("id", "next_run_time"))
        tz = ZoneInfo(settings.SCHEDULER_TIMEZONE)
        for spec in specs:
            next_run = next_runs.get(spec.id)
            when = next_run.astimezone(tz).isoformat() if next_run else ("paused" if spec.id in next_runs else "-")
            state = "" if spec.enabled else " (disabled)"
            self.stdout.write(f"{spec.id:32} {spec.trigger_text():40} {when}{state}")

    def _shards(self) -> None:
        """Shard → owner (host:pid), term and since; `free` when no live process holds it."""
        rows = scheduler_shards()
        if not rows:
            self.stdout.write(
                "account sharding is off (SQLite or SCHEDULER_SHARDING=off): one scheduler owns every account"
            )
            return
        owners: dict[str, int] = {}
        for row in rows:
            if row["held"]:
                owner = f"{row['host']}:{row['pid']}"
                owners[owner] = owners.get(owner, 0) + 1
                since = row["since"].isoformat(timespec="seconds") if row["since"] else "-"
                self.stdout.write(f"shard {row['shard']:3}  {owner:40} term {row['term']:<6} since {since}")
            else:
                self.stdout.write(f"shard {row['shard']:3}  free")
        summary = ", ".join(f"{owner} {n}" for owner, n in sorted(owners.items())) or "none"
        free = sum(1 for row in rows if not row["held"])
        self.stdout.write(f"{len(rows)} shards; held by {summary}; {free} free")

    def _run(self, specs: list[JobSpec], job_id: str, *, force: bool) -> None:
        spec = next((s for s in specs if s.id == job_id), None)
        if spec is None:
            raise CommandError(f"unknown job id {job_id!r}; see runscheduler --list")
        leader = SchedulerInstance.objects.filter(
            role=SchedulerInstance.Role.LEADER, last_heartbeat__gte=timezone.now() - LEADER_ALIVE
        ).first()
        if leader is not None and spec.enabled and not force:
            raise CommandError(
                f"refused: the leader {leader.host}:{leader.pid} (term {leader.term}) runs {job_id}; "
                "use Run now in the admin, or --force"
            )
        secret_register_from_settings()
        run = run_manual(spec=spec, term=None)
        if run is None:
            raise CommandError(f"{job_id}: not run (the job's lock stayed busy)")
        self.stdout.write(f"{job_id}: {run.outcome} in {run.duration_ms} ms: {run.summary}")
        if run.outcome == "error":
            raise CommandError(f"{job_id} failed: {run.summary}")

    def _host(self, specs: list[JobSpec]) -> None:
        from scheduler.runner import SchedulerHost

        # With DEBUG on (the development default), Django keeps the last 9,000 queries of every
        # connection in memory; a long-lived process with 20 job threads would grow by that much
        # per thread. The scheduler never serves debug pages, so it never needs the log.
        settings.DEBUG = False
        secret_register_from_settings()
        host = SchedulerHost(specs=specs)
        host.install_signal_handlers()
        code = host.run()
        sys.stdout.flush()
        if code:
            raise SystemExit(code)
