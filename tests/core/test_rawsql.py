"""core.rawsql: plain-SQL reads and writes that give the same rows and objects as the ORM, on both databases."""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connections, transaction

from core.rawsql import (
    row_select,
    row_update,
    rows_delete,
    rows_insert,
    rows_select,
    rows_update,
    rows_values,
    scalar,
)
from exchanges.models import SimAccount, SimExchange, SimFill, SimOrder
from orders.models import QueueDirty
from tests.orders.factories import AccountFactory

pytestmark = pytest.mark.django_db

AT = datetime(2026, 12, 6, 3, 4, 5, 678901, tzinfo=UTC)


def _fields(obj: object) -> dict:
    return {f.attname: getattr(obj, f.attname) for f in type(obj)._meta.concrete_fields}  # type: ignore[attr-defined]


def _order(**kwargs) -> SimOrder:  # noqa: ANN003
    values = {
        "exchange": "BINANCE",
        "account": "acct-1",
        "market_type": "FUTURES",
        "symbol": "ETH/USDT",
        "side": "BUY",
        "order_type": "LIMIT",
        "client_order_id": "cid-1",
        "quantity": Decimal("0.015"),
        "price": Decimal("3100.25"),
        "created_at": AT,
        "updated_at": AT,
    }
    return SimOrder(**{**values, **kwargs})


def test_a_row_reads_as_the_orm_reads_it_decimals_datetimes_json_and_booleans():
    SimExchange.objects.create(
        exchange="BINANCE", last_match_at=AT, taker_fee_rate=Decimal("0.0004"), delisted=["SPOT:XRP/USDT"]
    )
    _order(conditional=True, stop_price=Decimal("3000")).save()

    exchange = row_select(SimExchange, "exchange = %s", ["BINANCE"])
    order = rows_select(SimOrder, "account = %s AND conditional = %s", ["acct-1", True])[0]

    assert _fields(exchange) == _fields(SimExchange.objects.get(exchange="BINANCE"))
    assert exchange.delisted == ["SPOT:XRP/USDT"] and exchange.last_match_at == AT
    assert exchange.taker_fee_rate == Decimal("0.0004")
    assert _fields(order) == _fields(SimOrder.objects.get())
    assert order.conditional is True and order.quantity == Decimal("0.015")
    assert order._state.adding is False
    assert row_select(SimExchange, "exchange = %s", ["BYBIT"]) is None
    assert scalar(f"SELECT COUNT(*) FROM {SimOrder._meta.db_table} WHERE account = %s", ["acct-1"]) == 1  # noqa: S608


def test_rows_come_in_the_order_asked_for_and_no_more_than_the_limit():
    for i in range(3):
        _order(client_order_id=f"cid-{i}").save()

    newest_first = rows_select(SimOrder, "account = %s", ["acct-1"], order_by="id DESC", limit=2)

    assert [o.client_order_id for o in newest_first] == ["cid-2", "cid-1"]
    assert row_select(SimOrder, "account = %s", ["acct-1"]).client_order_id == "cid-0"  # by primary key


def test_values_of_chosen_fields_read_as_queryset_values_reads_them():
    for i in range(2):
        _order(client_order_id=f"cid-{i}", price=Decimal("3100.5") + i, stop_price=None).save()
    fields = ("id", "client_order_id", "price", "stop_price", "conditional", "created_at")

    values = rows_values(SimOrder, fields, "account = %s", ["acct-1"], order_by="id")

    assert values == list(SimOrder.objects.filter(account="acct-1").order_by("id").values(*fields))
    assert values[1]["price"] == Decimal("3101.5") and values[0]["created_at"] == AT


