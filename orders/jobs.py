"""Order jobs: rebalance_order_queue (1 s), update_open_orders (29 s) and check_websocket_health (60 s)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.utils import timezone

from accounts.models import Account
from exchanges.gateway import Auth, GatewayError, call_policy
from exchanges.services import UnknownExchangeError, exchange_error_count, gateway_for
from orders.circuit import account_scope, circuit_record, circuit_states, exchange_scope
from orders.models import OpenOrder, PendingOrder
from orders.queue import queue_pass, queue_work_load
from orders.reconcile import EXCHANGE_FAILURES, ReconcileReport, orders_reconcile
from orders.streams import stream_health_check
from scheduler.runs import JobResult, current_run, scheduler_job

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
    work = queue_work_load(now=now, term=run.term if run else None)
    if work is None:
        return JobResult(summary="nothing dirty", noop=True)
    # The pass's own exchange calls get a short timeout and no in-call retries: a slow or silent
    # exchange costs one short timeout (its pairs then wait TROUBLE_RETRY), not the next ticks.
    # Unknown outcomes are settled by lookup, so nothing is lost by giving up early.
    with call_policy(timeout_ms=settings.EXCHANGE_QUEUE_TIMEOUT_MS, retries=0):
        tally = queue_pass(work)
    return JobResult(summary=tally.summary(), noop=tally.noop)


@scheduler_job("update_open_orders")
def update_open_orders() -> JobResult:
    """Reconcile live orders per (account, market type) with the exchange (SPEC §4.2).

    Exchange failures are caught per pair and fed to the circuit breakers: (exchange, market
    type) for network, rate-limit, maintenance and exchange errors, the account for Auth. A
    pair whose breaker is open is skipped; after an exchange failure the remaining pairs of
    that exchange market are skipped for this run. Each breaker records one outcome per run.
    """
    now = timezone.now()
    pairs = sorted(
        set(OpenOrder.objects.values_list("account_id", "market_type").distinct())
        | set(
            PendingOrder.objects.filter(status=PendingOrder.Status.SUBMITTING)
            .values_list("account_id", "market_type")
            .distinct()
        )
    )
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
    breakers = circuit_states(scopes=sorted({scope for pair in scopes.values() for scope in pair}))
    outcomes: dict[str, tuple[bool, str]] = {}  # scope → (failed, error) for this run
    total = ReconcileReport()
    skipped: list[str] = []
    failed: list[str] = []
    done = 0
    for account_id, market_type in pairs:
        account = accounts[account_id]
        ex_scope, acc_scope = scopes[(account_id, market_type)]
        open_scopes = [s for s in (ex_scope, acc_scope) if s in breakers and breakers[s].is_open(now)]
        if open_scopes:
            skipped.append(f"{account_id}/{market_type} (circuit open: {', '.join(open_scopes)})")
            continue
        if outcomes.get(ex_scope, (False, ""))[0]:
            skipped.append(f"{account_id}/{market_type} ({ex_scope} failed this run)")
            continue
        try:
            gateway = gateway_for(account)
            total.add(orders_reconcile(account=account, market_type=market_type, gateway=gateway, now=now))
        except Auth as exc:
            outcomes[acc_scope] = (True, f"Auth: {exc}")
            failed.append(f"{account_id}/{market_type}: Auth")
            logger.warning("reconcile %s/%s: authentication failed: %s", account_id, market_type, exc)
        except EXCHANGE_FAILURES as exc:
            exchange_error_count(exchange=account.exchange)
            outcomes[ex_scope] = (True, f"{type(exc).__name__}: {exc}")
            failed.append(f"{account_id}/{market_type}: {type(exc).__name__}")
            logger.warning("reconcile %s/%s failed: %s: %s", account_id, market_type, type(exc).__name__, exc)
        except (GatewayError, UnknownExchangeError) as exc:
            failed.append(f"{account_id}/{market_type}: {type(exc).__name__}")
            logger.warning("reconcile %s/%s failed: %s: %s", account_id, market_type, type(exc).__name__, exc)
        else:
            done += 1
            outcomes.setdefault(ex_scope, (False, ""))
            outcomes[acc_scope] = (False, "")
    for scope, (scope_failed, error) in sorted(outcomes.items()):
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
