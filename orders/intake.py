"""The one order intake pipeline (SPEC §6): per order, read the market rules, price and position the pure
checks of orders.validation need, then enqueue the accepted orders with spot sells re-checked under
their pair locks. `POST /api/orders/` (order_intake) and the webhook's fan-out both go through
order_check and orders_place. Intake only writes; it never calls an exchange."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F, Sum

from accounts.models import Account, MarketType, StrategyAccount
from core.text import echo
from exchanges.gateway import MarketRule
from exchanges.selectors import market_rule_any, price_for_trading
from orders.models import OpenOrder, OrderType, PendingOrder, Side, Signal
from orders.services import OrderSpec, SignalSource, orders_enqueue, pair_lock, signal_record
from orders.validation import (
    Errors,
    OrderRejectedError,
    capital_quantity,
    errors_merge,
    floored_price,
    order_market_check,
    order_range_check,
    order_reference_price,
    order_shape_check,
    position_close_order,
    spot_sell_check,
)
from positions.models import Position

logger = logging.getLogger(__name__)


# --- Reads around the checks -------------------------------------------------------------------


def market_rule_active(*, exchange: str, market_type: str, symbol: str) -> tuple[MarketRule | None, Errors]:
    """The rules of a tradable symbol, or None with the `symbol` error saying why (unknown or delisted)."""
    rule = market_rule_any(exchange=exchange, market_type=market_type, symbol=symbol)
    where = f"{exchange} {market_type}"
    if rule is None:
        return None, {"symbol": [f"unknown symbol {symbol} on {where}"]}
    if not rule.active:
        return None, {"symbol": [f"symbol {symbol} is not active (delisted) on {where}"]}
    return rule, {}


@dataclass
class MarketReads:
    """Market rules and trading prices read once per (exchange, market type, symbol) and kept for one intake:
    the followers of a webhook's fan-out share one symbol, so 100 followers cost two reads, not 200."""

    rules: dict[tuple[str, str, str], tuple[MarketRule | None, Errors]] = field(default_factory=dict)
    prices: dict[tuple[str, str, str], Decimal | None] = field(default_factory=dict)

    def rule(self, *, exchange: str, market_type: str, symbol: str) -> tuple[MarketRule | None, Errors]:
        key = (exchange, market_type, symbol)
        if key not in self.rules:
            self.rules[key] = market_rule_active(exchange=exchange, market_type=market_type, symbol=symbol)
        rule, errors = self.rules[key]
        return rule, {name: list(messages) for name, messages in errors.items()}  # the caller adds to its copy

    def price(self, *, exchange: str, market_type: str, symbol: str, now: datetime) -> Decimal | None:
        key = (exchange, market_type, symbol)
        if key not in self.prices:
            self.prices[key] = price_for_trading(exchange=exchange, market_type=market_type, symbol=symbol, now=now)
        return self.prices[key]


def sell_exposure(*, strategy_account_id: int, symbol: str) -> tuple[Decimal, Decimal]:
    """(position quantity, remaining quantity of queued and live SELL orders) of one strategy account."""
    held = position_quantity(strategy_account_id=strategy_account_id, symbol=symbol)
    in_orders = Decimal(0)
    for model in (PendingOrder, OpenOrder):
        total = model.objects.filter(strategy_account_id=strategy_account_id, symbol=symbol, side=Side.SELL).aggregate(
            total=Sum(F("quantity") - F("filled_quantity"))
        )["total"]
        in_orders += total or Decimal(0)
    return held, in_orders


def position_quantity(*, strategy_account_id: int, symbol: str) -> Decimal:
    """The signed position of one strategy account in `symbol` (0 without a row)."""
    held = (
        Position.objects.filter(strategy_account_id=strategy_account_id, symbol=symbol)
        .values_list("quantity", flat=True)
        .first()
    )
    return held or Decimal(0)


