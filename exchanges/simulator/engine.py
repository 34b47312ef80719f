"""The simulated exchange's matching engine; all of its state lives in the exchanges app's Sim* tables.

Public API. `exchange` is a name ("PAPER", "BINANCE", "BYBIT", ...), `account` any key string (the
PAPER account key, or an API key for the dialect server), `market_type` a MarketType, `now` an
aware UTC datetime (default: the engine's injectable clock). Every call that reads or writes
orders first runs a lazy matching step (at most one per MATCH_INTERVAL of engine time per
exchange), then the calling account's own (at most one that did work per MATCH_INTERVAL per
account), so no background thread is needed and a call always sees its account matched up to
`now`, whoever ran the exchange's step.

Locking (PostgreSQL; SQLite serializes every writer anyway). The writers of one account lock its
SimAccount row first (lock order: SimAccount → SimOrder → SimBalance/SimPosition) and number its
order changes from its `seq`; writers of different accounts never wait for each other. Exchange
settings (fees, caps, delistings, seed) are read unlocked. The matching step claims the exchange
with a skip-locked try-lock on SimExchange.last_match_at (committed at once; a caller never waits
for another's match), then locks one account at a time for that account's fills and triggers,
skipping an account whose lock is held (that account's own call matches it).
Nothing sleeps (latency faults) inside an engine transaction.

    engine = SimEngine(clock=timezone.now, sleep=time.sleep)      # or the module's `default_engine`

    # market data
    engine.market_list(exchange, market_type) -> list[MarketRule]
    engine.price_get(exchange, market_type, symbol, *, now=None) -> Decimal      # Rejected if unknown
    engine.prices_last(exchange, market_type, symbols=None, *, now=None) -> dict[str, Decimal]
    # balances
    engine.balance_get(exchange, account, market_type) -> Balance
    engine.balance_set(exchange, account, market_type, currency, *, free, used=None) -> None
    # orders (errors: Rejected, InsufficientFunds, DuplicateClientId, NotFound)
    engine.order_create(exchange, account, request: OrderRequest, *, now=None,
                        time_in_force=TimeInForce.GTC, quote_order=False) -> OrderState
    engine.order_cancel(exchange, account, *, symbol, market_type, exchange_order_id=None,
                        client_order_id=None, conditional=False, now=None) -> OrderState
    engine.order_get(exchange, account, *, symbol, market_type, exchange_order_id=None,
                     client_order_id=None, conditional=False, now=None) -> OrderState  # open or history
    engine.order_list_open(exchange, account, market_type, *, conditional=False, symbol=None,
                           now=None) -> list[OrderState]
    engine.order_updates_since(exchange, account, cursor, *, market_type=None, now=None)
        -> tuple[list[OrderState], int]          # changed orders (latest state) and the next cursor
    engine.stream_cursor(exchange, account) -> StreamCursor                       # "from now on"
    engine.order_events_since(exchange, account, cursor, *, market_type=None, now=None)
        -> tuple[list[OrderEvent], StreamCursor]  # every state each order went through, in order
    engine.fill_list(exchange, account, market_type, *, symbol=None, exchange_order_id=None) -> list[FillRecord]
    engine.position_list(exchange, account) -> list[PositionRecord]                # futures
    # matching (tests call it to move time along)
    engine.match(exchange, *, now=None, force=False) -> MatchReport
    # scripting and configuration
    engine.exchange_configure(exchange, *, open_order_cap=None, maker_fee_rate=None,
                              taker_fee_rate=None, seed=None) -> None
    engine.price_script(exchange, symbol, prices, *, start_at=None, step_seconds=60) -> None
    engine.price_script_clear(exchange, symbol=None) -> None
    engine.market_delist(exchange, market_type, symbol) / engine.market_relist(...) -> None
    # faults (endpoint names: ENDPOINTS; the dialect server maps its routes onto them)
    engine.fault_add(kind, *, exchange="", endpoint="", account="", phase="before", remaining=1,
                     probability=None, latency_ms=0) -> int
    engine.order_create_row(...) -> SimOrder   # order_create's arguments; the row as committed
    engine.fault_take(exchange, endpoint, account, *, phase="before") -> FaultHit | None   # consumes
    engine.fault_take_before(exchange, endpoint, account) -> (FaultHit | None, after armed: bool)
    engine.fault_check(exchange, endpoint, account, *, phase="before") -> None   # sleeps or raises
    engine.fault_ws_take(exchange, account) -> str | None                        # "ws_drop" | "ws_silent"
    engine.fault_clear(exchange=None) -> int

    walk_price(symbol=, seed=, at=, base_price=) -> Decimal   # the pure seeded price path

Modelling choices: a resting LIMIT fills at its own price (maker) up to the market's
`liquidity` per matching step, so large orders fill in steps; a marketable order fills at
once at the market price (taker). Conditional orders reserve nothing until they trigger
(like Binance futures algo orders); the spawned order reserves then, and is REJECTED if the
balance no longer covers it. Spot fees are charged in the quote currency. Futures keep a
signed position per symbol, orders reserve FUTURES_MARGIN_RATE of their notional while open,
and fills credit realized PnL minus fees to the quote balance.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from enum import StrEnum
from typing import Any, NamedTuple, cast

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import Max
from django.utils import timezone

from core.money import ZERO, quantize
from core.rawsql import row_select, row_update, rows_select, scalar
from exchanges.gateway import (
    AssetBalance,
    Balance,
    DuplicateClientId,
    ExchangeError,
    InsufficientFunds,
    Maintenance,
    MarketRule,
    MarketType,
    Network,
    NotFound,
    OrderRequest,
    OrderState,
    OrderStatus,
    OrderType,
    RateLimited,
    Rejected,
    Side,
    call_policy_current,
)
from exchanges.models import (
    SimAccount,
    SimBalance,
    SimExchange,
    SimFault,
    SimFill,
    SimOrder,
    SimPosition,
    SimPricePath,
)
from exchanges.rounding import floor_to_step
from exchanges.simulator.books import Books, books_current, books_kept
from exchanges.simulator.catalog import DEFAULT_BALANCES, CatalogMarket, catalog_market, catalog_markets

logger = logging.getLogger(__name__)

ONE = Decimal("1")
MATCH_INTERVAL = timedelta(seconds=1)
FUTURES_MARGIN_RATE = Decimal("0.1")  # 10x: margin reserved per unit of notional on open futures orders
OPEN = (OrderStatus.NEW.value, OrderStatus.PARTIALLY_FILLED.value)
_OPEN_IN = "(" + ", ".join(["%s"] * len(OPEN)) + ")"  # `status IN _OPEN_IN` with *OPEN as its parameters
ENDPOINTS = (
    "load_markets",
    "fetch_last_prices",
    "fetch_balance",
    "create_order",
    "cancel_order",
    "fetch_order",
    "fetch_open_orders",
    "ws",
)
# Exchanges whose accounts have one wallet for spot and futures (Bybit's unified trading account): the
# futures margin and PnL come from, and go to, the same balances spot trades use.
UNIFIED_WALLETS = frozenset({"BYBIT"})
WS_FAULTS = (SimFault.Kind.WS_DROP, SimFault.Kind.WS_SILENT)
# Walk octaves: (period in seconds, relative amplitude). Sums of interpolated hash noise at
# three scales look like a walk, stay within ±5.2 % of the base and cost O(1) at any time.
WALK_OCTAVES = ((60, Decimal("0.002")), (900, Decimal("0.01")), (14400, Decimal("0.04")))
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class TimeInForce(StrEnum):
    """How long a new order may rest, and whether it may take liquidity."""

    GTC = "GTC"  # rests until filled or cancelled
    IOC = "IOC"  # takes what it can at once; the rest EXPIRED
    FOK = "FOK"  # fills entirely at once, or EXPIRED without a fill
    POST_ONLY = "POST_ONLY"  # would take: Rejected (code -5022), nothing kept (Binance GTX, LIMIT_MAKER)
    POST_ONLY_EXPIRE = "POST_ONLY_EXPIRE"  # would take: kept as EXPIRED, never filled (Bybit PostOnly)


@dataclass(frozen=True)
class StreamCursor:
    """Where a user stream stands: the last order change, order and fill it has reported."""

    seq: int = 0
    order_id: int = 0
    fill_id: int = 0


@dataclass(frozen=True)
class OrderEvent:
    """One state an order went through, for the user streams.

    `order` is a detached copy of the row showing the order as it was at this event
    (status, filled quantity, cost and fee); `fill` is the execution of a TRADE event.
    """

    kind: str  # NEW | TRADE | CANCELED | EXPIRED | REJECTED | TRIGGERED
    order: SimOrder
    fill: SimFill | None
    at: datetime


@dataclass(frozen=True)
class _Live:
    """The open orders an account's own step read under its lock (`complete`: all of them)."""

    orders: list[SimOrder]
    complete: bool


