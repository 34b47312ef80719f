"""Database side of the user-data streams: accounts to stream, StreamState rows, order updates, REST catch-up."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from django.db import transaction
from django.db.models import F, Q

from accounts.models import Account, StrategyAccount
from core.money import ZERO
from core.scrub import scrub, secret_register
from exchanges.gateway import MarketType, OrderState, OrderStatus
from exchanges.models import StreamState
from exchanges.streams.messages import StreamUpdate, stream_alive
from orders.models import Fill, OpenOrder, Trade
from orders.reconcile import ReconcileReport, order_state_apply, order_trigger_record, orders_reconcile

logger = logging.getLogger(__name__)

STREAMED_EXCHANGES = ("BINANCE", "BYBIT")
# Binance spot accounts rely on the REST poll; a Bybit stream carries spot and linear alike.
STREAMED_MARKETS = {"BINANCE": (MarketType.FUTURES,), "BYBIT": (MarketType.SPOT, MarketType.FUTURES)}


@dataclass(frozen=True)
class StreamAccount:
    """What a stream task needs of an account; equal values mean the running stream can stay."""

    account_id: int
    exchange: str
    api_key: str = field(repr=False)
    api_secret: str = field(repr=False)
    testnet: bool = False


def stream_account_list() -> list[StreamAccount]:
    """Active crypto accounts that get a stream: Binance ones trading USDⓈ-M futures, and every Bybit one.

    A Binance account trades futures when an active strategy of market type FUTURES runs on it,
    or when it still has live FUTURES orders. Accounts without credentials are skipped.
    """
    accounts = list(
        Account.objects.filter(
            is_active=True, account_type=Account.AccountType.CRYPTO, exchange__in=STREAMED_EXCHANGES
        ).order_by("pk")
    )
    binance_ids = [a.pk for a in accounts if a.exchange == "BINANCE"]
    futures = set()
    if binance_ids:
        futures = set(
            StrategyAccount.objects.filter(
                account_id__in=binance_ids,
                is_active=True,
                strategy__is_active=True,
                strategy__market_type=MarketType.FUTURES,
            ).values_list("account_id", flat=True)
        ) | set(
            OpenOrder.objects.filter(account_id__in=binance_ids, market_type=MarketType.FUTURES).values_list(
                "account_id", flat=True
            )
        )
    chosen = []
    for account in accounts:
        if account.exchange == "BINANCE" and account.pk not in futures:
            continue
        if not account.api_key or not account.api_secret:
            logger.debug("account %s (%s) has no API credentials: no user stream", account.pk, account.exchange)
            continue
        secret_register(account.api_key)
        secret_register(account.api_secret)
        chosen.append(
            StreamAccount(
                account_id=account.pk,
                exchange=account.exchange,
                api_key=account.api_key,
                api_secret=account.api_secret,
                testnet=account.is_testnet,
            )
        )
    return chosen


# --- StreamState rows (one short statement or transaction each) -------------------------


def stream_state_write(
    *, account_id: int, exchange: str, now: datetime, count_reconnect: bool = False, **fields: Any
) -> None:
    """Upsert the account's StreamState with `fields`; `count_reconnect` adds one to `reconnects`."""
    if "last_error" in fields:
        fields["last_error"] = scrub(fields["last_error"])[:500]
    values = {**fields, "exchange": exchange, "updated_at": now}
    if count_reconnect:
        values["reconnects"] = F("reconnects") + 1
    with transaction.atomic():
        if StreamState.objects.filter(account_id=account_id).update(**values):
            return
        StreamState.objects.bulk_create(
            [StreamState(account_id=account_id, exchange=exchange, updated_at=now)], ignore_conflicts=True
        )
        StreamState.objects.filter(account_id=account_id).update(**values)


def stream_state_stop(*, account_ids: list[int], now: datetime) -> int:
    """Mark streams stopped (leadership lost, account no longer streamed); pending flags are void."""
    return StreamState.objects.filter(account_id__in=account_ids).update(
        state=StreamState.State.STOPPED, next_reconnect_at=None, reconnect_requested_at=None, updated_at=now
    )


def stream_flags_take(*, account_ids: list[int]) -> list[int]:
    """The accounts whose stream check_websocket_health asked to replace; the flags are cleared."""
    if not account_ids:
        return []
    with transaction.atomic():
        flagged = list(
            StreamState.objects.select_for_update()
            .filter(account_id__in=account_ids, reconnect_requested_at__isnull=False)
            .values_list("account_id", flat=True)
        )
        if flagged:
            StreamState.objects.filter(account_id__in=flagged).update(reconnect_requested_at=None)
    return flagged


