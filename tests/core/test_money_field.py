"""MoneyField: money stays exact on SQLite (TEXT + the "decimal" collation + an exact SUM) and is
numeric(28, 12) on PostgreSQL; filters, ordering, MIN/MAX and SUM are numeric on both."""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from django.db import connection
from django.db.models import Max, Min, Sum

from accounts.models import StrategyCapital
from core.db import DecimalAwareSum, decimal_collate
from orders.models import PendingOrder
from positions.models import Fill, Position
from tests.orders.factories import PendingOrderFactory, StrategyAccountFactory

D = Decimal
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
# 28 significant digits (16 + 12): far past a REAL's 15-17.
WIDE = ["1234567.123456789012", "9999999999999999.999999999999", "-9999999999999999.999999999999", "0.000000000001"]


def fill(sa, realized: str) -> Fill:  # noqa: ANN001
    return Fill.objects.create(
        trade=None,
        strategy_account=sa,
        symbol="BTC/USDT",
        cum_filled_after=0,
        delta_qty=D("1"),
        price=D("100"),
        realized_pnl=D(realized),
        filled_at=T0,
        source=Fill.Source.ADJUSTMENT,
    )


@pytest.mark.django_db
def test_28_digit_values_read_back_exactly():
    sa = StrategyAccountFactory()
    for value in WIDE:
        row = fill(sa, value)
        assert Fill.objects.get(pk=row.pk).realized_pnl == D(value)
        assert Fill.objects.filter(pk=row.pk).values_list("realized_pnl", flat=True).get() == D(value)
    capital = StrategyCapital.objects.create(strategy_account=sa, allocated_capital=D(WIDE[0]))
    capital.refresh_from_db()
    assert capital.allocated_capital == D("1234567.123456789012")
    # bulk_update (CASE … WHEN) and a 13th decimal rounded as PostgreSQL's numeric(28, 12) does.
    capital.allocated_capital = D("1234567.1234567890125")
    StrategyCapital.objects.bulk_update([capital], ["allocated_capital"])
    assert StrategyCapital.objects.get(pk=capital.pk).allocated_capital == D("1234567.123456789013")


@pytest.mark.django_db
def test_filters_compare_numerically_past_15_digits():
    sa = StrategyAccountFactory()
    values = {
        "a": "1234567.123456789012",
        "b": "1234567.123456789013",  # differs from a in the 19th digit
        "c": "-0.000000000001",
        "zero": "0",
        "ten": "10",
        "nine": "9.5",
    }
    for symbol, quantity in values.items():
        Position.objects.create(strategy_account=sa, symbol=f"{symbol.upper()}/USDT", quantity=D(quantity))

    def symbols(qs) -> set[str]:  # noqa: ANN001
        return {s.split("/")[0].lower() for s in qs.values_list("symbol", flat=True)}

    assert symbols(Position.objects.filter(quantity__gt=D("1234567.123456789012"))) == {"b"}
    assert symbols(Position.objects.filter(quantity__lt=0)) == {"c"}
    assert symbols(Position.objects.filter(quantity=0)) == {"zero"}
    assert symbols(Position.objects.exclude(quantity=0)) == set(values) - {"zero"}
    assert symbols(Position.objects.filter(quantity__gt=9)) == {"a", "b", "ten", "nine"}  # "10" > "9.5" as numbers
    assert symbols(Position.objects.filter(quantity__range=(D("9.5"), D("10")))) == {"ten", "nine"}
    assert symbols(Position.objects.filter(quantity__in=[D("10.0"), D("-1E-12")])) == {"ten", "c"}


@pytest.mark.django_db
def test_order_by_min_max_are_numeric():
    prices = ["10", "9.5", "1234567.123456789012", "1234567.123456789011", "0.5", "100"]
    sa = StrategyAccountFactory()
    for price in prices:
        PendingOrderFactory(strategy_account=sa, price=D(price))
    ordered = list(PendingOrder.objects.order_by("price").values_list("price", flat=True))
    assert ordered == sorted(D(p) for p in prices)
    assert list(PendingOrder.objects.order_by("-price").values_list("price", flat=True))[:2] == [
        D("1234567.123456789012"),
        D("1234567.123456789011"),
    ]
    got = PendingOrder.objects.aggregate(low=Min("price"), high=Max("price"))
    assert got == {"low": D("0.5"), "high": D("1234567.123456789012")}


@pytest.mark.django_db
def test_sum_is_exact():
    sa = StrategyAccountFactory()
    for value in ["1234567.123456789012", "0.000000000001", "9999999999.1", "-0.5"]:
        fill(sa, value)
    total = Fill.objects.aggregate(total=Sum("realized_pnl"))["total"]
    assert total == D("10001234565.723456789013")
    assert Fill.objects.filter(realized_pnl__gt=100).aggregate(total=Sum("realized_pnl"))["total"] == D(
        "10001234566.223456789012"
    )
    assert Fill.objects.filter(realized_pnl__gt=D("1e15")).aggregate(total=Sum("realized_pnl"))["total"] is None
    grouped = dict(Fill.objects.values_list("symbol").annotate(total=Sum("realized_pnl")))
    assert grouped == {"BTC/USDT": D("10001234565.723456789013")}


@pytest.mark.django_db
def test_columns_are_text_with_the_decimal_collation_on_sqlite_and_numeric_on_postgresql():
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("SELECT sql FROM sqlite_master WHERE name = 'orders_fill'")
            ddl = cursor.fetchone()[0]
            assert '"realized_pnl" text COLLATE "decimal" NOT NULL' in ddl or (
                '"realized_pnl" text COLLATE decimal NOT NULL' in ddl
            )
        else:
            cursor.execute(
                "SELECT data_type, numeric_precision, numeric_scale FROM information_schema.columns "
                "WHERE table_name = 'orders_fill' AND column_name = 'realized_pnl'"
            )
            assert cursor.fetchone() == ("numeric", 28, 12)


@pytest.mark.django_db(transaction=True)
@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="no sqlite3 command-line shell")
def test_the_sqlite3_shell_reads_the_columns_with_its_own_decimal_collation():
    """`manage.py dbshell` opens the sqlite3 shell, whose decimal extension provides the same collation."""
    if connection.vendor != "sqlite":
        pytest.skip("SQLite only")
    sa = StrategyAccountFactory()
    for value in ["10", "9.5", "1234567.123456789012"]:
        fill(sa, value)
    out = subprocess.run(
        [
            "sqlite3",
            connection.settings_dict["NAME"],
            "SELECT realized_pnl FROM orders_fill WHERE realized_pnl > '9.6' ORDER BY realized_pnl",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["10.000000000000", "1234567.123456789012"]


def test_collation_and_sum_helpers():
    assert decimal_collate("10", "9.5") == 1
    assert decimal_collate("1.0", "1.000") == 0
    assert decimal_collate("-0.000000000001", "0") == -1
    assert decimal_collate("abc", "1") == 1  # never stored; sorts after numbers, consistently

    def total(*values):  # noqa: ANN002, ANN202
        agg = DecimalAwareSum()
        for value in values:
            agg.step(value)
        return agg.finalize()

    assert total() is None and total(None) is None
    assert total(1, 2, None) == 3  # integers stay integers (counts, milliseconds)
    assert total(1, 0.5) == 1.5  # a REAL makes a REAL, as SQLite's own sum does
    assert total("0.1", "0.2", 1) == "1.3"  # exact: no 0.30000000000000004
    assert total(2**62, 2**62) == float(2**63)
