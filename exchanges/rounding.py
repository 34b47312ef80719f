"""Pure Decimal rounding to exchange steps and ticks, and order-rule checks (SPEC §4.8)."""

from __future__ import annotations

from decimal import ROUND_FLOOR, Decimal
from typing import cast

from core.money import decimal_text
from exchanges.gateway import MarketRule


def floor_to_step(value: Decimal, step: Decimal) -> Decimal:
    """The largest whole multiple of `step` not above `value` (any positive step: 0.001, 0.5, 25).

    Counting the decimals of "0.00100000" gives 8 and does not round (SPEC §8); dividing
    by the step does. The result keeps the step's exponent, e.g. 1.234 / 0.001 → 1.234.
    """
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    steps = (value / step).to_integral_value(rounding=ROUND_FLOOR)
    result = steps * step
    # Division rounds at the context precision: never hand back more than was asked for.
    if result > value:
        result -= step
    exponent = min(cast(int, step.normalize().as_tuple().exponent), 0)  # a finite step: int exponent
    return result.quantize(Decimal(1).scaleb(exponent))


def round_price_to_tick(price: Decimal, tick: Decimal) -> Decimal:
    """The price floored to a whole multiple of the tick size."""
    return floor_to_step(price, tick)


# Rule messages show plain numbers: "0.001", never "0.001000000000" or "1E+2".
_fmt = decimal_text


def check_order_rules(quantity: Decimal, price: Decimal | None, rules: MarketRule) -> list[str]:
    """Messages for every rule the order breaks (empty when it passes); `price` None skips notional."""
    problems: list[str] = []
    if quantity < rules.min_qty:
        problems.append(f"quantity {_fmt(quantity)} is below the minimum {_fmt(rules.min_qty)} for {rules.symbol}")
    if rules.max_qty is not None and quantity > rules.max_qty:
        problems.append(f"quantity {_fmt(quantity)} is above the maximum {_fmt(rules.max_qty)} for {rules.symbol}")
    if price is not None and rules.min_notional is not None:
        notional = quantity * price
        if notional < rules.min_notional:
            problems.append(
                f"order value {_fmt(notional)} is below the minimum notional {_fmt(rules.min_notional)} "
                f"for {rules.symbol}"
            )
    return problems
