"""The drill's load generator: orders, cancels and webhooks through the HTTP API at a bounded rate, and
fan-out signals (webhooks of the followers' strategy, one order per follower) at a steady cadence.

Prices come from the simulator's own pure price path (the seed is the server's), so "near" and "far"
mean near and far from where the exchange is now, not from a cached quote that may be 31 s old.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from typing import Any

import requests

from drill.seed import FAN_STRATEGY, SYMBOLS, Route
from exchanges.gateway import MarketType
from exchanges.simulator.catalog import CatalogMarket, catalog_market
from exchanges.simulator.engine import walk_price

logger = logging.getLogger("drill")

# (action, weight): the mix of one load tick.
ACTIONS = (
    ("limit_near", 30),
    ("limit_far", 20),
    ("limit_cross", 5),
    ("market", 10),
    ("stop_market", 6),
    ("stop_limit", 6),
    ("cancel", 18),
    ("webhook", 5),
)
HTTP_TIMEOUT = 10.0
RECENT_KEYS = 300
# Fan-out signals, in this order and again: LIMITs on one (symbol, side) per round, each further from
# the price than the one before, so the third ranks last and waits behind the bucket's two slots
# (queued); a MARKET that every follower places at once (the express lane); a CANCEL of the round's
# symbol. A 60 s drill plays the first four.
FAN_PLAN = ("LIMIT", "LIMIT", "MARKET", "LIMIT", "CANCEL", "MARKET")
FAN_SYMBOLS = ("BTC/USDT", "ETH/USDT")
FAN_FIRST_AFTER = 3.0  # seconds from the start to the first fan-out signal
FAN_HTTP_TIMEOUT = 30.0  # one webhook enqueues an order per follower


@dataclass
class LoadStats:
    posted: int = 0  # orders accepted (202 order_keys, webhook fan-out included)
    by_action: Counter = field(default_factory=Counter)
    http: Counter = field(default_factory=Counter)  # "POST orders 202", "DELETE 409", ...
    cancel_states: Counter = field(default_factory=Counter)
    rejected_examples: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    webhook_enabled: bool = False


def _floor(value: Decimal, step: Decimal) -> Decimal:
    return (value / step).to_integral_value(rounding=ROUND_FLOOR) * step


def _size(market: CatalogMarket, price: Decimal) -> Decimal:
    """About 1.5 × the minimum notional, in whole steps: well below one match step's liquidity."""
    steps = (market.min_notional * Decimal("1.5") / price / market.step_size).to_integral_value(rounding=ROUND_CEILING)
    return max(steps * market.step_size, market.min_qty)


