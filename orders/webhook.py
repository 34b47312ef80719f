"""Webhook intake (SPEC §6): authenticate a strategy's signal, fan it out to its active accounts, dedupe deliveries."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import IntegrityError, transaction

from accounts.models import Account, Strategy, StrategyAccount
from accounts.services import (
    strategy_account_ref,
    strategy_webhook_token_check,
    webhook_token_hash,
    webhook_token_matches,
)
from orders.intake import MarketReads, OrderDraft, Sizing, SpotSellRejectedError, order_check, orders_place
from orders.models import OpenOrder, OrderType, PendingOrder, Signal, WebhookDelivery
from orders.services import OrderSpec, SignalSource, pair_lock, signal_record
from orders.transitions import order_cancel_by_user
from orders.validation import Errors, errors_merge, order_range_check, order_shape_check

logger = logging.getLogger(__name__)

CANCEL = "CANCEL"
CANCEL_ALL = "CANCEL_ALL"
WEBHOOK_ORDER_TYPES = (*OrderType.values, CANCEL, CANCEL_ALL)
CLOSE_POSITION = Decimal(-100)
HASH_WINDOW = timedelta(seconds=60)
CLAIM_ATTEMPTS = 5


class WebhookRejectedError(Exception):
    """The signal breaks a rule; nothing was written for any account.

    `errors` names bad payload fields; `account_errors` names, per account reference
    (accounts.services.strategy_account_ref: the sender learns no account ids), the rules that
    fail for that account, without its capital, position or sized quantity.
    """

    def __init__(self, errors: Errors | None = None, account_errors: dict[str, Errors] | None = None):
        self.errors = errors or {}
        self.account_errors = account_errors or {}
        parts = [f"{name}: {' '.join(msgs)}" for name, msgs in sorted(self.errors.items())]
        parts += [
            f"account {account_id} {name}: {' '.join(msgs)}"
            for account_id, fields in sorted(self.account_errors.items())
            for name, msgs in sorted(fields.items())
        ]
        super().__init__("; ".join(parts))


@dataclass(frozen=True)
class WebhookSignal:
    """One parsed delivery; None where a field was missing or failed parsing."""

    delivery_id: str = ""
    symbol: str | None = None
    side: str | None = None
    order_type: str | None = None
    price: Decimal | None = None
    stop_price: Decimal | None = None
    qty_per: Decimal | None = None

    @property
    def cancels(self) -> bool:
        return self.order_type in (CANCEL, CANCEL_ALL)

    @property
    def closes(self) -> bool:
        return self.qty_per == CLOSE_POSITION and not self.cancels


@dataclass(frozen=True)
class WebhookReply:
    """The 202 body (`orders` and `cancelled` per account id) and whether it replays an earlier delivery."""

    body: dict[str, Any]
    duplicate: bool = False


@dataclass
class _Plan:
    specs: list[OrderSpec] = field(default_factory=list)
    accounts: list[int] = field(default_factory=list)  # every fanned-out account, in order
    refs: dict[int, str] = field(default_factory=dict)  # strategy account id → its reference in replies


# --- Pure pieces ---------------------------------------------------------------------------------


def webhook_payload_hash(payload: Mapping[str, Any]) -> str:
    """sha256 of the canonical payload: the JSON object with `token` removed, keys sorted, no spaces.

    Numbers keep their spelling as sent (10 and 10.0 differ), which is what a repeated alert repeats.
    """
    canonical = {k: v for k, v in payload.items() if k != "token"}
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def webhook_signal_check(*, signal: WebhookSignal) -> Errors:
    """Rules of the payload itself, before any account is looked at: which fields each order type needs."""
    errors: Errors = {}
    if signal.order_type is None:
        return errors
    if signal.order_type == CANCEL and signal.symbol is None:
        errors["symbol"] = ["symbol is required for CANCEL"]
    if signal.cancels:
        return errors
    if signal.symbol is None:
        errors["symbol"] = ["symbol is required"]
    if signal.side is None:
        errors["side"] = ["side is required"]
    if signal.qty_per is None:
        errors["qty_per"] = ["qty_per is required"]
    elif signal.qty_per <= 0 and signal.qty_per != CLOSE_POSITION:
        errors["qty_per"] = ["qty_per must be greater than 0, or -100 to close the position"]
    if not signal.closes:
        # A close is always a MARKET order on the opposite side: price fields do not apply to it.
        errors_merge(
            errors, order_shape_check(order_type=signal.order_type, price=signal.price, stop_price=signal.stop_price)
        )
        errors_merge(errors, order_range_check(price=signal.price, stop_price=signal.stop_price))
    return errors


# --- Authentication ------------------------------------------------------------------------------


_DECOY_HASH = webhook_token_hash("webhook decoy token")


def webhook_strategy_authenticate(*, group_name: Any, token: Any) -> Strategy | None:
    """The strategy whose hashed webhook token matches `token`, else None.

    An unknown group, a strategy without a token and a wrong token all cost one password-hash
    check (a decoy where there is nothing to compare), so neither the answer nor its timing tells
    which group names exist. Inactive strategies authenticate; the caller rejects them with 400.
    """
    token = token if isinstance(token, str) else ""
    strategy = None
    if isinstance(group_name, str) and 0 < len(group_name) <= 100:
        strategy = Strategy.objects.filter(group_name=group_name).first()
    if strategy is None or not strategy.webhook_token_hash or not token:
        webhook_token_matches(token=token or "-", stored=_DECOY_HASH)
        return None
    return strategy if strategy_webhook_token_check(strategy=strategy, token=token) else None


# --- Deliveries ----------------------------------------------------------------------------------


def _delivery_find(*, strategy: Strategy, delivery_id: str, payload_hash: str) -> WebhookDelivery | None:
    rows = WebhookDelivery.objects.filter(strategy=strategy)
    if delivery_id:
        return rows.filter(delivery_id=delivery_id).first()
    return rows.filter(delivery_id="", payload_hash=payload_hash, hash_window_open=True).first()


def _replay_of(row: WebhookDelivery | None, *, now: datetime) -> dict[str, Any] | None:
    """The stored reply when `row` makes this delivery a duplicate (an id: always; a hash: within 60 s)."""
    if row is None:
        return None
    if row.delivery_id or now - row.received_at < HASH_WINDOW:
        return row.reply
    return None


def _delivery_claim(
    *, strategy: Strategy, delivery_id: str, payload_hash: str, now: datetime
) -> tuple[WebhookDelivery | None, dict[str, Any] | None]:
    """Insert this delivery's row (inside the caller's transaction): (row, None), or (None, first reply).

    The unique indexes are the lock: a concurrent identical insert waits until the first
    transaction ends, then fails (it committed: replay its reply) or goes through (it rolled
    back). A hash row whose 60 s are over is closed, and this delivery takes its place.
    """
    for _ in range(CLAIM_ATTEMPTS):
        try:
            with transaction.atomic():  # a savepoint: a conflict leaves the outer transaction usable
                row = WebhookDelivery.objects.create(
                    strategy=strategy,
                    delivery_id=delivery_id,
                    payload_hash=payload_hash,
                    hash_window_open=not delivery_id,
                    received_at=now,
                    reply={},
                )
            return row, None
        except IntegrityError:
            existing = _delivery_find(strategy=strategy, delivery_id=delivery_id, payload_hash=payload_hash)
            replay = _replay_of(existing, now=now)
            if replay is not None:
                return None, replay
            if existing is not None:
                # The window is over. Conditional, so of two late twins only one closes it; the
                # other then conflicts with the newcomer's row and replays it.
                WebhookDelivery.objects.filter(pk=existing.pk, hash_window_open=True).update(hash_window_open=False)
    raise RuntimeError(f"webhook delivery of strategy {strategy.pk} could not be claimed")


# --- Orders --------------------------------------------------------------------------------------


def _fan_out(strategy: Strategy) -> list[StrategyAccount]:
    """The strategy's active StrategyAccounts on active crypto accounts, by account id."""
    return list(
        StrategyAccount.objects.filter(
            strategy=strategy,
            is_active=True,
            account__is_active=True,
            account__account_type=Account.AccountType.CRYPTO,
        )
        .select_related("account", "capital")
        .order_by("account_id")
    )


