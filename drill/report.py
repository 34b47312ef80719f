"""The drill's printed table: invariants with their verdict, then the measured figures."""

from __future__ import annotations

from collections.abc import Callable

from drill.chaos import ChaosStats
from drill.checks import Check, Figures, examples
from drill.load import FanStats, LoadStats

WIDTH = 58


def _row(name: str, result: str, detail: str = "") -> str:
    return f"{name:<{WIDTH}} {result:<14} {detail}".rstrip()


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def render(
    *,
    checks: list[Check],
    figures: Figures,
    load: LoadStats,
    fanout: FanStats,
    chaos: ChaosStats,
    header: str,
    notes: list[str],
    out: Callable[[str], None] = print,
) -> None:
    out("")
    out(header)
    out("=" * 110)
    out(_row("invariant", "result", "count / examples"))
    out("-" * 110)
    for check in checks:
        if check.ok:
            out(_row(check.name, "ok", check.note))
        else:
            out(_row(check.name, f"VIOLATED ({len(check.problems)})", examples(check)))
    suppressed = sum(figures.suppressed.values())
    detail = ", ".join(f"{k}: {v}" for k, v in sorted(figures.suppressed.items())) or "none"
    out(_row("suppressed duplicates (counted, reported)", str(suppressed), detail))

    out("")
    out(_row("figure", "value", "detail"))
    out("-" * 110)
    for event, seconds in figures.takeovers:
        label = {
            "sigkill": "takeover after SIGKILL",
            "sigkill_shard_owner": "shards moved after SIGKILL of a non-leader",
        }.get(event.kind, f"new term after {event.kind}")
        goal = " (goal ≤ 5 s)" if event.kind.startswith("sigkill") else ""
        out(_row(label, _seconds(seconds), f"{event.detail}, term {event.term_before}{goal}"))
    for gap in figures.gaps:
        out(
            _row(
                f"{gap.job_id}: longest gap across a takeover",
                _seconds(gap.across_max),
                f"between starts {_seconds(gap.across_start_max)}; {gap.runs} scheduled runs (goal ≤ 6 s)",
            )
        )
        out(
            _row(
                f"{gap.job_id}: longest gap otherwise",
                _seconds(gap.steady_max),
                f"at {gap.where}; {gap.steady_over_2s} > 2 s, {gap.after_long_run} after a body > 1 s (goal ≤ 2 s)",
            )
        )
    out(_row("orders posted (accepted by the API)", str(load.posted), _counts(load.by_action)))
    for name, value in sorted(figures.orders.items()):
        out(_row(name, str(value)))
    out(_row("HTTP replies", str(sum(load.http.values())), _counts(load.http)))
    if load.cancel_states:
        out(_row("user cancels", str(sum(load.cancel_states.values())), _counts(load.cancel_states)))
    out(_row("webhooks", "on" if load.webhook_enabled else "off (no /api/webhook/)"))
    accepted = fanout.accepted
    kinds: dict[str, int] = {}
    for signal in accepted:
        kinds[signal.kind] = kinds.get(signal.kind, 0) + 1
    redelivered = sum(1 for s in fanout.signals if s.redelivered)
    out(
        _row(
            f"fan-out signals (to {fanout.followers} followers each)",
            str(len(accepted)),
            f"{_counts(kinds)}; {redelivered} redelivered; of {len(fanout.signals)} posted",
        )
    )
    orders = fanout.orders()
    out(_row("follower orders (one per follower and signal)", str(len(orders)), _counts(fanout.http)))
    refused = {k: v for k, v in figures.rate_limits.items() if not k.startswith("client")}
    client = {k: v for k, v in figures.rate_limits.items() if k.startswith("client")}
    out(_row("rate-limit refusals sent (429/418; Bybit 10006)", str(sum(refused.values())), _counts(refused) or "none"))
    out(_row("client: back-offs after a refusal, budget holds", str(sum(client.values())), _counts(client) or "none"))
    for line in chaos.bursts:
        out(_row("rate-limit burst (Binance weight spent from 127.0.0.1)", "1", line))
    for job_id, outcomes in sorted(figures.jobruns.items()):
        out(_row(f"JobRuns {job_id}", str(sum(outcomes.values())), _counts(outcomes)))
    out(_row("faults injected (rules)", str(sum(chaos.faults.values())), _counts(chaos.faults)))
    out(
        _row(
            "faults fired (calls failed or slowed)",
            str(sum(figures.faults_fired.values())),
            _counts(figures.faults_fired),
        )
    )
    if figures.job_errors:
        out("")
        out("job errors and overruns (most frequent):")
        for line in figures.job_errors:
            out(f"  {line}")
    errors = [*(f"chaos: {e}" for e in chaos.errors), *(f"load: {e}" for e in load.errors)]
    errors += [f"fan-out: {e}" for e in fanout.errors]
    for line in [*notes, *errors]:
        out(f"note: {line}")
    if load.rejected_examples:
        out("intake 400 examples: " + " | ".join(load.rejected_examples[:3]))
    out("")
    failed = [c for c in checks if not c.ok]
    if failed:
        out(f"DRILL FAILED: {len(failed)} invariant(s) violated")
        for check in failed:
            out(f"--- {check.name} ({len(check.problems)})")
            for problem in check.problems[:20]:
                out(f"    {problem}")
    else:
        out("DRILL PASSED: every invariant holds")


def _counts(counter: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0]))))