@dataclass(frozen=True)
class FaultHit:
    fault_id: int
    kind: str
    latency_ms: int


@dataclass(frozen=True)
class MatchReport:
    ran: bool
    fills: int = 0
    triggers: int = 0


@dataclass(frozen=True)
class FillRecord:
    fill_id: int
    exchange_order_id: str
    client_order_id: str
    symbol: str
    side: Side
    quantity: Decimal
    price: Decimal
    fee: Decimal
    fee_currency: str
    is_maker: bool
    created_at: datetime


@dataclass(frozen=True)
class PositionRecord:
    symbol: str
    quantity: Decimal  # signed: long > 0, short < 0
    entry_price: Decimal


def _noise(symbol: str, seed: int, period: int, bucket: int) -> Decimal:
    digest = hashlib.sha256(f"{seed}:{symbol}:{period}:{bucket}".encode()).digest()
    return Decimal(int.from_bytes(digest[:8], "big")) / Decimal(2**63) - ONE  # [-1, 1)


def walk_price(*, symbol: str, seed: int, at: datetime, base_price: Decimal) -> Decimal:
    """The deterministic price of `symbol` at `at`: a pure function of (symbol, seed, time), unrounded."""
    elapsed = at - EPOCH
    micros = (elapsed.days * 86400 + elapsed.seconds) * 1_000_000 + elapsed.microseconds
    offset = ZERO
    for period, amplitude in WALK_OCTAVES:
        period_us = period * 1_000_000
        bucket, into = divmod(micros, period_us)
        frac = Decimal(into) / Decimal(period_us)
        n0 = _noise(symbol, seed, period, bucket)
        n1 = _noise(symbol, seed, period, bucket + 1)
        offset += amplitude * (n0 + (n1 - n0) * frac)
    return base_price * (ONE + offset)