# --- One order ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizing:
    """Size the order from the account's capital (webhook): capital × qty_per / 100 / price × leverage,
    or, with `close`, the whole position on the opposite side (qty_per = -100)."""

    capital: Decimal
    qty_per: Decimal
    leverage: Decimal
    close: bool = False


@dataclass(frozen=True)
class OrderDraft:
    """One order of one strategy account as asked for; quantity None when `sizing` decides it."""

    strategy_account_id: int
    account_id: int
    exchange: str
    market_type: str
    symbol: str
    side: str | None  # None: failed parsing; the market rules are still checked
    order_type: str
    quantity: Decimal | None = None
    price: Decimal | None = None
    stop_price: Decimal | None = None
    priority: int = 0
    sizing: Sizing | None = None


@dataclass(frozen=True)
class OrderCheck:
    """The outcome for one draft: the spec to enqueue, or the errors; `nothing` when there is nothing to
    do (a close of a flat position); `sizing` a one-line account of how the quantity was found."""

    spec: OrderSpec | None = None
    errors: Errors | None = None
    sizing: str = ""

    @property
    def nothing(self) -> bool:
        return self.spec is None and not self.errors


def order_check(
    *, draft: OrderDraft, now: datetime, private: bool = False, reads: MarketReads | None = None
) -> OrderCheck:
    """Validate one order against the market rules, a fresh price and the sellable position (reads only).

    With `draft.sizing` the quantity (and, for a close, the side and type) is decided here from the
    capital or the position. `private`: the caller is not the account's owner (a webhook's token
    holder), so messages name the rule, never the capital, position or the quantity derived from them.
    A spot SELL passes here on a first look; orders_place checks it again under the pair lock.
    `reads`: rules and prices already read for an earlier order of the same intake (a fan-out).
    """
    reads = reads if reads is not None else MarketReads()
    rule, errors = reads.rule(exchange=draft.exchange, market_type=draft.market_type, symbol=draft.symbol)
    if rule is None:
        return OrderCheck(errors=errors)
    side, order_type, quantity = draft.side, draft.order_type, draft.quantity
    price, stop_price = draft.price, draft.stop_price
    sizing, source = "", None
    if draft.sizing is not None and draft.sizing.close:
        held = position_quantity(strategy_account_id=draft.strategy_account_id, symbol=draft.symbol)
        close = position_close_order(held=held)
        if close is None:
            return OrderCheck()
        side, order_type, quantity, price, stop_price = close.side, close.order_type, close.quantity, None, None
        sizing, source = f"closing the position {echo(held)}", "the position to close"

    market_price = None
    if order_type == OrderType.MARKET:
        market_price = reads.price(exchange=draft.exchange, market_type=draft.market_type, symbol=draft.symbol, now=now)
    if draft.sizing is not None and not draft.sizing.close:
        reference = order_reference_price(
            order_type=order_type,
            price=floored_price(price, tick=rule.tick_size),
            stop_price=floored_price(stop_price, tick=rule.tick_size),
            market_price=market_price,
        )
        source = "sized from the account's capital"
        if draft.sizing.capital <= 0:
            errors["quantity"] = [f"no capital allocated to {draft.symbol} trading on this account"]
        elif reference is not None:
            sizing_in = draft.sizing
            quantity = capital_quantity(
                capital=sizing_in.capital, qty_per=sizing_in.qty_per, price=reference, leverage=sizing_in.leverage
            )
            sizing = (
                f"sized {echo(draft.sizing.capital)} × {echo(draft.sizing.qty_per)} % ÷ {echo(reference)} "
                f"× leverage {echo(draft.sizing.leverage)}"
            )
    check = order_market_check(
        rule=rule,
        order_type=order_type,
        quantity=quantity,
        price=price,
        stop_price=stop_price,
        market_price=market_price,
        quantity_source=source if private else None,
    )
    errors_merge(errors, check.errors)
    if not private and "quantity" in check.errors and sizing:
        errors["quantity"].append(f"({sizing})")
    if errors or check.quantity is None or side is None:
        # Without errors: a field was missing (already reported by the caller), nothing to enqueue.
        return OrderCheck(errors=errors, sizing=sizing)
    spec = OrderSpec(
        strategy_account_id=draft.strategy_account_id,
        account_id=draft.account_id,
        symbol=draft.symbol,
        market_type=draft.market_type,
        side=side,
        order_type=order_type,
        quantity=check.quantity,
        price=check.price,
        stop_price=check.stop_price,
        priority=draft.priority,
        reference_price=order_reference_price(
            order_type=order_type, price=check.price, stop_price=check.stop_price, market_price=market_price
        ),
    )
    if spec.market_type == MarketType.SPOT and spec.side == Side.SELL:
        held, in_orders = sell_exposure(strategy_account_id=spec.strategy_account_id, symbol=spec.symbol)
        sell_errors = spot_sell_check(
            quantity=spec.quantity, held=held, in_sell_orders=in_orders, symbol=spec.symbol, private=private
        )
        if sell_errors:
            return OrderCheck(errors=sell_errors, sizing=sizing)
    return OrderCheck(spec=spec, sizing=sizing)


