"""The REST poller (SPEC §4.2): compare OpenOrder and SUBMITTING rows with the exchange, per (account, market type).

What it finds is recorded by orders.transitions (fills, triggers, cancels, lost orders, placements).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from accounts.models import Account
from core.rawsql import rows_select, rows_update
from exchanges.gateway import (
    Auth,
    ExchangeError,
    ExchangeGateway,
    GatewayError,
    Maintenance,
    MarketType,
    Network,
    NotFound,
    OrderState,
    OrderStatus,
    RateLimited,
)
from orders.models import OpenOrder, OrderEvent, PendingOrder
from orders.transitions import order_mark_missing, order_state_apply, order_trigger_record, submitting_resolve
from positions.models import Fill

logger = logging.getLogger(__name__)

# Errors that say nothing about an order, only that the exchange (market) cannot be asked now:
# they never end or change a row, and count against the (exchange, market type) breaker.
EXCHANGE_FAILURES = (Network, RateLimited, Maintenance, ExchangeError)


@dataclass
class ReconcileReport:
    """What one (account, market type) pass did; the job adds these up for its summary."""

    orders: int = 0
    fills: int = 0
    filled: int = 0
    triggered: int = 0
    cancelled: int = 0
    requeued: int = 0
    missing: int = 0
    lost: int = 0
    submitting: dict[str, int] = field(default_factory=dict)
    row_errors: int = 0

    def add(self, other: ReconcileReport) -> None:
        for name in (
            "orders",
            "fills",
            "filled",
            "triggered",
            "cancelled",
            "requeued",
            "missing",
            "lost",
            "row_errors",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for outcome, count in other.submitting.items():
            self.submitting[outcome] = self.submitting.get(outcome, 0) + count


# Up to this many symbols with live orders, an account market is listed symbol by symbol; beyond, in one call.
RECONCILE_SYMBOL_LISTS_MAX = 3


def orders_reconcile(
    *, account: Account, market_type: str, gateway: ExchangeGateway, now: datetime, submitting: bool = True
) -> ReconcileReport:
    """Reconcile every OpenOrder and SUBMITTING PendingOrder of (account, market_type) with the exchange.

    Open-orders listings for regular orders and for conditional orders (only when rows of that
    kind exist): one per symbol of those rows, or one of every symbol beyond
    RECONCILE_SYMBOL_LISTS_MAX symbols; then a lookup only for rows missing from those sets. No row lock is
    held across an exchange call. Network, rate-limit, maintenance and other exchange errors
    and Auth propagate (the caller feeds its circuit breakers); rows already handled keep
    their changes, the rest stay as they are. `submitting` False: the caller read just before that the
    account market has no SUBMITTING row (a row claimed since is its pass's, or the next run's).
    """
    report = ReconcileReport()
    mt = MarketType(market_type)
    # Plain SQL (core.rawsql): every account market with live orders passes here on every run.
    rows = rows_select(OpenOrder, "account_id = %s AND market_type = %s", [account.pk, market_type], order_by="id")
    for row in rows:
        row.account = account  # the caller's row: no join, and its keys decrypted once
    report.orders = len(rows)
    if rows:
        listed: dict[tuple[bool, str], OrderState] = {}
        for conditional in (False, True):
            symbols = sorted({row.symbol for row in rows if row.conditional == conditional})
            # A listing per symbol weighs far less than one of every symbol (Binance futures 1 against
            # 40, spot 6 against 80): with a few symbols, a thousand accounts fit one IP's budget.
            per_symbol: list[str | None] = [None]  # None: one listing of every symbol
            if len(symbols) <= RECONCILE_SYMBOL_LISTS_MAX:
                per_symbol = [*symbols]
            for symbol in per_symbol if symbols else []:
                for open_state in gateway.fetch_open_orders(mt, conditional=conditional, symbol=symbol):
                    listed[(conditional, open_state.exchange_order_id)] = open_state
        seen = []
        for row in rows:
            state = listed.get((row.conditional, row.exchange_order_id))
            if state is None:
                try:
                    state = gateway.fetch_order(
                        symbol=row.symbol,
                        market_type=mt,
                        exchange_order_id=row.exchange_order_id,
                        conditional=row.conditional,
                    )
                except NotFound:
                    # Missing from the open list, and the lookup (open and closed/history) says not found.
                    if order_mark_missing(order=row, now=now):
                        report.lost += 1
                    else:
                        report.missing += 1
                    continue
                except (Auth, *EXCHANGE_FAILURES):
                    raise
                except GatewayError as exc:
                    # Rejected and the like concern this one lookup (e.g. a delisted symbol); the row stays.
                    report.row_errors += 1
                    logger.warning(
                        "lookup of %s (%s) failed: %s: %s",
                        row.order_key,
                        row.exchange_order_id,
                        type(exc).__name__,
                        exc,
                    )
                    continue
            if state.is_open:
                seen.append(row.pk)
            _observe(row=row, state=state, gateway=gateway, now=now, report=report)
        if seen:
            rows_update(OpenOrder, seen, last_seen_at=now, missing_runs=0)
    if submitting:
        pendings = PendingOrder.objects.filter(
            account=account, market_type=market_type, status=PendingOrder.Status.SUBMITTING
        )
        for pending in pendings:
            outcome = submitting_resolve(pending=pending, gateway=gateway, now=now)
            report.submitting[outcome] = report.submitting.get(outcome, 0) + 1
    return report


def _observe(
    *, row: OpenOrder, state: OrderState, gateway: ExchangeGateway, now: datetime, report: ReconcileReport
) -> None:
    if row.conditional and state.status == OrderStatus.TRIGGERED:
        spawned = order_trigger_record(order=row, state=state, now=now)
        if spawned is None:
            return
        report.triggered += 1
        # Follow the spawned order at once (a STOP_MARKET's child usually fills immediately);
        # an error here leaves the row TRIGGERED for the next run.
        try:
            child = gateway.fetch_order(
                symbol=spawned.symbol,
                market_type=MarketType(spawned.market_type),
                exchange_order_id=spawned.exchange_order_id,
            )
        except GatewayError as exc:
            logger.info("spawned order %s of %s not fetched yet: %s", spawned.exchange_order_id, row.order_key, exc)
            return
        _observe(row=spawned, state=child, gateway=gateway, now=now, report=report)
        return
    if state.is_open and state.filled_quantity == row.filled_quantity:
        return  # the steady state: nothing new (the row's filled quantity moves with its ledger)
    outcome = order_state_apply(order=row, state=state, source=Fill.Source.REST, now=now)
    if outcome.applied:
        report.fills += 1
    if outcome.ended == OrderEvent.Kind.FILLED:
        report.filled += 1
    elif outcome.ended == OrderEvent.Kind.REQUEUED:
        report.requeued += 1
    elif outcome.ended in (OrderEvent.Kind.CANCELLED, OrderEvent.Kind.REJECTED):
        report.cancelled += 1