class LoadGenerator(threading.Thread):
    """Posts one action every 1/rate seconds until stopped; every loop is bounded by `deadline`."""

    def __init__(
        self,
        *,
        base_url: str,
        token: str,
        routes: list[Route],
        webhook_tokens: dict[str, str],
        seed: int,
        price_seed: int,
        rate: float,
        deadline: float,
        webhook: bool,
    ):
        super().__init__(name="drill-load", daemon=True)
        self.base_url = base_url
        self.routes = routes
        self.webhook_tokens = webhook_tokens
        self.rng = random.Random(seed)  # noqa: S311 - load shape, not security
        self.price_seed = price_seed
        self.interval = 1.0 / rate
        self.deadline = deadline
        self.stop_event = threading.Event()
        self.stats = LoadStats(webhook_enabled=webhook)
        self.keys: deque[str] = deque(maxlen=RECENT_KEYS)  # cancel candidates
        self.keys_all: list[str] = []  # every accepted order_key (each must have a history)
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {token}"
        self._actions = [a for a, _ in ACTIONS if webhook or a != "webhook"]
        self._weights = [w for a, w in ACTIONS if webhook or a != "webhook"]

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop_event.is_set() and time.monotonic() < self.deadline:
            action = self.rng.choices(self._actions, self._weights)[0]
            try:
                self._do(action)
            except requests.RequestException as exc:
                self.stats.http[f"{action} {type(exc).__name__}"] += 1
            except Exception as exc:  # one bad tick must not end the load; it is reported
                logger.exception("load action %s failed", action)
                if len(self.stats.errors) < 10:
                    self.stats.errors.append(f"{action}: {type(exc).__name__}: {exc}")
            next_at += self.interval
            self.stop_event.wait(max(0.0, next_at - time.monotonic()))
        self.session.close()

    # --- one action ----------------------------------------------------------------------------

    def _price(self, market: CatalogMarket) -> Decimal:
        raw = walk_price(
            symbol=market.symbol, seed=self.price_seed, at=datetime.now(tz=UTC), base_price=market.base_price
        )
        return max(_floor(raw, market.tick_size), market.tick_size)

    def _do(self, action: str) -> None:
        if action == "cancel":
            self._cancel()
            return
        if action == "webhook":
            self._webhook()
            return
        route = self.rng.choice(self.routes)
        market = catalog_market(MarketType.FUTURES, self.rng.choice(SYMBOLS))
        assert market is not None
        last = self._price(market)
        side = self.rng.choice(("BUY", "SELL"))
        sign = Decimal(1) if side == "BUY" else Decimal(-1)  # BUY: below is passive, above crosses
        body: dict[str, Any] = {
            "account": route.account_id,
            "strategy": route.strategy,
            "symbol": market.symbol,
            "side": side,
            "quantity": str(_size(market, last)),
        }

        def away(low: float, high: float) -> Decimal:
            return _floor(last * (1 - sign * Decimal(str(self.rng.uniform(low, high)))), market.tick_size)

        if action == "limit_near":
            body.update(order_type="LIMIT", price=str(away(0.0002, 0.004)))
        elif action == "limit_far":
            body.update(order_type="LIMIT", price=str(away(0.03, 0.15)), priority=self.rng.choice((0, 0, 1, -1)))
        elif action == "limit_cross":
            body.update(order_type="LIMIT", price=str(away(-0.003, -0.001)))
        elif action == "market":
            body.update(order_type="MARKET")
        else:
            # A stop fires when the market moves against the side: BUY above, SELL below.
            stop = away(-0.006, -0.001)
            body.update(order_type="STOP_MARKET" if action == "stop_market" else "STOP_LIMIT", stop_price=str(stop))
            if action == "stop_limit":
                body["price"] = str(_floor(stop * (1 + sign * Decimal("0.002")), market.tick_size))
        response = self.session.post(f"{self.base_url}/api/orders/", json=body, timeout=HTTP_TIMEOUT)
        self.stats.http[f"POST orders {response.status_code}"] += 1
        self.stats.by_action[action] += 1
        if response.status_code == 202:
            keys = [str(k) for k in response.json().get("order_keys", [])]
            self.stats.posted += len(keys)
            self.keys.extend(keys)
            self.keys_all.extend(keys)
        elif response.status_code == 400 and len(self.stats.rejected_examples) < 5:
            self.stats.rejected_examples.append(f"{action} {market.symbol}: {response.text[:200]}")

    def _cancel(self) -> None:
        if not self.keys:
            return
        key = self.rng.choice(list(self.keys))
        response = self.session.delete(f"{self.base_url}/api/orders/{key}/", timeout=HTTP_TIMEOUT)
        self.stats.http[f"DELETE {response.status_code}"] += 1
        self.stats.by_action["cancel"] += 1
        if response.status_code in (202, 409):
            self.stats.cancel_states[response.json().get("state", "?")] += 1

    def _webhook(self) -> None:
        group_name = self.rng.choice(sorted(self.webhook_tokens))
        market = catalog_market(MarketType.FUTURES, self.rng.choice(SYMBOLS))
        assert market is not None
        last = self._price(market)
        side = self.rng.choice(("BUY", "SELL"))
        kind = self.rng.choices(("LIMIT", "MARKET", "CANCEL"), (6, 2, 1))[0]
        body: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "group_name": group_name,
            "token": self.webhook_tokens[group_name],
            "symbol": market.symbol,
            "side": side,
            "order_type": kind,
            "qty_per": "1",
        }
        if kind == "LIMIT":
            factor = Decimal(str(self.rng.uniform(0.001, 0.02)))
            body["price"] = str(_floor(last * (1 - factor if side == "BUY" else 1 + factor), market.tick_size))
        repeats = 2 if self.rng.random() < 0.2 else 1  # a redelivery must be deduplicated
        for _ in range(repeats):
            response = self.session.post(f"{self.base_url}/api/webhook/", json=body, timeout=HTTP_TIMEOUT)
            self.stats.http[f"POST webhook {response.status_code}"] += 1
        self.stats.by_action["webhook"] += 1
        if response.status_code in (200, 201, 202):
            keys = _webhook_keys(response.json())
            self.stats.posted += len(keys)
            self.keys.extend(keys)
            self.keys_all.extend(keys)
        elif response.status_code == 400 and len(self.stats.rejected_examples) < 5:
            self.stats.rejected_examples.append(f"webhook {kind} {market.symbol}: {response.text[:200]}")


def _webhook_keys(body: Any) -> list[str]:
    """order_keys anywhere in a webhook reply (it lists them per account)."""
    found: list[str] = []
    if isinstance(body, dict):
        for key, value in body.items():
            if key == "order_keys" and isinstance(value, list):
                found.extend(str(v) for v in value)
            else:
                found.extend(_webhook_keys(value))
    elif isinstance(body, list):
        for value in body:
            found.extend(_webhook_keys(value))
    return found


@dataclass
class FanSignal:
    """One fan-out signal as the webhook accepted it: the order keys per follower account."""

    delivery_id: str
    kind: str
    symbol: str
    side: str
    status: int
    orders: dict[str, list[str]] = field(default_factory=dict)  # account id → order keys
    signal_id: int | None = None
    redelivered: bool = False
    replay_differs: bool = False  # the redelivery's reply named other orders than the first reply


@dataclass
class FanStats:
    followers: int = 0
    signals: list[FanSignal] = field(default_factory=list)
    http: Counter = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def accepted(self) -> list[FanSignal]:
        return [s for s in self.signals if s.status in (200, 201, 202)]

    def orders(self) -> dict[str, str]:
        """Every follower order accepted: order key → account id."""
        return {key: account for s in self.accepted for account, keys in s.orders.items() for key in keys}


