"""Binance spot (/api/v3) and USDⓈ-M (/fapi) REST plus the listen-key user stream, shaped like the real API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import secrets
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web
from django.db.models import Max

from exchanges.gateway import (
    DuplicateClientId,
    GatewayError,
    InsufficientFunds,
    MarketType,
    NotFound,
    OrderRequest,
    OrderStatus,
    OrderType,
    Side,
)
from exchanges.models import SimFault, SimOrder
from exchanges.simulator.catalog import catalog_market
from exchanges.simulator.engine import SimEngine
from exchanges.simulator.server import WS_POLL_SECONDS, Faults, ServerConfig, db_call, now_ms

logger = logging.getLogger(__name__)

SPOT_ORDER_TYPES = [
    "LIMIT",
    "LIMIT_MAKER",
    "MARKET",
    "STOP_LOSS",
    "STOP_LOSS_LIMIT",
    "TAKE_PROFIT",
    "TAKE_PROFIT_LIMIT",
]
FUTURES_ORDER_TYPES = ["LIMIT", "MARKET", "STOP", "STOP_MARKET", "TAKE_PROFIT", "TAKE_PROFIT_MARKET"]
_TO_ENGINE_TYPE = {
    "LIMIT": OrderType.LIMIT,
    "MARKET": OrderType.MARKET,
    "STOP_LOSS_LIMIT": OrderType.STOP_LIMIT,
    "STOP_LOSS": OrderType.STOP_MARKET,
    "STOP": OrderType.STOP_LIMIT,
    "STOP_MARKET": OrderType.STOP_MARKET,
}
_SPOT_TYPE = {
    OrderType.LIMIT: "LIMIT",
    OrderType.MARKET: "MARKET",
    OrderType.STOP_LIMIT: "STOP_LOSS_LIMIT",
    OrderType.STOP_MARKET: "STOP_LOSS",
}
_FUTURES_TYPE = {
    OrderType.LIMIT: "LIMIT",
    OrderType.MARKET: "MARKET",
    OrderType.STOP_LIMIT: "STOP",
    OrderType.STOP_MARKET: "STOP_MARKET",
}
_ALGO_STATUS = {
    OrderStatus.NEW: "NEW",
    OrderStatus.TRIGGERED: "TRIGGERED",
    OrderStatus.CANCELED: "CANCELED",
    OrderStatus.REJECTED: "REJECTED",
    OrderStatus.EXPIRED: "EXPIRED",
}


class BinanceError(Exception):
    """A reply in Binance's error shape: HTTP status plus {"code": …, "msg": …}."""

    def __init__(self, status: int, code: int, msg: str):
        super().__init__(msg)
        self.status, self.code, self.msg = status, code, msg

    def response(self) -> web.Response:
        return web.json_response({"code": self.code, "msg": self.msg}, status=self.status)


def _s(value: Decimal | None) -> str:
    if value is None:
        return "0"
    text = format(value.normalize(), "f")
    return text


def _symbol_id(symbol: str) -> str:
    return symbol.replace("/", "")


