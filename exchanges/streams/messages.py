"""Pure user-stream logic: Binance USDⓈ-M and Bybit v5 order messages as OrderStates, backoff and liveness."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from core.money import ZERO
from exchanges.gateway import MarketType, OrderState, OrderStatus, OrderType, Side

_QUOTES = ("USDT", "USDC", "BUSD", "FDUSD", "BTC", "ETH")

# --- decisions ---------------------------------------------------------------------------


def backoff_delay(failures: int, *, base: float = 1.0, cap: float = 60.0) -> float:
    """Seconds to wait before the reconnect that follows `failures` failures in a row: 1, 2, 4 … cap."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** min(failures - 1, 32))


def stream_alive(
    *,
    now: datetime,
    ping_interval: float,
    last_message_at: datetime | None,
    last_pong_at: datetime | None,
    connected_at: datetime | None,
    listen_key_ok: bool = True,
) -> bool:
    """SPEC §4.6: a message or a pong younger than twice the ping interval (and a live Binance listen key).

    An idle account has no order messages; its pongs keep it alive. The connect time counts as
    the first sign of life, so a stream is not declared dead before its first ping was answered.
    """
    if not listen_key_ok:
        return False
    seen = [t for t in (last_message_at, last_pong_at, connected_at) if t is not None]
    return bool(seen) and (now - max(seen)).total_seconds() < 2 * ping_interval


def alert_due(failures: int, *, alert_after: int) -> bool:
    """Alert on the `alert_after`-th failure in a row, and again every `alert_after` failures after it."""
    return failures >= alert_after and failures % alert_after == 0


def bybit_auth_args(*, api_key: str, api_secret: str, expires_ms: int) -> list[Any]:
    """Bybit private-stream auth: HMAC-SHA256 over "GET/realtime" + expires (ms, in the future)."""
    signature = hmac.new(api_secret.encode(), f"GET/realtime{expires_ms}".encode(), hashlib.sha256).hexdigest()
    return [api_key, expires_ms, signature]


# --- messages ----------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamUpdate:
    """One order report from a user stream, in the two views an OpenOrder row may need.

    `conditional` is the report read as a conditional order (status NEW until it fires,
    TRIGGERED with the spawned order named, or CANCELED/REJECTED/EXPIRED); `regular` read as a
    regular order (for Bybit, whose stops keep their id, the order a fired stop became). Either
    may be None. `fee_is_last_trade`: the fee is the commission of the last trade only
    (Binance), not cumulative; the applier adds it to what the ledger holds.
    """

    market_type: MarketType
    conditional: OrderState | None = None
    regular: OrderState | None = None
    fee_is_last_trade: bool = False

    @property
    def exchange_order_id(self) -> str:
        state = self.conditional or self.regular
        return state.exchange_order_id if state else ""


