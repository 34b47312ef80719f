"""Order intake decisions as pure functions (SPEC §6, §4.8): which fields an order type needs, the
market rules and value ranges, the sellable position, sizing from capital and closing a position.
Plain values in, plain values out: no ORM, no clock, no network (orders.intake does the reads)."""

from __future__ import annotations

from dataclasses import dataclass, field
from decimal import Decimal

from core.money import INTAKE_LIMIT
from core.text import echo
from exchanges.gateway import MarketRule
from exchanges.rounding import floor_to_step
from orders.models import OrderType, Side

Errors = dict[str, list[str]]

LIMIT_PRICED = frozenset({OrderType.LIMIT, OrderType.STOP_LIMIT})
STOP_TYPES = frozenset({OrderType.STOP_LIMIT, OrderType.STOP_MARKET})
HUNDRED = Decimal(100)
LIMIT_TEXT = "10^15"


class OrderRejectedError(Exception):
    """The order breaks one or more rules; `errors` names every bad field. Nothing was written."""

    def __init__(self, errors: Errors):
        super().__init__("; ".join(f"{name}: {' '.join(msgs)}" for name, msgs in sorted(errors.items())))
        self.errors = errors


def errors_merge(into: Errors, more: Errors) -> Errors:
    """Append every message of `more` to `into` (field by field); returns `into`."""
    for name, messages in more.items():
        into.setdefault(name, []).extend(messages)
    return into


def _add(errors: Errors, name: str, message: str) -> None:
    errors.setdefault(name, []).append(message)


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


def order_range_check(**values: Decimal | None) -> Errors:
    """Values given by the caller (price, stop_price, quantity, …) must stay below 10^15 (INTAKE_LIMIT)."""
    errors: Errors = {}
    for name, value in values.items():
        if value is not None and value >= INTAKE_LIMIT:
            _add(errors, name, f"{name} {echo(value)} is above the largest accepted {LIMIT_TEXT}")
    return errors


# --- Decisions: close, sizing ------------------------------------------------------------------


@dataclass(frozen=True)
class CloseOrder:
    """The order that flattens a position: a MARKET order on the opposite side for its whole size."""

    side: str
    quantity: Decimal
    order_type: str = OrderType.MARKET


def position_close_order(*, held: Decimal) -> CloseOrder | None:
    """The close of a signed position `held` (qty_per = -100): SELL a long, BUY back a short; None when flat."""
    if held == 0:
        return None
    return CloseOrder(side=Side.SELL if held > 0 else Side.BUY, quantity=abs(held))


def order_reference_price(
    *, order_type: str, price: Decimal | None, stop_price: Decimal | None, market_price: Decimal | None
) -> Decimal | None:
    """The price an order is expected to fill near, for sizing and the notional rules: its limit price
    (LIMIT, STOP_LIMIT), its stop price (STOP_MARKET: a market order once the stop triggers), else the
    market price (MARKET). Prices are passed already floored to the tick; None when unknown."""
    if order_type in LIMIT_PRICED:
        return price
    if order_type == OrderType.STOP_MARKET:
        return stop_price
    return market_price


def floored_price(price: Decimal | None, *, tick: Decimal) -> Decimal | None:
    """`price` floored to the tick, or None when missing, out of range or floored to nothing."""
    if price is None or not 0 < price < INTAKE_LIMIT:
        return None
    value = floor_to_step(price, tick)
    return value if value > 0 else None


def capital_quantity(*, capital: Decimal, qty_per: Decimal, price: Decimal, leverage: Decimal) -> Decimal:
    """allocated capital × qty_per / 100 / price × leverage (before flooring to the step)."""
    return capital * qty_per / HUNDRED / price * leverage


# --- Market rules and ranges -------------------------------------------------------------------


@dataclass(frozen=True)
class MarketCheck:
    """The outcome of the market rules: errors by field, and the values floored to step and tick."""

    errors: Errors = field(default_factory=dict)
    quantity: Decimal | None = None
    price: Decimal | None = None
    stop_price: Decimal | None = None


