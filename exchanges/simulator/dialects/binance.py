"""Binance spot (/api/v3) and USDⓈ-M (/fapi) REST plus the listen-key user streams, shaped like the real API."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import secrets
from datetime import timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qsl

from aiohttp import WSMsgType, web
from django.utils import timezone

from core.rawsql import row_select, rows_select
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
from exchanges.simulator.dialects.base import (
    Call,
    Dialect,
    DialectError,
    Route,
    decimal_text,
    ms,
    signature_ok,
)
from exchanges.simulator.engine import OPEN, OrderEvent, StreamCursor, TimeInForce
from exchanges.simulator.ratelimit import Charge, Verdict, Window
from exchanges.simulator.wire import db_call, now_ms

logger = logging.getLogger(__name__)

_s = decimal_text
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
    "LIMIT_MAKER": OrderType.LIMIT,
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
# Binance's timeInForce → the engine's; GTX is USDⓈ-M's post-only.
_TIF = {"GTC": TimeInForce.GTC, "IOC": TimeInForce.IOC, "FOK": TimeInForce.FOK, "GTX": TimeInForce.POST_ONLY}
_TIF_TEXT = {TimeInForce.POST_ONLY: "GTX", TimeInForce.POST_ONLY_EXPIRE: "GTX"}
_EXECUTION = {"NEW": "NEW", "TRADE": "TRADE", "CANCELED": "CANCELED", "EXPIRED": "EXPIRED", "REJECTED": "REJECTED"}
FAMILY_OF_PREFIX = {"/api/": "api", "/fapi/": "fapi", "/sapi/": "sapi", "/dapi/": "dapi"}


class BinanceError(DialectError):
    """A reply in Binance's error shape: HTTP status plus {"code": …, "msg": …}."""

    def __init__(self, status: int, code: int, msg: str, headers: dict[str, str] | None = None):
        super().__init__(msg)
        self.status, self.code, self.msg, self.headers = status, code, msg, headers or {}

    def response(self) -> web.Response:
        return web.json_response({"code": self.code, "msg": self.msg}, status=self.status, headers=self.headers)


def _symbol_id(symbol: str) -> str:
    return symbol.replace("/", "")


def _unknown_order() -> BinanceError:
    return BinanceError(400, -2011, "Unknown order sent.")


def _no_such_order() -> BinanceError:
    return BinanceError(400, -2013, "Order does not exist.")