# --- order updates -------------------------------------------------------------------------


def _match(rows: Any, state: OrderState) -> OpenOrder | None:
    """The row of `state` by exchange order id; by client order id only for a row without one.

    The fill ledger is keyed by exchange order id, so a client-id match naming another
    exchange order is not applied (left to the REST poll).
    """
    row = rows.filter(exchange_order_id=state.exchange_order_id).first()
    if row is None and state.client_order_id:
        row = rows.filter(client_order_id=state.client_order_id, exchange_order_id="").first()
    return row


def _cumulative_fee(*, row: OpenOrder, state: OrderState) -> Decimal:
    """Binance reports the commission of the last trade only: add it to what the ledger holds."""
    known = (
        Trade.objects.filter(strategy_account_id=row.strategy_account_id, exchange_order_id=state.exchange_order_id)
        .values_list("fees", "fee_currency", "cumulative_filled")
        .first()
    )
    if known is None:
        return state.fee
    fees, currency, cumulative = known
    if state.filled_quantity <= cumulative:
        return fees  # nothing new: the fill path will do nothing
    return (fees if currency == state.fee_currency else ZERO) + state.fee


def _apply_regular(*, row: OpenOrder, state: OrderState, fee_is_last_trade: bool, now: datetime) -> str:
    state = dataclasses.replace(state, symbol=row.symbol)
    if fee_is_last_trade:
        state = dataclasses.replace(state, fee=_cumulative_fee(row=row, state=state))
    if state.is_open and state.filled_quantity <= row.filled_quantity:
        return "noop"
    outcome = order_state_apply(order=row, state=state, source=Fill.Source.STREAM, now=now)
    if outcome.ended:
        return str(outcome.ended)
    return "fill" if outcome.applied else "noop"


def stream_update_apply(*, account_id: int, update: StreamUpdate, now: datetime) -> str:
    """Apply one stream report to the account's OpenOrder through the idempotent path (SPEC §4.2, §4.6).

    A conditional report goes to the still-conditional row: TRIGGERED is recorded by
    order_trigger_record (and, for an exchange that keeps the id, the spawned order's own
    report is applied to the switched row), a cancel/rejection ends it; a regular report goes
    to order_state_apply with source STREAM. Orders that are not ours are ignored. Returns
    what happened ("unknown", "noop", "fill", "triggered" or the ending event).
    """
    rows = OpenOrder.objects.filter(account_id=account_id, market_type=update.market_type).select_related("account")
    if update.conditional is not None:
        row = _match(rows.filter(conditional=True), update.conditional)
        if row is not None:
            cond = dataclasses.replace(update.conditional, symbol=row.symbol)
            if cond.status == OrderStatus.TRIGGERED:
                spawned = order_trigger_record(order=row, state=cond, now=now)
                if spawned is None:
                    return "noop"
                regular = update.regular
                if regular is not None and regular.exchange_order_id == spawned.exchange_order_id:
                    _apply_regular(row=spawned, state=regular, fee_is_last_trade=update.fee_is_last_trade, now=now)
                return "triggered"
            if cond.status in (OrderStatus.CANCELED, OrderStatus.REJECTED, OrderStatus.EXPIRED):
                outcome = order_state_apply(order=row, state=cond, source=Fill.Source.STREAM, now=now)
                return str(outcome.ended) if outcome.ended else "noop"
            return "noop"  # not fired yet
    if update.regular is not None:
        row = _match(rows.filter(conditional=False), update.regular)
        if row is not None:
            return _apply_regular(row=row, state=update.regular, fee_is_last_trade=update.fee_is_last_trade, now=now)
    logger.debug(
        "stream: order %s of account %s (%s) is not one of ours; ignored",
        update.exchange_order_id,
        account_id,
        update.market_type,
    )
    return "unknown"


