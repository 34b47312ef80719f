"""Capital allocation decisions (SPEC §4.11). Pure: no ORM, no clock, no network."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from decimal import ROUND_DOWN, Decimal
from typing import TypeVar

from core.money import ZERO

MIN_CHANGE = Decimal("10")  # quote currency
MIN_CHANGE_RATIO = Decimal("0.001")  # 0.1 %, strictly exceeded
PART_QUANTUM = Decimal("1e-8")

K = TypeVar("K", bound=Hashable)


def should_rebalance(
    *, total: Decimal, last_allocated_total: Decimal | None, has_allocation: bool, has_open_position: bool
) -> bool:
    """Whether to reallocate an (account, market type) from `total`.

    Never while a position is open; always when nothing was allocated yet; otherwise when
    the total moved from the one used at the last allocation by ≥ 10 (quote) AND by > 0.1 %.
    """
    if has_open_position:
        return False
    if not has_allocation or last_allocated_total is None:
        return True
    change = abs(total - last_allocated_total)
    return change >= MIN_CHANGE and change > abs(last_allocated_total) * MIN_CHANGE_RATIO


def allocate(total: Decimal, weights: Mapping[K, Decimal]) -> dict[K, Decimal]:
    """Split `total` by weight: each part total × w / Σw, rounded down to 1e-8.

    The parts sum to `total` exactly: the rounding remainder goes to the largest weight (ties:
    the smallest key), so the same inputs always give the same split. Raises ValueError on a
    negative weight or when the weights sum to 0.
    """
    if not weights:
        return {}
    if any(w < 0 for w in weights.values()):
        raise ValueError("weights must not be negative")
    weight_sum = sum(weights.values(), ZERO)
    if weight_sum <= 0:
        raise ValueError("the weights sum to 0: nothing to split by")
    parts = {
        key: (total * weight / weight_sum).quantize(PART_QUANTUM, rounding=ROUND_DOWN)
        for key, weight in weights.items()
    }
    largest = min(weights, key=lambda key: (-weights[key], key))
    parts[largest] += total - sum(parts.values(), ZERO)
    return parts