class BinanceDialect:
    """Binance REST/WS routes over the engine; the engine account is the API key."""

    def __init__(self, engine: SimEngine, config: ServerConfig, faults: Faults):
        self.engine = engine
        self.config = config
        self.faults = faults
        self.exchange = config.binance_exchange

    def register(self, app: web.Application) -> None:
        r = app.router
        for prefix, mt in (("/api/v3", MarketType.SPOT), ("/fapi/v1", MarketType.FUTURES)):
            r.add_get(f"{prefix}/ping", self._wrap(self.ping, mt, None))
            r.add_get(f"{prefix}/time", self._wrap(self.server_time, mt, None))
            r.add_get(f"{prefix}/exchangeInfo", self._wrap(self.exchange_info, mt, "load_markets"))
            r.add_get(f"{prefix}/ticker/price", self._wrap(self.ticker_price, mt, "fetch_last_prices"))
            r.add_post(f"{prefix}/order", self._wrap(self.order_create, mt, "create_order", signed=True))
            r.add_delete(f"{prefix}/order", self._wrap(self.order_cancel, mt, "cancel_order", signed=True))
            r.add_get(f"{prefix}/order", self._wrap(self.order_get, mt, "fetch_order", signed=True))
            r.add_get(f"{prefix}/openOrders", self._wrap(self.open_orders, mt, "fetch_open_orders", signed=True))
            r.add_get(f"{prefix}/allOrders", self._wrap(self.all_orders, mt, "fetch_order", signed=True))
        fm = MarketType.FUTURES
        r.add_get("/api/v3/account", self._wrap(self.account, MarketType.SPOT, "fetch_balance", signed=True))
        r.add_get("/fapi/v2/ticker/price", self._wrap(self.ticker_price, fm, "fetch_last_prices"))
        for version in ("v2", "v3"):
            r.add_get(f"/fapi/{version}/account", self._wrap(self.account, fm, "fetch_balance", signed=True))
            r.add_get(f"/fapi/{version}/balance", self._wrap(self.futures_balance, fm, "fetch_balance", signed=True))
        r.add_post("/fapi/v1/algoOrder", self._wrap(self.algo_create, fm, "create_order", signed=True))
        r.add_delete("/fapi/v1/algoOrder", self._wrap(self.algo_cancel, fm, "cancel_order", signed=True))
        r.add_get("/fapi/v1/algoOrder", self._wrap(self.algo_get, fm, "fetch_order", signed=True))
        r.add_get("/fapi/v1/openAlgoOrders", self._wrap(self.algo_open, fm, "fetch_open_orders", signed=True))
        r.add_get("/fapi/v1/allAlgoOrders", self._wrap(self.algo_all, fm, "fetch_order", signed=True))
        for method in ("POST", "PUT", "DELETE"):
            r.add_route(method, "/fapi/v1/listenKey", self._wrap(self.listen_key, fm, None, key_only=True))
        r.add_get("/ws/{listen_key}", self.user_stream)

    # --- request plumbing ----------------------------------------------------------------

    def _wrap(self, fn, market_type: MarketType, endpoint: str | None, *, signed: bool = False, key_only=False):  # noqa: ANN001, ANN202
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                body = await request.text()
                params = dict(parse_qsl(request.query_string, keep_blank_values=True))
                params.update(dict(parse_qsl(body, keep_blank_values=True)))
                account = ""
                if signed or key_only:
                    account = self._authenticate(request, body, signed=signed)
                hit = await self.faults.take(self.exchange, endpoint, account, SimFault.Phase.BEFORE)
                reply = await self.faults.apply(hit, self._fault_reply)
                if reply is not None:
                    return reply
                result = await fn(request, params, market_type, account)
                after = await self.faults.take(self.exchange, endpoint, account, SimFault.Phase.AFTER)
                reply = await self.faults.apply(after, self._fault_reply)
                if reply is not None:
                    return reply
                return web.json_response(result)
            except BinanceError as exc:
                return exc.response()
            except GatewayError as exc:
                return self._engine_error(exc, market_type).response()

        return handler

    def _authenticate(self, request: web.Request, body: str, *, signed: bool) -> str:
        key = request.headers.get("X-MBX-APIKEY", "")
        if key != self.config.api_key:
            raise BinanceError(401, -2015, "Invalid API-key, IP, or permissions for action.")
        if not signed:
            return key
        # totalParams is the query string followed by the body; the signature is the last parameter.
        total = request.query_string + body
        payload, sep, signature = total.rpartition("&signature=")
        if not sep:
            raise BinanceError(
                400, -1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed."
            )
        expected = hmac.new(self.config.api_secret.encode(), payload.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature.split("&")[0]):
            raise BinanceError(400, -1022, "Signature for this request is not valid.")
        fields = dict(parse_qsl(payload))
        try:
            timestamp = int(fields.get("timestamp", "0"))
            window = int(fields.get("recvWindow", "5000"))
        except ValueError:
            raise BinanceError(
                400, -1102, "Mandatory parameter 'timestamp' was not sent, was empty/null, or malformed."
            )
        if not (timestamp - 1000 <= now_ms() <= timestamp + window):
            raise BinanceError(400, -1021, "Timestamp for this request is outside of the recvWindow.")
        return key

    def _fault_reply(self, kind: str) -> web.Response:
        if kind == SimFault.Kind.HTTP_429:
            return web.json_response(
                {
                    "code": -1003,
                    "msg": "Too many requests; current limit of IP(127.0.0.1) is 2400 requests per minute.",
                },
                status=429,
            )
        if kind == SimFault.Kind.MAINTENANCE:
            return web.json_response({"code": 1, "msg": "System is under maintenance."}, status=503)
        return web.json_response(
            {"code": -1000, "msg": "An unknown error occured while processing the request."}, status=500
        )

    def _engine_error(self, exc: GatewayError, market_type: MarketType) -> BinanceError:
        futures = market_type == MarketType.FUTURES
        if isinstance(exc, DuplicateClientId):
            return (
                BinanceError(400, -4116, "ClientOrderId is duplicated.")
                if futures
                else BinanceError(400, -2010, "Duplicate order sent.")
            )
        if isinstance(exc, InsufficientFunds):
            return (
                BinanceError(400, -2019, "Margin is insufficient.")
                if futures
                else BinanceError(400, -2010, "Account has insufficient balance for requested action.")
            )
        if isinstance(exc, NotFound):
            if exc.code == "-2011":
                return BinanceError(400, -2011, "Unknown order sent.")
            return BinanceError(400, -2013, "Order does not exist.")
        if exc.code == "-1121":
            return BinanceError(400, -1121, "Invalid symbol.")
        if exc.code == "-2021":
            return (
                BinanceError(400, -2021, "Order would immediately trigger.")
                if futures
                else BinanceError(400, -2010, "Stop price would trigger immediately.")
            )
        if exc.code == "-2025":
            return (
                BinanceError(400, -2025, "Reach max open order limit.")
                if futures
                else BinanceError(400, -2010, "Filter failure: MAX_NUM_ORDERS")
            )
        if exc.code == "-1013":
            return BinanceError(400, -1013, str(exc).split(" (")[0])
        return BinanceError(400, -2010, str(exc))

    def _engine_symbol(self, symbol_id: str | None, market_type: MarketType) -> str:
        if not symbol_id:
            raise BinanceError(400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        for quote in ("USDT", "USDC", "BUSD"):
            if symbol_id.endswith(quote) and catalog_market(market_type, f"{symbol_id[: -len(quote)]}/{quote}"):
                return f"{symbol_id[: -len(quote)]}/{quote}"
        raise BinanceError(400, -1121, "Invalid symbol.")

    # --- market data -------------------------------------------------------------------

    async def ping(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        return {}

    async def server_time(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        return {"serverTime": now_ms()}

    async def exchange_info(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        rules = await db_call(self.engine.market_list, self.exchange, market_type)
        symbols = []
        for rule in rules:
            entry: dict[str, Any] = {
                "symbol": _symbol_id(rule.symbol),
                "status": "TRADING" if rule.active else "BREAK",
                "baseAsset": rule.base,
                "quoteAsset": rule.quote,
                "filters": [
                    {
                        "filterType": "PRICE_FILTER",
                        "minPrice": _s(rule.tick_size),
                        "maxPrice": _s(rule.max_price) if rule.max_price is not None else "0",
                        "tickSize": _s(rule.tick_size),
                    },
                    {
                        "filterType": "LOT_SIZE",
                        "minQty": _s(rule.min_qty),
                        "maxQty": _s(rule.max_qty),
                        "stepSize": _s(rule.step_size),
                    },
                ],
            }
            if market_type == MarketType.SPOT:
                entry.update(
                    {
                        "baseAssetPrecision": 8,
                        "quotePrecision": 8,
                        "quoteAssetPrecision": 8,
                        "orderTypes": SPOT_ORDER_TYPES,
                        "isSpotTradingAllowed": True,
                        "isMarginTradingAllowed": False,
                        "permissions": ["SPOT"],
                    }
                )
                entry["filters"].append(
                    {"filterType": "NOTIONAL", "minNotional": _s(rule.min_notional), "maxNotional": "9000000"}
                )
            else:
                entry.update(
                    {
                        "pair": _symbol_id(rule.symbol),
                        "contractType": "PERPETUAL",
                        "deliveryDate": 4133404800000,
                        "onboardDate": 1569398400000,
                        "marginAsset": rule.quote,
                        "pricePrecision": rule.price_precision,
                        "quantityPrecision": rule.amount_precision,
                        "underlyingType": "COIN",
                        "orderTypes": FUTURES_ORDER_TYPES,
                        "timeInForce": ["GTC", "IOC", "FOK", "GTX"],
                    }
                )
                entry["filters"].append({"filterType": "MIN_NOTIONAL", "notional": _s(rule.min_notional)})
            symbols.append(entry)
        return {"timezone": "UTC", "serverTime": now_ms(), "rateLimits": [], "exchangeFilters": [], "symbols": symbols}

    async def ticker_price(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        symbol = params.get("symbol")
        wanted = [self._engine_symbol(symbol, market_type)] if symbol else None
        prices = await db_call(self.engine.prices_last, self.exchange, market_type, wanted)
        rows = []
        for sym, price in prices.items():
            row: dict[str, Any] = {"symbol": _symbol_id(sym), "price": _s(price)}
            if market_type == MarketType.FUTURES:
                row["time"] = now_ms()
            rows.append(row)
        return rows[0] if symbol else rows

    # --- account -----------------------------------------------------------------------

    async def account(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        balance = await db_call(self.engine.balance_get, self.exchange, account, market_type)
        if market_type == MarketType.SPOT:
            return {
                "makerCommission": 10,
                "takerCommission": 10,
                "canTrade": True,
                "canWithdraw": False,
                "canDeposit": False,
                "updateTime": now_ms(),
                "accountType": "SPOT",
                "balances": [
                    {"asset": a.currency, "free": _s(a.free), "locked": _s(a.used)} for a in balance.assets.values()
                ],
                "permissions": ["SPOT"],
            }
        return {
            "totalWalletBalance": _s(sum((a.total for a in balance.assets.values()), Decimal(0))),
            "assets": [self._futures_asset(a) for a in balance.assets.values()],
            "positions": [],
        }

    @staticmethod
    def _futures_asset(asset) -> dict[str, Any]:  # noqa: ANN001
        return {
            "asset": asset.currency,
            "walletBalance": _s(asset.total),
            "marginBalance": _s(asset.total),
            "availableBalance": _s(asset.free),
            "maxWithdrawAmount": _s(asset.free),
            "initialMargin": _s(asset.used),
            "openOrderInitialMargin": _s(asset.used),
            "unrealizedProfit": "0",
            "updateTime": now_ms(),
        }

    async def futures_balance(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        balance = await db_call(self.engine.balance_get, self.exchange, account, market_type)
        return [
            {
                "accountAlias": "sim",
                "asset": a.currency,
                "balance": _s(a.total),
                "availableBalance": _s(a.free),
                "crossWalletBalance": _s(a.total),
                "crossUnPnl": "0",
                "updateTime": now_ms(),
            }
            for a in balance.assets.values()
        ]

    # --- orders: views ------------------------------------------------------------------

    def _rows(self, account: str, market_type: MarketType, **filters: Any) -> list[SimOrder]:
        self.engine.match(self.exchange)
        orders = SimOrder.objects.filter(exchange=self.exchange, account=account, market_type=market_type, **filters)
        return list(orders.select_related("parent").order_by("pk"))

    def _child(self, order: SimOrder) -> SimOrder | None:
        return SimOrder.objects.filter(parent_id=order.pk).first() if order.conditional else None

    def _order_view(self, order: SimOrder, market_type: MarketType) -> dict[str, Any]:
        """A regular order; on spot a conditional order is one order whose fills are its child's."""
        shown = order
        working = True
        if order.conditional:
            child = self._child(order)
            working = child is not None
            if child is not None:
                shown = child
        status = shown.status
        if order.conditional and child is None and status == OrderStatus.TRIGGERED:
            status = OrderStatus.NEW.value
        filled = shown.filled_quantity
        view: dict[str, Any] = {
            "symbol": _symbol_id(order.symbol),
            "orderId": order.pk,
            "clientOrderId": order.client_order_id,
            "price": _s(order.price),
            "origQty": _s(order.quantity),
            "executedQty": _s(filled),
            "status": status,
            "timeInForce": "GTC",
            "side": order.side,
            "stopPrice": _s(order.stop_price),
            "time": int(order.created_at.timestamp() * 1000),
            "updateTime": int(max(order.updated_at, shown.updated_at).timestamp() * 1000),
        }
        if market_type == MarketType.SPOT:
            view.update(
                {
                    "orderListId": -1,
                    "cummulativeQuoteQty": _s(shown.cost),
                    "type": _SPOT_TYPE[OrderType(order.order_type)],
                    "icebergQty": "0",
                    "isWorking": working,
                    "workingTime": int(shown.created_at.timestamp() * 1000) if working else -1,
                    "origQuoteOrderQty": "0",
                    "selfTradePreventionMode": "EXPIRE_MAKER",
                }
            )
        else:
            order_type = _FUTURES_TYPE[OrderType(order.order_type)]
            view.update(
                {
                    "avgPrice": _s(shown.cost / filled) if filled else "0",
                    "cumQuote": _s(shown.cost),
                    "type": order_type,
                    "origType": order_type,
                    "reduceOnly": order.reduce_only,
                    "closePosition": False,
                    "positionSide": "BOTH",
                    "workingType": "CONTRACT_PRICE",
                    "priceProtect": False,
                    "priceMatch": "NONE",
                    "selfTradePreventionMode": "EXPIRE_MAKER",
                    "goodTillDate": 0,
                }
            )
        return view

    def _algo_view(self, order: SimOrder) -> dict[str, Any]:
        child = self._child(order)
        status = OrderStatus(order.status)
        if status == OrderStatus.TRIGGERED and child is not None and child.status not in ("NEW", "PARTIALLY_FILLED"):
            algo_status = "FINISHED"
        else:
            algo_status = _ALGO_STATUS.get(status, "NEW")
        return {
            "algoId": order.pk,
            "clientAlgoId": order.client_order_id,
            "algoType": "CONDITIONAL",
            "orderType": _FUTURES_TYPE[OrderType(order.order_type)],
            "symbol": _symbol_id(order.symbol),
            "side": order.side,
            "positionSide": "BOTH",
            "timeInForce": "GTC",
            "quantity": _s(order.quantity),
            "algoStatus": algo_status,
            "actualOrderId": str(child.pk) if child is not None else "",
            "actualPrice": _s(child.cost / child.filled_quantity) if child and child.filled_quantity else "0",
            "triggerPrice": _s(order.stop_price),
            "price": _s(order.price),
            "icebergQuantity": None,
            "selfTradePreventionMode": "EXPIRE_MAKER",
            "workingType": "CONTRACT_PRICE",
            "priceMatch": "NONE",
            "closePosition": False,
            "priceProtect": False,
            "reduceOnly": order.reduce_only,
            "createTime": int(order.created_at.timestamp() * 1000),
            "updateTime": int(order.updated_at.timestamp() * 1000),
            "triggerTime": int(child.created_at.timestamp() * 1000) if child is not None else 0,
            "goodTillDate": 0,
        }

    def _find_row(self, account: str, market_type: MarketType, params: dict[str, str], *, algo: bool) -> SimOrder:
        symbol = self._engine_symbol(params.get("symbol"), market_type)
        filters: dict[str, Any] = {"symbol": symbol}
        id_key, cid_key = ("algoId", "clientAlgoId") if algo else ("orderId", "origClientOrderId")
        if params.get(id_key):
            if not params[id_key].isdigit():
                raise BinanceError(400, -2013, "Order does not exist.")
            filters["pk"] = int(params[id_key])
        elif params.get(cid_key):
            filters["client_order_id"] = params[cid_key]
        else:
            raise BinanceError(400, -1102, f"Param '{id_key}' or '{cid_key}' must be sent, but both were empty/null!")
        if market_type == MarketType.FUTURES:
            filters["conditional"] = algo
        else:
            filters["parent__isnull"] = True  # a spot stop's child is shown through its parent
        rows = self._rows(account, market_type, **filters)
        if not rows:
            raise BinanceError(400, -2013, "Order does not exist.")
        return rows[0]

    # --- orders: handlers ---------------------------------------------------------------

    def _request(self, params: dict[str, str], market_type: MarketType, *, stop_key: str, cid_key: str) -> OrderRequest:
        raw_type = params.get("type", "").upper()
        order_type = _TO_ENGINE_TYPE.get(raw_type)
        if order_type is None:
            raise BinanceError(400, -1116, "Invalid orderType.")
        side = params.get("side", "").upper()
        if side not in ("BUY", "SELL"):
            raise BinanceError(400, -1117, "Invalid side.")
        try:
            quantity = Decimal(params.get("quantity", ""))
            price = Decimal(params["price"]) if params.get("price") else None
            stop = Decimal(params[stop_key]) if params.get(stop_key) else None
            return OrderRequest(
                symbol=self._engine_symbol(params.get("symbol"), market_type),
                market_type=market_type,
                side=Side(side),
                order_type=order_type,
                quantity=quantity,
                price=price,
                stop_price=stop,
                client_order_id=params.get(cid_key, ""),
                reduce_only=params.get("reduceOnly", "").lower() == "true",
            )
        except (ArithmeticError, ValueError) as exc:
            raise BinanceError(400, -1102, f"Mandatory parameter missing or malformed: {exc}")

    async def order_create(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        if market_type == MarketType.FUTURES and params.get("type", "").upper() not in ("LIMIT", "MARKET"):
            # Since the algo migration USDⓈ-M refuses conditional types on /fapi/v1/order.
            raise BinanceError(
                400,
                -4120,
                "Order type not supported for this endpoint. Please use the Algo Order API endpoints instead.",
            )
        order_request = self._request(params, market_type, stop_key="stopPrice", cid_key="newClientOrderId")
        state = await db_call(self.engine.order_create, self.exchange, account, order_request)
        return await db_call(self._view_by_id, account, market_type, int(state.exchange_order_id), False)

    def _view_by_id(self, account: str, market_type: MarketType, pk: int, algo: bool) -> dict[str, Any]:
        order = SimOrder.objects.get(pk=pk, exchange=self.exchange, account=account)
        view = self._algo_view(order) if algo else self._order_view(order, market_type)
        if not algo and market_type == MarketType.SPOT:
            view["transactTime"] = view["updateTime"]
            view["fills"] = [
                {
                    "price": _s(f.price),
                    "qty": _s(f.quantity),
                    "commission": _s(f.fee),
                    "commissionAsset": f.fee_currency,
                    "tradeId": f.pk,
                }
                for f in (self._child(order) or order).fills.order_by("pk")
            ]
        return view

    async def order_cancel(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        def cancel() -> dict[str, Any]:
            order = self._find_row(account, market_type, params, algo=False)
            target = order
            if order.conditional and order.status == OrderStatus.TRIGGERED:
                target = self._child(order) or order
            try:
                self.engine.order_cancel(
                    self.exchange,
                    account,
                    symbol=order.symbol,
                    market_type=market_type,
                    exchange_order_id=str(target.pk),
                    conditional=target.conditional,
                )
            except NotFound:
                raise BinanceError(400, -2011, "Unknown order sent.")
            view = self._view_by_id(account, market_type, order.pk, False)
            view["origClientOrderId"] = order.client_order_id
            return view

        return await db_call(cancel)

    async def order_get(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        def get() -> dict[str, Any]:
            return self._order_view(self._find_row(account, market_type, params, algo=False), market_type)

        return await db_call(get)

    async def open_orders(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        def listing() -> list[dict[str, Any]]:
            filters: dict[str, Any] = {}
            if params.get("symbol"):
                filters["symbol"] = self._engine_symbol(params["symbol"], market_type)
            if market_type == MarketType.FUTURES:
                rows = self._rows(
                    account, market_type, conditional=False, status__in=("NEW", "PARTIALLY_FILLED"), **filters
                )
                return [self._order_view(o, market_type) for o in rows]
            views = [
                self._order_view(o, market_type)
                for o in self._rows(account, market_type, parent__isnull=True, **filters)
            ]
            return [v for v in views if v["status"] in ("NEW", "PARTIALLY_FILLED")]

        return await db_call(listing)

    async def all_orders(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        def listing() -> list[dict[str, Any]]:
            symbol = self._engine_symbol(params.get("symbol"), market_type)
            extra = {"conditional": False} if market_type == MarketType.FUTURES else {"parent__isnull": True}
            rows = self._rows(account, market_type, symbol=symbol, **extra)
            limit = int(params.get("limit") or 500)
            return [self._order_view(o, market_type) for o in rows][-limit:]

        return await db_call(listing)

    async def algo_create(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        if params.get("algoType", "").upper() != "CONDITIONAL":
            raise BinanceError(400, -1102, "Mandatory parameter 'algoType' was not sent, was empty/null, or malformed.")
        order_request = self._request(params, market_type, stop_key="triggerPrice", cid_key="clientAlgoId")
        if not order_request.conditional:
            raise BinanceError(400, -1116, "Invalid orderType.")
        state = await db_call(self.engine.order_create, self.exchange, account, order_request)
        return await db_call(self._view_by_id, account, market_type, int(state.exchange_order_id), True)

    async def algo_cancel(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        def cancel() -> dict[str, Any]:
            order = self._find_row(account, market_type, params, algo=True)
            try:
                self.engine.order_cancel(
                    self.exchange,
                    account,
                    symbol=order.symbol,
                    market_type=market_type,
                    exchange_order_id=str(order.pk),
                    conditional=True,
                )
            except NotFound:
                raise BinanceError(400, -2011, "Unknown order sent.")
            return {"algoId": order.pk, "clientAlgoId": order.client_order_id, "code": "200", "msg": "success"}

        return await db_call(cancel)

    async def algo_get(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        return await db_call(lambda: self._algo_view(self._find_row(account, market_type, params, algo=True)))

    async def algo_open(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        def listing() -> list[dict[str, Any]]:
            filters: dict[str, Any] = {"conditional": True, "status": OrderStatus.NEW.value}
            if params.get("symbol"):
                filters["symbol"] = self._engine_symbol(params["symbol"], market_type)
            return [self._algo_view(o) for o in self._rows(account, market_type, **filters)]

        return await db_call(listing)

    async def algo_all(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        def listing() -> list[dict[str, Any]]:
            symbol = self._engine_symbol(params.get("symbol"), market_type)
            return [self._algo_view(o) for o in self._rows(account, market_type, conditional=True, symbol=symbol)]

        return await db_call(listing)

    # --- user data stream ---------------------------------------------------------------

    async def listen_key(self, request, params, market_type, account):  # noqa: ANN001, ANN201
        keys = self.config.listen_keys
        if request.method == "POST":
            existing = next((k for k, a in keys.items() if a == account), None)
            key = existing or secrets.token_urlsafe(48)
            keys[key] = account
            return {"listenKey": key}
        if request.method == "DELETE":
            for key in [k for k, a in keys.items() if a == account]:
                keys.pop(key, None)
            return {}
        if account not in keys.values():
            raise BinanceError(400, -1125, "This listenKey does not exist.")
        return {}

    async def user_stream(self, request: web.Request) -> web.StreamResponse:
        account = self.config.listen_keys.get(request.match_info["listen_key"])
        if account is None:
            return web.json_response({"code": -1125, "msg": "This listenKey does not exist."}, status=400)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        cursor = await db_call(_cursor_now, self.exchange, account)
        silent = False
        reader = asyncio.ensure_future(_drain(ws))
        try:
            while not ws.closed and not reader.done():
                fault = await db_call(self.engine.fault_ws_take, self.exchange, account)
                if fault == SimFault.Kind.WS_DROP:
                    logger.info("sim binance stream of %s dropped (fault)", account[:4])
                    break
                if fault == SimFault.Kind.WS_SILENT:
                    silent = True
                if not silent:
                    events, cursor = await db_call(self._events_since, account, cursor)
                    for event in events:
                        await ws.send_str(json.dumps(event))
                await asyncio.sleep(WS_POLL_SECONDS)
        finally:
            reader.cancel()
            await ws.close()
        return ws

    def _events_since(self, account: str, cursor: int) -> tuple[list[dict[str, Any]], int]:
        states, cursor_next = self.engine.order_updates_since(
            self.exchange, account, cursor, market_type=MarketType.FUTURES
        )
        events = []
        for state in states:
            order = SimOrder.objects.get(pk=int(state.exchange_order_id))
            now = now_ms()
            if order.conditional:
                algo = self._algo_view(order)
                events.append(
                    {
                        "e": "ALGO_UPDATE",
                        "E": now,
                        "T": now,
                        "o": {
                            "caid": algo["clientAlgoId"],
                            "aid": algo["algoId"],
                            "at": "CONDITIONAL",
                            "o": algo["orderType"],
                            "s": algo["symbol"],
                            "S": algo["side"],
                            "ps": "BOTH",
                            "f": "GTC",
                            "q": algo["quantity"],
                            "X": algo["algoStatus"],
                            "ai": algo["actualOrderId"],
                            "tp": algo["triggerPrice"],
                            "p": algo["price"],
                            "R": algo["reduceOnly"],
                        },
                    }
                )
                continue
            view = self._order_view(order, MarketType.FUTURES)
            last = order.fills.order_by("-pk").first()
            execution = {"NEW": "NEW", "CANCELED": "CANCELED", "EXPIRED": "EXPIRED", "REJECTED": "REJECTED"}
            events.append(
                {
                    "e": "ORDER_TRADE_UPDATE",
                    "E": now,
                    "T": now,
                    "o": {
                        "s": view["symbol"],
                        "c": view["clientOrderId"],
                        "S": view["side"],
                        "o": view["type"],
                        "f": "GTC",
                        "q": view["origQty"],
                        "p": view["price"],
                        "ap": view["avgPrice"],
                        "sp": view["stopPrice"],
                        "x": execution.get(view["status"], "TRADE"),
                        "X": view["status"],
                        "i": view["orderId"],
                        "l": _s(last.quantity) if last else "0",
                        "z": view["executedQty"],
                        "L": _s(last.price) if last else "0",
                        "n": _s(last.fee) if last else "0",
                        "N": "USDT",
                        "T": view["updateTime"],
                        "t": last.pk if last else 0,
                        "R": view["reduceOnly"],
                        "ps": "BOTH",
                        "ot": view["origType"],
                        "rp": "0",
                    },
                }
            )
        return events, cursor_next


def _cursor_now(exchange: str, account: str) -> int:
    return SimOrder.objects.filter(exchange=exchange, account=account).aggregate(m=Max("update_seq"))["m"] or 0


async def _drain(ws: web.WebSocketResponse) -> None:
    """Read (and drop) client frames so pings are answered and a close is noticed."""
    async for message in ws:
        if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            break