def _capital_of(strategy_account: StrategyAccount) -> Decimal:
    try:
        return strategy_account.capital.allocated_capital
    except StrategyAccount.capital.RelatedObjectDoesNotExist:
        return Decimal(0)


def _orders_plan(*, strategy: Strategy, signal: WebhookSignal, now: datetime) -> _Plan:
    """Validate the fan-out: one order (or none) per active account; any account's error rejects all.

    Each account goes through the intake pipeline (orders.intake.order_check) with its own capital
    and leverage; the reply names a failing account by its reference and the rule only, and the
    log line gives the operator the account id and the figures.
    """
    accounts = _fan_out(strategy)
    if not accounts:
        raise WebhookRejectedError({"group_name": [f"strategy {strategy.group_name!r} has no active accounts"]})
    assert signal.symbol is not None and signal.order_type is not None and signal.qty_per is not None
    plan = _Plan()
    reads = MarketReads()  # one read of the symbol's rules and price for every follower
    account_errors: dict[str, Errors] = {}
    for strategy_account in accounts:
        plan.accounts.append(strategy_account.account_id)
        ref = plan.refs[strategy_account.pk] = strategy_account_ref(strategy_account.pk)
        draft = OrderDraft(
            strategy_account_id=strategy_account.pk,
            account_id=strategy_account.account_id,
            exchange=strategy_account.account.exchange,
            market_type=strategy.market_type,
            symbol=signal.symbol,
            side=signal.side,
            order_type=signal.order_type,
            price=signal.price,
            stop_price=signal.stop_price,
            sizing=Sizing(
                capital=_capital_of(strategy_account),
                qty_per=signal.qty_per,
                leverage=strategy_account.leverage,
                close=signal.closes,
            ),
        )
        check = order_check(draft=draft, now=now, private=True, reads=reads)
        if check.errors:
            account_errors[ref] = check.errors
            logger.info(
                "webhook of %s: account %s (%s) rejected: %s %s",
                strategy,
                strategy_account.account_id,
                ref,
                check.errors,
                check.sizing,
            )
        elif check.spec is not None:
            plan.specs.append(check.spec)
    if account_errors:
        raise WebhookRejectedError(account_errors=account_errors)
    return plan


