"""backfill_performance: recompute StrategyDailyPerformance over a range of KST days (SPEC §2.6)."""

from __future__ import annotations

from datetime import date
from typing import Any

from django.core.management.base import BaseCommand, CommandError, OutputWrapper
from django.utils import timezone

from accounts.models import Strategy
from positions.services import performance_backfill, performance_last_complete_day


def _parse_day(option: str, text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise CommandError(f"{option} {text!r} is not a date (YYYY-MM-DD)")


class ProgressBar:
    """A textual bar: redrawn in place on a terminal, one line per tenth otherwise (logs, CI)."""

    def __init__(self, out: OutputWrapper, total: int, width: int = 30):
        self.out, self.total, self.width = out, max(total, 1), width
        self.done = 0
        self.tty = out.isatty()
        self.last_tenth = -1

    def step(self, label: str) -> None:
        self.done += 1
        tenth = self.done * 10 // self.total
        if not self.tty and tenth == self.last_tenth and self.done != self.total:
            return
        self.last_tenth = tenth
        filled = self.done * self.width // self.total
        bar = "#" * filled + "-" * (self.width - filled)
        ending = "\r" if self.tty and self.done != self.total else "\n"
        self.out.write(f"[{bar}] {self.done}/{self.total} {label}", ending=ending)


class Command(BaseCommand):
    help = (
        "Recompute daily performance for every KST day in [--since, --until] (default until: yesterday) "
        "for the active strategies, or those named with --strategy. Stored rows keep their capital_base."
    )

    def add_arguments(self, parser: Any) -> None:
        parser.add_argument("--since", required=True, metavar="YYYY-MM-DD")
        parser.add_argument("--until", metavar="YYYY-MM-DD", help="default: yesterday (KST)")
        parser.add_argument(
            "--strategy", action="append", default=[], metavar="GROUP_NAME", help="repeatable; default: all active"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        now = timezone.now()
        since = _parse_day("--since", options["since"])
        until = _parse_day("--until", options["until"]) if options["until"] else performance_last_complete_day(now=now)
        strategies = None
        if options["strategy"]:
            strategies = list(Strategy.objects.filter(group_name__in=options["strategy"]))
            missing = sorted(set(options["strategy"]) - {s.group_name for s in strategies})
            if missing:
                raise CommandError(f"no strategy with group_name {', '.join(missing)}")
        latest = performance_last_complete_day(now=now)
        for option, day in (("--since", since), ("--until", until)):
            if day > latest:
                raise CommandError(f"{option} {day} is not over yet (KST); the newest complete day is {latest}")
        if until < since:
            raise CommandError(f"--until {until} is before --since {since}")
        count = len(strategies) if strategies is not None else Strategy.objects.filter(is_active=True).count()
        days = (until - since).days + 1
        self.stdout.write(f"backfilling {days} days ({since} .. {until}) for {count} strategies")
        bar = ProgressBar(self.stdout, count * days)
        report = performance_backfill(
            since=since,
            until=until,
            now=now,
            strategies=strategies,
            progress=lambda strategy, day: bar.step(f"{strategy.group_name} {day}"),
        )
        self.stdout.write(
            self.style.SUCCESS(
                f"{report.written} rows written, {report.unchanged} unchanged "
                f"({report.strategies} strategies, {since} .. {until})"
            )
        )