def scripted_price(*, prices: list[str], start_at: datetime, step_seconds: int, at: datetime) -> Decimal:
    """prices[i] holds from start_at + i × step; before start the first, after the end the last."""
    index = int((at - start_at).total_seconds() // step_seconds) if at > start_at else 0
    return Decimal(prices[min(max(index, 0), len(prices) - 1)])


class _Resting(NamedTuple):
    """What a matching step's test (`_due`) reads of an open order."""

    pk: int
    account: str
    market_type: str
    symbol: str
    side: str
    order_type: str
    conditional: bool
    price: Decimal  # None where the test does not read it (a MARKET's price, a regular order's stop)
    stop_price: Decimal


def _snapshot(
    order: SimOrder, status: OrderStatus, filled: Decimal, cost: Decimal, fee: Decimal, at: datetime
) -> SimOrder:
    """A detached copy of `order` as it stood at one past event (never saved)."""
    past = copy.copy(order)
    past.status, past.filled_quantity, past.cost, past.fee, past.updated_at = status.value, filled, cost, fee, at
    return past


def _state_of(order: SimOrder) -> OrderState:
    spawned = getattr(order, "_spawned_cache", None)
    if spawned is None and order.conditional and order.status == OrderStatus.TRIGGERED:
        spawned = SimOrder.objects.filter(parent_id=order.pk).first()
    filled = order.filled_quantity
    return OrderState(
        exchange_order_id=str(order.pk),
        client_order_id=order.client_order_id,
        symbol=order.symbol,
        market_type=MarketType(order.market_type),
        side=Side(order.side),
        order_type=OrderType(order.order_type),
        status=OrderStatus(order.status),
        quantity=order.quantity,
        filled_quantity=filled,
        average_price=quantize(order.cost / filled) if filled else None,
        price=order.price,
        stop_price=order.stop_price,
        fee=order.fee,
        fee_currency=order.fee_currency,
        updated_at=order.updated_at,
        conditional=order.conditional,
        spawned_order_id=str(spawned.pk) if spawned else None,
        spawned_client_order_id=spawned.client_order_id if spawned else None,
    )


def _recent(last: datetime | None, now: datetime) -> bool:
    """A matching step at `last` covers `now` (within MATCH_INTERVAL after it; a clock moved back is not covered)."""
    return last is not None and last <= now < last + MATCH_INTERVAL


def _in_transaction() -> bool:
    """True inside a transaction.atomic block of the code (a test case's wrapping blocks do not count)."""
    return any(not getattr(block, "_from_testcase", False) for block in connection.atomic_blocks)


class SimEngine:
    """The matching engine. Stateless in memory: any number of instances and processes share one exchange."""

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] = timezone.now,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        unified_wallets: frozenset[str] = UNIFIED_WALLETS,
    ):
        self.clock = clock
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.unified_wallets = unified_wallets

    # --- configuration and scripting -------------------------------------------------

    def _exchange_row(self, exchange: str, *, lock: bool) -> SimExchange:
        row = row_select(SimExchange, "exchange = %s", [exchange], lock=lock)
        if row is None:
            try:
                with transaction.atomic():
                    SimExchange.objects.create(exchange=exchange)
            except IntegrityError:
                pass  # another process created it first; read it below
            row = row_select(SimExchange, "exchange = %s", [exchange], lock=lock)
            assert row is not None  # noqa: S101 - created above or by the process that conflicted
        return row

    def _account_lock(self, exchange: str, account: str) -> SimAccount:
        """Lock the account's SimAccount row (created on first use), waiting for its holder; inside transaction.atomic.

        Every writer of the account's orders, fills, balances and positions takes it first.
        """
        row = self._account_row(exchange, account, skip_locked=False)
        assert row is not None  # noqa: S101 - without skip_locked the read waits and finds the row
        return row

    def _account_try_lock(self, exchange: str, account: str) -> SimAccount | None:
        """The account's row locked, or None while another transaction holds it (never waits for a holder)."""
        return self._account_row(exchange, account, skip_locked=True)

    @contextmanager
    def _locked(self, exchange: str, account: str, *, wait: bool = True) -> Iterator[SimAccount | None]:
        """A transaction holding the account's lock, with its books kept (exchanges.simulator.books) and
        written when it ends; None (and no books) when `wait` is False and another transaction holds it."""
        with transaction.atomic():
            acct = self._account_lock(exchange, account) if wait else self._account_try_lock(exchange, account)
            if acct is None:
                yield None
                return
            with books_kept(exchange, account):
                yield acct

    @staticmethod
    def _books(exchange: str, account: str) -> Books:
        """The books of the account's locked transaction (_locked): every balance, position, order and fill
        write of the engine goes through them."""
        books = books_current(exchange, account)
        if books is None:
            raise RuntimeError(f"sim {exchange}/{account}: a write outside the account's locked transaction")
        return books

    def _account_row(self, exchange: str, account: str, *, skip_locked: bool) -> SimAccount | None:
        # A new row continues the account's sequence from its orders (those written before the row
        # existed were numbered from the exchange-wide sequence of old), so cursors never move back.
        # The insert is ON CONFLICT DO NOTHING, so two first uses racing neither fail nor abort the
        # transaction (PostgreSQL waits for the other insert's commit, then the locking read sees it);
        # the row it inserts is this transaction's until it commits, as good as locked.
        where, params = "exchange = %s AND account = %s", [exchange, account]
        row = row_select(SimAccount, where, params, lock=True, skip_locked=skip_locked)
        if row is not None:
            return row
        if skip_locked and row_select(SimAccount, where, params) is not None:
            return None  # held by another transaction
        accounts, orders = SimAccount._meta.db_table, SimOrder._meta.db_table
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {accounts} (exchange, account, seq, last_match_at) "  # noqa: S608 - our table names
                f"SELECT %s, %s, COALESCE(MAX(update_seq), 0), NULL FROM {orders} WHERE exchange = %s AND account = %s "
                "ON CONFLICT DO NOTHING RETURNING id, seq",
                [exchange, account, exchange, account],
            )
            inserted = cursor.fetchone()
        if inserted is not None:
            return SimAccount.from_db(
                connection.alias,
                ["id", "exchange", "account", "seq", "last_match_at"],
                [inserted[0], exchange, account, inserted[1], None],
            )
        return row_select(SimAccount, where, params, lock=True, skip_locked=skip_locked)

    def exchange_configure(
        self,
        exchange: str,
        *,
        open_order_cap: int | None = None,
        maker_fee_rate: Decimal | None = None,
        taker_fee_rate: Decimal | None = None,
        seed: int | None = None,
    ) -> None:
        with transaction.atomic():
            row = self._exchange_row(exchange, lock=True)
            if open_order_cap is not None:
                row.open_order_cap = open_order_cap
            if maker_fee_rate is not None:
                row.maker_fee_rate = maker_fee_rate
            if taker_fee_rate is not None:
                row.taker_fee_rate = taker_fee_rate
            if seed is not None:
                row.seed = seed
            row.save()

    def price_script(
        self,
        exchange: str,
        symbol: str,
        prices: list[Decimal | str],
        *,
        start_at: datetime | None = None,
        step_seconds: int = 60,
    ) -> None:
        """Replace the walk of `symbol` with a scripted list (both market types)."""
        if not prices:
            raise ValueError("a price script needs at least one price")
        SimPricePath.objects.update_or_create(
            exchange=exchange,
            symbol=symbol,
            defaults={
                "start_at": start_at or self.clock(),
                "step_seconds": step_seconds,
                "prices": [str(Decimal(p)) for p in prices],
            },
        )

    def price_script_clear(self, exchange: str, symbol: str | None = None) -> None:
        scripts = SimPricePath.objects.filter(exchange=exchange)
        if symbol:
            scripts = scripts.filter(symbol=symbol)
        scripts.delete()

    def market_delist(self, exchange: str, market_type: MarketType, symbol: str) -> None:
        self._set_delisted(exchange, f"{MarketType(market_type)}:{symbol}", True)

    def market_relist(self, exchange: str, market_type: MarketType, symbol: str) -> None:
        self._set_delisted(exchange, f"{MarketType(market_type)}:{symbol}", False)

    def _set_delisted(self, exchange: str, key: str, delisted: bool) -> None:
        with transaction.atomic():
            row = self._exchange_row(exchange, lock=True)
            keys = set(row.delisted)
            if delisted:
                keys.add(key)
            else:
                keys.discard(key)
            row.delisted = sorted(keys)
            row.save(update_fields=["delisted"])

    # --- market data -------------------------------------------------------------------

    def _market(self, row: SimExchange, market_type: MarketType, symbol: str) -> CatalogMarket:
        market = catalog_market(market_type, symbol)
        if market is None or f"{MarketType(market_type)}:{symbol}" in row.delisted:
            raise Rejected(f"Invalid symbol {symbol} for {market_type}", code="-1121", exchange=row.exchange)
        return market

    def market_list(self, exchange: str, market_type: MarketType) -> list[MarketRule]:
        row = self._exchange_row(exchange, lock=False)
        market_type = MarketType(market_type)
        return [
            m.rule(market_type) for m in catalog_markets(market_type) if f"{market_type}:{m.symbol}" not in row.delisted
        ]

    def _seed(self, row: SimExchange) -> int:
        return row.seed if row.seed is not None else settings.SIMULATOR_SEED

    def _price(
        self, row: SimExchange, market: CatalogMarket, at: datetime, scripts: dict[str, SimPricePath]
    ) -> Decimal:
        script = scripts.get(market.symbol)
        if script is not None:
            raw = scripted_price(
                prices=script.prices, start_at=script.start_at, step_seconds=script.step_seconds, at=at
            )
        else:
            raw = walk_price(symbol=market.symbol, seed=self._seed(row), at=at, base_price=market.base_price)
        return max(floor_to_step(raw, market.tick_size), market.tick_size)

    def _scripts(self, exchange: str) -> dict[str, SimPricePath]:
        return {s.symbol: s for s in rows_select(SimPricePath, "exchange = %s", [exchange])}

    def price_get(self, exchange: str, market_type: MarketType, symbol: str, *, now: datetime | None = None) -> Decimal:
        row = self._exchange_row(exchange, lock=False)
        market = self._market(row, MarketType(market_type), symbol)
        return self._price(row, market, now or self.clock(), self._scripts(exchange))

    def prices_last(
        self,
        exchange: str,
        market_type: MarketType,
        symbols: list[str] | None = None,
        *,
        now: datetime | None = None,
    ) -> dict[str, Decimal]:
        """Last prices of the listed symbols (unknown ones left out), all symbols when None."""
        now = now or self.clock()
        row = self._exchange_row(exchange, lock=False)
        market_type = MarketType(market_type)
        scripts = self._scripts(exchange)
        wanted = set(symbols) if symbols is not None else None
        return {
            m.symbol: self._price(row, m, now, scripts)
            for m in catalog_markets(market_type)
            if f"{market_type}:{m.symbol}" not in row.delisted and (wanted is None or m.symbol in wanted)
        }

    # --- balances ----------------------------------------------------------------------

    def wallet_of(self, exchange: str, market_type: MarketType | str) -> MarketType:
        """The wallet a market type's balances live in: its own, or on a unified exchange the spot wallet."""
        return MarketType.SPOT if exchange in self.unified_wallets else MarketType(market_type)

    def _ensure_balances(self, exchange: str, account: str, market_type: MarketType) -> None:
        """A never-seen account starts with DEFAULT_BALANCES (balance_set opts out by creating rows)."""
        market_type = self.wallet_of(exchange, market_type)
        if SimBalance.objects.filter(exchange=exchange, account=account, market_type=market_type).exists():
            return
        SimBalance.objects.bulk_create(
            [
                SimBalance(exchange=exchange, account=account, market_type=market_type, currency=c, free=amount)
                for c, amount in DEFAULT_BALANCES[MarketType(market_type)].items()
            ],
            ignore_conflicts=True,
        )

    def balance_get(self, exchange: str, account: str, market_type: MarketType) -> Balance:
        market_type = MarketType(market_type)
        with transaction.atomic():
            self._ensure_balances(exchange, account, market_type)
        wallet = self.wallet_of(exchange, market_type)
        rows = SimBalance.objects.filter(exchange=exchange, account=account, market_type=wallet)
        return Balance(
            market_type=market_type,
            assets={r.currency: AssetBalance(currency=r.currency, free=r.free, used=r.used) for r in rows},
        )

    def balance_set(
        self,
        exchange: str,
        account: str,
        market_type: MarketType,
        currency: str,
        *,
        free: Decimal,
        used: Decimal | None = None,
    ) -> None:
        """Set one currency's free (and optionally used) amount: the simulator's deposit/withdraw."""
        defaults = {"free": Decimal(free)}
        if used is not None:
            defaults["used"] = Decimal(used)
        with transaction.atomic():
            self._account_lock(exchange, account)
            SimBalance.objects.update_or_create(
                exchange=exchange,
                account=account,
                market_type=self.wallet_of(exchange, market_type),
                currency=currency,
                defaults=defaults,
            )

    def _balance_row(self, order: SimOrder, currency: str) -> SimBalance:
        return self._books(order.exchange, order.account).balance(
            self.wallet_of(order.exchange, order.market_type), currency
        )

    def _move(self, order: SimOrder, currency: str, *, free: Decimal = ZERO, used: Decimal = ZERO) -> None:
        row = self._balance_row(order, currency)
        row.free = quantize(row.free + free)
        row.used = quantize(row.used + used)
        self._books(order.exchange, order.account).changed(row)

    def _order_save(self, order: SimOrder) -> None:
        self._books(order.exchange, order.account).order_save(order)

    # --- orders ------------------------------------------------------------------------

    def _bump(self, acct: SimAccount, order: SimOrder, now: datetime) -> None:
        acct.seq += 1
        order.update_seq = acct.seq
        order.updated_at = now

    def _reservation(
        self, row: SimExchange, market: CatalogMarket, order: SimOrder, ref_price: Decimal
    ) -> tuple[str, Decimal]:
        remaining = order.quantity - order.filled_quantity
        if order.market_type == MarketType.FUTURES:
            if order.reduce_only:
                return market.quote, ZERO
            return market.quote, quantize(remaining * ref_price * (FUTURES_MARGIN_RATE + row.taker_fee_rate))
        if order.side == Side.BUY:
            return market.quote, quantize(remaining * ref_price * (ONE + row.taker_fee_rate))
        return market.base, remaining

    def _reserve(self, row: SimExchange, market: CatalogMarket, order: SimOrder, ref_price: Decimal) -> None:
        """Hold the order's funds; InsufficientFunds when the free balance does not cover them."""
        currency, amount = self._reservation(row, market, order, ref_price)
        if amount <= 0:
            order.reserved_currency = currency
            return
        balance = self._balance_row(order, currency)
        if balance.free < amount:
            raise InsufficientFunds(
                f"Account has insufficient balance for requested action: needs {amount} {currency}, "
                f"free {balance.free}",
                code="-2019" if order.market_type == MarketType.FUTURES else "-2010",
                exchange=row.exchange,
            )
        balance.free = quantize(balance.free - amount)
        balance.used = quantize(balance.used + amount)
        self._books(order.exchange, order.account).changed(balance)
        order.reserved, order.reserved_currency = amount, currency

    def _release(self, order: SimOrder, amount: Decimal) -> None:
        if amount > 0:
            self._move(order, order.reserved_currency, free=amount, used=-amount)
            order.reserved = quantize(order.reserved - amount)

    def _fill(
        self,
        row: SimExchange,
        acct: SimAccount,
        market: CatalogMarket,
        order: SimOrder,
        qty: Decimal,
        price: Decimal,
        now: datetime,
        *,
        maker: bool,
    ) -> None:
        remaining = order.quantity - order.filled_quantity
        qty = min(qty, remaining)
        if qty <= 0:
            return
        rate = row.maker_fee_rate if maker else row.taker_fee_rate
        notional = quantize(qty * price)
        fee = quantize(notional * rate)
        self._release(order, order.reserved if qty == remaining else quantize(order.reserved * qty / remaining))
        if order.market_type == MarketType.FUTURES:
            realized = self._position_apply(order, market, qty, price)
            self._move(order, market.quote, free=realized - fee)
        elif order.side == Side.BUY:
            self._move(order, market.quote, free=-(notional + fee))
            self._move(order, market.base, free=qty)
        else:
            self._move(order, market.base, free=-qty)
            self._move(order, market.quote, free=notional - fee)
        order.filled_quantity = quantize(order.filled_quantity + qty)
        order.cost = quantize(order.cost + notional)
        order.fee = quantize(order.fee + fee)
        order.fee_currency = market.quote
        order.status = (
            OrderStatus.FILLED.value if order.filled_quantity >= order.quantity else OrderStatus.PARTIALLY_FILLED.value
        )
        self._bump(acct, order, now)
        books = self._books(order.exchange, order.account)
        books.order_save(order)
        books.fill_add(
            SimFill(
                order=order,
                quantity=qty,
                price=price,
                fee=fee,
                fee_currency=market.quote,
                is_maker=maker,
                created_at=now,
            )
        )

    def _position_apply(self, order: SimOrder, market: CatalogMarket, qty: Decimal, price: Decimal) -> Decimal:
        """SPEC §4.3 arithmetic on the simulated futures position; returns the realized PnL."""
        books = self._books(order.exchange, order.account)
        position = books.position(order.symbol)
        q0, p0 = position.quantity, position.entry_price
        t = qty if order.side == Side.BUY else -qty
        realized = ZERO
        if q0 == 0:
            q1, p1 = t, price
        elif (q0 > 0) == (t > 0):
            q1 = q0 + t
            p1 = quantize((abs(q0) * p0 + abs(t) * price) / (abs(q0) + abs(t)))
        else:
            closed = min(abs(q0), abs(t))
            realized = closed * (price - p0) if q0 > 0 else closed * (p0 - price)
            q1 = q0 + t
            p1 = ZERO if q1 == 0 else (p0 if (q1 > 0) == (q0 > 0) else price)
        position.quantity, position.entry_price = quantize(q1), quantize(p1)
        books.changed(position)
        return quantize(realized)

    def _check_rules(self, row: SimExchange, market: CatalogMarket, request: OrderRequest, ref_price: Decimal) -> None:
        """Exchange filters, with Binance-like messages."""
        qty = request.quantity
        if qty < market.min_qty or qty > market.max_qty or floor_to_step(qty, market.step_size) != qty:
            raise Rejected(f"Filter failure: LOT_SIZE ({qty} {request.symbol})", code="-1013", exchange=row.exchange)
        for value in (request.price, request.stop_price):
            if value is not None and floor_to_step(value, market.tick_size) != value:
                raise Rejected(f"Filter failure: PRICE_FILTER ({value})", code="-1013", exchange=row.exchange)
        if qty * ref_price < market.min_notional:
            raise Rejected(
                f"Filter failure: NOTIONAL ({quantize(qty * ref_price).normalize()} < {market.min_notional})",
                code="-1013",
                exchange=row.exchange,
            )

    def order_create(self, exchange: str, account: str, request: OrderRequest, **options: Any) -> OrderState:
        """order_create_row (its arguments), as the order's state."""
        return _state_of(self.order_create_row(exchange, account, request, **options))

    def order_create_row(
        self,
        exchange: str,
        account: str,
        request: OrderRequest,
        *,
        now: datetime | None = None,
        time_in_force: TimeInForce = TimeInForce.GTC,
        quote_order: bool = False,
    ) -> SimOrder:
        """Store and (if marketable) fill an order in one short transaction; nothing is kept when it raises.
        Returns the order's row as committed (a dialect shapes its reply from it without reading it again).

        `time_in_force` applies to regular LIMIT orders (see TimeInForce). `quote_order`: a MARKET
        order whose request.quantity is an amount of the quote currency, converted at the market
        price and floored to the step (Binance quoteOrderQty, Bybit marketUnit=quoteCoin).
        """
        now = now or self.clock()
        row = self._exchange_row(exchange, lock=False)
        self.match(exchange, now=now, row=row)
        scripts = self._scripts(exchange)
        refused: Exception | None = None
        with self._locked(exchange, account) as acct:
            assert acct is not None  # noqa: S101 - a waiting lock always returns the row
            # The account's own step (_match_for's), under the lock this call holds anyway.
            live = self._step_account(row, acct, scripts, now)
            if live is None:
                self._books(exchange, account).flush()  # the checks below read the orders it changed
            try:
                order = self._order_new(
                    row, acct, live, scripts, request, now=now, time_in_force=time_in_force, quote_order=quote_order
                )
            except (Rejected, InsufficientFunds, DuplicateClientId, ValueError) as exc:
                if live is not None:
                    raise  # the step matched nothing: nothing at all is kept
                # Refused before it changed anything; what the account's step matched is kept, as when
                # that step ran in a transaction of its own.
                refused = exc
            row_update(acct, ["seq", "last_match_at"])
        if refused is not None:
            raise refused
        logger.debug("sim %s/%s created order %s (%s)", exchange, account, order.pk, order.client_order_id)
        return order

    def _order_new(
        self,
        row: SimExchange,
        acct: SimAccount,
        live: _Live | None,
        scripts: dict[str, SimPricePath],
        request: OrderRequest,
        *,
        now: datetime,
        time_in_force: TimeInForce,
        quote_order: bool,
    ) -> SimOrder:
        """order_create's order, under the account's lock after its step. The errors it raises (Rejected,
        InsufficientFunds, DuplicateClientId, ValueError) come before it changes anything."""
        exchange, account = row.exchange, acct.account
        market_type = MarketType(request.market_type)
        time_in_force = TimeInForce(time_in_force)
        market = self._market(row, market_type, request.symbol)
        last = self._price(row, market, now, scripts)
        quote_quantity = None
        if quote_order:
            if request.order_type != OrderType.MARKET:
                raise ValueError("a quote-sized order must be a MARKET order")
            quote_quantity = request.quantity
            base_quantity = floor_to_step(request.quantity / last, market.step_size)
            if base_quantity <= 0:
                raise Rejected(
                    f"Filter failure: LOT_SIZE ({request.quantity} {market.quote} buys nothing)",
                    code="-1013",
                    exchange=exchange,
                )
            request = dataclasses.replace(request, quantity=base_quantity)
        cid = request.client_order_id or f"sim{uuid.uuid4().hex[:24]}"
        if scalar(
            f"SELECT 1 FROM {SimOrder._meta.db_table} "  # noqa: S608 - our table name
            "WHERE exchange = %s AND account = %s AND market_type = %s AND client_order_id = %s LIMIT 1",
            [exchange, account, market_type.value, cid],
        ):
            raise DuplicateClientId(f"Duplicate order sent: client order id {cid}", code="-4116", exchange=exchange)
        # OrderRequest.__post_init__ holds: LIMIT and STOP_LIMIT have a price, conditional orders a stop price.
        if request.order_type in (OrderType.LIMIT, OrderType.STOP_LIMIT):
            ref_price = cast(Decimal, request.price)
        elif request.order_type == OrderType.STOP_MARKET:
            ref_price = cast(Decimal, request.stop_price)
        else:
            ref_price = last
        self._check_rules(row, market, request, ref_price)
        limit = request.price if request.order_type == OrderType.LIMIT else None
        takes = limit is not None and self._takes(request.side, limit, last)
        if takes and time_in_force == TimeInForce.POST_ONLY:
            raise Rejected(
                "Due to the order could not be executed as maker, the Post Only order will be rejected.",
                code="-5022",
                exchange=exchange,
            )
        if request.conditional:
            stop = cast(Decimal, request.stop_price)
            if (request.side == Side.BUY and last >= stop) or (request.side == Side.SELL and last <= stop):
                raise Rejected("Order would immediately trigger.", code="-2021", exchange=exchange)
        if live is not None and live.complete:  # the step read every open order and changed none
            open_same = sum(
                1
                for o in live.orders
                if (o.market_type, o.symbol, o.conditional) == (market_type, request.symbol, request.conditional)
            )
        else:
            open_same = scalar(
                f"SELECT COUNT(*) FROM {SimOrder._meta.db_table} "  # noqa: S608 - our table name
                "WHERE exchange = %s AND account = %s AND market_type = %s AND symbol = %s AND conditional = %s "
                "AND status IN " + _OPEN_IN,
                [exchange, account, market_type.value, request.symbol, request.conditional, *OPEN],
            )
        if open_same >= row.open_order_cap:
            raise Rejected(
                f"Filter failure: MAX_NUM_ORDERS ({row.open_order_cap} open orders on {request.symbol})",
                code="-2025",
                exchange=exchange,
            )
        self._books(exchange, account).wallet_ensure(self.wallet_of(exchange, market_type))
        order = SimOrder(
            exchange=exchange,
            account=account,
            market_type=market_type,
            symbol=request.symbol,
            side=request.side,
            order_type=request.order_type,
            conditional=request.conditional,
            reduce_only=request.reduce_only,
            client_order_id=cid,
            quantity=request.quantity,
            price=request.price,
            stop_price=request.stop_price,
            fee_currency=market.quote,
            created_at=now,
            time_in_force=time_in_force.value,
            quote_quantity=quote_quantity,
        )
        expire_unfilled = False
        if takes and time_in_force == TimeInForce.POST_ONLY_EXPIRE:
            expire_unfilled, order.reject_reason = True, "post-only order would take liquidity"
        elif (
            time_in_force == TimeInForce.FOK
            and limit is not None
            and (not takes or request.quantity > market.liquidity)
        ):
            expire_unfilled, order.reject_reason = True, "fill-or-kill order cannot fill at once"
        if not request.conditional:
            self._reserve(row, market, order, ref_price)
        self._bump(acct, order, now)
        self._order_save(order)
        if not expire_unfilled:
            self._execute_new(row, acct, market, order, last, now)
        if order.status in OPEN and (expire_unfilled or time_in_force == TimeInForce.IOC):
            self._expire(acct, order, now)
        return order

    def _execute_new(
        self, row: SimExchange, acct: SimAccount, market: CatalogMarket, order: SimOrder, last: Decimal, now: datetime
    ) -> None:
        """A new regular order takes what it can at once: MARKET all of it, a marketable LIMIT one step."""
        if order.order_type == OrderType.MARKET:
            self._fill(row, acct, market, order, order.quantity, last, now, maker=False)
        elif order.order_type == OrderType.LIMIT and self._crosses(order, last):
            self._fill(row, acct, market, order, market.liquidity, last, now, maker=False)

    def _expire(self, acct: SimAccount, order: SimOrder, now: datetime) -> None:
        """An order whose time in force ran out at once: EXPIRED, its reservation released."""
        self._release(order, order.reserved)
        order.status = OrderStatus.EXPIRED.value
        self._bump(acct, order, now)
        self._order_save(order)

    @staticmethod
    def _takes(side: Side | str, limit: Decimal, last: Decimal) -> bool:
        """A new LIMIT at `limit` would trade against the market at `last` (it would be a taker)."""
        return last <= limit if side == Side.BUY else last >= limit

    @staticmethod
    def _crosses(order: SimOrder | _Resting, price: Decimal) -> bool:
        return price <= order.price if order.side == Side.BUY else price >= order.price

    @staticmethod
    def _stop_hit(order: SimOrder | _Resting, price: Decimal) -> bool:
        return price >= order.stop_price if order.side == Side.BUY else price <= order.stop_price

    def _find(
        self,
        exchange: str,
        account: str,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None,
        client_order_id: str | None,
        conditional: bool,
        lock: bool,
    ) -> SimOrder:
        if not exchange_order_id and not client_order_id:
            raise ValueError("give exchange_order_id or client_order_id")
        orders = SimOrder.objects.select_for_update() if lock else SimOrder.objects
        orders = orders.filter(
            exchange=exchange,
            account=account,
            market_type=MarketType(market_type),
            symbol=symbol,
            conditional=conditional,
        )
        if exchange_order_id:
            if not str(exchange_order_id).isdigit():
                raise NotFound(f"Order does not exist: {exchange_order_id}", code="-2013", exchange=exchange)
            orders = orders.filter(pk=int(exchange_order_id))
        if client_order_id:
            orders = orders.filter(client_order_id=client_order_id)
        order = orders.first()
        if order is None:
            raise NotFound(
                f"Order does not exist: id={exchange_order_id} client id={client_order_id} on {symbol}",
                code="-2013",
                exchange=exchange,
            )
        return order

    def order_get(
        self,
        exchange: str,
        account: str,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None = None,
        client_order_id: str | None = None,
        conditional: bool = False,
        now: datetime | None = None,
    ) -> OrderState:
        """One order, open or in history; NotFound otherwise."""
        self._match_for(exchange, account, now)
        order = self._find(
            exchange,
            account,
            symbol=symbol,
            market_type=market_type,
            exchange_order_id=exchange_order_id,
            client_order_id=client_order_id,
            conditional=conditional,
            lock=False,
        )
        return _state_of(order)

    def order_cancel(
        self,
        exchange: str,
        account: str,
        *,
        symbol: str,
        market_type: MarketType,
        exchange_order_id: str | None = None,
        client_order_id: str | None = None,
        conditional: bool = False,
        now: datetime | None = None,
    ) -> OrderState:
        """Cancel a live order and release its reservation; NotFound when it is unknown or no longer open."""
        now = now or self.clock()
        self._match_for(exchange, account, now)
        with self._locked(exchange, account) as acct:
            assert acct is not None  # noqa: S101 - a waiting lock always returns the row
            order = self._find(
                exchange,
                account,
                symbol=symbol,
                market_type=market_type,
                exchange_order_id=exchange_order_id,
                client_order_id=client_order_id,
                conditional=conditional,
                lock=True,
            )
            if order.status not in OPEN:
                # Binance answers -2011 "Unknown order sent." for a filled or cancelled order.
                raise NotFound(f"Unknown order sent: {order.pk} is {order.status}", code="-2011", exchange=exchange)
            self._release(order, order.reserved)
            order.status = OrderStatus.CANCELED.value
            self._bump(acct, order, now)
            self._order_save(order)
            row_update(acct, ["seq"])
        return _state_of(order)

    def order_list_open(
        self,
        exchange: str,
        account: str,
        market_type: MarketType,
        *,
        conditional: bool = False,
        symbol: str | None = None,
        now: datetime | None = None,
    ) -> list[OrderState]:
        market_type = MarketType(market_type)
        live = self._match_for(exchange, account, now)
        if live is not None:  # read just now, nothing matched since
            return [
                _state_of(o)
                for o in live
                if o.market_type == market_type and o.conditional == conditional and (not symbol or o.symbol == symbol)
            ]
        orders = SimOrder.objects.filter(
            exchange=exchange,
            account=account,
            market_type=market_type,
            conditional=conditional,
            status__in=OPEN,
        )
        if symbol:
            orders = orders.filter(symbol=symbol)
        return [_state_of(o) for o in orders.order_by("pk")]

    def order_updates_since(
        self,
        exchange: str,
        account: str,
        cursor: int,
        *,
        market_type: MarketType | None = None,
        now: datetime | None = None,
    ) -> tuple[list[OrderState], int]:
        """Orders changed after `cursor` (their latest state, in change order) and the cursor to pass next.

        Writers of one account are serialized on its SimAccount row and number its changes from
        that row's `seq`, so the account's sequence numbers commit in order and a reader never
        skips a change (the sequence is per account: other accounts' numbers are unrelated).
        """
        self._match_for(exchange, account, now)
        orders = SimOrder.objects.filter(exchange=exchange, account=account, update_seq__gt=cursor)
        if market_type is not None:
            orders = orders.filter(market_type=MarketType(market_type))
        changed = list(orders.order_by("update_seq"))
        return [_state_of(o) for o in changed], (changed[-1].update_seq if changed else cursor)

    def stream_cursor(self, exchange: str, account: str) -> StreamCursor:
        """The cursor of a stream that starts now: nothing before it is reported."""
        with transaction.atomic():
            self._account_lock(exchange, account)  # the account's writers hold it: the three maxima agree
            orders = SimOrder.objects.filter(exchange=exchange, account=account)
            top = orders.aggregate(seq=Max("update_seq"), order_id=Max("pk"))
            fill_id = SimFill.objects.filter(order__in=orders).aggregate(m=Max("pk"))["m"]
        return StreamCursor(seq=top["seq"] or 0, order_id=top["order_id"] or 0, fill_id=fill_id or 0)

    def order_events_since(
        self,
        exchange: str,
        account: str,
        cursor: StreamCursor,
        *,
        market_type: MarketType | None = None,
        now: datetime | None = None,
    ) -> tuple[list[OrderEvent], StreamCursor]:
        """Every state the account's orders went through after `cursor`, oldest first, and the next cursor.

        Rebuilt from the rows: creation (NEW), each fill (TRADE), then a final CANCELED, EXPIRED,
        REJECTED or TRIGGERED; so an order created and cancelled between two polls still shows
        NEW first. An account's orders, fills and sequence numbers are written under its
        SimAccount row lock, so within the account their ids grow in commit order and nothing is
        skipped (ids are exchange-wide and interleave across accounts; the cursor is per account).
        """
        self._match_for(exchange, account, now)
        orders = SimOrder.objects.filter(exchange=exchange, account=account, update_seq__gt=cursor.seq)
        if market_type is not None:
            orders = orders.filter(market_type=MarketType(market_type))
        changed = list(orders.order_by("update_seq"))
        if not changed:
            return [], cursor
        fills: dict[int, list[SimFill]] = {}
        for fill in SimFill.objects.filter(order__in=changed, pk__gt=cursor.fill_id).order_by("pk"):
            fills.setdefault(fill.order_id, []).append(fill)
        events: list[OrderEvent] = []
        for order in changed:
            new_fills = fills.get(order.pk, [])
            filled = order.filled_quantity - sum((f.quantity for f in new_fills), ZERO)
            cost = order.cost - sum((f.quantity * f.price for f in new_fills), ZERO)
            fee = order.fee - sum((f.fee for f in new_fills), ZERO)
            if order.pk > cursor.order_id:
                snapshot = _snapshot(order, OrderStatus.NEW, ZERO, ZERO, ZERO, order.created_at)
                events.append(OrderEvent("NEW", snapshot, None, order.created_at))
            for fill in new_fills:
                filled, cost, fee = filled + fill.quantity, cost + fill.quantity * fill.price, fee + fill.fee
                status = OrderStatus.FILLED if filled >= order.quantity else OrderStatus.PARTIALLY_FILLED
                snapshot = _snapshot(order, status, filled, quantize(cost), quantize(fee), fill.created_at)
                events.append(OrderEvent("TRADE", snapshot, fill, fill.created_at))
            if order.status not in (*OPEN, OrderStatus.FILLED.value):
                events.append(OrderEvent(order.status, order, None, order.updated_at))
        events.sort(key=lambda e: e.at)  # stable: one order's events keep their order
        next_cursor = StreamCursor(
            seq=changed[-1].update_seq,
            order_id=max(cursor.order_id, *(o.pk for o in changed)),
            fill_id=max([cursor.fill_id, *(f.pk for group in fills.values() for f in group)]),
        )
        return events, next_cursor

    def fill_list(
        self,
        exchange: str,
        account: str,
        market_type: MarketType,
        *,
        symbol: str | None = None,
        exchange_order_id: str | None = None,
    ) -> list[FillRecord]:
        fills = SimFill.objects.select_related("order").filter(
            order__exchange=exchange, order__account=account, order__market_type=MarketType(market_type)
        )
        if symbol:
            fills = fills.filter(order__symbol=symbol)
        if exchange_order_id:
            fills = fills.filter(order_id=int(exchange_order_id))
        return [
            FillRecord(
                fill_id=f.pk,
                exchange_order_id=str(f.order_id),
                client_order_id=f.order.client_order_id,
                symbol=f.order.symbol,
                side=Side(f.order.side),
                quantity=f.quantity,
                price=f.price,
                fee=f.fee,
                fee_currency=f.fee_currency,
                is_maker=f.is_maker,
                created_at=f.created_at,
            )
            for f in fills.order_by("pk")
        ]

    def position_list(self, exchange: str, account: str) -> list[PositionRecord]:
        return [
            PositionRecord(symbol=p.symbol, quantity=p.quantity, entry_price=p.entry_price)
            for p in SimPosition.objects.filter(exchange=exchange, account=account)
            .exclude(quantity=0)
            .order_by("symbol")
        ]

    # --- matching ----------------------------------------------------------------------

    def match(
        self, exchange: str, *, now: datetime | None = None, force: bool = False, row: SimExchange | None = None
    ) -> MatchReport:
        """One matching step at `now`: trigger stops, fill crossing limits (one liquidity slice each).

        Runs at most once per MATCH_INTERVAL of engine time per exchange unless `force`; a
        clock that moved backwards (tests) runs it too. The step is claimed with a skip-locked
        try-lock (a caller whose claim finds the exchange row busy skips matching rather than
        wait), then an unlocked scan finds the orders due at `now`, and each account with one is
        handled in its own short transaction under its SimAccount lock, re-checked there; an
        account whose lock is held (its own call running) or stepped within MATCH_INTERVAL is left
        alone: that account's calls run its own step (_match_for). `row`: the exchange's row as
        the caller just read it (its last step's time spares a read when the step is not due).
        """
        now = now or self.clock()
        if not self._match_claim(exchange, now, force=force, last=row.last_match_at if row is not None else None):
            return MatchReport(ran=False)
        row = self._exchange_row(exchange, lock=False)
        due = self._due(row, self._scripts(exchange), now)
        # Orders created during the step (a trigger's child) wait for the next one, as they always have.
        by_account: dict[str, list[int]] = {}
        # Every open order of the exchange: plain tuples (a fan-out's thousands of resting orders cost
        # the step a model instance each otherwise), tested by `due` as the orders themselves.
        live = SimOrder.objects.filter(exchange=exchange, status__in=OPEN).order_by("pk")
        for values in live.values_list(*_Resting._fields):
            resting = _Resting._make(values)
            if due(resting) is not None:
                by_account.setdefault(resting.account, []).append(resting.pk)
        fills = triggers = 0
        for account, pks in by_account.items():
            # Skip-locked: an account busy with its own call is matched by that call's own step
            # or the next exchange step, rather than making this caller wait for it.
            with self._locked(exchange, account, wait=False) as acct:
                if acct is None or (not force and _recent(acct.last_match_at, now)):
                    continue
                locked = SimOrder.objects.select_for_update().filter(pk__in=pks, status__in=OPEN).order_by("pk")
                done = self._step_orders(row, acct, locked, due, now)
                fills, triggers = fills + done[0], triggers + done[1]
                row_update(acct, ["seq", "last_match_at"])
        return MatchReport(ran=True, fills=fills, triggers=triggers)

    def _match_for(self, exchange: str, account: str, now: datetime | None) -> list[SimOrder] | None:
        """The lazy matching before a call of `account`: the exchange's step, then the account's own.

        The exchange's step may be running in another caller, or have skipped this account while
        it was busy; the account's own step (waiting for its lock: its calls serialize anyway)
        makes sure that what this call reads or writes is matched up to `now`. order_create runs
        the same two steps itself, the account's inside its own transaction.

        Returns the account's open orders (every market type, by id) when it read them and matched
        none, so a caller listing them needs no second read; else None.
        """
        now = now or self.clock()
        row = self._exchange_row(exchange, lock=False)
        self.match(exchange, now=now, row=row)
        stepped = row_select(SimAccount, "exchange = %s AND account = %s", [exchange, account])
        if stepped is not None and _recent(stepped.last_match_at, now):
            return None
        # An unlocked look first: most calls (order lookups, open-order lists) find nothing due, and
        # then only mark the account stepped, without waiting for its lock.
        live = rows_select(
            SimOrder,
            "exchange = %s AND account = %s AND status IN " + _OPEN_IN,
            [exchange, account, *OPEN],
            order_by="id",
        )
        if live:
            scripts = self._scripts(exchange)
            due = self._due(row, scripts, now)
            if any(due(order) is not None for order in live):
                with self._locked(exchange, account) as acct:
                    assert acct is not None  # noqa: S101 - a waiting lock always returns the row
                    self._step_account(row, acct, scripts, now)
                    row_update(acct, ["seq", "last_match_at"])
                return None
        if stepped is not None:
            stepped.last_match_at = now
            row_update(stepped, ["last_match_at"])
        return live

    def _step_account(
        self, row: SimExchange, acct: SimAccount, scripts: dict[str, SimPricePath], now: datetime
    ) -> _Live | None:
        """The account's own matching step at `now`, inside its locked transaction (_locked), unless it was
        stepped within MATCH_INTERVAL. None when it filled or triggered an order, else the open orders it
        read (`complete` False when it did not run).

        The account counts as stepped at `now` even when nothing was due: an order this call creates
        takes its next slice at the next step (MATCH_INTERVAL on), as at the exchange's. The caller
        saves `acct` (seq and last_match_at).
        """
        if _recent(acct.last_match_at, now):
            return _Live(orders=[], complete=False)
        orders = rows_select(
            SimOrder,
            "exchange = %s AND account = %s AND status IN " + _OPEN_IN,
            [row.exchange, acct.account, *OPEN],
            lock=True,
            order_by="id",
        )
        fills, triggers = self._step_orders(row, acct, orders, self._due(row, scripts, now), now)
        return None if fills or triggers else _Live(orders=orders, complete=True)

    def _due(
        self, row: SimExchange, scripts: dict[str, SimPricePath], now: datetime
    ) -> Callable[[SimOrder | _Resting], tuple[CatalogMarket, Decimal] | None]:
        """The test of a step at `now`: an order's market and price when it fills or triggers, else None."""
        prices: dict[tuple[str, str], Decimal] = {}

        def due(order: SimOrder | _Resting) -> tuple[CatalogMarket, Decimal] | None:
            market = catalog_market(MarketType(order.market_type), order.symbol)
            if market is None:
                return None
            key = (order.market_type, order.symbol)
            if key not in prices:
                prices[key] = self._price(row, market, now, scripts)
            price = prices[key]
            if order.conditional:
                hit = self._stop_hit(order, price)
            else:
                hit = order.order_type == OrderType.MARKET or self._crosses(order, price)
            return (market, price) if hit else None

        return due

    def _step_orders(
        self,
        row: SimExchange,
        acct: SimAccount,
        orders: Iterable[SimOrder],
        due: Callable[[SimOrder | _Resting], tuple[CatalogMarket, Decimal] | None],
        now: datetime,
    ) -> tuple[int, int]:
        """Fill or trigger the due ones among the account's locked open `orders`; (fills, triggers).
        Marks the account stepped at `now` (the caller saves it)."""
        fills = triggers = 0
        for order in orders:
            found = due(order)  # under the lock: a cancel or fill may have come since an unlocked scan
            if found is None:
                continue
            market, price = found
            if order.conditional:
                self._trigger(row, acct, market, order, price, now)
                triggers += 1
            elif order.order_type == OrderType.MARKET:
                self._fill(row, acct, market, order, order.quantity, price, now, maker=False)
                fills += 1
            else:
                self._fill(row, acct, market, order, market.liquidity, order.price, now, maker=True)
                fills += 1
        acct.last_match_at = now
        return fills, triggers

    def _match_claim(self, exchange: str, now: datetime, *, force: bool, last: datetime | None = None) -> bool:
        """Claim the matching step at `now`: True when this caller runs it (last_match_at set to now, committed).

        SKIP LOCKED makes it a try-lock: the exchange row is held only by this claim and by
        configuration writes, each a few statements long; a busy row means someone else is
        claiming, and the step is skipped rather than waited for. `last`: the exchange's last step
        as the caller just read it (None: read it here).
        """
        if not force:
            if last is None:
                last = SimExchange.objects.filter(exchange=exchange).values_list("last_match_at", flat=True).first()
            if _recent(last, now):
                return False
        self._exchange_row(exchange, lock=False)  # exists from here on
        with transaction.atomic():
            row = SimExchange.objects.select_for_update(skip_locked=True).filter(exchange=exchange).first()
            if row is None:
                return False
            if not force and _recent(row.last_match_at, now):
                return False  # another process matched meanwhile
            row.last_match_at = now
            row.save(update_fields=["last_match_at"])
        return True

    def _trigger(
        self, row: SimExchange, acct: SimAccount, market: CatalogMarket, order: SimOrder, price: Decimal, now: datetime
    ) -> None:
        """Conditional → TRIGGERED, and its regular child (STOP_LIMIT → LIMIT, STOP_MARKET → MARKET, filled at once)."""
        order.status = OrderStatus.TRIGGERED.value
        self._bump(acct, order, now)
        self._order_save(order)
        is_limit = order.order_type == OrderType.STOP_LIMIT
        child = SimOrder(
            exchange=order.exchange,
            account=order.account,
            market_type=order.market_type,
            symbol=order.symbol,
            side=order.side,
            order_type=OrderType.LIMIT.value if is_limit else OrderType.MARKET.value,
            reduce_only=order.reduce_only,
            client_order_id=f"{order.client_order_id[:36]}-T",
            quantity=order.quantity,
            price=order.price if is_limit else None,
            fee_currency=market.quote,
            parent=order,
            created_at=now,
        )
        try:
            # No savepoint: _reserve changes nothing (the books write at the end) before it raises.
            self._reserve(row, market, child, order.price if is_limit else price)
        except InsufficientFunds as exc:
            child.status = OrderStatus.REJECTED.value
            child.reject_reason = str(exc)[:255]
        self._bump(acct, child, now)
        self._order_save(child)
        order._spawned_cache = child  # type: ignore[attr-defined]
        if child.status == OrderStatus.NEW:
            self._execute_new(row, acct, market, child, price, now)

    # --- faults ------------------------------------------------------------------------

    def fault_add(
        self,
        kind: str,
        *,
        exchange: str = "",
        endpoint: str = "",
        account: str = "",
        phase: str = SimFault.Phase.BEFORE,
        remaining: int | None = 1,
        probability: Decimal | None = None,
        latency_ms: int = 0,
    ) -> int:
        """Inject a fault; blank scope fields match anything. Returns its id."""
        if kind not in SimFault.Kind.values:
            raise ValueError(f"unknown fault kind {kind!r}")
        if endpoint and endpoint not in ENDPOINTS:
            raise ValueError(f"unknown endpoint {endpoint!r}; one of {', '.join(ENDPOINTS)}")
        fault = SimFault.objects.create(
            kind=kind,
            exchange=exchange,
            endpoint=endpoint,
            account=account,
            phase=phase,
            remaining=remaining,
            probability=probability,
            latency_ms=latency_ms,
        )
        return fault.pk

    def fault_clear(self, exchange: str | None = None) -> int:
        faults = SimFault.objects.all() if exchange is None else SimFault.objects.filter(exchange=exchange)
        return faults.delete()[0]

    def _fault_candidates(
        self, exchange: str, endpoint: str, account: str, *, phase: str | None, also_after: bool = False
    ) -> list[tuple]:
        """The faults in scope of one call, oldest first: (id, kind, remaining, probability, latency_ms, phase).

        `phase` None: the websocket faults of the account's stream, else the REST faults of that phase
        (and of phase "after" too with `also_after`).
        Plain SQL: every gateway call of every client passes here, and the ORM's query building for
        these OR'd scopes cost more CPU than the rest of a fault-free call's checks.
        """
        table = SimFault._meta.db_table
        sql = (
            f"SELECT id, kind, remaining, probability, latency_ms, phase FROM {table} "  # noqa: S608 - our table name
            "WHERE exchange IN (%s, '') AND endpoint IN (%s, '') AND account IN (%s, '') "
            "AND (remaining IS NULL OR remaining > 0) AND "
        )
        params: list[Any] = [exchange, endpoint, account]
        if phase is None:
            sql += "kind IN (%s, %s)"
            params += list(WS_FAULTS)
        elif also_after:
            sql += "kind NOT IN (%s, %s) AND phase IN (%s, %s)"
            params += [*WS_FAULTS, phase, SimFault.Phase.AFTER]
        else:
            sql += "kind NOT IN (%s, %s) AND phase = %s"
            params += [*WS_FAULTS, phase]
        with connection.cursor() as cursor:
            cursor.execute(sql + " ORDER BY id", params)
            return cursor.fetchall()

    def _fault_consume(self, candidates: list[tuple]) -> FaultHit | None:
        """The first candidate that fires, consumed by one conditional UPDATE (no transaction held).

        Every gateway call passes here, so a fault that matches every account (a latency on all
        creates) must not queue them: its row is locked for that one statement only.
        """
        table = SimFault._meta.db_table
        for fault_id, kind, remaining, probability, latency_ms, _phase in candidates:
            if probability is not None and Decimal(str(self.rng.random())) >= Decimal(str(probability)):
                continue
            with connection.cursor() as cursor:
                if remaining is None:
                    cursor.execute(f"UPDATE {table} SET fired = fired + 1 WHERE id = %s", [fault_id])  # noqa: S608
                else:
                    cursor.execute(
                        f"UPDATE {table} SET remaining = remaining - 1, fired = fired + 1 "  # noqa: S608
                        "WHERE id = %s AND remaining > 0",
                        [fault_id],
                    )
                taken = cursor.rowcount
            if taken:  # else spent by a concurrent call meanwhile, or deleted: try the next
                return FaultHit(fault_id=fault_id, kind=kind, latency_ms=latency_ms)
        return None

    def fault_take(self, exchange: str, endpoint: str, account: str, *, phase: str = "before") -> FaultHit | None:
        """Consume the first matching REST fault for this call and phase (the HTTP server shapes the reply)."""
        return self._fault_consume(self._fault_candidates(exchange, endpoint, account, phase=phase))

    def fault_take_before(self, exchange: str, endpoint: str, account: str) -> tuple[FaultHit | None, bool]:
        """fault_take of phase "before", and whether a fault of phase "after" was armed for the call then: the
        server takes an "after" fault only then, so a fault-free call costs one query instead of two."""
        candidates = self._fault_candidates(exchange, endpoint, account, phase=SimFault.Phase.BEFORE, also_after=True)
        before = [c for c in candidates if c[5] == SimFault.Phase.BEFORE]
        return self._fault_consume(before), len(before) < len(candidates)

    def fault_ws_take(self, exchange: str, account: str) -> str | None:
        """Consume a websocket fault for the account's stream: "ws_drop", "ws_silent" or None."""
        hit = self._fault_consume(self._fault_candidates(exchange, "ws", account, phase=None))
        return hit.kind if hit else None

    def _caller_wait(self, latency_ms: int, exchange: str, endpoint: str) -> None:
        """Wait out a slow reply as the calling thread would: a CallPolicy timeout (the order queue's)
        shorter than the latency fires first, with the Network error a real client raises. In the
        dialect server the handler thread has no policy; the client's own timeout does this there.

        Never inside an engine transaction: fault_take's has committed. A caller that holds one of
        its own (a gateway call inside transaction.atomic, against the house rule) is logged."""
        if _in_transaction():
            logger.error(
                "sim latency of %d ms on %s/%s taken inside a database transaction: its locks are held meanwhile",
                latency_ms,
                exchange,
                endpoint,
            )
        limit_ms = call_policy_current().timeout_ms
        if limit_ms is not None and latency_ms > limit_ms:
            self.sleep(limit_ms / 1000)
            raise Network(
                f"{exchange} {endpoint}: request timed out after {limit_ms} ms (simulated)", exchange=exchange
            )
        self.sleep(latency_ms / 1000)

    def fault_check(self, exchange: str, endpoint: str, account: str, *, phase: str = "before") -> None:
        """Apply a matching fault: sleep for latency, or raise the typed error the real gateway would."""
        hit = self.fault_take(exchange, endpoint, account, phase=phase)
        if hit is None:
            return
        logger.info("sim fault %s on %s/%s %s (%s)", hit.kind, exchange, endpoint, phase, hit.fault_id)
        if hit.kind == SimFault.Kind.LATENCY:
            self._caller_wait(hit.latency_ms, exchange, endpoint)
        elif hit.kind == SimFault.Kind.TIMEOUT:
            if hit.latency_ms:
                self._caller_wait(hit.latency_ms, exchange, endpoint)
            raise Network(f"{exchange} {endpoint}: request timed out (simulated)", exchange=exchange)
        elif hit.kind == SimFault.Kind.HTTP_5XX:
            raise ExchangeError(
                f"{exchange} {endpoint}: HTTP 500 Internal Server Error (simulated)", code="500", exchange=exchange
            )
        elif hit.kind == SimFault.Kind.HTTP_429:
            raise RateLimited(
                f"{exchange} {endpoint}: HTTP 429 Too Many Requests (simulated)", code="429", exchange=exchange
            )
        elif hit.kind == SimFault.Kind.MAINTENANCE:
            raise Maintenance(f"{exchange} {endpoint}: system maintenance (simulated)", code="503", exchange=exchange)


default_engine = SimEngine()