class SpotSellRejectedError(OrderRejectedError):
    """A spot sell that passed its first look no longer fits the position under the pair lock."""

    def __init__(self, errors: Errors, *, spec: OrderSpec):
        super().__init__(errors)
        self.spec = spec


def orders_place(*, specs: list[OrderSpec], now: datetime, private: bool = False) -> list[PendingOrder]:
    """Enqueue checked orders in one transaction (the caller's, if open): spot sells re-checked first.

    Every spot SELL's (account, symbol) pair is locked, in sorted order so two intakes locking
    overlapping pairs never wait on each other in a cycle, and its sellable position checked again,
    so two concurrent sells cannot both spend the same position. Raises SpotSellRejectedError
    (naming the spec) with nothing written.
    """
    sells = sorted(
        {(s.account_id, s.symbol) for s in specs if s.market_type == MarketType.SPOT and s.side == Side.SELL}
    )
    # No savepoint of its own inside the caller's transaction: an error here rolls the whole intake back.
    with transaction.atomic(savepoint=False), ExitStack() as locks:
        for account_id, symbol in sells:
            locks.enter_context(pair_lock(account_id=account_id, symbol=symbol))
        for spec in specs:
            if (spec.account_id, spec.symbol) not in sells or spec.side != Side.SELL:
                continue
            held, in_orders = sell_exposure(strategy_account_id=spec.strategy_account_id, symbol=spec.symbol)
            errors = spot_sell_check(
                quantity=spec.quantity, held=held, in_sell_orders=in_orders, symbol=spec.symbol, private=private
            )
            if errors:
                raise SpotSellRejectedError(errors, spec=spec)
        return orders_enqueue(specs=specs, signal_at=now, now=now) if specs else []


# --- POST /api/orders/ -------------------------------------------------------------------------


@dataclass(frozen=True)
class IntakeRequest:
    """One order as parsed from the request; None where the field was missing or failed parsing."""

    account_id: int | None
    strategy: str | None
    symbol: str | None
    side: str | None
    order_type: str | None
    quantity: Decimal | None
    price: Decimal | None = None
    stop_price: Decimal | None = None
    priority: int = 0


def _resolve_account(*, user: User, account_id: int | None, errors: Errors) -> Account | None:
    if account_id is None:
        return None
    # A foreign account reads exactly like an unknown one: ids of other users' accounts do not leak.
    account = Account.objects.filter(pk=account_id, user=user).first()
    if account is None:
        errors.setdefault("account", []).append(f"unknown account {account_id}")
        return None
    if not account.is_active:
        errors.setdefault("account", []).append(f"account {account_id} is inactive")
        return None
    if account.account_type != Account.AccountType.CRYPTO:
        errors.setdefault("account", []).append(
            f"account {account_id} is a {account.account_type} account; intake trades crypto"
        )
        return None
    return account