def _decimal(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def _positive(value: Any) -> Decimal | None:
    number = _decimal(value)
    return number if number is not None and number > 0 else None


def _ms(value: Any, default: datetime) -> datetime:
    try:
        return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
    except (TypeError, ValueError, OverflowError, OSError):
        return default


def canonical_symbol(symbol_id: str) -> str:
    """ "ETHUSDT" → "ETH/USDT" by its quote; the matched row's symbol wins when the update is applied."""
    for quote in _QUOTES:
        if symbol_id.endswith(quote) and len(symbol_id) > len(quote):
            return f"{symbol_id[: -len(quote)]}/{quote}"
    return symbol_id


_BINANCE_STATUS = {
    "NEW": OrderStatus.NEW,
    "PARTIALLY_FILLED": OrderStatus.PARTIALLY_FILLED,
    "FILLED": OrderStatus.FILLED,
    "CANCELED": OrderStatus.CANCELED,
    "EXPIRED": OrderStatus.EXPIRED,
    "EXPIRED_IN_MATCH": OrderStatus.EXPIRED,
    "REJECTED": OrderStatus.REJECTED,
}
_BINANCE_ALGO_STATUS = {
    "NEW": OrderStatus.NEW,
    "TRIGGERING": OrderStatus.NEW,
    "TRIGGERED": OrderStatus.TRIGGERED,
    "FINISHED": OrderStatus.TRIGGERED,
    "CANCELED": OrderStatus.CANCELED,
    "CANCELLED": OrderStatus.CANCELED,
    "REJECTED": OrderStatus.REJECTED,
    "EXPIRED": OrderStatus.EXPIRED,
}
_BINANCE_CONDITIONAL_TYPES = {
    "STOP": OrderType.STOP_LIMIT,
    "TAKE_PROFIT": OrderType.STOP_LIMIT,
    "STOP_MARKET": OrderType.STOP_MARKET,
    "TAKE_PROFIT_MARKET": OrderType.STOP_MARKET,
}


def binance_futures_updates(event: dict[str, Any], *, now: datetime) -> list[StreamUpdate]:
    """ORDER_TRADE_UPDATE (regular orders) and ALGO_UPDATE (conditional orders) of the USDⓈ-M user stream.

    Other events (ACCOUNT_UPDATE, listenKeyExpired, …) give no update; the caller handles
    listenKeyExpired itself.
    """
    kind = event.get("e")
    o = event.get("o") or {}
    if kind == "ORDER_TRADE_UPDATE":
        filled = _decimal(o.get("z")) or ZERO
        state = OrderState(
            exchange_order_id=str(o.get("i", "")),
            client_order_id=str(o.get("c") or ""),
            symbol=canonical_symbol(str(o.get("s", ""))),
            market_type=MarketType.FUTURES,
            side=Side(str(o.get("S", "BUY")).upper()),
            order_type=OrderType.LIMIT if str(o.get("o", "")).upper() == "LIMIT" else OrderType.MARKET,
            status=_BINANCE_STATUS.get(str(o.get("X", "")).upper(), OrderStatus.NEW),
            quantity=_decimal(o.get("q")) or ZERO,
            filled_quantity=filled,
            average_price=_positive(o.get("ap")) if filled > 0 else None,
            price=_positive(o.get("p")),
            stop_price=None,
            fee=_decimal(o.get("n")) or ZERO,
            fee_currency=str(o.get("N") or ""),
            updated_at=_ms(o.get("T") or event.get("E"), now),
        )
        if not state.exchange_order_id:
            return []
        return [StreamUpdate(market_type=MarketType.FUTURES, regular=state, fee_is_last_trade=True)]
    if kind == "ALGO_UPDATE":
        status = _BINANCE_ALGO_STATUS.get(str(o.get("X", "")).upper(), OrderStatus.NEW)
        spawned = str(o.get("ai") or "") or None
        if status == OrderStatus.TRIGGERED and spawned is None:
            status = OrderStatus.NEW  # fired, but the regular order is not placed yet
        state = OrderState(
            exchange_order_id=str(o.get("aid", "")),
            client_order_id=str(o.get("caid") or ""),
            symbol=canonical_symbol(str(o.get("s", ""))),
            market_type=MarketType.FUTURES,
            side=Side(str(o.get("S", "BUY")).upper()),
            order_type=_BINANCE_CONDITIONAL_TYPES.get(str(o.get("o", "")).upper(), OrderType.STOP_MARKET),
            status=status,
            quantity=_decimal(o.get("q")) or ZERO,
            filled_quantity=ZERO,  # a trigger is never a fill: the spawned order carries them
            average_price=None,
            price=_positive(o.get("p")),
            stop_price=_positive(o.get("tp")),
            fee=ZERO,
            fee_currency="",
            updated_at=_ms(event.get("T") or event.get("E"), now),
            conditional=True,
            spawned_order_id=spawned if status == OrderStatus.TRIGGERED else None,
        )
        if not state.exchange_order_id:
            return []
        return [StreamUpdate(market_type=MarketType.FUTURES, conditional=state)]
    return []


_BYBIT_STATUS = {
    "Created": OrderStatus.NEW,
    "New": OrderStatus.NEW,
    "Untriggered": OrderStatus.NEW,
    "Triggered": OrderStatus.NEW,  # as a regular order: placed, nothing filled yet
    "Active": OrderStatus.NEW,
    "PartiallyFilled": OrderStatus.PARTIALLY_FILLED,
    "Filled": OrderStatus.FILLED,
    "Cancelled": OrderStatus.CANCELED,
    "PartiallyFilledCanceled": OrderStatus.CANCELED,
    "Deactivated": OrderStatus.CANCELED,
    "Rejected": OrderStatus.REJECTED,
}
_BYBIT_CATEGORIES = {"spot": MarketType.SPOT, "linear": MarketType.FUTURES}


def _bybit_is_conditional(item: dict[str, Any]) -> bool:
    trigger = _decimal(item.get("triggerPrice"))
    stop_type = str(item.get("stopOrderType") or "")
    return (trigger is not None and trigger > 0) or stop_type not in ("", "UNKNOWN")


def bybit_order_updates(message: dict[str, Any], *, now: datetime) -> list[StreamUpdate]:
    """The `order` topic of the Bybit v5 private stream (spot and linear; other categories skipped).

    Bybit keeps one id for a stop and the order it became: a conditional item past
    "Untriggered" is both the trigger (conditional view) and the spawned order (regular view).
    A conditional cancelled before it fired ("Deactivated", or "Cancelled" with nothing
    filled) is a cancel of the conditional only.
    """
    if not str(message.get("topic", "")).startswith("order"):
        return []
    updates = []
    for item in message.get("data") or []:
        market_type = _BYBIT_CATEGORIES.get(str(item.get("category", "")).lower())
        order_id = str(item.get("orderId") or "")
        if market_type is None or not order_id:
            continue
        raw_status = str(item.get("orderStatus", ""))
        filled = _decimal(item.get("cumExecQty")) or ZERO
        average = _positive(item.get("avgPrice"))
        if average is None and filled > 0:
            value = _decimal(item.get("cumExecValue"))
            average = value / filled if value else None
        is_conditional = _bybit_is_conditional(item)
        is_limit = str(item.get("orderType", "")).lower() == "limit"
        regular = OrderState(
            exchange_order_id=order_id,
            client_order_id=str(item.get("orderLinkId") or ""),
            symbol=canonical_symbol(str(item.get("symbol", ""))),
            market_type=market_type,
            side=Side.BUY if str(item.get("side", "")).lower() == "buy" else Side.SELL,
            order_type=OrderType.LIMIT if is_limit else OrderType.MARKET,
            status=_BYBIT_STATUS.get(raw_status, OrderStatus.NEW),
            quantity=_decimal(item.get("qty")) or ZERO,
            filled_quantity=filled,
            average_price=average if filled > 0 else None,
            price=_positive(item.get("price")) if is_limit else None,
            stop_price=None,
            # cumExecFee is cumulative; Bybit names no fee currency here (as in the REST view).
            fee=_decimal(item.get("cumExecFee")) or ZERO,
            fee_currency="",
            updated_at=_ms(item.get("updatedTime") or message.get("creationTime"), now),
        )
        if not is_conditional:
            updates.append(StreamUpdate(market_type=market_type, regular=regular))
            continue
        if raw_status == "Untriggered":
            cond_status, view = OrderStatus.NEW, None
        elif raw_status == "Deactivated" or (raw_status in ("Cancelled", "Rejected") and filled == 0):
            cond_status = OrderStatus.REJECTED if raw_status == "Rejected" else OrderStatus.CANCELED
            view = regular  # for a row already tracked as the spawned order
        else:
            cond_status, view = OrderStatus.TRIGGERED, regular
        conditional = OrderState(
            exchange_order_id=order_id,
            client_order_id=regular.client_order_id,
            symbol=regular.symbol,
            market_type=market_type,
            side=regular.side,
            order_type=OrderType.STOP_LIMIT if is_limit else OrderType.STOP_MARKET,
            status=cond_status,
            quantity=regular.quantity,
            filled_quantity=ZERO,
            average_price=None,
            price=regular.price,
            stop_price=_positive(item.get("triggerPrice")),
            fee=ZERO,
            fee_currency="",
            updated_at=regular.updated_at,
            conditional=True,
            spawned_order_id=order_id if cond_status == OrderStatus.TRIGGERED else None,
            spawned_client_order_id=(regular.client_order_id or None) if cond_status == OrderStatus.TRIGGERED else None,
        )
        updates.append(StreamUpdate(market_type=market_type, conditional=conditional, regular=view))
    return updates
