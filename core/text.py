"""Text helpers shared by every domain: bounded echoes of input in messages."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

# A value quoted back in an error message is cut to this many characters: a reply never grows with the input.
ECHO_LIMIT = 40


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """`value` as text for a message, cut to `limit` characters with an ellipsis.

    Decimals read as plain numbers ("0.001", "100"), unless that spelling would be long: 1e-1000000
    keeps its short exponent form rather than a million zeros.
    """
    if isinstance(value, Decimal):
        plain = value.is_finite() and abs(value.normalize().adjusted()) <= limit
        text = format(value.normalize(), "f") if plain else str(value)
    else:
        text = str(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}…"
