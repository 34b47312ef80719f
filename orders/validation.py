"""Order intake: pure checks over market rules, a reference price and the sellable position, and the
validate-then-enqueue entry point of `POST /api/orders/` (SPEC §6). Intake only writes; it never calls
an exchange."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import F, Sum

from accounts.models import Account, MarketType, Strategy, StrategyAccount
from exchanges.gateway import MarketRule
from exchanges.rounding import floor_to_step
from exchanges.selectors import market_rule_any, price_for_trading
from orders.models import OpenOrder, OrderType, PendingOrder, Side
from orders.services import OrderSpec, orders_enqueue, pair_lock
from positions.models import Position

logger = logging.getLogger(__name__)

Errors = dict[str, list[str]]

LIMIT_PRICED = frozenset({OrderType.LIMIT, OrderType.STOP_LIMIT})
STOP_TYPES = frozenset({OrderType.STOP_LIMIT, OrderType.STOP_MARKET})


class OrderRejectedError(Exception):
    """The order breaks one or more rules; `errors` names every bad field. Nothing was written."""

    def __init__(self, errors: Errors):
        super().__init__("; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in sorted(errors.items())))
        self.errors = errors


def _fmt(value: Decimal) -> str:
    """0.001000000000 → "0.001"; 1E+2 → "100"."""
    return format(value.normalize(), "f")


def _add(errors: Errors, name: str, message: str) -> None:
    errors.setdefault(name, []).append(message)


# --- Pure checks (no ORM, no clock, no network) ------------------------------------------------


def order_shape_check(*, order_type: str | None, price: Decimal | None, stop_price: Decimal | None) -> Errors:
    """Which prices an order type needs: LIMIT/STOP_LIMIT a price, STOP_* a stop price; MARKET and
    STOP_MARKET take no limit price (it would be silently ignored by the exchange), MARKET and LIMIT
    no stop price."""
    errors: Errors = {}
    if order_type is None:
        return errors
    if order_type in LIMIT_PRICED and price is None:
        _add(errors, "price", f"price is required for {order_type} orders")
    if order_type not in LIMIT_PRICED and price is not None:
        _add(errors, "price", f"price must be empty for {order_type} orders")
    if order_type in STOP_TYPES and stop_price is None:
        _add(errors, "stop_price", f"stop_price is required for {order_type} orders")
    if order_type not in STOP_TYPES and stop_price is not None:
        _add(errors, "stop_price", f"stop_price must be empty for {order_type} orders")
    return errors


@dataclass(frozen=True)
class MarketCheck:
    """The outcome of the market rules: errors by field, and the values floored to step and tick."""

    errors: Errors = field(default_factory=dict)
    quantity: Decimal | None = None
    price: Decimal | None = None
    stop_price: Decimal | None = None


def order_market_check(
    *,
    rule: MarketRule,
    order_type: str,
    quantity: Decimal | None,
    price: Decimal | None,
    stop_price: Decimal | None,
    market_price: Decimal | None,
) -> MarketCheck:
    """Floor quantity to the step and prices to the tick (SPEC §4.8), then check min/max quantity and the
    minimum notional.

    The notional is priced by the order's own (floored) limit price for LIMIT and STOP_LIMIT, and by
    `market_price` (a quote no older than PRICE_MAX_AGE_TRADE, or None) for MARKET and STOP_MARKET;
    those need a fresh price even without a notional rule, so a market order is never sized blind.
    Inputs that are None (missing or already rejected) skip the checks that need them.
    """
    errors: Errors = {}
    symbol = rule.symbol
    floored_price = floored_stop = floored_qty = None
    if price is not None:
        floored_price = floor_to_step(price, rule.tick_size)
        if floored_price <= 0:
            _add(errors, "price", f"price {_fmt(price)} is below the tick size {_fmt(rule.tick_size)} of {symbol}")
    if stop_price is not None:
        floored_stop = floor_to_step(stop_price, rule.tick_size)
        if floored_stop <= 0:
            _add(
                errors,
                "stop_price",
                f"stop_price {_fmt(stop_price)} is below the tick size {_fmt(rule.tick_size)} of {symbol}",
            )
    if quantity is not None:
        floored_qty = floor_to_step(quantity, rule.step_size)
        if floored_qty < rule.min_qty or floored_qty <= 0:
            shown = _fmt(quantity) if floored_qty == quantity else f"{_fmt(quantity)} (floored to {_fmt(floored_qty)})"
            _add(errors, "quantity", f"quantity {shown} is below the minimum {_fmt(rule.min_qty)} for {symbol}")
        elif rule.max_qty is not None and floored_qty > rule.max_qty:
            _add(
                errors,
                "quantity",
                f"quantity {_fmt(floored_qty)} is above the maximum {_fmt(rule.max_qty)} for {symbol}",
            )

    if order_type in LIMIT_PRICED:
        reference = floored_price if floored_price is not None and floored_price > 0 else None
    else:
        reference = market_price
        if market_price is None:
            _add(errors, "price", f"no fresh market price for {symbol}; try again when prices are current")
    if (
        reference is not None
        and rule.min_notional is not None
        and floored_qty is not None
        and "quantity" not in errors
        and floored_qty * reference < rule.min_notional
    ):
        _add(
            errors,
            "quantity",
            f"order value {_fmt(floored_qty)} × {_fmt(reference)} = {_fmt(floored_qty * reference)} is below "
            f"the minimum notional {_fmt(rule.min_notional)} for {symbol}",
        )
    return MarketCheck(errors=errors, quantity=floored_qty, price=floored_price, stop_price=floored_stop)


def spot_sell_check(*, quantity: Decimal, held: Decimal, in_sell_orders: Decimal, symbol: str) -> Errors:
    """A spot sell may not exceed the position minus what queued and live sell orders already cover."""
    sellable = max(held - in_sell_orders, Decimal(0))
    if quantity <= sellable:
        return {}
    return {
        "quantity": [
            f"sell quantity {_fmt(quantity)} exceeds the sellable {_fmt(sellable)} {symbol} "
            f"(position {_fmt(held)}, {_fmt(in_sell_orders)} already in queued or live sell orders)"
        ]
    }


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


def sell_exposure(*, strategy_account_id: int, symbol: str) -> tuple[Decimal, Decimal]:
    """(position quantity, remaining quantity of queued and live SELL orders) of one strategy account."""
    held = (
        Position.objects.filter(strategy_account_id=strategy_account_id, symbol=symbol)
        .values_list("quantity", flat=True)
        .first()
    ) or Decimal(0)
    in_orders = Decimal(0)
    for model in (PendingOrder, OpenOrder):
        total = model.objects.filter(strategy_account_id=strategy_account_id, symbol=symbol, side=Side.SELL).aggregate(
            total=Sum(F("quantity") - F("filled_quantity"))
        )["total"]
        in_orders += total or Decimal(0)
    return held, in_orders


# --- The entry point ---------------------------------------------------------------------------


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
        _add(errors, "account", f"unknown account {account_id}")
        return None
    if not account.is_active:
        _add(errors, "account", f"account {account_id} is inactive")
        return None
    if account.account_type != Account.AccountType.CRYPTO:
        _add(errors, "account", f"account {account_id} is a {account.account_type} account; intake trades crypto")
        return None
    return account


def _resolve_strategy(*, group_name: str | None, errors: Errors) -> Strategy | None:
    if group_name is None:
        return None
    strategy = Strategy.objects.filter(group_name=group_name).first()
    if strategy is None:
        _add(errors, "strategy", f"unknown strategy {group_name!r}")
        return None
    if not strategy.is_active:
        _add(errors, "strategy", f"strategy {group_name!r} is inactive")
        return None
    return strategy


def order_intake(
    *,
    user: User,
    request: IntakeRequest,
    now: datetime,
    known_errors: Mapping[str, list[str]] | None = None,
) -> list[PendingOrder]:
    """Validate one order for `user` and enqueue it (PendingOrder QUEUED + `queued` event + dirty mark).

    `known_errors` are field errors found while parsing; they are reported together with every rule
    this function finds, and any error raises OrderRejectedError with nothing written. A spot SELL is
    checked against the position under the pair lock, in the transaction that enqueues it, so two
    concurrent sells cannot both spend the same position.
    """
    errors: Errors = {name: list(messages) for name, messages in (known_errors or {}).items()}
    account = _resolve_account(user=user, account_id=request.account_id, errors=errors)
    strategy = _resolve_strategy(group_name=request.strategy, errors=errors)
    strategy_account = None
    if account is not None and strategy is not None:
        strategy_account = StrategyAccount.objects.filter(strategy=strategy, account=account, is_active=True).first()
        if strategy_account is None:
            _add(errors, "strategy", f"strategy {strategy.group_name!r} is not active on account {account.pk}")

    for name, messages in order_shape_check(
        order_type=request.order_type, price=request.price, stop_price=request.stop_price
    ).items():
        errors.setdefault(name, []).extend(messages)

    check = MarketCheck()
    # Market rules need the exchange (from the account) and the market type (from the strategy).
    if account is not None and strategy is not None and request.symbol is not None:
        rule, rule_errors = market_rule_active(
            exchange=account.exchange, market_type=strategy.market_type, symbol=request.symbol
        )
        for name, messages in rule_errors.items():
            errors.setdefault(name, []).extend(messages)
        if rule is not None and request.order_type is not None:
            market_price = None
            if request.order_type not in LIMIT_PRICED:
                market_price = price_for_trading(
                    exchange=account.exchange, market_type=strategy.market_type, symbol=request.symbol, now=now
                )
            check = order_market_check(
                rule=rule,
                order_type=request.order_type,
                # A field that already failed (e.g. price given to a MARKET order) is not checked twice.
                quantity=request.quantity if "quantity" not in errors else None,
                price=request.price if "price" not in errors else None,
                stop_price=request.stop_price if "stop_price" not in errors else None,
                market_price=market_price,
            )
            for name, messages in check.errors.items():
                errors.setdefault(name, []).extend(messages)

    spot_sell = strategy is not None and strategy.market_type == MarketType.SPOT and request.side == Side.SELL
    # check.quantity is set only once the market rules were checked, which needs the symbol.
    if (
        spot_sell
        and strategy_account is not None
        and request.symbol is not None
        and check.quantity is not None
        and "quantity" not in errors
    ):
        # A first look without the lock, so this rule is reported with all the others;
        # it is checked again under the pair lock before enqueueing.
        held, in_orders = sell_exposure(strategy_account_id=strategy_account.pk, symbol=request.symbol)
        for name, messages in spot_sell_check(
            quantity=check.quantity, held=held, in_sell_orders=in_orders, symbol=request.symbol
        ).items():
            errors.setdefault(name, []).extend(messages)

    if errors:
        raise OrderRejectedError(errors)
    # Every field resolved without error, so these hold (check.quantity is the floored quantity).
    assert account is not None and strategy is not None and strategy_account is not None
    assert request.symbol is not None and request.side is not None and request.order_type is not None
    assert check.quantity is not None

    spec = OrderSpec(
        strategy_account_id=strategy_account.pk,
        account_id=account.pk,
        symbol=request.symbol,
        market_type=strategy.market_type,
        side=request.side,
        order_type=request.order_type,
        quantity=check.quantity,
        price=check.price,
        stop_price=check.stop_price,
        priority=request.priority,
    )
    with transaction.atomic():
        if spot_sell:
            with pair_lock(account_id=account.pk, symbol=request.symbol):
                held, in_orders = sell_exposure(strategy_account_id=strategy_account.pk, symbol=request.symbol)
                sell_errors = spot_sell_check(
                    quantity=check.quantity, held=held, in_sell_orders=in_orders, symbol=request.symbol
                )
                if sell_errors:
                    raise OrderRejectedError(sell_errors)
                orders = orders_enqueue(specs=[spec], signal_at=now, now=now)
        else:
            orders = orders_enqueue(specs=[spec], signal_at=now, now=now)
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