def _orders_place(
    *, plan: _Plan, strategy: Strategy, signal: WebhookSignal, now: datetime
) -> tuple[dict[str, list[str]], int | None]:
    """Enqueue the plan's orders (caller's transaction), spot sells re-checked under their pair locks, and
    record them as one Signal for the execution report. Returns the order keys per account and the signal id."""
    try:
        orders = orders_place(specs=plan.specs, now=now, private=True)
    except SpotSellRejectedError as exc:
        raise WebhookRejectedError(account_errors={plan.refs[exc.spec.strategy_account_id]: exc.errors}) from None
    keys: dict[str, list[str]] = {str(account_id): [] for account_id in plan.accounts}
    for order in orders:
        keys[str(order.account_id)].append(str(order.order_key))
    if not orders:
        return keys, None
    recorded = signal_record(
        source=SignalSource(
            source=Signal.Source.WEBHOOK,
            strategy_id=strategy.pk,
            symbol=signal.symbol or "",
            side=signal.side or "",
            order_type=signal.order_type or "",
            price=signal.stop_price or signal.price,
        ),
        orders=orders,
        specs=plan.specs,
        now=now,
    )
    return keys, recorded.pk


def _cancel(*, strategy: Strategy, symbol: str | None, now: datetime) -> dict[str, dict[str, str]]:
    """Cancel every queued, then every live, order of the strategy (on `symbol`, or all symbols).

    Runs in the caller's transaction. All affected (account, symbol) pairs are locked first, in
    sorted order, so the queue job cannot move an order between the two lists meanwhile and two
    cancels never deadlock. Each order goes through order_cancel_by_user (queued: removed;
    placing or live: marked, cancelled by the queue job and never re-queued). Returns
    {account_id: {order_key: "cancelled" | "cancelling" | "ended"}}.
    """
    scope: dict[str, Any] = {"strategy_account__strategy": strategy}
    if symbol is not None:
        scope["symbol"] = symbol
    pairs: set[tuple[int, str]] = set()
    for model in (PendingOrder, OpenOrder):
        pairs.update(model.objects.filter(**scope).values_list("account_id", "symbol").distinct())
    result: dict[str, dict[str, str]] = {}
    with ExitStack() as locks:
        for account_id, pair_symbol in sorted(pairs):
            locks.enter_context(pair_lock(account_id=account_id, symbol=pair_symbol))
        # Queued first: nothing queued can be promoted into a slot the live cancels free.
        for model in (PendingOrder, OpenOrder):
            rows = model.objects.filter(**scope).order_by("account_id", "symbol", "queue_seq")
            for order_key, account_id, pair_symbol in rows.values_list("order_key", "account_id", "symbol"):
                if (account_id, pair_symbol) not in pairs:
                    continue  # a pair that got its first order after the listing: that order came later
                state = order_cancel_by_user(order_key=order_key, now=now)
                result.setdefault(str(account_id), {})[str(order_key)] = state
    return result


