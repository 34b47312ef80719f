"""Money and quantity constants shared by every domain: Decimal only, never float."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

ZERO = Decimal("0")
# The money columns' decimal places (DecimalField(max_digits=28, decimal_places=12)): a value
# quantized to this is stored exactly as computed.
QUANTUM = Decimal("1e-12")
# The money columns' integer digits (28 - 12 = 16): nothing at or above this can be stored.
COLUMN_LIMIT = Decimal(10) ** 16
# What intake accepts: prices, quantities and an order's value (quantity × price) below 10^15, one
# digit short of the columns. The spare digit is headroom for what is derived from an order
# (reservations with fees, costs, PnL), and SQLite stores decimals as 8-byte floats, which read
# 9999999999999999 back as 10^16: a 16-digit value would break every later read of its row.
INTAKE_LIMIT = Decimal(10) ** 15


def quantize(value: Decimal) -> Decimal:
    """`value` rounded half-up to the money columns' 12 decimal places."""
    return value.quantize(QUANTUM, rounding=ROUND_HALF_UP)
