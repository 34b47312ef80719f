"""An account's books for one engine transaction: each row read once, each change written once at its end.

The engine's writers of one account hold its SimAccount lock for the whole transaction (see the
engine's docstring), so nothing else writes the account's balances, positions or orders
meanwhile, and the transaction may keep them in memory: a MARKET create used to read and write
the same quote balance three times (reserve, release, settle), insert its order and then update
it, and create its position through a savepoint. With the books it reads each balance wallet and
position once and writes each changed row once, when the transaction ends. With the account's
own matching step inside the create's transaction, plain-SQL fault lookups and first-use inserts
that return their rows, a new account's MARKET create (fault check included) went from 35
statements to 18 (the simulator shares its machine with the engine under test; bench.fanout
measures both).

Nothing reads these tables behind the books inside such a transaction: the engine reaches
balances only through `balance()`, positions through `position()`, and saves orders and fills
through `order_save()` / `fill_add()`. Rows are never inserted before `flush()` except a wallet's
default balances (the same insert, ignoring conflicts, that an unlocked balance read makes), so a
savepoint rolled back inside the transaction cannot leave the books holding a row that is gone.
Reads and writes are plain SQL (core.rawsql): the ORM's query building cost more CPU than the
statements themselves.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from django.db import connection

from core.money import ZERO
from core.rawsql import row_select, row_update, rows_insert, rows_select
from exchanges.gateway import MarketType
from exchanges.models import SimBalance, SimFill, SimOrder, SimPosition
from exchanges.simulator.catalog import DEFAULT_BALANCES

_CURRENT: ContextVar[Books | None] = ContextVar("sim_books", default=None)


class Books:
    """The locked account's balances, positions, and the orders and fills written in this transaction."""

    def __init__(self, exchange: str, account: str):
        self.exchange = exchange
        self.account = account
        self._balances: dict[tuple[str, str], SimBalance] = {}  # (wallet, currency)
        self._wallets: set[str] = set()  # wallets read
        self._positions: dict[str, SimPosition] = {}
        self._dirty: dict[int, SimBalance | SimPosition] = {}  # by id(): rows changed, in change order
        self._orders: dict[int, SimOrder] = {}  # by id(): orders to save, in first-save order
        self._fills: list[SimFill] = []

    def covers(self, exchange: str, account: str) -> bool:
        return (exchange, account) == (self.exchange, self.account)

    # --- balances -------------------------------------------------------------------------

    def _wallet_load(self, wallet: str) -> None:
        """Lock and read the wallet's rows; a never-seen wallet gets DEFAULT_BALANCES first (as balance_get does).

        The defaults go in with ON CONFLICT DO NOTHING (an unlocked balance read may insert the same
        rows meanwhile) and RETURNING: the rows this insert made are this transaction's until it
        commits, so only a conflict (rows someone else inserted) costs a second read.
        """
        where, key = "exchange = %s AND account = %s AND market_type = %s", [self.exchange, self.account, wallet]
        found = rows_select(SimBalance, where, key, lock=True)
        if not found:
            defaults = DEFAULT_BALANCES[MarketType(wallet)]
            values = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(defaults))
            money = SimBalance._meta.get_field("free")
            params: list[Any] = []
            for currency, amount in defaults.items():
                amounts = [money.get_db_prep_value(a, connection) for a in (amount, ZERO)]
                params += [self.exchange, self.account, wallet, currency, *amounts]
            with connection.cursor() as cursor:
                cursor.execute(
                    f"INSERT INTO {SimBalance._meta.db_table} "  # noqa: S608 - our table name
                    f"(exchange, account, market_type, currency, free, used) VALUES {values} "
                    "ON CONFLICT DO NOTHING RETURNING id, currency",
                    params,
                )
                made = dict((currency, pk) for pk, currency in cursor.fetchall())
            if len(made) == len(defaults):
                found = [
                    SimBalance(
                        id=made[c],
                        exchange=self.exchange,
                        account=self.account,
                        market_type=wallet,
                        currency=c,
                        free=amount,
                        used=ZERO,
                    )
                    for c, amount in defaults.items()
                ]
            else:
                found = rows_select(SimBalance, where, key, lock=True)
        self._wallets.add(wallet)
        for row in found:
            self._balances[(wallet, row.currency)] = row

    def balance(self, wallet: str, currency: str) -> SimBalance:
        """The wallet's `currency` row, read under a lock with the rest of the wallet on first use; a new row
        (inserted by flush) for a currency the wallet does not hold yet."""
        if wallet not in self._wallets:
            self._wallet_load(wallet)
        row = self._balances.get((wallet, currency))
        if row is None:
            row = SimBalance(exchange=self.exchange, account=self.account, market_type=wallet, currency=currency)
            self._balances[(wallet, currency)] = row
        return row

    def wallet_ensure(self, wallet: str) -> None:
        """The wallet exists (DEFAULT_BALANCES for a never-seen one), as an order's first step requires."""
        if wallet not in self._wallets:
            self._wallet_load(wallet)

    # --- positions, orders, fills -----------------------------------------------------------

    def position(self, symbol: str) -> SimPosition:
        """The futures position on `symbol`, read under a lock on first use; a flat new one (inserted by flush)."""
        position = self._positions.get(symbol)
        if position is None:
            position = row_select(
                SimPosition,
                "exchange = %s AND account = %s AND symbol = %s",
                [self.exchange, self.account, symbol],
                lock=True,
            ) or SimPosition(exchange=self.exchange, account=self.account, symbol=symbol)
            self._positions[symbol] = position
        return position

    def changed(self, row: SimBalance | SimPosition) -> None:
        self._dirty[id(row)] = row

    def order_save(self, order: SimOrder) -> None:
        self._orders.setdefault(id(order), order)

    def fill_add(self, fill: SimFill) -> None:
        self._fills.append(fill)

    def flush(self) -> None:
        """Write what changed: orders (a new one inserted once, with its final state), then their fills,
        then each changed balance and position row."""
        for order in self._orders.values():
            if order.pk is None:
                rows_insert([order])
            else:
                row_update(order)
        if self._fills:
            rows_insert(self._fills)  # each takes its order's key, inserted just above if new
        for row in self._dirty.values():
            if row.pk is None:
                rows_insert([row])
            else:
                row_update(row, ["free", "used"] if isinstance(row, SimBalance) else ["quantity", "entry_price"])
        self._orders.clear()
        self._fills.clear()
        self._dirty.clear()


def books_current(exchange: str, account: str) -> Books | None:
    """The books of the transaction running in this thread when they are `account`'s, else None."""
    books = _CURRENT.get()
    return books if books is not None and books.covers(exchange, account) else None


@contextmanager
def books_kept(exchange: str, account: str) -> Iterator[Books]:
    """Keep the account's books for the block (inside its locked transaction); flushed when it ends without error."""
    books = Books(exchange, account)
    token = _CURRENT.set(books)
    try:
        yield books
        books.flush()
    finally:
        _CURRENT.reset(token)
