"""Bybit v5 REST (market, account, asset, order, position, execution) and the private WS, shaped like the real API."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web
from django.db.models import Q
from django.utils import timezone

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
from exchanges.simulator.dialects.base import Call, Dialect, DialectError, Route, decimal_text, ms, signature_ok
from exchanges.simulator.engine import OrderEvent, StreamCursor, TimeInForce
from exchanges.simulator.ratelimit import Charge, Verdict, Window
from exchanges.simulator.wire import db_call, now_ms

logger = logging.getLogger(__name__)

_s = decimal_text
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
_TIF = {
    "GTC": TimeInForce.GTC,
    "IOC": TimeInForce.IOC,
    "FOK": TimeInForce.FOK,
    "POSTONLY": TimeInForce.POST_ONLY_EXPIRE,
}
_TIF_TEXT = {TimeInForce.POST_ONLY_EXPIRE: "PostOnly", TimeInForce.POST_ONLY: "PostOnly"}
LEVERAGE_DEFAULT = 10
UNLISTED_CATEGORIES = ("inverse", "option")
STREAM_TOPICS = frozenset(
    {
        "order",
        "order.spot",
        "order.linear",
        "execution",
        "execution.spot",
        "execution.linear",
        "position",
        "position.linear",
        "wallet",
    }
)  # real categories the simulator lists nothing in


class BybitError(DialectError):
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


class BybitDialect(Dialect):
    """Bybit v5 routes over the engine; the engine account is the API key (its UID)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.exchange = self.config.bybit_exchange
        limits = self.config.rate_limits
        self.ip_window = Window("IP", limits.bybit_ip_per_5s, 5)
        self.order_limits = {
            MarketType.FUTURES: limits.bybit_orders_per_second,
            MarketType.SPOT: limits.bybit_spot_orders_per_second,
        }
        self.query_limit = limits.bybit_queries_per_second
        self.leverage: dict[tuple[str, str], str] = {}  # (account, symbol id) → leverage set by the client

    def register(self, app: web.Application) -> None:
        r = app.router
        q, o = {"auth": "signed", "extra": {"uid": "query"}}, {"auth": "signed", "extra": {"uid": "order"}}
        r.add_get("/v5/market/time", self.route(self.server_time, None))
        r.add_get("/v5/market/instruments-info", self.route(self.instruments, "load_markets"))
        r.add_get("/v5/market/tickers", self.route(self.tickers, "fetch_last_prices"))
        r.add_get("/v5/account/wallet-balance", self.route(self.wallet_balance, "fetch_balance", **q))
        r.add_get("/v5/account/info", self.route(self.account_info, None, **q))
        r.add_get("/v5/user/query-api", self.route(self.query_api, None, **q))
        r.add_get("/v5/asset/coin/query-info", self.route(self.coin_info, None, **q))
        r.add_post("/v5/order/create", self.route(self.order_create, "create_order", **o))
        r.add_post("/v5/order/cancel", self.route(self.order_cancel, "cancel_order", **o))
        r.add_post("/v5/order/cancel-all", self.route(self.order_cancel_all, "cancel_order", **o))
        r.add_get("/v5/order/realtime", self.route(self.order_realtime, "fetch_open_orders", **q))
        r.add_get("/v5/order/history", self.route(self.order_history, "fetch_order", **q))
        r.add_get("/v5/execution/list", self.route(self.execution_list, "fetch_order", **q))
        r.add_get("/v5/position/list", self.route(self.position_list, "fetch_balance", **q))
        r.add_post("/v5/position/set-leverage", self.route(self.set_leverage, None, **o))
        r.add_get("/v5/private", self.private_stream)

    # --- hooks -------------------------------------------------------------------------

    async def parse(self, request: web.Request, body: str) -> dict[str, Any]:
        params: dict[str, Any] = dict(parse_qsl(request.query_string, keep_blank_values=True))
        if body:
            try:
                params.update(json.loads(body))
            except json.JSONDecodeError:
                raise BybitError(10001, "params error: body is not JSON")
        return params

    def authenticate(self, request: web.Request, body: str, route: Route) -> str:
        key = request.headers.get("X-BAPI-API-KEY", "")
        secret = self.config.secret_of(key)
        if secret is None:
            raise BybitError(10003, "API key is invalid.")
        timestamp = request.headers.get("X-BAPI-TIMESTAMP", "")
        window = request.headers.get("X-BAPI-RECV-WINDOW", "5000")
        payload = body if request.method == "POST" else request.query_string
        if not signature_ok(secret, f"{timestamp}{key}{window}{payload}", request.headers.get("X-BAPI-SIGN", "")):
            raise BybitError(10004, "error sign! origin_string[redacted]")
        try:
            ts, recv = int(timestamp), int(window)
        except ValueError:
            raise BybitError(10002, "invalid request, please check your timestamp or recv_window param")
        if not (ts - 1000 <= now_ms() < ts + recv):
            raise BybitError(10002, "invalid request, please check your server timestamp or recv_window param")
        return key

    def fault_endpoint(self, call: Call) -> str | None:
        endpoint = call.route.endpoint
        if endpoint == "fetch_open_orders" and (call.params.get("orderId") or call.params.get("orderLinkId")):
            return "fetch_order"
        return endpoint

    def fault_reply(self, kind: str) -> web.Response:
        if kind == SimFault.Kind.HTTP_429:
            return BybitError(10006, "Too many visits. Exceeded the API Rate Limit.").response()
        if kind == SimFault.Kind.MAINTENANCE:
            return web.Response(status=503, text="<html><body>503 Service Temporarily Unavailable</body></html>")
        return BybitError(10016, "Internal system error.").response()

    def rate_charges(self, call: Call) -> list[Charge]:
        charges = [Charge(f"ip:{call.request.remote or 'unknown'}", self.ip_window, 1)]
        uid = call.route.extra.get("uid")
        if uid and call.account:
            # Order endpoints are counted per category (spot and linear have their own limits).
            scope = f"{call.request.path}:{call.market_type}" if uid == "order" else call.request.path
            limit = (
                self.order_limits.get(call.market_type or MarketType.FUTURES, 10)
                if uid == "order"
                else self.query_limit
            )
            charges.append(Charge(f"uid:{call.account}:{scope}", Window(f"UID:{scope}", limit, 1), 1))
        return charges

    def rate_headers(self, verdict: Verdict | None, call: Call) -> dict[str, str]:
        # Only the per-UID (signed) endpoints report their limit, as on Bybit.
        if verdict is None or len(verdict.usages) < 2:
            return {}
        usage = verdict.usages[1]
        reset = usage.reset_at * 1000 if not verdict.allowed else time.time() * 1000
        return {
            "X-Bapi-Limit": str(usage.window.limit),
            "X-Bapi-Limit-Status": str(usage.remaining),
            "X-Bapi-Limit-Reset-Timestamp": str(int(reset)),
        }

    def rate_refused(self, verdict: Verdict, call: Call) -> web.Response:
        if verdict.over == self.ip_window:
            return web.Response(status=403, text="access too frequent")
        return BybitError(10006, "Too many visits!").response()

    def reply(self, result: Any) -> web.StreamResponse:
        return web.json_response(_ok(result))

    def market_type_of(self, call: Call) -> MarketType | None:
        return _CATEGORY.get(str(call.params.get("category")))

    def engine_error(self, exc: GatewayError, call: Call) -> BybitError:
        spot = call.params.get("category") == "spot"
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
            return BybitError(110092 if call.params.get("side") == "Buy" else 110093, "expect Rising/Falling trigger")
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

    async def server_time(self, call: Call) -> Any:
        now = time.time()
        return {"timeSecond": str(int(now)), "timeNano": str(int(now * 1e9))}

    async def instruments(self, call: Call) -> Any:
        params = call.params
        category = params.get("category")
        if category in UNLISTED_CATEGORIES:
            return {"category": category, "list": [], "nextPageCursor": ""}
        market_type = self._market_type(params)
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

    async def tickers(self, call: Call) -> Any:
        """Last price now and the path's price 24 h ago; no trade tape, so volumes are 0."""
        params = call.params
        if params.get("category") in UNLISTED_CATEGORIES:
            return {"category": params["category"], "list": []}
        market_type = self._market_type(params)
        wanted = [self._engine_symbol(params["symbol"], market_type)] if params.get("symbol") else None
        now = timezone.now()
        prices = await db_call(self.engine.prices_last, self.exchange, market_type, wanted, now=now)
        before = await db_call(self.engine.prices_last, self.exchange, market_type, wanted, now=now - timedelta(days=1))
        rows = []
        for s, p in prices.items():
            open_ = before.get(s, p)
            row = {
                "symbol": s.replace("/", ""),
                "lastPrice": _s(p),
                "bid1Price": _s(p),
                "bid1Size": "0",
                "ask1Price": _s(p),
                "ask1Size": "0",
                "prevPrice24h": _s(open_),
                "price24hPcnt": _s(((p - open_) / open_).quantize(Decimal("0.000001"))),
                "highPrice24h": _s(max(p, open_)),
                "lowPrice24h": _s(min(p, open_)),
                "volume24h": "0",
                "turnover24h": "0",
            }
            if market_type == MarketType.FUTURES:
                row.update(
                    {
                        "markPrice": _s(p),
                        "indexPrice": _s(p),
                        "fundingRate": "0",
                        "nextFundingTime": "0",
                        "openInterest": "0",
                        "openInterestValue": "0",  # ccxt tells a contract ticker from a spot one by this field
                    }
                )
            rows.append(row)
        return {"category": params["category"], "list": rows}

    # --- account -----------------------------------------------------------------------

    async def query_api(self, call: Call) -> Any:
        """The API key's own record: a master key of a unified trading account (UTA 2.0)."""
        return {
            "id": "1",
            "note": "simulator",
            "apiKey": call.account,
            "readOnly": 0,
            "secret": "",
            "permissions": {
                "ContractTrade": ["Order", "Position"],
                "Spot": ["SpotTrade"],
                "Wallet": [],
                "Derivatives": [],
            },
            "ips": ["*"],
            "type": 1,
            "deadlineDay": -1,
            "expiredAt": "",
            "createdAt": "2024-01-01T00:00:00Z",
            "unified": 1,
            "uta": 1,
            "userID": 1,
            "inviterID": 0,
            "vipLevel": "No VIP",
            "mktMakerLevel": "0",
            "affiliateID": 0,
            "rsaPublicKey": "",
            "isMaster": True,
            "parentUid": "0",
            "kycLevel": "LEVEL_DEFAULT",
            "kycRegion": "",
        }

    async def account_info(self, call: Call) -> Any:
        return {
            "unifiedMarginStatus": 6,
            "marginMode": "REGULAR_MARGIN",
            "isMasterTrader": False,
            "spotHedgingStatus": "OFF",
            "updatedTime": str(now_ms()),
        }

    async def coin_info(self, call: Call) -> Any:
        coins = await self.listed_coins()
        chain = {
            "chainType": "SIM",
            "confirmation": "1",
            "withdrawFee": "0",
            "depositMin": "0",
            "withdrawMin": "0",
            "chain": "SIM",
            "chainDeposit": "0",
            "chainWithdraw": "0",
            "minAccuracy": "8",
            "withdrawPercentageFee": "0",
        }
        return {"rows": [{"name": c, "coin": c, "remainAmount": "0", "chains": [chain]} for c in coins]}

    async def wallet_balance(self, call: Call) -> Any:
        return {"list": [await db_call(self._wallet_view, call.account)]}

    def _wallet_view(self, account: str) -> dict[str, Any]:
        """The unified trading account: one engine wallet serves spot and linear (engine.UNIFIED_WALLETS);
        coins valued in USD at the last spot price (USDT and USDC at 1); equity adds the positions' PnL."""
        wallet = self.engine.balance_get(self.exchange, account, MarketType.SPOT)
        totals = {a.currency: (a.total, a.used) for a in wallet.assets.values()}
        marks = self.engine.prices_last(self.exchange, MarketType.SPOT, [f"{c}/USDT" for c in totals])
        prices = {s.split("/")[0]: p for s, p in marks.items()}
        unrealized = sum((p.unrealized for p in self.marked_positions(account, self.held_symbols(account))), Decimal(0))
        coins = []
        total_usd = Decimal(0)
        for c, (t, u) in totals.items():
            usd = t * (Decimal(1) if c in ("USDT", "USDC") else prices.get(c, Decimal(0)))
            total_usd += usd
            coins.append(
                {
                    "coin": c,
                    "walletBalance": _s(t),
                    "equity": _s(t),
                    "usdValue": _s(usd),
                    "locked": _s(u),
                    "totalOrderIM": "0",
                    "totalPositionIM": "0",
                    "borrowAmount": "0",
                    "accruedInterest": "0",
                    "unrealisedPnl": "0",
                    "cumRealisedPnl": "0",
                    "availableToWithdraw": "",
                    "marginCollateral": True,
                    "collateralSwitch": True,
                }
            )
        equity = _s(total_usd + unrealized)
        return {
            "accountType": "UNIFIED",
            "totalEquity": equity,
            "totalWalletBalance": _s(total_usd),
            "totalMarginBalance": equity,
            "totalAvailableBalance": _s(total_usd),
            "totalPerpUPL": _s(unrealized),
            "totalInitialMargin": "0",
            "totalMaintenanceMargin": "0",
            "accountIMRate": "0",
            "accountMMRate": "0",
            "accountLTV": "0",
            "coin": coins,
        }

    async def position_list(self, call: Call) -> Any:
        params = call.params
        if self._market_type(params) != MarketType.FUTURES:
            raise BybitError(10001, "params error: category only support linear or option")

        def listing() -> list[dict[str, Any]]:
            if params.get("symbol"):
                return self._position_rows(call.account, [self._engine_symbol(params["symbol"], MarketType.FUTURES)])
            return self._position_rows(call.account, self.held_symbols(call.account))

        return {"category": "linear", "list": await db_call(listing), "nextPageCursor": ""}

    def _position_rows(self, account: str, symbols: list[str]) -> list[dict[str, Any]]:
        """position/list rows (and the stream's position topic) of the given linear symbols, flat ones included."""
        rows = []
        for position in self.marked_positions(account, symbols):
            symbol, qty, entry, mark = position.symbol, position.quantity, position.entry_price, position.mark_price
            sid = symbol.replace("/", "")
            leverage = self.leverage.get((account, sid), str(LEVERAGE_DEFAULT))
            rows.append(
                {
                    "positionIdx": 0,
                    "riskId": 1,
                    "riskLimitValue": "2000000",
                    "symbol": sid,
                    "side": "" if qty == 0 else ("Buy" if qty > 0 else "Sell"),
                    "size": _s(abs(qty)),
                    "avgPrice": _s(entry),
                    "positionValue": _s(abs(qty) * entry),
                    "tradeMode": 0,
                    "positionStatus": "Normal",
                    "autoAddMargin": 0,
                    "adlRankIndicator": 0,
                    "leverage": leverage,
                    "positionBalance": "0",
                    "markPrice": _s(mark),
                    "liqPrice": "",
                    "bustPrice": "",
                    "positionMM": "0",
                    "positionIM": _s(abs(qty) * mark / Decimal(leverage)),
                    "tpslMode": "Full",
                    "takeProfit": "0",
                    "stopLoss": "0",
                    "trailingStop": "0",
                    "unrealisedPnl": _s(position.unrealized),
                    "curRealisedPnl": "0",
                    "cumRealisedPnl": "0",
                    "seq": 0,
                    "isReduceOnly": False,
                    "createdTime": "0",
                    "updatedTime": str(now_ms()),
                }
            )
        return rows

    async def set_leverage(self, call: Call) -> Any:
        params = call.params
        symbol = self._engine_symbol(params.get("symbol"), self._market_type(params)).replace("/", "")
        buy, sell = str(params.get("buyLeverage", "")), str(params.get("sellLeverage", ""))
        if not buy or buy != sell:
            raise BybitError(10001, "params error: buyLeverage must equal sellLeverage in one-way mode")
        if self.leverage.get((call.account, symbol), str(LEVERAGE_DEFAULT)) == buy:
            raise BybitError(110043, "leverage not modified")
        self.leverage[(call.account, symbol)] = buy
        return {}

    # --- orders -------------------------------------------------------------------------

    @staticmethod
    def _tif(order: SimOrder) -> str:
        tif = TimeInForce(order.time_in_force or "GTC")
        return _TIF_TEXT.get(tif, tif.value)

    @staticmethod
    def _raw_status(order: SimOrder, status: OrderStatus, child: SimOrder | None, stop_filter: bool) -> str:
        if not order.conditional:
            return _STATUS.get(status, "New")
        if stop_filter:
            return {
                OrderStatus.NEW: "Untriggered",
                OrderStatus.TRIGGERED: "Triggered",
                OrderStatus.CANCELED: "Deactivated",
            }.get(status, "Rejected")
        return _STATUS.get(OrderStatus((child or order).status), "New")

    def _view(
        self, order: SimOrder, category: str, *, stop_filter: bool, shown: SimOrder | None = None
    ) -> dict[str, Any]:
        """A conditional keeps its id: its own status under StopOrder, its child's life under Order.

        `shown` (stream events): the snapshot whose state to report, instead of the rows as they are now.
        """
        status = OrderStatus(order.status)
        if shown is not None and shown is not order:  # a spawned order's snapshot, under its conditional's id
            raw_status = _STATUS.get(OrderStatus(shown.status), "New")
        else:
            shown = order
            child = self.child_of(order)
            raw_status = self._raw_status(order, status, child, stop_filter)
            if order.conditional and not stop_filter:
                shown = child or order

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
            "timeInForce": self._tif(order),
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
            view["marketUnit"] = "quoteCoin" if order.quote_quantity is not None else "baseCoin"
            if order.quote_quantity is not None:
                view["qty"] = _s(order.quote_quantity)
                view["leavesQty"] = "0"
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

    async def order_realtime(self, call: Call) -> Any:
        params, account = call.params, call.account
        # Like the real API: open orders, or any recent order when asked by id.
        views = await db_call(self._select, params, account, open_only=True)
        return {"category": params.get("category"), "list": views, "nextPageCursor": ""}

    async def order_history(self, call: Call) -> Any:
        params, account = call.params, call.account
        views = await db_call(self._select, params, account, open_only=False)
        return {"category": params.get("category"), "list": views, "nextPageCursor": ""}

    async def order_create(self, call: Call) -> Any:
        params = call.params
        market_type = self._market_type(params)
        trigger = params.get("triggerPrice")
        is_limit = str(params.get("orderType", "")).lower() == "limit"
        if trigger:
            order_type = OrderType.STOP_LIMIT if is_limit else OrderType.STOP_MARKET
        else:
            order_type = OrderType.LIMIT if is_limit else OrderType.MARKET
        if params.get("side") not in ("Buy", "Sell"):
            raise BybitError(10001, "params error: side invalid")
        tif = _TIF.get(str(params.get("timeInForce") or "GTC").upper())
        if tif is None:
            raise BybitError(10001, "params error: timeInForce invalid")
        if order_type != OrderType.LIMIT:
            tif = TimeInForce.GTC  # a market order takes what it can; conditional orders rest until triggered
        # Spot market orders: a Buy's qty is in the quote coin unless marketUnit says baseCoin; a Sell's in base.
        unit = params.get("marketUnit") or ("quoteCoin" if params["side"] == "Buy" else "baseCoin")
        quote_order = market_type == MarketType.SPOT and order_type == OrderType.MARKET and unit == "quoteCoin"
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
        state = await db_call(
            self.engine.order_create, self.exchange, call.account, request, time_in_force=tif, quote_order=quote_order
        )
        return {"orderId": state.exchange_order_id, "orderLinkId": state.client_order_id}

    def _cancel(self, account: str, market_type: MarketType, order: SimOrder) -> dict[str, Any]:
        self.cancel_as_shown(account, market_type, order)
        return {"orderId": str(order.pk), "orderLinkId": order.client_order_id}

    async def order_cancel(self, call: Call) -> Any:
        params = call.params
        market_type = self._market_type(params)
        symbol = self._engine_symbol(params.get("symbol"), market_type)

        def cancel() -> dict[str, Any]:
            orders = SimOrder.objects.filter(
                exchange=self.exchange,
                account=call.account,
                market_type=market_type,
                symbol=symbol,
                parent__isnull=True,
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
            return self._cancel(call.account, market_type, order)

        return await db_call(cancel)

    async def order_cancel_all(self, call: Call) -> Any:
        params = call.params
        market_type = self._market_type(params)

        def cancel() -> dict[str, Any]:
            self.engine.match(self.exchange)
            orders = SimOrder.objects.filter(
                exchange=self.exchange, account=call.account, market_type=market_type, parent__isnull=True
            ).filter(Q(status__in=("NEW", "PARTIALLY_FILLED")) | Q(spawned__status__in=("NEW", "PARTIALLY_FILLED")))
            if params.get("symbol"):
                orders = orders.filter(symbol=self._engine_symbol(params["symbol"], market_type))
            done = []
            for order in orders.order_by("pk"):
                try:
                    done.append(self._cancel(call.account, market_type, order))
                except NotFound:
                    continue  # filled meanwhile
            return {"list": done, "success": "1"}

        return await db_call(cancel)

    def _execution(self, fill: Any, order: SimOrder, category: str) -> dict[str, Any]:
        parent = order.parent if order.parent_id else None
        shown = parent or order
        return {
            "symbol": shown.symbol.replace("/", ""),
            "orderId": str(shown.pk),
            "orderLinkId": shown.client_order_id,
            "side": "Buy" if order.side == Side.BUY else "Sell",
            "orderPrice": _s(order.price),
            "orderQty": _s(order.quantity),
            "leavesQty": _s(order.quantity - order.filled_quantity),
            "createType": "CreateByUser",
            "orderType": "Limit" if order.order_type == OrderType.LIMIT else "Market",
            "stopOrderType": "Stop" if parent is not None else "",
            "execFee": _s(fill.fee),
            "feeCurrency": fill.fee_currency,
            "execId": str(fill.pk),
            "execPrice": _s(fill.price),
            "execQty": _s(fill.quantity),
            "execType": "Trade",
            "execValue": _s(fill.quantity * fill.price),
            "execTime": str(ms(fill.created_at)),
            "isMaker": fill.is_maker,
            "feeRate": _s(fill.fee / (fill.quantity * fill.price)) if fill.quantity * fill.price else "0",
            "tradeIv": "",
            "markIv": "",
            "markPrice": _s(fill.price),
            "indexPrice": "",
            "underlyingPrice": "",
            "blockTradeId": "",
            "closedSize": "",
            "seq": fill.pk,
            "category": category,
        }

    async def execution_list(self, call: Call) -> Any:
        params = call.params
        market_type = self._market_type(params)

        def listing() -> list[dict[str, Any]]:
            from exchanges.models import SimFill

            fills = SimFill.objects.select_related("order", "order__parent").filter(
                order__exchange=self.exchange, order__account=call.account, order__market_type=market_type
            )
            if params.get("symbol"):
                fills = fills.filter(order__symbol=self._engine_symbol(params["symbol"], market_type))
            if params.get("orderId"):
                oid = str(params["orderId"])
                fills = fills.filter(Q(order_id=oid) | Q(order__parent_id=oid)) if oid.isdigit() else fills.none()
            limit = int(params.get("limit") or 50)
            return [self._execution(f, f.order, params["category"]) for f in fills.order_by("-pk")[:limit]]

        return {"category": params["category"], "list": await db_call(listing), "nextPageCursor": ""}

    # --- private stream -----------------------------------------------------------------

    async def private_stream(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        state: dict[str, Any] = {"account": None, "topics": set(), "silent": False, "cursor": StreamCursor()}
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
            secret = self.config.secret_of(str(key))
            ok = secret is not None and signature_ok(secret, f"GET/realtime{expires}", str(signature))
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
                state["cursor"] = await self.stream_cursor(key)
        elif op == "subscribe":
            if state["account"] is None:
                await ws.send_json({"success": False, "ret_msg": "Request not authorized", "op": "subscribe"})
                return
            state["topics"].update(msg.get("args") or [])
            await ws.send_json({"success": True, "ret_msg": "", "op": "subscribe", "conn_id": "sim", "req_id": req_id})

    async def _push(self, ws: web.WebSocketResponse, state: dict[str, Any]) -> None:
        while not ws.closed:
            await self.poll_pause()
            account = state["account"]
            if account is None:
                continue
            fault = await self.stream_faulted(account)
            if fault == SimFault.Kind.WS_DROP:
                logger.info("sim bybit stream dropped (fault)")
                await ws.close()
                return
            if fault == SimFault.Kind.WS_SILENT:
                state["silent"] = True
            topics = state["topics"]
            if state["silent"] or not topics & STREAM_TOPICS:
                continue
            events, state["cursor"] = await self.order_events(account, state["cursor"])
            for topic, data in await db_call(self._pushes, events, topics):
                await ws.send_json(
                    {"id": f"sim-{state['cursor'].seq}", "topic": topic, "creationTime": now_ms(), "data": data}
                )

    def _pushes(self, events: list[OrderEvent], topics: set[str]) -> list[tuple[str, list[dict[str, Any]]]]:
        """One "order" push per state each order went through (Bybit sends each change); per fill one
        "execution" push, then the fill's "position" (linear) and "wallet" as they stand now. A spawned
        order is reported under its conditional's id."""
        pushes: list[tuple[str, list[dict[str, Any]]]] = []
        for event in events:
            snapshot = event.order
            parent = snapshot.parent if snapshot.parent_id else None
            category = "spot" if snapshot.market_type == MarketType.SPOT else "linear"
            if parent is not None and event.kind == "NEW":
                continue  # the conditional's trigger already reported it working
            if "order" in topics or f"order.{category}" in topics:
                if parent is not None:
                    view = self._view(parent, category, stop_filter=False, shown=snapshot)
                else:
                    untriggered = snapshot.conditional and snapshot.status == OrderStatus.NEW
                    view = self._view(snapshot, category, stop_filter=untriggered, shown=snapshot)
                pushes.append(("order", [view]))
            if event.fill is None:
                continue
            if "execution" in topics or f"execution.{category}" in topics:
                pushes.append(("execution", [self._execution(event.fill, snapshot, category)]))
            if category == "linear" and topics & {"position", "position.linear"}:
                rows = self._position_rows(snapshot.account, [snapshot.symbol])
                pushes.append(("position", [{**row, "category": "linear"} for row in rows]))
            if "wallet" in topics:
                pushes.append(("wallet", [self._wallet_view(snapshot.account)]))
        return pushes