def _resolve_strategy_account(
    *, user: User, group_name: str | None, account: Account | None, account_id: int | None, errors: Errors
) -> StrategyAccount | None:
    """The active link of strategy `group_name` to the order's account.

    A strategy the user's accounts are not linked to reads exactly like an unknown one (one message
    for both), so strategy names cannot be enumerated; a linked strategy that is paused says so.
    With the account itself rejected, the strategy is fine when linked to any of the user's accounts.
    """
    if group_name is None:
        return None
    links = StrategyAccount.objects.filter(strategy__group_name=group_name, is_active=True).select_related("strategy")
    link = links.filter(account=account).first() if account is not None else links.filter(account__user=user).first()
    if link is None:
        where = f"account {account_id}" if account is not None else "any of your accounts"
        errors.setdefault("strategy", []).append(f"unknown strategy {group_name!r}, or not active on {where}")
        return None
    if not link.strategy.is_active:
        errors.setdefault("strategy", []).append(f"strategy {group_name!r} is inactive")
        return None
    return link if account is not None else None


def order_intake(
    *,
    user: User,
    request: IntakeRequest,
    now: datetime,
    known_errors: Mapping[str, list[str]] | None = None,
) -> list[PendingOrder]:
    """Validate one order for `user` and enqueue it (PendingOrder QUEUED + `queued` event + dirty mark).

    `known_errors` are field errors found while parsing; they are reported together with every rule
    found here, and any error raises OrderRejectedError with nothing written. A spot SELL is checked
    again under the pair lock in the transaction that enqueues it (orders_place).
    """
    errors: Errors = {name: list(messages) for name, messages in (known_errors or {}).items()}
    account = _resolve_account(user=user, account_id=request.account_id, errors=errors)
    strategy_account = _resolve_strategy_account(
        user=user, group_name=request.strategy, account=account, account_id=request.account_id, errors=errors
    )
    errors_merge(
        errors, order_shape_check(order_type=request.order_type, price=request.price, stop_price=request.stop_price)
    )
    errors_merge(
        errors, order_range_check(price=request.price, stop_price=request.stop_price, quantity=request.quantity)
    )
    check = OrderCheck()
    # Market rules need the exchange (from the account) and the market type (from the strategy).
    if account is not None and strategy_account is not None and request.symbol is not None and request.order_type:
        check = order_check(
            draft=OrderDraft(
                strategy_account_id=strategy_account.pk,
                account_id=account.pk,
                exchange=account.exchange,
                market_type=strategy_account.strategy.market_type,
                symbol=request.symbol,
                side=request.side,
                order_type=request.order_type,
                # A field that already failed (e.g. price given to a MARKET order) is not checked twice.
                quantity=request.quantity if "quantity" not in errors else None,
                price=request.price if "price" not in errors else None,
                stop_price=request.stop_price if "stop_price" not in errors else None,
                priority=request.priority,
            ),
            now=now,
        )
        errors_merge(errors, check.errors or {})
    if errors:
        raise OrderRejectedError(errors)
    # Every field parsed and resolved without error, so the check produced a spec.
    assert check.spec is not None
    spec = check.spec
    with transaction.atomic():
        orders = orders_place(specs=[spec], now=now)
        signal_record(
            source=SignalSource(
                source=Signal.Source.API,
                strategy_id=strategy_account.strategy_id,  # type: ignore[union-attr]  # resolved: no errors
                symbol=spec.symbol,
                side=spec.side,
                order_type=spec.order_type,
                price=spec.stop_price or spec.price,
                user_id=user.pk,
            ),
            orders=orders,
            specs=[spec],
            now=now,
        )
    logger.info(
        "order %s accepted: %s %s %s %s on account %s",
        orders[0].order_key,
        spec.side,
        spec.order_type,
        spec.quantity,
        spec.symbol,
        spec.account_id,
    )
    return orders
