"""The orders side of the user-data streams (SPEC §4.6): which accounts stream, applying their order updates,
the REST catch-up after a (re)connect, the health check's expectations, and the manager built with them.

The stream transport (exchanges.streams) knows no account or order: the leader starts the
manager through `user_stream_manager` (scheduler.runner.LEADER_THREADS), which hands it
`OrderStreamHandler`. Updates go through the same idempotent path as the REST poll (orders.transitions).
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import datetime
from decimal import Decimal
from typing import Any

from accounts.models import Account, StrategyAccount
from core.money import ZERO
from core.scrub import secret_register
from exchanges.gateway import MarketType, OrderState, OrderStatus
from exchanges.services import gateway_for
from exchanges.streams.manager import StreamClock, StreamConfig, UserStreamManager
from exchanges.streams.messages import StreamUpdate
from exchanges.streams.services import (
    STREAMED_EXCHANGES,
    STREAMED_MARKETS,
    StreamAccount,
    StreamHealthReport,
    stream_health_report,
)
from orders.circuit import account_scope, circuit_states, exchange_scope
from orders.models import OpenOrder
from orders.reconcile import ReconcileReport, orders_reconcile
from orders.transitions import order_state_apply, order_trigger_record
from positions.models import Fill
from positions.selectors import trade_fee_known
from scheduler.shards import shard_account_owned, sharding_enabled

logger = logging.getLogger(__name__)


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
    known = trade_fee_known(strategy_account_id=row.strategy_account_id, exchange_order_id=state.exchange_order_id)
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


def stream_health_check(*, now: datetime) -> StreamHealthReport:
    """Classify the stream of every account that should have one (stream_account_list) from its StreamState row.

    Flags open-but-stale streams for the manager (exchanges.streams.services.stream_health_report);
    no exchange call.
    """
    return stream_health_report(accounts=stream_account_list(), now=now)


class OrderStreamHandler:
    """What the stream manager asks of the orders side (exchanges.streams.manager.StreamHandler).

    With account sharding on, only the accounts of this process's shards stream, and an update or
    catch-up for an account whose shard has just left the process is dropped (its new owner's
    stream and the REST poll cover it).
    """

    def accounts(self) -> list[StreamAccount]:
        return [a for a in stream_account_list() if shard_account_owned(a.account_id)]

    def update_apply(self, *, account_id: int, update: StreamUpdate, now: datetime) -> str:
        if not shard_account_owned(account_id):
            return "not owned"
        return stream_update_apply(account_id=account_id, update=update, now=now)

    def reconcile(self, *, account_id: int, now: datetime) -> ReconcileReport:
        if not shard_account_owned(account_id):
            return ReconcileReport()
        return stream_reconcile(account_id=account_id, now=now)


def user_stream_manager(
    host: Any = None, *, config: StreamConfig | None = None, clock: StreamClock | None = None
) -> UserStreamManager:
    """The leader's user-stream thread (SPEC §2.4), wired to the orders side; started by the scheduler host.

    With account sharding on, every scheduler runs one for its own shards' accounts, re-read every
    5 s at most so that streams follow their shards soon after they move.
    """
    if config is None and sharding_enabled():
        base = StreamConfig.from_settings()
        config = dataclasses.replace(base, accounts_every=min(base.accounts_every, 5.0))
    return UserStreamManager(host, handler=OrderStreamHandler(), config=config, clock=clock)