class BinanceDialect(Dialect):
    """Binance REST/WS routes over the engine; the engine account is the API key."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.exchange = self.config.binance_exchange
        limits = self.config.rate_limits
        self.weight_windows = {
            "api": Window("REQUEST_WEIGHT", limits.binance_spot_weight_per_minute, 60),
            "fapi": Window("REQUEST_WEIGHT", limits.binance_futures_weight_per_minute, 60),
            "sapi": Window("REQUEST_WEIGHT", limits.binance_sapi_weight_per_minute, 60),
            "dapi": Window("REQUEST_WEIGHT", limits.binance_futures_weight_per_minute, 60),
        }
        self.order_windows = {
            MarketType.SPOT: (
                ("10S", Window("ORDERS", limits.binance_spot_orders_per_10s, 10)),
                ("1D", Window("ORDERS", limits.binance_spot_orders_per_day, 86400)),
            ),
            MarketType.FUTURES: (
                ("10S", Window("ORDERS", limits.binance_futures_orders_per_10s, 10)),
                ("1M", Window("ORDERS", limits.binance_futures_orders_per_minute, 60)),
            ),
        }
        self.leverage: dict[tuple[str, str], int] = {}  # (account, symbol id) → leverage set by the client

    def register(self, app: web.Application) -> None:
        r = app.router
        spot, fut = MarketType.SPOT, MarketType.FUTURES
        # Served on both /api/v3 (spot) and /fapi/v1 (USDⓈ-M): method, path, handler, fault endpoint, signed,
        # request weight (spot, USDⓈ-M), and the weight without a symbol (all symbols) where it differs.
        shared = (
            ("GET", "ping", self.ping, None, False, (1, 1), None),
            ("GET", "time", self.server_time, None, False, (1, 1), None),
            ("GET", "exchangeInfo", self.exchange_info, "load_markets", False, (20, 1), None),
            ("GET", "ticker/price", self.ticker_price, "fetch_last_prices", False, (2, 1), (4, 2)),
            ("GET", "ticker/24hr", self.ticker_24hr, "fetch_last_prices", False, (2, 1), (80, 40)),
            ("GET", "ticker/bookTicker", self.book_ticker, "fetch_last_prices", False, (2, 2), (4, 5)),
            ("POST", "order", self.order_create, "create_order", True, (1, 0), None),
            ("DELETE", "order", self.order_cancel, "cancel_order", True, (1, 1), None),
            ("GET", "order", self.order_get, "fetch_order", True, (4, 1), None),
            ("GET", "openOrders", self.open_orders, "fetch_open_orders", True, (6, 1), (80, 40)),
            ("GET", "allOrders", self.all_orders, "fetch_order", True, (20, 5), None),
        )
        for prefix, mt, i in (("/api/v3", spot, 0), ("/fapi/v1", fut, 1)):
            for method, path, fn, endpoint, signed, weight, weight_all in shared:
                extra: dict[str, Any] = {"orders": True} if (method, path) == ("POST", "order") else {}
                if weight_all:
                    extra["weight_all"] = weight_all[i]
                auth = "signed" if signed else "none"
                handler = self.route(fn, endpoint, market_type=mt, auth=auth, weight=weight[i], extra=extra)
                r.add_route(method, f"{prefix}/{path}", handler)
        sg = {"auth": "signed"}
        r.add_get("/api/v3/account", self.route(self.account, "fetch_balance", market_type=spot, weight=20, **sg))
        r.add_get("/api/v3/myTrades", self.route(self.my_trades, "fetch_order", market_type=spot, weight=20, **sg))
        r.add_delete("/api/v3/openOrders", self.route(self.cancel_all, "cancel_order", market_type=spot, **sg))
        for method in ("POST", "PUT", "DELETE"):
            r.add_route(
                method,
                "/api/v3/userDataStream",
                self.route(self.listen_key, None, market_type=spot, auth="key", weight=2),
            )
            r.add_route(method, "/fapi/v1/listenKey", self.route(self.listen_key, None, market_type=fut, auth="key"))
        r.add_get(
            "/fapi/v2/ticker/price",
            self.route(self.ticker_price, "fetch_last_prices", market_type=fut, extra={"weight_all": 2}),
        )
        for version in ("v2", "v3"):
            r.add_get(
                f"/fapi/{version}/account", self.route(self.account, "fetch_balance", market_type=fut, weight=5, **sg)
            )
            r.add_get(
                f"/fapi/{version}/balance",
                self.route(self.futures_balance, "fetch_balance", market_type=fut, weight=5, **sg),
            )
            r.add_get(
                f"/fapi/{version}/positionRisk",
                self.route(self.position_risk, "fetch_balance", market_type=fut, weight=5, **sg),
            )
        r.add_get("/fapi/v1/openOrder", self.route(self.open_order, "fetch_order", market_type=fut, **sg))
        r.add_delete("/fapi/v1/allOpenOrders", self.route(self.cancel_all, "cancel_order", market_type=fut, **sg))
        r.add_get("/fapi/v1/userTrades", self.route(self.my_trades, "fetch_order", market_type=fut, weight=5, **sg))
        r.add_post("/fapi/v1/leverage", self.route(self.leverage_set, None, market_type=fut, **sg))
        r.add_post("/fapi/v1/marginType", self.route(self.margin_type, None, market_type=fut, **sg))
        r.add_get("/fapi/v1/positionSide/dual", self.route(self.position_mode, None, market_type=fut, weight=30, **sg))
        r.add_get("/fapi/v1/leverageBracket", self.route(self.leverage_bracket, None, market_type=fut, **sg))
        r.add_post(
            "/fapi/v1/algoOrder",
            self.route(self.algo_create, "create_order", market_type=fut, weight=0, extra={"orders": True}, **sg),
        )
        r.add_delete("/fapi/v1/algoOrder", self.route(self.algo_cancel, "cancel_order", market_type=fut, **sg))
        r.add_get("/fapi/v1/algoOrder", self.route(self.algo_get, "fetch_order", market_type=fut, **sg))
        r.add_get("/fapi/v1/openAlgoOrders", self.route(self.algo_open, "fetch_open_orders", market_type=fut, **sg))
        r.add_get("/fapi/v1/allAlgoOrders", self.route(self.algo_all, "fetch_order", market_type=fut, weight=5, **sg))
        # What default ccxt reads while loading markets: currencies (signed), and the coin-margined
        # and options catalogues, which the simulator lists empty.
        r.add_get("/sapi/v1/capital/config/getall", self.route(self.currencies, None, weight=10, **sg))
        r.add_get("/sapi/v1/margin/allPairs", self.route(self.empty_list, None, **sg))
        r.add_get("/sapi/v1/margin/isolated/allPairs", self.route(self.empty_list, None, weight=10, **sg))
        r.add_get("/dapi/v1/exchangeInfo", self.route(self.empty_exchange_info, None))
        r.add_get("/eapi/v1/exchangeInfo", self.route(self.empty_options_info, None))
        r.add_get("/ws/{listen_key}", self.user_stream)
        r.add_get("/ws", self.user_stream)
        r.add_get("/stream", self.user_stream)

    # --- hooks -------------------------------------------------------------------------

    async def parse(self, request: web.Request, body: str) -> dict[str, Any]:
        params = dict(parse_qsl(request.query_string, keep_blank_values=True))
        params.update(dict(parse_qsl(body, keep_blank_values=True)))
        return params

    def authenticate(self, request: web.Request, body: str, route: Route) -> str:
        key = request.headers.get("X-MBX-APIKEY", "")
        secret = self.config.secret_of(key)
        if secret is None:
            raise BinanceError(401, -2015, "Invalid API-key, IP, or permissions for action.")
        if route.auth != "signed":
            return key
        # totalParams is the query string followed by the body; the signature is the last parameter.
        total = request.query_string + body
        payload, sep, signature = total.rpartition("&signature=")
        if not sep:
            raise BinanceError(
                400, -1102, "Mandatory parameter 'signature' was not sent, was empty/null, or malformed."
            )
        if not signature_ok(secret, payload, signature.split("&")[0]):
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

    def fault_reply(self, kind: str) -> web.Response:
        if kind == SimFault.Kind.HTTP_429:
            return web.json_response(
                {
                    "code": -1003,
                    "msg": "Too many requests; current limit of IP(127.0.0.1) is 2400 requests per minute.",
                },
                status=429,
                headers={"Retry-After": "1"},  # as the real 429s: the client must honour it
            )
        if kind == SimFault.Kind.MAINTENANCE:
            return web.json_response({"code": 1, "msg": "System is under maintenance."}, status=503)
        return web.json_response(
            {"code": -1000, "msg": "An unknown error occured while processing the request."}, status=500
        )

    @staticmethod
    def _family(call: Call) -> str:
        path = call.request.path
        return next((f for prefix, f in FAMILY_OF_PREFIX.items() if path.startswith(prefix)), "api")

    def rate_charges(self, call: Call) -> list[Charge]:
        family = self._family(call)
        route = call.route
        weight = route.weight
        if "weight_all" in route.extra and not call.params.get("symbol"):
            weight = route.extra["weight_all"]
        ip = call.request.remote or "unknown"
        charges = [Charge(f"ip:{ip}:{family}", self.weight_windows[family], weight)]
        if route.extra.get("orders") and call.account and call.market_type is not None:
            key = f"account:{call.account}:{call.market_type}"
            charges += [Charge(key, window, 1) for _, window in self.order_windows[call.market_type]]
        return charges

    def rate_headers(self, verdict: Verdict | None, call: Call) -> dict[str, str]:
        if verdict is None or not verdict.usages:
            return {}
        headers = {"X-MBX-USED-WEIGHT-1M": str(verdict.usages[0].used)}
        if call.route.extra.get("orders") and call.market_type is not None:
            for suffix, window in self.order_windows[call.market_type]:
                usage = verdict.usage_of(window)
                if usage is not None:
                    headers[f"X-MBX-ORDER-COUNT-{suffix}"] = str(usage.used)
        return headers

    def rate_refused(self, verdict: Verdict, call: Call) -> web.Response:
        retry = {"Retry-After": str(max(1, math.ceil(verdict.retry_after)))}
        ip = call.request.remote or "unknown"
        if verdict.banned_until is not None:
            return BinanceError(
                418,
                -1003,
                f"Way too much request weight used; IP banned until {int(verdict.banned_until * 1000)}. "
                "Please use WebSocket Streams for live updates to avoid bans.",
                retry,
            ).response()
        over = verdict.over
        if over is not None and over.name == "ORDERS":
            unit = {10: "TEN_SECONDS", 60: "MINUTE", 86400: "DAY"}.get(over.seconds, f"{over.seconds}S")
            return BinanceError(
                429, -1015, f"Too many new orders; current limit is {over.limit} orders per {unit}.", retry
            ).response()
        limit = over.limit if over is not None else 0
        return BinanceError(
            429,
            -1003,
            f"Too many requests; current limit of IP({ip}) is {limit} requests per minute. "
            "Please use WebSocket Streams for live updates to avoid polling the API.",
            retry,
        ).response()

    def engine_error(self, exc: GatewayError, call: Call) -> BinanceError:
        futures = call.market_type == MarketType.FUTURES
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
            return _unknown_order() if exc.code == "-2011" else _no_such_order()
        if exc.code == "-1121":
            return BinanceError(400, -1121, "Invalid symbol.")
        if exc.code == "-5022":
            if futures:
                return BinanceError(
                    400,
                    -5022,
                    "Due to the order could not be executed as maker, the Post Only order will be rejected. "
                    "The order will not be recorded in the order history",
                )
            return BinanceError(400, -2010, "Order would immediately match and take.")
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

    @staticmethod
    def _mt(call: Call) -> MarketType:
        assert call.market_type is not None  # every Binance order route names its market
        return call.market_type

    # --- market data -------------------------------------------------------------------

    async def ping(self, call: Call) -> Any:
        return {}

    async def server_time(self, call: Call) -> Any:
        return {"serverTime": now_ms()}

    async def empty_list(self, call: Call) -> Any:
        return []

    async def empty_exchange_info(self, call: Call) -> Any:
        return {"timezone": "UTC", "serverTime": now_ms(), "rateLimits": [], "exchangeFilters": [], "symbols": []}

    async def empty_options_info(self, call: Call) -> Any:
        return {
            "timezone": "UTC",
            "serverTime": now_ms(),
            "optionContracts": [],
            "optionAssets": [],
            "optionSymbols": [],
        }

    async def currencies(self, call: Call) -> Any:
        coins = await self.listed_coins()
        network = {
            "network": "SIM",
            "coin": "",
            "name": "Simulated",
            "depositEnable": False,
            "withdrawEnable": False,
            "withdrawFee": "0",
            "withdrawMin": "0",
            "withdrawMax": "0",
            "withdrawIntegerMultiple": "0.00000001",
            "isDefault": True,
            "minConfirm": 1,
            "busy": False,
        }
        return [
            {
                "coin": c,
                "name": c,
                "depositAllEnable": False,
                "withdrawAllEnable": False,
                "free": "0",
                "locked": "0",
                "freeze": "0",
                "withdrawing": "0",
                "ipoing": "0",
                "ipoable": "0",
                "storage": "0",
                "isLegalMoney": False,
                "trading": True,
                "networkList": [{**network, "coin": c}],
            }
            for c in coins
        ]

    def _rate_limits(self, market_type: MarketType) -> list[dict[str, Any]]:
        family = "api" if market_type == MarketType.SPOT else "fapi"
        windows = [("REQUEST_WEIGHT", self.weight_windows[family])] + [
            ("ORDERS", w) for _, w in self.order_windows[market_type]
        ]
        units = {10: ("SECOND", 10), 60: ("MINUTE", 1), 86400: ("DAY", 1)}
        return [
            {
                "rateLimitType": kind,
                "interval": units[w.seconds][0],
                "intervalNum": units[w.seconds][1],
                "limit": w.limit,
            }
            for kind, w in windows
        ]

    async def exchange_info(self, call: Call) -> Any:
        market_type = self._mt(call)
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
                        "quoteOrderQtyMarketAllowed": True,
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
        return {
            "timezone": "UTC",
            "serverTime": now_ms(),
            "rateLimits": self._rate_limits(market_type),
            "exchangeFilters": [],
            "symbols": symbols,
        }

    async def _prices(self, call: Call, *, ago: timedelta | None = None) -> dict[str, Decimal]:
        market_type = self._mt(call)
        symbol = call.params.get("symbol")
        wanted = [self._engine_symbol(symbol, market_type)] if symbol else None
        if call.params.get("symbols"):
            ids = json.loads(call.params["symbols"])
            wanted = [self._engine_symbol(i, market_type) for i in ids]
        now = timezone.now() - (ago or timedelta(0))
        return await db_call(self.engine.prices_last, self.exchange, market_type, wanted, now=now)

    async def ticker_price(self, call: Call) -> Any:
        prices = await self._prices(call)
        rows = []
        for sym, price in prices.items():
            row: dict[str, Any] = {"symbol": _symbol_id(sym), "price": _s(price)}
            if call.market_type == MarketType.FUTURES:
                row["time"] = now_ms()
            rows.append(row)
        return rows[0] if call.params.get("symbol") else rows

    async def ticker_24hr(self, call: Call) -> Any:
        """Last price now against the price path 24 h ago; the simulator keeps no trade tape, so volumes are 0."""
        last, day_ago = await self._prices(call), await self._prices(call, ago=timedelta(days=1))
        now = now_ms()
        rows = []
        for sym, price in last.items():
            open_ = day_ago.get(sym, price)
            change = price - open_
            row: dict[str, Any] = {
                "symbol": _symbol_id(sym),
                "priceChange": _s(change),
                "priceChangePercent": _s((change / open_ * 100).quantize(Decimal("0.001"))),
                "weightedAvgPrice": _s(price),
                "lastPrice": _s(price),
                "lastQty": "0",
                "openPrice": _s(open_),
                "highPrice": _s(max(price, open_)),
                "lowPrice": _s(min(price, open_)),
                "volume": "0",
                "quoteVolume": "0",
                "openTime": now - 86_400_000,
                "closeTime": now,
                "firstId": 0,
                "lastId": 0,
                "count": 0,
            }
            if call.market_type == MarketType.SPOT:
                row.update(
                    {
                        "prevClosePrice": _s(open_),
                        "bidPrice": _s(price),
                        "bidQty": "0",
                        "askPrice": _s(price),
                        "askQty": "0",
                    }
                )
            rows.append(row)
        return rows[0] if call.params.get("symbol") else rows

    async def book_ticker(self, call: Call) -> Any:
        prices = await self._prices(call)
        rows = [
            {
                "symbol": _symbol_id(s),
                "bidPrice": _s(p),
                "bidQty": "0",
                "askPrice": _s(p),
                "askQty": "0",
                "time": now_ms(),
            }
            for s, p in prices.items()
        ]
        return rows[0] if call.params.get("symbol") else rows

    # --- account -----------------------------------------------------------------------

    def _positions(self, account: str, *, all_symbols: bool) -> list[dict[str, Any]]:
        """USDⓈ-M positionRisk rows: the engine's positions marked at the last price (v2: every symbol)."""
        symbols = None if all_symbols else self.held_symbols(account)
        rows = []
        for position in self.marked_positions(account, symbols):
            symbol, qty, entry, mark = position.symbol, position.quantity, position.entry_price, position.mark_price
            sid = _symbol_id(symbol)
            leverage = self.leverage.get((account, sid), 20)
            rows.append(
                {
                    "symbol": sid,
                    "positionAmt": _s(qty),
                    "entryPrice": _s(entry),
                    "breakEvenPrice": _s(entry),
                    "markPrice": _s(mark),
                    "unRealizedProfit": _s(position.unrealized) if qty else "0",
                    "liquidationPrice": "0",
                    "leverage": str(leverage),
                    "maxNotionalValue": "1000000",
                    "marginType": "cross",
                    "isolatedMargin": "0",
                    "isAutoAddMargin": "false",
                    "positionSide": "BOTH",
                    "notional": _s(qty * mark),
                    "isolatedWallet": "0",
                    "initialMargin": _s(abs(qty * mark) / leverage),
                    "maintMargin": "0",
                    "updateTime": now_ms(),
                }
            )
        return rows

    async def account(self, call: Call) -> Any:
        market_type = self._mt(call)
        balance = await db_call(self.engine.balance_get, self.exchange, call.account, market_type)
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
        positions = await db_call(self._positions, call.account, all_symbols=False)
        unrealized = sum((Decimal(p["unRealizedProfit"]) for p in positions), Decimal(0))
        wallet = sum((a.total for a in balance.assets.values()), Decimal(0))
        return {
            "totalWalletBalance": _s(wallet),
            "totalUnrealizedProfit": _s(unrealized),
            "totalMarginBalance": _s(wallet + unrealized),
            "availableBalance": _s(sum((a.free for a in balance.assets.values()), Decimal(0))),
            "assets": [self._futures_asset(a) for a in balance.assets.values()],
            "positions": positions,
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

    async def futures_balance(self, call: Call) -> Any:
        balance = await db_call(self.engine.balance_get, self.exchange, call.account, self._mt(call))
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

    async def position_risk(self, call: Call) -> Any:
        v2 = "/v2/" in call.request.path  # v2 lists every symbol, v3 only open positions
        rows = await db_call(self._positions, call.account, all_symbols=v2)
        if call.params.get("symbol"):
            rows = [r for r in rows if r["symbol"] == call.params["symbol"]]
        return rows

    async def leverage_set(self, call: Call) -> Any:
        symbol = self._engine_symbol(call.params.get("symbol"), MarketType.FUTURES)
        try:
            leverage = int(call.params.get("leverage", ""))
        except ValueError:
            raise BinanceError(400, -1102, "Mandatory parameter 'leverage' was not sent, was empty/null, or malformed.")
        if not 1 <= leverage <= 125:
            raise BinanceError(400, -4028, f"Leverage {leverage} is not valid")
        self.leverage[(call.account, _symbol_id(symbol))] = leverage
        return {"leverage": leverage, "maxNotionalValue": "1000000", "symbol": _symbol_id(symbol)}

    async def margin_type(self, call: Call) -> Any:
        if str(call.params.get("marginType", "")).upper() == "CROSSED":
            raise BinanceError(400, -4046, "No need to change margin type.")
        raise BinanceError(400, -4047, "Margin type cannot be changed if there exists position.")

    async def position_mode(self, call: Call) -> Any:
        return {"dualSidePosition": False}

    async def leverage_bracket(self, call: Call) -> Any:
        rules = await db_call(self.engine.market_list, self.exchange, MarketType.FUTURES)
        bracket = {
            "bracket": 1,
            "initialLeverage": 125,
            "notionalCap": 1000000,
            "notionalFloor": 0,
            "maintMarginRatio": 0.004,
            "cum": 0.0,
        }
        rows = [{"symbol": _symbol_id(r.symbol), "brackets": [bracket]} for r in rules]
        if call.params.get("symbol"):
            rows = [r for r in rows if r["symbol"] == call.params["symbol"]]
            return rows[0] if rows else []
        return rows

    # --- orders: views ------------------------------------------------------------------

    def _rows(self, account: str, market_type: MarketType, **filters: Any) -> list[SimOrder]:
        self.engine.match(self.exchange)
        orders = SimOrder.objects.filter(exchange=self.exchange, account=account, market_type=market_type, **filters)
        return list(orders.select_related("parent").order_by("pk"))

    @staticmethod
    def _tif(order: SimOrder) -> str:
        tif = TimeInForce(order.time_in_force or "GTC")
        return _TIF_TEXT.get(tif, tif.value)

    def _order_view(self, order: SimOrder, market_type: MarketType, shown: SimOrder | None = None) -> dict[str, Any]:
        """A regular order; on spot a conditional order is one order whose fills are its child's."""
        working = True
        child = None
        if shown is None:
            shown = order
            if order.conditional:
                child = self.child_of(order)
                working = child is not None
                if child is not None:
                    shown = child
        status = shown.status
        if order.conditional and child is None and status == OrderStatus.TRIGGERED:
            status = OrderStatus.NEW.value
        filled = shown.filled_quantity
        post_only = order.time_in_force == TimeInForce.POST_ONLY
        view: dict[str, Any] = {
            "symbol": _symbol_id(order.symbol),
            "orderId": order.pk,
            "clientOrderId": order.client_order_id,
            "price": _s(order.price),
            "origQty": _s(order.quantity),
            "executedQty": _s(filled),
            "status": status,
            "timeInForce": self._tif(order),
            "side": order.side,
            "stopPrice": _s(order.stop_price),
            "time": ms(order.created_at),
            "updateTime": ms(max(order.updated_at, shown.updated_at)),
        }
        if market_type == MarketType.SPOT:
            spot_type = "LIMIT_MAKER" if post_only else _SPOT_TYPE[OrderType(order.order_type)]
            if post_only:
                view["timeInForce"] = "GTC"
            view.update(
                {
                    "orderListId": -1,
                    "cummulativeQuoteQty": _s(shown.cost),
                    "type": spot_type,
                    "icebergQty": "0",
                    "isWorking": working,
                    "workingTime": ms(shown.created_at) if working else -1,
                    "origQuoteOrderQty": _s(order.quote_quantity),
                    "selfTradePreventionMode": "EXPIRE_MAKER",
                }
            )
        else:
            order_type = _FUTURES_TYPE[OrderType(order.order_type)]
            view.update(
                {
                    "avgPrice": _s(shown.cost / filled) if filled else "0",
                    "cumQuote": _s(shown.cost),
                    "cumQty": _s(filled),
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
        child = self.child_of(order)
        status = OrderStatus(order.status)
        if status == OrderStatus.NEW:
            child = None  # a snapshot from before the trigger
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
            "createTime": ms(order.created_at),
            "updateTime": ms(order.updated_at),
            "triggerTime": ms(child.created_at) if child is not None else 0,
            "goodTillDate": 0,
        }

    def _find_row(
        self, account: str, market_type: MarketType, params: dict[str, str], *, algo: bool, missing: BinanceError
    ) -> SimOrder:
        symbol = self._engine_symbol(params.get("symbol"), market_type)
        filters: dict[str, Any] = {"symbol": symbol}
        id_key, cid_key = ("algoId", "clientAlgoId") if algo else ("orderId", "origClientOrderId")
        if params.get(id_key):
            if not params[id_key].isdigit():
                raise missing
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
            raise missing
        return rows[0]

    # --- orders: handlers ---------------------------------------------------------------

    def _request(
        self, params: dict[str, str], market_type: MarketType, *, stop_key: str, cid_key: str
    ) -> tuple[OrderRequest, TimeInForce, bool]:
        raw_type = params.get("type", "").upper()
        order_type = _TO_ENGINE_TYPE.get(raw_type)
        if order_type is None or (raw_type == "LIMIT_MAKER" and market_type == MarketType.FUTURES):
            raise BinanceError(400, -1116, "Invalid orderType.")
        side = params.get("side", "").upper()
        if side not in ("BUY", "SELL"):
            raise BinanceError(400, -1117, "Invalid side.")
        raw_tif = params.get("timeInForce", "GTC").upper()
        tif = _TIF.get(raw_tif)
        if tif is None or (tif == TimeInForce.POST_ONLY and market_type == MarketType.SPOT):
            raise BinanceError(400, -1115, "Invalid timeInForce.")
        if raw_type == "LIMIT_MAKER":
            tif = TimeInForce.POST_ONLY
        elif order_type != OrderType.LIMIT:
            tif = TimeInForce.GTC
        quote_order = bool(params.get("quoteOrderQty")) and market_type == MarketType.SPOT
        if quote_order and order_type != OrderType.MARKET:
            raise BinanceError(400, -1106, "Parameter 'quoteOrderQty' sent when not required.")
        try:
            quantity = Decimal(params["quoteOrderQty"] if quote_order else params.get("quantity", ""))
            price = Decimal(params["price"]) if params.get("price") else None
            stop = Decimal(params[stop_key]) if params.get(stop_key) else None
            request = OrderRequest(
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
        return request, tif, quote_order

    async def order_create(self, call: Call) -> Any:
        market_type, params = self._mt(call), call.params
        if market_type == MarketType.FUTURES and params.get("type", "").upper() not in ("LIMIT", "MARKET"):
            # Since the algo migration USDⓈ-M refuses conditional types on /fapi/v1/order.
            raise BinanceError(
                400,
                -4120,
                "Order type not supported for this endpoint. Please use the Algo Order API endpoints instead.",
            )
        request, tif, quote_order = self._request(params, market_type, stop_key="stopPrice", cid_key="newClientOrderId")
        # USDⓈ-M answers with the order as accepted (NEW, nothing executed) whatever newOrderRespType asks
        # (ccxt sends RESULT): matching is asynchronous there, and fills follow on the stream and on lookup.
        # Spot answers FULL (final state and fills) unless asked for ACK or RESULT.
        default = "ACK" if market_type == MarketType.FUTURES else "FULL"
        kind = params.get("newOrderRespType", default).upper()

        def create() -> dict[str, Any]:  # one trip to a database thread for the order and its reply
            order = self.engine.order_create_row(
                self.exchange, call.account, request, time_in_force=tif, quote_order=quote_order
            )
            return self._create_reply(order, market_type, kind)

        return await db_call(create)

    def _create_reply(self, order: SimOrder, market_type: MarketType, kind: str) -> dict[str, Any]:
        """The reply to a create, from the order's row as the create committed it: on USDⓈ-M as accepted (its
        values are the request's, validated), on spot as read back (amounts as the database keeps them)."""
        if market_type == MarketType.FUTURES:
            accepted = SimOrder(**{f.attname: getattr(order, f.attname) for f in SimOrder._meta.concrete_fields})
            accepted.status, accepted.filled_quantity, accepted.cost = OrderStatus.NEW.value, Decimal(0), Decimal(0)
            accepted.updated_at = order.created_at
            return self._order_view(accepted, market_type, shown=accepted)
        stored = row_select(SimOrder, "id = %s", [order.pk])
        if stored is None:
            raise SimOrder.DoesNotExist(f"sim order {order.pk} of {self.exchange}")
        order = stored
        view = self._order_view(order, market_type)
        view["transactTime"] = view["updateTime"]
        if kind == "ACK":
            return {k: view[k] for k in ("symbol", "orderId", "orderListId", "clientOrderId", "transactTime")}
        if kind == "FULL":
            view["fills"] = [
                {
                    "price": _s(f.price),
                    "qty": _s(f.quantity),
                    "commission": _s(f.fee),
                    "commissionAsset": f.fee_currency,
                    "tradeId": f.pk,
                }
                for f in (self.child_of(order) or order).fills.order_by("pk")
            ]
        return view

    def _cancel_row(self, account: str, market_type: MarketType, order: SimOrder) -> dict[str, Any]:
        try:
            self.cancel_as_shown(account, market_type, order)
        except NotFound:
            raise _unknown_order()
        order.refresh_from_db()
        view = self._order_view(order, market_type)
        view["origClientOrderId"] = order.client_order_id
        return view

    async def order_cancel(self, call: Call) -> Any:
        market_type = self._mt(call)

        def cancel() -> dict[str, Any]:
            # Binance answers −2011 "Unknown order sent." for any cancel it cannot do, unknown ids included.
            order = self._find_row(call.account, market_type, call.params, algo=False, missing=_unknown_order())
            return self._cancel_row(call.account, market_type, order)

        return await db_call(cancel)

    async def cancel_all(self, call: Call) -> Any:
        market_type = self._mt(call)
        symbol = self._engine_symbol(call.params.get("symbol"), market_type)

        def cancel() -> Any:
            extra = {"conditional": False} if market_type == MarketType.FUTURES else {"parent__isnull": True}
            rows = self._rows(call.account, market_type, symbol=symbol, **extra)
            live = [o for o in rows if self._order_view(o, market_type)["status"] in ("NEW", "PARTIALLY_FILLED")]
            if market_type == MarketType.FUTURES:
                for order in live:
                    self._cancel_row(call.account, market_type, order)
                return {"code": 200, "msg": "The operation of cancel all open order is done."}
            if not live:
                raise _unknown_order()
            return [self._cancel_row(call.account, market_type, order) for order in live]

        return await db_call(cancel)

    async def order_get(self, call: Call) -> Any:
        market_type = self._mt(call)

        def get() -> dict[str, Any]:
            order = self._find_row(call.account, market_type, call.params, algo=False, missing=_no_such_order())
            return self._order_view(order, market_type)

        return await db_call(get)

    async def open_order(self, call: Call) -> Any:
        view = await self.order_get(call)
        if view["status"] not in ("NEW", "PARTIALLY_FILLED"):
            raise BinanceError(400, -2013, "Order does not exist.")
        return view

    async def open_orders(self, call: Call) -> Any:
        market_type, params = self._mt(call), call.params

        def listing() -> list[dict[str, Any]]:
            filters: dict[str, Any] = {}
            if params.get("symbol"):
                filters["symbol"] = self._engine_symbol(params["symbol"], market_type)
            if market_type == MarketType.FUTURES:
                # Plain SQL (core.rawsql): reconciliation lists every account's open orders each run.
                self.engine.match(self.exchange)
                where = "exchange = %s AND account = %s AND market_type = %s AND NOT conditional AND status IN "
                where += "(" + ", ".join(["%s"] * len(OPEN)) + ")"
                key = [self.exchange, call.account, market_type.value, *OPEN]
                if "symbol" in filters:
                    where, key = where + " AND symbol = %s", [*key, filters["symbol"]]
                rows = rows_select(SimOrder, where, key, order_by="id")
                return [self._order_view(o, market_type) for o in rows]
            views = [
                self._order_view(o, market_type)
                for o in self._rows(call.account, market_type, parent__isnull=True, **filters)
            ]
            return [v for v in views if v["status"] in ("NEW", "PARTIALLY_FILLED")]

        return await db_call(listing)

    async def all_orders(self, call: Call) -> Any:
        market_type, params = self._mt(call), call.params

        def listing() -> list[dict[str, Any]]:
            symbol = self._engine_symbol(params.get("symbol"), market_type)
            extra = {"conditional": False} if market_type == MarketType.FUTURES else {"parent__isnull": True}
            rows = self._rows(call.account, market_type, symbol=symbol, **extra)
            limit = int(params.get("limit") or 500)
            return [self._order_view(o, market_type) for o in rows][-limit:]

        return await db_call(listing)

    async def my_trades(self, call: Call) -> Any:
        market_type, params = self._mt(call), call.params
        symbol = self._engine_symbol(params.get("symbol"), market_type)

        def listing() -> list[dict[str, Any]]:
            fills = self.engine.fill_list(
                self.exchange, call.account, market_type, symbol=symbol, exchange_order_id=params.get("orderId")
            )
            if params.get("fromId"):
                fills = [f for f in fills if f.fill_id >= int(params["fromId"])]
            rows = []
            for f in fills[-int(params.get("limit") or 500) :]:
                row: dict[str, Any] = {
                    "symbol": _symbol_id(f.symbol),
                    "id": f.fill_id,
                    "orderId": int(f.exchange_order_id),
                    "price": _s(f.price),
                    "qty": _s(f.quantity),
                    "quoteQty": _s(f.price * f.quantity),
                    "commission": _s(f.fee),
                    "commissionAsset": f.fee_currency,
                    "time": ms(f.created_at),
                }
                if market_type == MarketType.SPOT:
                    row.update(
                        {"orderListId": -1, "isBuyer": f.side == Side.BUY, "isMaker": f.is_maker, "isBestMatch": True}
                    )
                else:
                    row.update(
                        {
                            "side": f.side.value,
                            "buyer": f.side == Side.BUY,
                            "maker": f.is_maker,
                            "realizedPnl": "0",
                            "positionSide": "BOTH",
                            "marginAsset": f.fee_currency,
                        }
                    )
                rows.append(row)
            return rows

        return await db_call(listing)

    async def algo_create(self, call: Call) -> Any:
        params, market_type = call.params, self._mt(call)
        if params.get("algoType", "").upper() != "CONDITIONAL":
            raise BinanceError(400, -1102, "Mandatory parameter 'algoType' was not sent, was empty/null, or malformed.")
        request, _, _ = self._request(params, market_type, stop_key="triggerPrice", cid_key="clientAlgoId")
        if not request.conditional:
            raise BinanceError(400, -1116, "Invalid orderType.")
        state = await db_call(self.engine.order_create, self.exchange, call.account, request)

        def view() -> dict[str, Any]:
            return self._algo_view(SimOrder.objects.get(pk=int(state.exchange_order_id)))

        return await db_call(view)

    async def algo_cancel(self, call: Call) -> Any:
        market_type = self._mt(call)

        def cancel() -> dict[str, Any]:
            order = self._find_row(call.account, market_type, call.params, algo=True, missing=_unknown_order())
            try:
                self.engine.order_cancel(
                    self.exchange,
                    call.account,
                    symbol=order.symbol,
                    market_type=market_type,
                    exchange_order_id=str(order.pk),
                    conditional=True,
                )
            except NotFound:
                raise _unknown_order()
            return {"algoId": order.pk, "clientAlgoId": order.client_order_id, "code": "200", "msg": "success"}

        return await db_call(cancel)

    async def algo_get(self, call: Call) -> Any:
        market_type = self._mt(call)
        return await db_call(
            lambda: self._algo_view(
                self._find_row(call.account, market_type, call.params, algo=True, missing=_no_such_order())
            )
        )

    async def algo_open(self, call: Call) -> Any:
        market_type, params = self._mt(call), call.params

        def listing() -> list[dict[str, Any]]:
            filters: dict[str, Any] = {"conditional": True, "status": OrderStatus.NEW.value}
            if params.get("symbol"):
                filters["symbol"] = self._engine_symbol(params["symbol"], market_type)
            return [self._algo_view(o) for o in self._rows(call.account, market_type, **filters)]

        return await db_call(listing)

    async def algo_all(self, call: Call) -> Any:
        market_type = self._mt(call)

        def listing() -> list[dict[str, Any]]:
            symbol = self._engine_symbol(call.params.get("symbol"), market_type)
            return [self._algo_view(o) for o in self._rows(call.account, market_type, conditional=True, symbol=symbol)]

        return await db_call(listing)

    # --- user data streams --------------------------------------------------------------

    async def listen_key(self, call: Call) -> Any:
        """One listen key per (account, market): POST returns the live one, PUT keeps it alive, DELETE ends it."""
        keys, markets, market_type = self.config.listen_keys, self.config.listen_key_markets, self._mt(call)
        mine = [k for k, a in keys.items() if a == call.account and markets.get(k, MarketType.FUTURES) == market_type]
        method = call.request.method
        if method == "POST":
            key = mine[0] if mine else secrets.token_urlsafe(48)
            keys[key], markets[key] = call.account, market_type
            return {"listenKey": key}
        if method == "DELETE":
            for key in mine:
                keys.pop(key, None)
                markets.pop(key, None)
            return {}
        wanted = call.params.get("listenKey")
        if not mine or (wanted and wanted not in mine):
            raise BinanceError(400, -1125, "This listenKey does not exist.")
        return {}

    async def user_stream(self, request: web.Request) -> web.StreamResponse:
        """/ws/<listenKey>, /stream?streams=<listenKey>, or /ws and /stream with SUBSCRIBE [listenKey].

        On /stream every event is wrapped as {"stream": <listenKey>, "data": <event>}.
        """
        combined = request.path.startswith("/stream")
        keys = [request.match_info["listen_key"]] if "listen_key" in request.match_info else []
        keys += [k for k in request.query.get("streams", "").split("/") if k]
        unknown = [k for k in keys if k not in self.config.listen_keys]
        if unknown:
            return web.json_response({"code": -1125, "msg": "This listenKey does not exist."}, status=400)
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        subscribed: dict[str, StreamCursor] = {}
        for key in keys:
            subscribed[key] = await self.stream_cursor(self.config.listen_keys[key])
        reader = asyncio.ensure_future(self._stream_requests(ws, subscribed))
        silent: set[str] = set()
        try:
            while not ws.closed and not reader.done():
                for key, cursor in list(subscribed.items()):
                    account = self.config.listen_keys.get(key)
                    if account is None:
                        continue  # deleted: a real stream would get listenKeyExpired and close
                    fault = await self.stream_faulted(account)
                    if fault == SimFault.Kind.WS_DROP:
                        logger.info("sim binance stream of %s dropped (fault)", account[:4])
                        return ws
                    if fault == SimFault.Kind.WS_SILENT:
                        silent.add(key)
                    if key in silent:
                        continue
                    market_type = self.config.listen_key_markets.get(key, MarketType.FUTURES)
                    events, subscribed[key] = await self.order_events(account, cursor, market_type)
                    for payload in await db_call(self._stream_payloads, account, market_type, events):
                        await ws.send_str(json.dumps({"stream": key, "data": payload} if combined else payload))
                await self.poll_pause()
        finally:
            reader.cancel()
            await ws.close()
        return ws

    async def _stream_requests(self, ws: web.WebSocketResponse, subscribed: dict[str, StreamCursor]) -> None:
        """Client frames: SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS; market-data names are accepted and idle."""
        async for message in ws:
            if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
                break
            if message.type != WSMsgType.TEXT:
                continue
            try:
                frame = json.loads(message.data)
                method, params, req_id = frame.get("method"), list(frame.get("params") or []), frame.get("id")
            except (json.JSONDecodeError, AttributeError):
                await ws.send_json({"error": {"code": 3, "msg": "Invalid JSON"}})
                continue
            if method == "SUBSCRIBE":
                for name in params:
                    if name in self.config.listen_keys and name not in subscribed:
                        subscribed[name] = await self.stream_cursor(self.config.listen_keys[name])
                await ws.send_json({"result": None, "id": req_id})
            elif method == "UNSUBSCRIBE":
                for name in params:
                    subscribed.pop(name, None)
                await ws.send_json({"result": None, "id": req_id})
            elif method == "LIST_SUBSCRIPTIONS":
                await ws.send_json({"result": list(subscribed), "id": req_id})
            else:
                await ws.send_json(
                    {"error": {"code": 2, "msg": f"Invalid request: unknown method {method}"}, "id": req_id}
                )

    def _stream_payloads(self, account: str, market_type: MarketType, events: list[OrderEvent]) -> list[dict[str, Any]]:
        payloads: list[dict[str, Any]] = []
        for event in events:
            if market_type == MarketType.FUTURES:
                payloads.append(self._futures_event(event))
                if event.kind == "TRADE":
                    payloads.append(self._futures_account_update(account, event))
            else:
                payload = self._spot_event(event)
                if payload is not None:
                    payloads.append(payload)
                if event.kind == "TRADE":
                    payloads.append(self._spot_account_position(account))
        return payloads

    def _futures_event(self, event: OrderEvent) -> dict[str, Any]:
        order, fill, now = event.order, event.fill, now_ms()
        if order.conditional:
            algo = self._algo_view(order)
            return {
                "e": "ALGO_UPDATE",
                "E": now,
                "T": ms(event.at),
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
        view = self._order_view(order, MarketType.FUTURES, shown=order)
        return {
            "e": "ORDER_TRADE_UPDATE",
            "E": now,
            "T": ms(event.at),
            "o": {
                "s": view["symbol"],
                "c": view["clientOrderId"],
                "S": view["side"],
                "o": view["type"],
                "f": view["timeInForce"],
                "q": view["origQty"],
                "p": view["price"],
                "ap": view["avgPrice"],
                "sp": view["stopPrice"],
                "x": _EXECUTION.get(event.kind, "TRADE"),
                "X": view["status"],
                "i": view["orderId"],
                "l": _s(fill.quantity) if fill else "0",
                "z": view["executedQty"],
                "L": _s(fill.price) if fill else "0",
                "n": _s(fill.fee) if fill else "0",
                "N": fill.fee_currency if fill else "USDT",
                "T": ms(event.at),
                "t": fill.pk if fill else 0,
                "b": "0",
                "a": "0",
                "m": bool(fill and fill.is_maker),
                "R": view["reduceOnly"],
                "wt": "CONTRACT_PRICE",
                "ps": "BOTH",
                "cp": False,
                "ot": view["origType"],
                "rp": "0",
                "V": "EXPIRE_MAKER",
                "pm": "NONE",
                "gtd": 0,
            },
        }

    def _futures_account_update(self, account: str, event: OrderEvent) -> dict[str, Any]:
        """ACCOUNT_UPDATE after a fill: the balances and the position of the order's symbol as they stand now."""
        balance = self.engine.balance_get(self.exchange, account, MarketType.FUTURES)
        sid = _symbol_id(event.order.symbol)
        positions = [p for p in self._positions(account, all_symbols=True) if p["symbol"] == sid]
        now = now_ms()
        return {
            "e": "ACCOUNT_UPDATE",
            "E": now,
            "T": ms(event.at),
            "a": {
                "m": "ORDER",
                "B": [
                    {"a": a.currency, "wb": _s(a.total), "cw": _s(a.total), "bc": "0"} for a in balance.assets.values()
                ],
                "P": [
                    {
                        "s": p["symbol"],
                        "pa": p["positionAmt"],
                        "ep": p["entryPrice"],
                        "bep": p["breakEvenPrice"],
                        "cr": "0",
                        "up": p["unRealizedProfit"],
                        "mt": "cross",
                        "iw": "0",
                        "ps": "BOTH",
                    }
                    for p in positions
                ],
            },
        }

    def _spot_event(self, event: OrderEvent) -> dict[str, Any] | None:
        """executionReport; a stop's spawned order is reported under its parent, as spot shows one order."""
        order, fill = event.order, event.fill
        parent = order.parent if order.parent_id else None
        if parent is not None and event.kind == "NEW":
            return None  # the parent's TRIGGERED already said it is working
        shown_as = parent or order
        view = self._order_view(shown_as, MarketType.SPOT, shown=order)
        kind = "NEW" if event.kind == "TRIGGERED" else event.kind
        status = "NEW" if event.kind == "TRIGGERED" else order.status
        return {
            "e": "executionReport",
            "E": now_ms(),
            "s": view["symbol"],
            "c": view["clientOrderId"],
            "S": view["side"],
            "o": view["type"],
            "f": view["timeInForce"],
            "q": view["origQty"],
            "p": view["price"],
            "P": view["stopPrice"],
            "F": "0.00000000",
            "g": -1,
            "C": view["clientOrderId"] if kind == "CANCELED" else "",
            "x": _EXECUTION.get(kind, "TRADE"),
            "X": status,
            "r": "NONE",
            "i": view["orderId"],
            "l": _s(fill.quantity) if fill else "0",
            "z": _s(order.filled_quantity),
            "L": _s(fill.price) if fill else "0",
            "n": _s(fill.fee) if fill else "0",
            "N": fill.fee_currency if fill else None,
            "T": ms(event.at),
            "t": fill.pk if fill else -1,
            "v": 0,
            "I": 0,
            "w": status in ("NEW", "PARTIALLY_FILLED"),
            "m": bool(fill and fill.is_maker),
            "M": False,
            "O": ms(shown_as.created_at),
            "Z": _s(order.cost),
            "Y": _s(fill.quantity * fill.price) if fill else "0",
            "Q": view["origQuoteOrderQty"],
            "W": ms(order.created_at),
            "V": "EXPIRE_MAKER",
        }

    def _spot_account_position(self, account: str) -> dict[str, Any]:
        balance = self.engine.balance_get(self.exchange, account, MarketType.SPOT)
        now = now_ms()
        return {
            "e": "outboundAccountPosition",
            "E": now,
            "u": now,
            "B": [{"a": a.currency, "f": _s(a.free), "l": _s(a.used)} for a in balance.assets.values()],
        }