def test_an_insert_gives_each_object_its_key_and_a_foreign_key_takes_the_key_of_an_object_saved_since():
    order = _order()
    fills = [
        SimFill(order=order, quantity=Decimal("0.005"), price=Decimal("3100.25"), fee_currency="USDT", created_at=AT),
        SimFill(order=order, quantity=Decimal("0.010"), price=Decimal("3100.5"), fee_currency="USDT", created_at=AT),
    ]

    rows_insert([order])  # after the fills were built around it
    rows_insert(fills)

    assert order.pk is not None and not order._state.adding
    assert [f.pk for f in fills] == list(SimFill.objects.order_by("id").values_list("id", flat=True))
    assert set(SimFill.objects.values_list("order_id", flat=True)) == {order.pk}
    assert _fields(SimOrder.objects.get(pk=order.pk)) == _fields(order)
    assert SimFill.objects.get(pk=fills[1].pk).price == Decimal("3100.5")
    assert fills[0].fee == Decimal(0)  # the field's default, as the database holds it


def test_an_insert_that_conflicts_inserts_nothing_and_leaves_the_object_without_a_key():
    first, second = SimAccount(exchange="BINANCE", account="a"), SimAccount(exchange="BINANCE", account="a", seq=9)

    rows_insert([first], conflict=("exchange", "account"))
    rows_insert([second], conflict=("exchange", "account"))

    assert first.pk is not None and second.pk is None
    assert list(SimAccount.objects.values_list("account", "seq")) == [("a", 0)]


def test_an_update_writes_only_the_fields_named_and_says_when_the_row_is_gone():
    order = _order()
    order.save()
    order.status, order.filled_quantity, order.updated_at = "FILLED", Decimal("0.015"), AT.replace(second=59)

    assert row_update(order, ["status", "updated_at"]) == 1
    stored = SimOrder.objects.get(pk=order.pk)
    assert (stored.status, stored.updated_at, stored.filled_quantity) == ("FILLED", AT.replace(second=59), 0)

    assert row_update(order) == 1  # every field
    assert SimOrder.objects.get(pk=order.pk).filled_quantity == Decimal("0.015")
    SimOrder.objects.filter(pk=order.pk).delete()
    assert row_update(order, ["status"]) == 0


def test_an_update_by_keys_sets_the_values_on_those_rows_only():
    orders = [_order(client_order_id=f"cid-{i}") for i in range(3)]
    for order in orders:
        order.save()

    assert rows_update(SimOrder, [orders[0].pk, orders[2].pk], updated_at=AT.replace(hour=9), update_seq=7) == 2
    assert rows_update(SimOrder, [], update_seq=8) == 0

    stored = dict(SimOrder.objects.values_list("client_order_id", "update_seq"))
    assert stored == {"cid-0": 7, "cid-1": 0, "cid-2": 7}
    assert SimOrder.objects.get(pk=orders[2].pk).updated_at == AT.replace(hour=9)


def test_a_delete_matches_a_datetime_as_the_orm_stored_it():
    account = AccountFactory()
    QueueDirty.objects.create(account=account, market_type="FUTURES", symbol="ETH/USDT", marked_at=AT)
    pair = {"account_id": account.pk, "market_type": "FUTURES", "symbol": "ETH/USDT"}

    assert rows_delete(QueueDirty, **pair, marked_at=AT.replace(microsecond=0)) == 0
    assert QueueDirty.objects.count() == 1
    assert rows_delete(QueueDirty, **pair, marked_at=AT) == 1
    assert not QueueDirty.objects.exists()


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_a_locked_read_waits_for_or_skips_a_row_another_transaction_holds():
    SimAccount.objects.create(exchange="BINANCE", account="held")
    where = ("exchange = %s AND account = %s", ["BINANCE", "held"])
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        try:
            with transaction.atomic():
                assert row_select(SimAccount, *where, lock=True) is not None
                holding.set()
                release.wait(10)
        finally:
            connections.close_all()

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert holding.wait(10)
        with transaction.atomic():
            assert rows_select(SimAccount, *where, lock=True, skip_locked=True) == []
            assert row_select(SimAccount, *where) is not None  # an unlocked read sees it
    finally:
        release.set()
        holder.join(10)
    with transaction.atomic():
        assert row_select(SimAccount, *where, lock=True, skip_locked=True) is not None