def _price_check(errors: Errors, name: str, value: Decimal | None, rule: MarketRule) -> Decimal | None:
    """Range, market maximum and tick of one price field; the floored value, or None when it failed."""
    if value is None:
        return None
    symbol = rule.symbol
    if value >= INTAKE_LIMIT:
        _add(errors, name, f"{name} {echo(value)} is above the largest accepted {LIMIT_TEXT}")
        return None
    if rule.max_price is not None and value > rule.max_price:
        _add(errors, name, f"{name} {echo(value)} is above the maximum {echo(rule.max_price)} for {symbol}")
        return None
    floored = floor_to_step(value, rule.tick_size)
    if floored <= 0:
        _add(errors, name, f"{name} {echo(value)} is below the tick size {echo(rule.tick_size)} of {symbol}")
        return None
    return floored


def order_market_check(
    *,
    rule: MarketRule,
    order_type: str,
    quantity: Decimal | None,
    price: Decimal | None,
    stop_price: Decimal | None,
    market_price: Decimal | None,
    quantity_source: str | None = None,
) -> MarketCheck:
    """Check ranges and maxima, floor quantity to the step and prices to the tick (SPEC §4.8), then check
    min/max quantity and the notional (minimum of the market; below 10^15, so every amount derived
    from the order fits the money columns).

    The notional is priced by order_reference_price; a MARKET order needs `market_price` (a quote no
    older than PRICE_MAX_AGE_TRADE, or None) even without a notional rule, so it is never placed blind.
    `quantity_source` says how a quantity derived from private figures was found (e.g. "sized from
    the account's capital"): messages then name the rule and that source, never the quantity itself.
    Inputs that are None (missing or already rejected) skip the checks that need them.
    """
    errors: Errors = {}
    symbol = rule.symbol
    price_floored = _price_check(errors, "price", price, rule)
    stop_floored = _price_check(errors, "stop_price", stop_price, rule)
    floored_qty = None
    if quantity is not None:
        floored = floor_to_step(quantity, rule.step_size) if quantity < INTAKE_LIMIT else None
        if quantity_source is not None:
            shown = f"the quantity ({quantity_source})"
        elif floored is None or floored == quantity:
            shown = f"quantity {echo(quantity)}"
        else:
            shown = f"quantity {echo(quantity)} (floored to {echo(floored)})"
        if floored is None:
            _add(errors, "quantity", f"{shown} is above the largest accepted {LIMIT_TEXT}")
        elif floored < rule.min_qty or floored <= 0:
            _add(errors, "quantity", f"{shown} is below the minimum {echo(rule.min_qty)} for {symbol}")
        elif rule.max_qty is not None and floored > rule.max_qty:
            _add(errors, "quantity", f"{shown} is above the maximum {echo(rule.max_qty)} for {symbol}")
        else:
            floored_qty = floored

    if order_type == OrderType.MARKET and market_price is None:
        _add(errors, "price", f"no fresh market price for {symbol}; try again when prices are current")
    reference = order_reference_price(
        order_type=order_type, price=price_floored, stop_price=stop_floored, market_price=market_price
    )
    if reference is not None and floored_qty is not None:
        notional = floored_qty * reference
        if quantity_source is not None:
            value = f"the order value ({quantity_source}, at {echo(reference)})"
        else:
            value = f"order value {echo(floored_qty)} × {echo(reference)} = {echo(notional)}"
        if rule.min_notional is not None and notional < rule.min_notional:
            _add(errors, "quantity", f"{value} is below the minimum notional {echo(rule.min_notional)} for {symbol}")
        elif notional >= INTAKE_LIMIT:
            _add(errors, "quantity", f"{value} is above the largest accepted {LIMIT_TEXT}")
    if "quantity" in errors:
        floored_qty = None
    return MarketCheck(errors=errors, quantity=floored_qty, price=price_floored, stop_price=stop_floored)


def spot_sell_check(
    *, quantity: Decimal, held: Decimal, in_sell_orders: Decimal, symbol: str, private: bool = False
) -> Errors:
    """A spot sell may not exceed the position minus what queued and live sell orders already cover.

    `private`: the figures belong to someone else than the caller (a webhook's token holder): the
    message names the rule without the position or the quantities.
    """
    sellable = max(held - in_sell_orders, Decimal(0))
    if quantity <= sellable:
        return {}
    if private:
        return {
            "quantity": [
                f"the sell quantity exceeds the sellable {symbol} of this account "
                "(its position minus queued and live sell orders)"
            ]
        }
    return {
        "quantity": [
            f"sell quantity {echo(quantity)} exceeds the sellable {echo(sellable)} {symbol} "
            f"(position {echo(held)}, {echo(in_sell_orders)} already in queued or live sell orders)"
        ]
    }
