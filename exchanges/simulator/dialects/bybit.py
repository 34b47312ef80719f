"""Bybit v5 REST (market, wallet, order create/cancel/realtime/history) and the private WS, shaped like the real API."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web
from django.db.models import Q

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
from exchanges.simulator.dialects.binance import _cursor_now, _s
from exchanges.simulator.engine import SimEngine
from exchanges.simulator.server import WS_POLL_SECONDS, Faults, ServerConfig, db_call, now_ms

logger = logging.getLogger(__name__)

# What a market without its own maximum price reports (the catalog's default).
MAX_PRICE = Decimal("10000000")

_STATUS = {
    OrderStatus.NEW: "New",
    OrderStatus.PARTIALLY_FILLED: "PartiallyFilled",
    OrderStatus.FILLED: "Filled",
    OrderStatus.CANCELED: "Cancelled",
    OrderStatus.REJECTED: "Rejected",
    OrderStatus.EXPIRED: "Cancelled",
}
_CATEGORY = {"spot": MarketType.SPOT, "linear": MarketType.FUTURES}


class BybitError(Exception):
    """A reply in Bybit's error shape: HTTP 200 with a non-zero retCode."""

    def __init__(self, code: int, msg: str):
        super().__init__(msg)
        self.code, self.msg = code, msg

    def response(self) -> web.Response:
        return web.json_response(
            {"retCode": self.code, "retMsg": self.msg, "result": {}, "retExtInfo": {}, "time": now_ms()}
        )


def _ok(result: Any) -> dict[str, Any]:
    return {"retCode": 0, "retMsg": "OK", "result": result, "retExtInfo": {}, "time": now_ms()}


