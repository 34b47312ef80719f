"""JSON request parsers for every API: bounded nesting, and a Decimal-reading variant for the webhook."""

from __future__ import annotations

import json
from collections.abc import Mapping
from decimal import Decimal
from typing import Any

from django.conf import settings
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser as DrfJSONParser
from rest_framework.utils.json import strict_constant

# Deeper documents are refused: no request of this API nests more than two levels, and the
# standard library's decoder recurses once per level (`'[' * 100000` raises RecursionError).
MAX_JSON_DEPTH = 32


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` (parsed JSON) nests deeper than `limit` containers; iterative, so any depth is safe."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if not isinstance(item, dict | list):
            continue
        children = item.values() if isinstance(item, dict) else item
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def json_loads_bounded(text: str, **kwargs: Any) -> Any:
    """json.loads, with a too-deep document (RecursionError included) and bad JSON raised as ParseError (400)."""
    try:
        value = json.loads(text, **kwargs)
    except RecursionError:
        raise ParseError(f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:
        raise ParseError(f"JSON parse error - {exc}") from None
    if json_depth_exceeds(value, MAX_JSON_DEPTH):
        raise ParseError(f"JSON parse error - nested deeper than {MAX_JSON_DEPTH} levels")
    return value


def _read_text(stream: Any, parser_context: Mapping[str, Any] | None) -> str:
    encoding = (parser_context or {}).get("encoding", settings.DEFAULT_CHARSET)
    if stream is None:
        return ""
    try:
        return stream.read().decode(encoding)
    except UnicodeDecodeError as exc:
        raise ParseError(f"JSON parse error - {exc.reason} at byte {exc.start}") from None


class JSONParser(DrfJSONParser):
    """DRF's JSON parser (REST_FRAMEWORK DEFAULT_PARSER_CLASSES) with nesting bounded to MAX_JSON_DEPTH."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        # DRF's STRICT_JSON (the default): NaN and Infinity are not JSON.
        parse_constant = strict_constant if self.strict else None
        return json_loads_bounded(_read_text(stream, parser_context), parse_constant=parse_constant)


class DecimalJSONParser(JSONParser):
    """JSON with numbers read as Decimal (no float rounding of prices or percentages)."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Mapping[str, Any] | None = None) -> Any:
        return json_loads_bounded(_read_text(stream, parser_context), parse_float=Decimal)


class DecimalTextParser(DecimalJSONParser):
    """JSON sent as text/plain (TradingView posts its alert message so when it does not recognise it as JSON)."""

    media_type = "text/plain"