# --- The entry point -----------------------------------------------------------------------------


def webhook_receive(
    *,
    strategy: Strategy,
    signal: WebhookSignal,
    payload_hash: str,
    now: datetime,
    known_errors: Mapping[str, list[str]] | None = None,
) -> WebhookReply:
    """Accept an authenticated signal: enqueue its fan-out, or cancel, in one transaction with its delivery row.

    All-or-nothing: any payload or account error raises WebhookRejectedError and nothing is
    written (no order, no event, no delivery row). A duplicate (same `id`; or, without one, the
    same payload within 60 s) returns the first delivery's reply and writes nothing. No exchange
    call: orders are queued (MARKET ones express) for the leader's queue job.
    """
    errors: Errors = {name: list(messages) for name, messages in (known_errors or {}).items()}
    if not strategy.is_active:
        errors.setdefault("group_name", []).append(f"strategy {strategy.group_name!r} is inactive")
    for name, messages in webhook_signal_check(signal=signal).items():
        errors.setdefault(name, []).extend(messages)
    if errors:
        raise WebhookRejectedError(errors)

    # A duplicate replays the first reply even if the market moved since (validation could differ now).
    replay = _replay_of(
        _delivery_find(strategy=strategy, delivery_id=signal.delivery_id, payload_hash=payload_hash), now=now
    )
    if replay is not None:
        logger.info("webhook %s of %s: duplicate delivery, replayed", signal.delivery_id or payload_hash[:12], strategy)
        return WebhookReply(body=replay, duplicate=True)

    # Validation reads (rules, prices, positions) run before the transaction, which stays short.
    plan = None if signal.cancels else _orders_plan(strategy=strategy, signal=signal, now=now)
    with transaction.atomic():
        delivery, replay = _delivery_claim(
            strategy=strategy, delivery_id=signal.delivery_id, payload_hash=payload_hash, now=now
        )
        if delivery is None:
            assert replay is not None
            logger.info("webhook of %s: concurrent duplicate delivery, replayed", strategy)
            return WebhookReply(body=replay, duplicate=True)
        if plan is not None:
            keys, signal_id = _orders_place(plan=plan, strategy=strategy, signal=signal, now=now)
            body: dict[str, Any] = {"orders": keys, "cancelled": {}}
            if signal_id is not None:
                body["signal"] = signal_id
        else:
            symbol = signal.symbol if signal.order_type == CANCEL else None
            body = {"orders": {}, "cancelled": _cancel(strategy=strategy, symbol=symbol, now=now)}
        delivery.reply = body
        delivery.save(update_fields=["reply"])
    logger.info(
        "webhook %s of %s: %s %s, %d orders queued, %d cancels",
        delivery.pk,
        strategy,
        signal.order_type,
        signal.symbol or "*",
        sum(len(keys) for keys in body["orders"].values()),
        sum(len(keys) for keys in body["cancelled"].values()),
    )
    return WebhookReply(body=body)