def stream_reconcile(*, account_id: int, now: datetime) -> ReconcileReport:
    """REST catch-up after a (re)connect: orders_reconcile for every market the account's stream covers.

    A market whose circuit breaker (exchange market or account) is open is skipped; the
    29 s poll retries. Gateway errors propagate to the stream manager, which logs them.
    """
    # Imported here: exchanges.services is edited by others and pulls in ccxt; the pure and
    # row parts of this module need neither.
    from exchanges.services import gateway_for
    from orders.circuit import account_scope, circuit_states, exchange_scope

    account = Account.objects.get(pk=account_id)
    report = ReconcileReport()
    markets = STREAMED_MARKETS.get(account.exchange, ())
    scopes = [exchange_scope(exchange=account.exchange, market_type=mt) for mt in markets]
    scopes.append(account_scope(account_id=account_id))
    breakers = circuit_states(scopes=scopes)
    account_breaker = breakers.get(account_scope(account_id=account_id))
    if account_breaker is not None and account_breaker.is_open(now):
        logger.info("stream catch-up of account %s skipped: account circuit open", account_id)
        return report
    gateway = gateway_for(account)
    for market_type in markets:
        breaker = breakers.get(exchange_scope(exchange=account.exchange, market_type=market_type))
        if breaker is not None and breaker.is_open(now):
            logger.info("stream catch-up of account %s %s skipped: circuit open", account_id, market_type)
            continue
        report.add(orders_reconcile(account=account, market_type=market_type, gateway=gateway, now=now))
    return report


# --- health (check_websocket_health) ------------------------------------------------------


@dataclass
class StreamHealthReport:
    """What one health check saw; `requested` counts the reconnects this check asked for."""

    expected: int = 0
    alive: int = 0
    reconnecting: int = 0
    dead: int = 0
    requested: int = 0
    missing: int = 0
    stopped: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.expected} streams: {self.alive} alive, {self.reconnecting} reconnecting"
        if self.dead:
            text += f", {self.dead} dead ({self.requested} reconnects requested now)"
        if self.missing:
            text += f", {self.missing} not started"
        if self.stopped:
            text += f", {self.stopped} stopped"
        if self.notes:
            text += "; " + "; ".join(self.notes)
        return text[:500]


def stream_health_check(*, now: datetime) -> StreamHealthReport:
    """Classify every stream that should exist (SPEC §4.6) and flag open-but-stale ones for the manager.

    alive: open with a message or pong younger than twice its ping interval. reconnecting:
    connecting, or torn down and waiting out its backoff — a reconnect is in flight, so
    nothing is asked. dead: open but stale, which the manager has not noticed yet; its row
    gets `reconnect_requested_at` unless already set, and the manager replaces the stream
    through its one task per account, so repeated checks never start a second reconnect.
    """
    report = StreamHealthReport()
    accounts = stream_account_list()
    report.expected = len(accounts)
    rows = {row.account_id: row for row in StreamState.objects.filter(account_id__in=[a.account_id for a in accounts])}
    for account in accounts:
        row = rows.get(account.account_id)
        if row is None:
            report.missing += 1
            report.notes.append(f"account {account.account_id} {account.exchange}: no stream yet")
            continue
        if row.state == StreamState.State.OPEN:
            if stream_alive(
                now=now,
                ping_interval=row.ping_interval,
                last_message_at=row.last_message_at,
                last_pong_at=row.last_pong_at,
                connected_at=row.connected_at,
            ):
                report.alive += 1
                continue
            report.dead += 1
            if row.reconnect_requested_at is None:
                flagged = StreamState.objects.filter(
                    Q(reconnect_requested_at__isnull=True), pk=row.pk, state=StreamState.State.OPEN
                ).update(reconnect_requested_at=now)
                report.requested += flagged
            seen = [t for t in (row.last_message_at, row.last_pong_at, row.connected_at) if t is not None]
            silence = f"{(now - max(seen)).total_seconds():.0f} s" if seen else "ever"
            report.notes.append(f"account {account.account_id} {account.exchange}: open but silent for {silence}")
        elif row.state in (StreamState.State.CONNECTING, StreamState.State.DEAD):
            report.reconnecting += 1
            wait = ""
            if row.next_reconnect_at is not None:
                wait = f", next try in {max(0.0, (row.next_reconnect_at - now).total_seconds()):.0f} s"
            report.notes.append(
                f"account {account.account_id} {account.exchange}: {row.state}, "
                f"{row.consecutive_failures} failures in a row{wait}"
                + (f" ({row.last_error[:80]})" if row.last_error else "")
            )
        else:
            report.stopped += 1
            report.notes.append(f"account {account.account_id} {account.exchange}: stopped")
    return report