class BybitDialect:
    """Bybit v5 routes over the engine; the engine account is the API key."""

    def __init__(self, engine: SimEngine, config: ServerConfig, faults: Faults):
        self.engine = engine
        self.config = config
        self.faults = faults
        self.exchange = config.bybit_exchange

    def register(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/v5/market/time", self._wrap(self.server_time, None))
        r.add_get("/v5/market/instruments-info", self._wrap(self.instruments, "load_markets"))
        r.add_get("/v5/market/tickers", self._wrap(self.tickers, "fetch_last_prices"))
        r.add_get("/v5/account/wallet-balance", self._wrap(self.wallet_balance, "fetch_balance", signed=True))
        r.add_post("/v5/order/create", self._wrap(self.order_create, "create_order", signed=True))
        r.add_post("/v5/order/cancel", self._wrap(self.order_cancel, "cancel_order", signed=True))
        r.add_get("/v5/order/realtime", self._wrap(self.order_realtime, "fetch_open_orders", signed=True))
        r.add_get("/v5/order/history", self._wrap(self.order_history, "fetch_order", signed=True))
        r.add_get("/v5/private", self.private_stream)

    # --- plumbing -----------------------------------------------------------------------

    def _wrap(self, fn, endpoint: str | None, *, signed: bool = False):  # noqa: ANN001, ANN202
        async def handler(request: web.Request) -> web.StreamResponse:
            try:
                body = await request.text()
                params: dict[str, Any] = dict(parse_qsl(request.query_string, keep_blank_values=True))
                if body:
                    try:
                        params.update(json.loads(body))
                    except json.JSONDecodeError:
                        raise BybitError(10001, "params error: body is not JSON")
                account = self._authenticate(request, body) if signed else ""
                name = endpoint
                if endpoint == "fetch_open_orders" and (params.get("orderId") or params.get("orderLinkId")):
                    name = "fetch_order"
                hit = await self.faults.take(self.exchange, name, account, SimFault.Phase.BEFORE)
                reply = await self.faults.apply(hit, self._fault_reply)
                if reply is not None:
                    return reply
                result = await fn(params, account)
                after = await self.faults.take(self.exchange, name, account, SimFault.Phase.AFTER)
                reply = await self.faults.apply(after, self._fault_reply)
                if reply is not None:
                    return reply
                return web.json_response(_ok(result))
            except BybitError as exc:
                return exc.response()
            except GatewayError as exc:
                return self._engine_error(exc, params).response()

        return handler

    def _authenticate(self, request: web.Request, body: str) -> str:
        key = request.headers.get("X-BAPI-API-KEY", "")
        if key != self.config.api_key:
            raise BybitError(10003, "API key is invalid.")
        timestamp = request.headers.get("X-BAPI-TIMESTAMP", "")
        window = request.headers.get("X-BAPI-RECV-WINDOW", "5000")
        payload = body if request.method == "POST" else request.query_string
        expected = hmac.new(
            self.config.api_secret.encode(), f"{timestamp}{key}{window}{payload}".encode(), hashlib.sha256
        ).hexdigest()
        if not hmac.compare_digest(expected, request.headers.get("X-BAPI-SIGN", "")):
            raise BybitError(10004, "error sign! origin_string[redacted]")
        try:
            ts, recv = int(timestamp), int(window)
        except ValueError:
            raise BybitError(10002, "invalid request, please check your timestamp or recv_window param")
        if not (ts - 1000 <= now_ms() < ts + recv):
            raise BybitError(10002, "invalid request, please check your server timestamp or recv_window param")
        return key

    def _fault_reply(self, kind: str) -> web.Response:
        if kind == SimFault.Kind.HTTP_429:
            return BybitError(10006, "Too many visits. Exceeded the API Rate Limit.").response()
        if kind == SimFault.Kind.MAINTENANCE:
            return web.Response(status=503, text="<html><body>503 Service Temporarily Unavailable</body></html>")
        return BybitError(10016, "Internal system error.").response()

    def _engine_error(self, exc: GatewayError, params: dict[str, Any]) -> BybitError:
        spot = params.get("category") == "spot"
        if isinstance(exc, DuplicateClientId):
            return BybitError(110072, "OrderLinkedID is duplicate")
        if isinstance(exc, InsufficientFunds):
            return (
                BybitError(170131, "Insufficient balance.")
                if spot
                else BybitError(110007, "ab not enough for new order")
            )
        if isinstance(exc, NotFound):
            return (
                BybitError(170213, "Order does not exist.")
                if spot
                else BybitError(110001, "order not exists or too late to cancel")
            )
        if exc.code == "-1121":
            return BybitError(10001, "params error: symbol invalid")
        if exc.code == "-2021":
            return BybitError(110092 if params.get("side") == "Buy" else 110093, "expect Rising/Falling trigger")
        return BybitError(170140 if spot else 110094, str(exc).split(" (")[0])

    def _market_type(self, params: dict[str, Any]) -> MarketType:
        category = params.get("category")
        if category not in _CATEGORY:
            raise BybitError(10001, f"params error: category {category} is not supported")
        return _CATEGORY[category]

    def _engine_symbol(self, symbol_id: str | None, market_type: MarketType) -> str:
        for quote in ("USDT", "USDC"):
            if symbol_id and symbol_id.endswith(quote):
                symbol = f"{symbol_id[: -len(quote)]}/{quote}"
                if catalog_market(market_type, symbol):
                    return symbol
        raise BybitError(10001, "params error: symbol invalid")

    # --- market data -------------------------------------------------------------------

    async def server_time(self, params, account):  # noqa: ANN001, ANN201
        now = time.time()
        return {"timeSecond": str(int(now)), "timeNano": str(int(now * 1e9))}

    async def instruments(self, params, account):  # noqa: ANN001, ANN201
        market_type = self._market_type(params)
        category = params["category"]
        if params.get("status") == "PreLaunch":
            return {"category": category, "list": []}
        rules = await db_call(self.engine.market_list, self.exchange, market_type)
        items = []
        for rule in rules:
            sym = rule.symbol.replace("/", "")
            item: dict[str, Any] = {
                "symbol": sym,
                "baseCoin": rule.base,
                "quoteCoin": rule.quote,
                "status": "Trading" if rule.active else "Closed",
                "priceFilter": {
                    "tickSize": _s(rule.tick_size),
                    "minPrice": _s(rule.tick_size),
                    "maxPrice": _s(rule.max_price or MAX_PRICE),
                },
            }
            if market_type == MarketType.SPOT:
                item.update(
                    {
                        "innovation": "0",
                        "marginTrading": "none",
                        "lotSizeFilter": {
                            "basePrecision": _s(rule.step_size),
                            "quotePrecision": "0.00000001",
                            "minOrderQty": _s(rule.min_qty),
                            "maxOrderQty": _s(rule.max_qty),
                            "minOrderAmt": _s(rule.min_notional),
                            "maxOrderAmt": "9000000",
                        },
                    }
                )
            else:
                item.update(
                    {
                        "contractType": "LinearPerpetual",
                        "settleCoin": rule.quote,
                        "launchTime": "1585526400000",
                        "deliveryTime": "0",
                        "priceScale": str(rule.price_precision),
                        "leverageFilter": {"minLeverage": "1", "maxLeverage": "100.00", "leverageStep": "0.01"},
                        "lotSizeFilter": {
                            "maxOrderQty": _s(rule.max_qty),
                            "minOrderQty": _s(rule.min_qty),
                            "qtyStep": _s(rule.step_size),
                            "minNotionalValue": _s(rule.min_notional),
                        },
                    }
                )
            items.append(item)
        return {"category": category, "list": items}

    async def tickers(self, params, account):  # noqa: ANN001, ANN201
        market_type = self._market_type(params)
        wanted = [self._engine_symbol(params["symbol"], market_type)] if params.get("symbol") else None
        prices = await db_call(self.engine.prices_last, self.exchange, market_type, wanted)
        return {
            "category": params["category"],
            "list": [
                {"symbol": s.replace("/", ""), "lastPrice": _s(p), "bid1Price": _s(p), "ask1Price": _s(p)}
                for s, p in prices.items()
            ],
        }

    async def wallet_balance(self, params, account):  # noqa: ANN001, ANN201
        # One unified wallet: the engine's spot and futures balances of the account, added up.
        def combined() -> dict[str, tuple[Decimal, Decimal]]:
            totals: dict[str, tuple[Decimal, Decimal]] = {}
            for market_type in (MarketType.SPOT, MarketType.FUTURES):
                for asset in self.engine.balance_get(self.exchange, account, market_type).assets.values():
                    total, used = totals.get(asset.currency, (Decimal(0), Decimal(0)))
                    totals[asset.currency] = (total + asset.total, used + asset.used)
            return totals

        totals = await db_call(combined)
        coins = [
            {
                "coin": c,
                "walletBalance": _s(t),
                "equity": _s(t),
                "locked": _s(u),
                "totalOrderIM": "0",
                "totalPositionIM": "0",
                "borrowAmount": "0",
                "accruedInterest": "0",
                "unrealisedPnl": "0",
            }
            for c, (t, u) in totals.items()
        ]
        return {"list": [{"accountType": "UNIFIED", "totalEquity": "0", "coin": coins}]}

    # --- orders -------------------------------------------------------------------------

    def _child(self, order: SimOrder) -> SimOrder | None:
        return SimOrder.objects.filter(parent_id=order.pk).first() if order.conditional else None

    def _view(self, order: SimOrder, category: str, *, stop_filter: bool) -> dict[str, Any]:
        """A conditional keeps its id: its own status under StopOrder, its child's life under Order."""
        shown = order
        child = self._child(order)
        status = OrderStatus(order.status)
        if order.conditional:
            if stop_filter:
                raw_status = {
                    OrderStatus.NEW: "Untriggered",
                    OrderStatus.TRIGGERED: "Triggered",
                    OrderStatus.CANCELED: "Deactivated",
                }.get(status, "Rejected")
            else:
                shown = child or order
                raw_status = _STATUS.get(OrderStatus(shown.status), "New")
        else:
            raw_status = _STATUS.get(status, "New")
        filled = shown.filled_quantity
        view = {
            "orderId": str(order.pk),
            "orderLinkId": order.client_order_id,
            "symbol": order.symbol.replace("/", ""),
            "price": _s(order.price),
            "qty": _s(order.quantity),
            "side": "Buy" if order.side == Side.BUY else "Sell",
            "orderStatus": raw_status,
            "avgPrice": _s(shown.cost / filled) if filled else "0",
            "leavesQty": _s(order.quantity - filled),
            "cumExecQty": _s(filled),
            "cumExecValue": _s(shown.cost),
            "cumExecFee": _s(shown.fee),
            "timeInForce": "GTC",
            "orderType": "Limit" if order.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT) else "Market",
            "stopOrderType": "Stop" if order.conditional else "",
            "triggerPrice": _s(order.stop_price),
            "triggerDirection": (1 if order.side == Side.BUY else 2) if order.conditional else 0,
            "reduceOnly": order.reduce_only,
            "orderFilter": ("StopOrder" if order.conditional else "Order") if category == "spot" else "",
            "createdTime": str(int(order.created_at.timestamp() * 1000)),
            "updatedTime": str(int(max(order.updated_at, shown.updated_at).timestamp() * 1000)),
            "category": category,
        }
        if category == "spot":
            view["marketUnit"] = "baseCoin"
        else:
            view["tpslMode"] = ""
            view["positionIdx"] = 0
        return view

    def _select(self, params: dict[str, Any], account: str, *, open_only: bool) -> list[dict[str, Any]]:
        market_type = self._market_type(params)
        self.engine.match(self.exchange)
        stop_filter = params.get("orderFilter") == "StopOrder"
        orders = SimOrder.objects.filter(
            exchange=self.exchange, account=account, market_type=market_type, parent__isnull=True
        )
        if params.get("symbol"):
            orders = orders.filter(symbol=self._engine_symbol(params["symbol"], market_type))
        if params.get("orderFilter") == "StopOrder":
            orders = orders.filter(conditional=True)
        elif params.get("orderFilter") == "Order":
            # A triggered conditional order lives on as a regular order under the same id.
            orders = orders.filter(Q(conditional=False) | Q(status=OrderStatus.TRIGGERED.value))
        if params.get("orderId"):
            if not str(params["orderId"]).isdigit():
                return []
            orders = orders.filter(pk=int(params["orderId"]))
        if params.get("orderLinkId"):
            orders = orders.filter(client_order_id=params["orderLinkId"])
        views = [
            self._view(o, params["category"], stop_filter=o.conditional and stop_filter) for o in orders.order_by("-pk")
        ]
        live = ("New", "PartiallyFilled", "Untriggered")
        by_id = params.get("orderId") or params.get("orderLinkId")
        if open_only and not by_id:
            views = [v for v in views if v["orderStatus"] in live]
        elif not open_only:
            views = [v for v in views if v["orderStatus"] not in live]
            if params.get("orderStatus"):
                views = [v for v in views if v["orderStatus"] == params["orderStatus"]]
        return views[: int(params.get("limit") or 50)]

    async def order_realtime(self, params, account):  # noqa: ANN001, ANN201
        # Like the real API: open orders, or any recent order when asked by id.
        views = await db_call(self._select, params, account, open_only=True)
        return {"category": params.get("category"), "list": views, "nextPageCursor": ""}

    async def order_history(self, params, account):  # noqa: ANN001, ANN201
        views = await db_call(self._select, params, account, open_only=False)
        return {"category": params.get("category"), "list": views, "nextPageCursor": ""}

    async def order_create(self, params, account):  # noqa: ANN001, ANN201
        market_type = self._market_type(params)
        trigger = params.get("triggerPrice")
        is_limit = str(params.get("orderType", "")).lower() == "limit"
        if trigger:
            order_type = OrderType.STOP_LIMIT if is_limit else OrderType.STOP_MARKET
        else:
            order_type = OrderType.LIMIT if is_limit else OrderType.MARKET
        if params.get("side") not in ("Buy", "Sell"):
            raise BybitError(10001, "params error: side invalid")
        if market_type == MarketType.SPOT and params.get("marketUnit") == "quoteCoin":
            raise BybitError(10001, "params error: the simulator takes spot market qty in baseCoin only")
        try:
            request = OrderRequest(
                symbol=self._engine_symbol(params.get("symbol"), market_type),
                market_type=market_type,
                side=Side.BUY if params["side"] == "Buy" else Side.SELL,
                order_type=order_type,
                quantity=Decimal(str(params.get("qty"))),
                price=Decimal(str(params["price"])) if params.get("price") else None,
                stop_price=Decimal(str(trigger)) if trigger else None,
                client_order_id=str(params.get("orderLinkId") or ""),
                reduce_only=bool(params.get("reduceOnly")),
            )
        except (ArithmeticError, ValueError) as exc:
            raise BybitError(10001, f"params error: {exc}")
        state = await db_call(self.engine.order_create, self.exchange, account, request)
        return {"orderId": state.exchange_order_id, "orderLinkId": state.client_order_id}

    async def order_cancel(self, params, account):  # noqa: ANN001, ANN201
        market_type = self._market_type(params)
        symbol = self._engine_symbol(params.get("symbol"), market_type)

        def cancel() -> dict[str, Any]:
            orders = SimOrder.objects.filter(
                exchange=self.exchange, account=account, market_type=market_type, symbol=symbol, parent__isnull=True
            )
            if params.get("orderId"):
                orders = orders.filter(pk=int(params["orderId"])) if str(params["orderId"]).isdigit() else orders.none()
            elif params.get("orderLinkId"):
                orders = orders.filter(client_order_id=params["orderLinkId"])
            else:
                raise BybitError(10001, "params error: orderId or orderLinkId is required")
            order = orders.first()
            if order is None:
                raise NotFound("order not exists", exchange=self.exchange)
            target = order
            if order.conditional and order.status == OrderStatus.TRIGGERED:
                target = self._child(order) or order
            self.engine.order_cancel(
                self.exchange,
                account,
                symbol=symbol,
                market_type=market_type,
                exchange_order_id=str(target.pk),
                conditional=target.conditional,
            )
            return {"orderId": str(order.pk), "orderLinkId": order.client_order_id}

        return await db_call(cancel)

    # --- private stream -----------------------------------------------------------------

    async def private_stream(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        state: dict[str, Any] = {"account": None, "topics": set(), "silent": False, "cursor": 0}
        poller = asyncio.ensure_future(self._push(ws, state))
        try:
            async for message in ws:
                if message.type != WSMsgType.TEXT:
                    if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                        break
                    continue
                if poller.done():
                    break
                await self._on_message(ws, state, message.data)
        finally:
            poller.cancel()
            await ws.close()
        return ws

    async def _on_message(self, ws: web.WebSocketResponse, state: dict[str, Any], data: str) -> None:
        try:
            msg = json.loads(data)
        except json.JSONDecodeError:
            return
        op = msg.get("op")
        req_id = msg.get("req_id", "")
        if op == "ping":
            if not state["silent"]:
                await ws.send_json({"req_id": req_id, "op": "pong", "args": [str(now_ms())], "conn_id": "sim"})
        elif op == "auth":
            key, expires, signature = (list(msg.get("args") or []) + ["", "", ""])[:3]
            expected = hmac.new(
                self.config.api_secret.encode(), f"GET/realtime{expires}".encode(), hashlib.sha256
            ).hexdigest()
            ok = key == self.config.api_key and hmac.compare_digest(expected, str(signature))
            ok = ok and str(expires).isdigit() and int(expires) > now_ms()
            await ws.send_json(
                {
                    "success": ok,
                    "ret_msg": "" if ok else "Params Error",
                    "op": "auth",
                    "conn_id": "sim",
                    "req_id": req_id,
                }
            )
            if ok:
                state["account"] = key
                state["cursor"] = await db_call(_cursor_now, self.exchange, key)
        elif op == "subscribe":
            if state["account"] is None:
                await ws.send_json({"success": False, "ret_msg": "Request not authorized", "op": "subscribe"})
                return
            state["topics"].update(msg.get("args") or [])
            await ws.send_json({"success": True, "ret_msg": "", "op": "subscribe", "conn_id": "sim", "req_id": req_id})

    async def _push(self, ws: web.WebSocketResponse, state: dict[str, Any]) -> None:
        while not ws.closed:
            await asyncio.sleep(WS_POLL_SECONDS)
            account = state["account"]
            if account is None:
                continue
            fault = await db_call(self.engine.fault_ws_take, self.exchange, account)
            if fault == SimFault.Kind.WS_DROP:
                logger.info("sim bybit stream dropped (fault)")
                await ws.close()
                return
            if fault == SimFault.Kind.WS_SILENT:
                state["silent"] = True
            if state["silent"] or "order" not in state["topics"]:
                continue
            views, state["cursor"] = await db_call(self._changes, account, state["cursor"])
            if views:
                await ws.send_json(
                    {"id": f"sim-{state['cursor']}", "topic": "order", "creationTime": now_ms(), "data": views}
                )

    def _changes(self, account: str, cursor: int) -> tuple[list[dict[str, Any]], int]:
        states, cursor_next = self.engine.order_updates_since(self.exchange, account, cursor)
        views = []
        for st in states:
            order = SimOrder.objects.get(pk=int(st.exchange_order_id))
            order = order.parent or order  # a spawned order is reported under its conditional's id
            category = "spot" if order.market_type == MarketType.SPOT else "linear"
            views.append(self._view(order, category, stop_filter=order.conditional and order.status == OrderStatus.NEW))
        return views, cursor_next
