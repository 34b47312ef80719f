"""Rounding to steps and ticks (properties) and the order-rule messages."""

from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchanges.gateway import MarketRule, MarketType
from exchanges.rounding import check_order_rules, floor_to_step, round_price_to_tick

D = Decimal

STEPS = st.sampled_from(
    [D("0.00100000"), D("0.00001000"), D("1.00000000"), D("0.5"), D("25"), D("0.0000005"), D("0.1"), D("0.25"), D("5")]
)
VALUES = st.decimals(min_value=D("0"), max_value=D("1000000"), allow_nan=False, allow_infinity=False, places=9)


@given(value=VALUES, step=STEPS)
def test_floor_is_a_whole_multiple_not_above_and_within_one_step(value, step):
    result = floor_to_step(value, step)
    assert result <= value
    assert value - result < step
    assert (result / step) == (result / step).to_integral_value()


@given(value=VALUES, step=STEPS)
def test_floor_is_idempotent(value, step):
    once = floor_to_step(value, step)
    assert floor_to_step(once, step) == once


@given(multiple=st.integers(min_value=0, max_value=10**6), step=STEPS)
def test_exact_multiples_are_unchanged(multiple, step):
    value = step * multiple
    assert floor_to_step(value, step) == value


@pytest.mark.parametrize(
    ("value", "step", "expected"),
    [
        ("1.23456", "0.00100000", "1.234"),  # counting decimals of the string would give 8 and not round
        ("0.0009", "0.00100000", "0.000"),
        ("7.9", "0.5", "7.5"),
        ("130", "25", "125"),
        ("100", "25", "100"),
        ("24.999", "25", "0"),
        ("0.0123456", "0.0000005", "0.0123455"),
    ],
)
def test_floor_examples(value, step, expected):
    result = floor_to_step(D(value), D(step))
    assert result == D(expected)
    assert str(result) == expected  # keeps the step's scale, not the string's trailing zeros


def test_round_price_to_tick():
    assert round_price_to_tick(D("65000.129"), D("0.01000000")) == D("65000.12")
    assert round_price_to_tick(D("65000.129"), D("0.10")) == D("65000.1")


def test_zero_or_negative_step_is_an_error():
    with pytest.raises(ValueError):
        floor_to_step(D("1"), D("0"))


RULES = MarketRule(
    symbol="ETH/USDT",
    market_type=MarketType.SPOT,
    base="ETH",
    quote="USDT",
    tick_size=D("0.01"),
    step_size=D("0.0001"),
    min_qty=D("0.001"),
    max_qty=D("9000"),
    min_notional=D("5"),
)


def test_check_order_rules_messages():
    assert check_order_rules(D("1"), D("3000"), RULES) == []
    assert check_order_rules(D("0.0005"), D("3000"), RULES) == [
        "quantity 0.0005 is below the minimum 0.001 for ETH/USDT",
        "order value 1.5 is below the minimum notional 5 for ETH/USDT",
    ]
    stored = dataclasses.replace(RULES, min_qty=D("0.001000000000"))  # as read from a DecimalField
    assert check_order_rules(D("0.0005"), None, stored) == ["quantity 0.0005 is below the minimum 0.001 for ETH/USDT"]
    assert check_order_rules(D("9001"), D("3000"), RULES) == [
        "quantity 9001 is above the maximum 9000 for ETH/USDT",
    ]
    assert check_order_rules(D("0.001"), D("3000"), RULES) == [
        "order value 3 is below the minimum notional 5 for ETH/USDT",
    ]
    assert check_order_rules(D("0.001"), None, RULES) == []  # no price, no notional check


@given(quantity=VALUES, price=st.decimals(min_value=D("0.01"), max_value=D("100000"), places=2))
def test_rules_pass_exactly_when_every_limit_holds(quantity, price):
    problems = check_order_rules(quantity, price, RULES)
    ok = RULES.min_qty <= quantity <= RULES.max_qty and quantity * price >= RULES.min_notional
    assert (problems == []) == ok