class FanOutGenerator(threading.Thread):
    """Posts one fan-out signal (webhook of FAN_STRATEGY) every `every` seconds until the deadline."""

    def __init__(
        self, *, base_url: str, token: str, followers: int, seed: int, price_seed: int, every: float, deadline: float
    ):
        super().__init__(name="drill-fanout", daemon=True)
        self.base_url = base_url
        self.token = token
        self.rng = random.Random(seed)  # noqa: S311 - load shape, not security
        self.price_seed = price_seed
        self.every = every
        self.deadline = deadline
        self.stop_event = threading.Event()
        self.stats = FanStats(followers=followers)
        self.session = requests.Session()
        self._round = (FAN_SYMBOLS[0], "BUY")  # this round's (symbol, side) of LIMIT and CANCEL signals

    def stop(self) -> None:
        self.stop_event.set()

    def run(self) -> None:
        next_at = time.monotonic() + FAN_FIRST_AFTER
        while not self.stop_event.wait(max(0.0, next_at - time.monotonic())) and time.monotonic() < self.deadline:
            try:
                self._signal()
            except requests.RequestException as exc:
                self.stats.http[f"fan-out {type(exc).__name__}"] += 1
            except Exception as exc:  # reported, the cadence goes on
                logger.exception("fan-out signal failed")
                if len(self.stats.errors) < 10:
                    self.stats.errors.append(f"{type(exc).__name__}: {exc}")
            next_at += self.every * self.rng.uniform(0.9, 1.1)
        self.session.close()

    def _signal(self) -> None:
        n = len(self.stats.signals)
        kind = FAN_PLAN[n % len(FAN_PLAN)]
        if n % len(FAN_PLAN) == 0:  # a new round: its symbol and its LIMITs' side
            self._round = (self.rng.choice(FAN_SYMBOLS), self.rng.choice(("BUY", "SELL")))
        symbol, side = self._round
        if kind == "MARKET":
            side = self.rng.choice(("BUY", "SELL"))
        market = catalog_market(MarketType.FUTURES, symbol)
        assert market is not None
        body: dict[str, Any] = {
            "id": uuid.uuid4().hex,
            "group_name": FAN_STRATEGY,
            "token": self.token,
            "symbol": market.symbol,
            "side": side,
            "order_type": kind,
            "qty_per": "1",
        }
        if kind == "LIMIT":
            raw = walk_price(
                symbol=market.symbol, seed=self.price_seed, at=datetime.now(tz=UTC), base_price=market.base_price
            )
            nth = FAN_PLAN[: n % len(FAN_PLAN)].count("LIMIT")  # 0, 1, 2: the round's first, second, third
            factor = Decimal(str(self.rng.uniform(0.005, 0.01))) * (1 + 2 * nth)  # resting, each further away
            body["price"] = str(_floor(raw * (1 - factor if side == "BUY" else 1 + factor), market.tick_size))
        redeliver = self.rng.random() < 0.2  # the same delivery again: must add nothing
        response = self.session.post(f"{self.base_url}/api/webhook/", json=body, timeout=FAN_HTTP_TIMEOUT)
        self.stats.http[f"POST fan-out {response.status_code}"] += 1
        signal = FanSignal(
            delivery_id=body["id"], kind=kind, symbol=market.symbol, side=side, status=response.status_code
        )
        if response.status_code in (200, 201, 202):
            reply = response.json()
            signal.orders = {str(a): [str(k) for k in keys] for a, keys in (reply.get("orders") or {}).items()}
            signal.signal_id = reply.get("signal")
        elif len(self.stats.errors) < 10:
            self.stats.errors.append(
                f"fan-out {kind} {market.symbol}: HTTP {response.status_code} {response.text[:200]}"
            )
        if redeliver:
            again = self.session.post(f"{self.base_url}/api/webhook/", json=body, timeout=FAN_HTTP_TIMEOUT)
            self.stats.http[f"POST fan-out redelivered {again.status_code}"] += 1
            signal.redelivered = True
            if again.status_code in (200, 201, 202):
                replayed = {str(a): [str(k) for k in keys] for a, keys in (again.json().get("orders") or {}).items()}
                if signal.status in (200, 201, 202):
                    signal.replay_differs = replayed != signal.orders
                else:  # the first delivery failed and wrote nothing: this one is the signal
                    signal.status, signal.orders = again.status_code, replayed
                    signal.signal_id = again.json().get("signal")
        self.stats.signals.append(signal)
        logger.info(
            "fan-out %s %s %s: HTTP %s, %d follower orders",
            kind,
            side,
            market.symbol,
            response.status_code,
            sum(len(k) for k in signal.orders.values()),
        )


def webhook_available(base_url: str) -> bool:
    """Whether POST /api/webhook/ is routed (an empty body gets a 4xx other than 404)."""
    try:
        response = requests.post(f"{base_url}/api/webhook/", json={}, timeout=HTTP_TIMEOUT)
    except requests.RequestException:
        return False
    return response.status_code != 404
