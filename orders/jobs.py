"""Order jobs: rebalance_order_queue (1 s), update_open_orders (29 s) and check_websocket_health (60 s)."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import wait
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from accounts.models import Account
from core.counters import counters_buffer_flush
from exchanges.gateway import Auth, GatewayError, call_policy, not_sent
from exchanges.services import UnknownExchangeError, exchange_error_count, gateway_for
from orders.circuit import account_scope, circuit_record, circuit_states, exchange_scope
from orders.execution import execution_pool
from orders.models import OpenOrder, PendingOrder
from orders.queue import PASS_WAIT_SECONDS, queue_pass, queue_work_load
from orders.reconcile import EXCHANGE_FAILURES, ReconcileReport, orders_reconcile
from orders.streams import stream_health_check
from scheduler.models import JobRun
from scheduler.runs import JobResult, current_run, scheduler_job
from scheduler.shards import shard_account_owned, shard_filter

logger = logging.getLogger(__name__)


@scheduler_job("rebalance_order_queue")
def rebalance_order_queue() -> JobResult:
    """Move the queue toward its target (SPEC §4.1): express MARKET orders first, then every dirty pair
    (and, every 60 s, every pair with queued or live orders).

    Nothing dirty and no sweep due: one indexed query, no exchange call. Exchange errors are
    outcomes of the order services; a pair without a gateway is logged and retried later.
    """
    now = timezone.now()
    run = current_run.get()
    shards = shard_filter(run.shards if run else None)
    # A new term, or a new shard set, sweeps on its first pass (its new pairs' state is unknown here).
    term = (run.term, run.shards) if run and run.shards is not None else (run.term if run else None)
    work = queue_work_load(now=now, term=term, shards=shards)
    if work is None:
        # Counts of tasks that ended since the last pass (none buffered: no statement).
        counters_buffer_flush()
        return JobResult(summary="nothing dirty", noop=True)
    # The pass's own exchange calls get a short timeout and no in-call retries: a slow or silent
    # exchange costs one short timeout (its pairs then wait TROUBLE_RETRY), not the next ticks.
    # Unknown outcomes are settled by lookup, so nothing is lost by giving up early.
    # A WAKE run (scheduler.wake: intake woke it between ticks) only starts its pair tasks: waiting
    # for them could hold the job past the next tick, which would then be skipped.
    woken = run is not None and run.kind == JobRun.Kind.WAKE
    with call_policy(timeout_ms=settings.EXCHANGE_QUEUE_TIMEOUT_MS, retries=0):
        tally = queue_pass(work, wait=0.0 if woken else PASS_WAIT_SECONDS)
    return JobResult(summary=tally.summary(), noop=tally.noop)


# update_open_orders waits this long for its account markets (its budget is 20 s); the rest go on
# reconciling beside the next runs, and a later run skips them while they do.
RECONCILE_WAIT_SECONDS = 18.0


@dataclass
class _ReconcileRun:
    """Shared state of one update_open_orders run across its account-market tasks."""

    now: datetime
    breakers: dict
    outcomes: dict[str, tuple[bool, str]] = field(default_factory=dict)  # scope → (failed, error)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _reconcile_account_market(
    *, run: _ReconcileRun, account: Account, market_type: str, scopes: tuple[str, str], submitting: bool = True
) -> tuple[str, Any]:
    """Reconcile one (account, market type) in a worker of the reconcile pool (or inline).

    Returns ("done", report), ("skipped", reason) or ("failed", reason); expected exchange failures
    become outcomes of the breakers' scopes, recorded once per run by the job.
    """
    ex_scope, acc_scope = scopes
    label = f"{account.pk}/{market_type}"
    open_scopes = [s for s in scopes if s in run.breakers and run.breakers[s].is_open(run.now)]
    if open_scopes:
        return "skipped", f"{label} (circuit open: {', '.join(open_scopes)})"
    if not shard_account_owned(account.pk):
        return "skipped", f"{label} (shard moved to another scheduler)"
    with run.lock:
        if run.outcomes.get(ex_scope, (False, ""))[0]:
            return "skipped", f"{label} ({ex_scope} failed this run)"
    try:
        gateway = gateway_for(account)
        report = orders_reconcile(
            account=account, market_type=market_type, gateway=gateway, now=run.now, submitting=submitting
        )
    except Auth as exc:
        with run.lock:
            run.outcomes[acc_scope] = (True, f"Auth: {exc}")
        logger.warning("reconcile %s: authentication failed: %s", label, exc)
        return "failed", f"{label}: Auth"
    except EXCHANGE_FAILURES as exc:
        if not_sent(exc):
            # Our own rate budget held the call back: the exchange is not failing, so no breaker
            # counts it; the account market is reconciled by a later run.
            return "skipped", f"{label} (held back by the local rate budget)"
        exchange_error_count(exchange=account.exchange)
        with run.lock:
            run.outcomes[ex_scope] = (True, f"{type(exc).__name__}: {exc}")
        logger.warning("reconcile %s failed: %s: %s", label, type(exc).__name__, exc)
        return "failed", f"{label}: {type(exc).__name__}"
    except (GatewayError, UnknownExchangeError) as exc:
        logger.warning("reconcile %s failed: %s: %s", label, type(exc).__name__, exc)
        return "failed", f"{label}: {type(exc).__name__}"
    with run.lock:
        run.outcomes.setdefault(ex_scope, (False, ""))
        run.outcomes[acc_scope] = (False, "")
    return "done", report


@scheduler_job("update_open_orders")
def update_open_orders() -> JobResult:
    """Reconcile live orders per (account, market type) with the exchange (SPEC §4.2), the account
    markets at the same time on the reconcile pool (one task per account market at a time).

    Exchange failures are caught per pair and fed to the circuit breakers: (exchange, market
    type) for network, rate-limit, maintenance and exchange errors, the account for Auth. A
    pair whose breaker is open is skipped; after an exchange failure the pairs of that exchange
    market not yet started are skipped for this run. Each breaker records one outcome per run.
    """
    now = timezone.now()
    ctx = current_run.get()
    shards = shard_filter(ctx.shards if ctx else None)
    mine = shards.q() if shards is not None else Q()  # a sharded scheduler's own accounts only
    submitting = set(
        PendingOrder.objects.filter(mine, status=PendingOrder.Status.SUBMITTING)
        .values_list("account_id", "market_type")
        .distinct()
    )
    pairs = sorted(set(OpenOrder.objects.filter(mine).values_list("account_id", "market_type").distinct()) | submitting)
    if not pairs:
        return JobResult(summary="no live orders", noop=True)
    accounts = Account.objects.in_bulk([account_id for account_id, _ in pairs])
    scopes = {
        (account_id, market_type): (
            exchange_scope(exchange=accounts[account_id].exchange, market_type=market_type),
            account_scope(account_id=account_id),
        )
        for account_id, market_type in pairs
    }
    run = _ReconcileRun(
        now=now, breakers=circuit_states(scopes=sorted({scope for pair in scopes.values() for scope in pair}))
    )
    pool = execution_pool("reconcile")
    futures = {}
    busy = 0
    for account_id, market_type in pairs:
        future = pool.submit(
            ("reconcile", account_id, market_type),
            _reconcile_account_market,
            run=run,
            account=accounts[account_id],
            market_type=market_type,
            scopes=scopes[(account_id, market_type)],
            submitting=(account_id, market_type) in submitting,
        )
        if future is None:
            busy += 1
        else:
            futures[future] = (account_id, market_type)
    finished, running = wait(futures, timeout=RECONCILE_WAIT_SECONDS) if futures else (set(), set())
    total = ReconcileReport()
    skipped: list[str] = []
    failed: list[str] = []
    done = 0
    for future in sorted(finished, key=lambda f: futures[f]):
        kind, value = future.result()  # an unexpected error propagates to the job wrapper, as before
        if kind == "done":
            total.add(value)
            done += 1
        else:
            (skipped if kind == "skipped" else failed).append(value)
    with run.lock:
        outcomes = sorted(run.outcomes.items())
    for scope, (scope_failed, error) in outcomes:
        circuit_record(scope=scope, failed=scope_failed, now=now, error=error)
    summary = (
        f"{done}/{len(pairs)} account markets, {total.orders} orders: {total.fills} fills, {total.filled} filled, "
        f"{total.triggered} triggered, {total.cancelled} cancelled, {total.requeued} requeued, "
        f"{total.missing} missing, {total.lost} lost"
    )
    if total.submitting:
        summary += "; submitting " + ", ".join(f"{k} {v}" for k, v in sorted(total.submitting.items()))
    if total.row_errors:
        summary += f"; {total.row_errors} lookups failed"
    if skipped:
        summary += "; skipped " + "; ".join(skipped)
    if failed:
        summary += "; failed " + "; ".join(failed)
    if running:
        summary += f"; {len(running)} still reconciling"
    if busy:
        summary += f"; {busy} busy from an earlier run"
    return JobResult(summary=summary)


@scheduler_job("check_websocket_health")
def check_websocket_health() -> JobResult:
    """Report the leader's user-data streams from their StreamState rows (SPEC §4.6), for every account that
    should have one (orders.streams.stream_account_list).

    Repairs only through the stream manager's single flight: an open but stale stream is
    flagged (once) for the manager to replace; a stream already reconnecting is left alone,
    so repeated checks never add reconnects. No exchange call.
    """
    report = stream_health_check(now=timezone.now())
    if report.requested:
        logger.warning("websocket health: %d open but stale streams flagged for reconnect", report.requested)
    return JobResult(summary=report.summary(), noop=report.expected == 0)
