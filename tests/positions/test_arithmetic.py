"""Fill arithmetic of SPEC §4.3 and unrealized PnL of §4.5."""

from __future__ import annotations

from decimal import Decimal as D

import pytest
from hypothesis import given
from hypothesis import strategies as st

from positions.arithmetic import (
    FillRegressionError,
    PositionState,
    apply_fill,
    fill_increment,
    unrealized_pnl,
)

FLAT = PositionState(D(0), D(0))


def test_open_add_reduce_close_and_flip():
    e = apply_fill(FLAT, side="BUY", quantity=D("2"), price=D("100"))
    assert e.position == PositionState(D("2"), D("100")) and e.realized_pnl == 0
    e = apply_fill(e.position, side="BUY", quantity=D("2"), price=D("110"))
    assert e.position == PositionState(D("4"), D("105"))
    e = apply_fill(e.position, side="SELL", quantity=D("1"), price=D("120"))
    assert e.position == PositionState(D("3"), D("105")) and e.realized_pnl == D("15")
    e = apply_fill(e.position, side="SELL", quantity=D("5"), price=D("100"))
    assert e.position == PositionState(D("-2"), D("100")) and e.realized_pnl == D("-15")
    e = apply_fill(e.position, side="BUY", quantity=D("2"), price=D("90"))
    assert e.position == FLAT and e.realized_pnl == D("20")


def test_short_side():
    e = apply_fill(FLAT, side="SELL", quantity=D("3"), price=D("50"))
    e = apply_fill(e.position, side="BUY", quantity=D("1"), price=D("40"))
    assert e.position == PositionState(D("-2"), D("50")) and e.realized_pnl == D("10")


def test_increment_priced_from_cumulative_cost():
    inc = fill_increment(filled_before=D("1"), average_before=D("100"), filled_after=D("3"), average_after=D("102"))
    assert inc.delta == D("2") and inc.price == D("103")
    assert fill_increment(filled_before=D(1), average_before=D(1), filled_after=D(1), average_after=D(1)) is None
    with pytest.raises(FillRegressionError):
        fill_increment(filled_before=D(2), average_before=D(1), filled_after=D(1), average_after=D(1))


def test_unrealized():
    assert unrealized_pnl(quantity=D("2"), average_entry=D("100"), last_price=D("110")) == D("20")
    assert unrealized_pnl(quantity=D("-2"), average_entry=D("100"), last_price=D("110")) == D("-20")


@given(st.lists(st.tuples(st.sampled_from(["BUY", "SELL"]), st.integers(1, 50), st.integers(1, 1000)), max_size=30))
def test_quantity_is_the_signed_sum_of_fills(fills):
    position, signed = FLAT, D(0)
    for side, qty, price in fills:
        position = apply_fill(position, side=side, quantity=D(qty), price=D(price)).position
        signed += D(qty) if side == "BUY" else -D(qty)
    assert position.quantity == signed
    assert (position.quantity == 0) == (position.average_entry == 0)


def test_a_fee_in_the_base_asset_shrinks_the_position_at_the_same_entry():
    from positions.arithmetic import PositionState, apply_fill

    opened = apply_fill(PositionState(D("0"), D("0")), side="BUY", quantity=D("1"), price=D("100"), base_fee=D("0.001"))
    assert opened.position == PositionState(D("0.999"), D("100")) and opened.realized_pnl == 0
    added = apply_fill(opened.position, side="BUY", quantity=D("1"), price=D("110"), base_fee=D("0.001"))
    # Entry averages the traded quantities (0.999 @ 100, 1 @ 110); the fee then leaves at that entry.
    assert added.position.quantity == D("1.998")
    assert added.position.average_entry == (D("0.999") * 100 + D("110")) / D("1.999")
    closed = apply_fill(added.position, side="SELL", quantity=D("1.998"), price=D("120"))
    assert closed.position == PositionState(D("0"), D("0"))
    assert closed.realized_pnl == D("1.998") * (120 - added.position.average_entry)
    gone = apply_fill(PositionState(D("0"), D("0")), side="BUY", quantity=D("0.001"), price=D("5"), base_fee=D("0.001"))
    assert gone.position == PositionState(D("0"), D("0"))
