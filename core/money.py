"""Money and quantity constants shared by every domain: Decimal only, never float."""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

ZERO = Decimal("0")
# The money columns' decimal places (DecimalField(max_digits=28, decimal_places=12)): a value
# quantized to this is stored exactly as computed.
QUANTUM = Decimal("1e-12")
# The money columns' integer digits (28 - 12 = 16): intake refuses anything at or above it.
COLUMN_LIMIT = Decimal(10) ** 16


def quantize(value: Decimal) -> Decimal:
    """`value` rounded half-up to the money columns' 12 decimal places."""
    return value.quantize(QUANTUM, rounding=ROUND_HALF_UP)
