"""The idempotent fill path: duplicates, concurrency, crash safety, day boundaries, spot floor, dust."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
import time_machine
from django.db import connection, connections

from exchanges.gateway import MarketType, OrderRequest, OrderState, OrderStatus, OrderType, Side
from exchanges.paper import PaperGateway
from exchanges.services import gateway_for
from notifications.models import AlertThrottle
from orders.faults import CrashPointError, crash_disable_all, crash_enable
from orders.fills import fill_apply
from orders.models import OpenOrder, OrderEvent, QueueDirty
from positions.fills import position_matches_fills
from positions.models import Fill, Position, Trade
from tests.orders.factories import MarketInfoFactory, OpenOrderFactory, StrategyAccountFactory

pytestmark = pytest.mark.django_db

D = Decimal
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
KST = ZoneInfo("Asia/Seoul")


@pytest.fixture(autouse=True)
def _ledger_invariant():
    yield
    assert position_matches_fills() == []


@pytest.fixture(autouse=True)
def _crash_points_off():
    yield
    crash_disable_all()


def state_of(
    order: OpenOrder,
    *,
    filled: str,
    average: str | None,
    status: OrderStatus = OrderStatus.PARTIALLY_FILLED,
    fee: str = "0",
    at: datetime = T0,
    exchange_order_id: str | None = None,
) -> OrderState:
    return OrderState(
        exchange_order_id=exchange_order_id or order.exchange_order_id,
        client_order_id=order.client_order_id,
        symbol=order.symbol,
        market_type=MarketType(order.market_type),
        side=Side(order.side),
        order_type=OrderType(order.order_type),
        status=status,
        quantity=order.quantity,
        filled_quantity=D(filled),
        average_price=D(average) if average else None,
        price=order.price,
        stop_price=order.stop_price,
        fee=D(fee),
        fee_currency="USDT",
        updated_at=at,
    )


def position(order: OpenOrder) -> Position:
    return Position.objects.get(strategy_account=order.strategy_account, symbol=order.symbol)


def kinds(order: OpenOrder) -> list[str]:
    return list(OrderEvent.objects.filter(order_key=order.order_key).order_by("id").values_list("kind", flat=True))


def test_the_same_fill_via_rest_then_stream_changes_the_position_once():
    order = OpenOrderFactory(quantity=D("2"), price=D("3000"))
    state = state_of(order, filled="1", average="3000", fee="3")

    assert fill_apply(order=order, state=state, source=Fill.Source.REST, now=T0) == D("1")
    assert fill_apply(order=order, state=state, source=Fill.Source.STREAM, now=T0) == 0

    pos = position(order)
    assert pos.quantity == D("1") and pos.average_entry == D("3000")
    fill = Fill.objects.get()
    assert (fill.delta_qty, fill.price, fill.fee, fill.source) == (D("1"), D("3000"), D("3"), "REST")
    trade = Trade.objects.get()
    assert (trade.cumulative_filled, trade.average_price, trade.order_key) == (D("1"), D("3000"), order.order_key)
    assert trade.strategy_account_id == order.strategy_account_id and trade.account_id == order.account_id
    row = OpenOrder.objects.get(pk=order.pk)
    assert row.status == OpenOrder.Status.PARTIALLY_FILLED and row.filled_quantity == D("1")
    assert kinds(order) == ["partially_filled"]
    assert QueueDirty.objects.filter(account=order.account, symbol=order.symbol).exists()


def test_increments_are_priced_from_cumulative_cost_and_a_complete_fill_ends_the_row():
    order = OpenOrderFactory(quantity=D("3"), side="BUY")
    fill_apply(order=order, state=state_of(order, filled="1", average="3000"), source="STREAM", now=T0)
    # 1 @ 3000 then 2 more for an average of 3020 → the increment cost 2 × 3030.
    applied = fill_apply(
        order=order,
        state=state_of(order, filled="3", average="3020", status=OrderStatus.FILLED, fee="9"),
        source="REST",
        now=T0,
    )
    assert applied == D("2")
    assert list(Fill.objects.order_by("id").values_list("delta_qty", "price", "cum_filled_after", "fee")) == [
        (D("1"), D("3000"), D("1"), D("0")),
        (D("2"), D("3030"), D("3"), D("9")),
    ]
    assert not OpenOrder.objects.filter(pk=order.pk).exists()
    assert kinds(order) == ["partially_filled", "filled"]
    assert position(order).quantity == D("3") and position(order).average_entry == D("3020")
    # A late duplicate after the row ended changes nothing.
    late = state_of(order, filled="3", average="3020", status=OrderStatus.FILLED)
    assert fill_apply(order=order, state=late, source="STREAM", now=T0) == 0
    assert Fill.objects.count() == 2


def test_sells_are_signed_negative_and_realize_pnl_on_the_position():
    sa = StrategyAccountFactory(strategy__market_type="FUTURES")
    buy = OpenOrderFactory(strategy_account=sa, quantity=D("2"), side="BUY")
    fill_apply(
        order=buy, state=state_of(buy, filled="2", average="3000", status=OrderStatus.FILLED), source="REST", now=T0
    )
    sell = OpenOrderFactory(strategy_account=sa, quantity=D("3"), side="SELL")
    fill_apply(
        order=sell, state=state_of(sell, filled="3", average="3100", status=OrderStatus.FILLED), source="REST", now=T0
    )

    sell_fill = Fill.objects.get(trade__exchange_order_id=sell.exchange_order_id)
    assert sell_fill.delta_qty == D("-3") and sell_fill.realized_pnl == D("200")
    pos = position(sell)
    assert pos.quantity == D("-1") and pos.average_entry == D("3100")  # flipped short at the fill price
    assert pos.realized_pnl == D("200")
    assert Trade.objects.get(exchange_order_id=sell.exchange_order_id).realized_pnl == D("200")


def test_an_older_report_than_the_one_recorded_is_old_news():
    order = OpenOrderFactory(quantity=D("2"))
    fill_apply(order=order, state=state_of(order, filled="1.5", average="3000"), source="STREAM", now=T0)
    assert fill_apply(order=order, state=state_of(order, filled="1", average="3000"), source="REST", now=T0) == 0
    assert Fill.objects.count() == 1 and position(order).quantity == D("1.5")
    assert OpenOrder.objects.get(pk=order.pk).filled_quantity == D("1.5")


def test_the_crash_point_after_the_trade_upsert_leaves_nothing_half_written():
    order = OpenOrderFactory(quantity=D("1"))
    state = state_of(order, filled="1", average="3000", status=OrderStatus.FILLED)
    crash_enable("fill.after_trade_upsert")
    with pytest.raises(CrashPointError):
        fill_apply(order=order, state=state, source="REST", now=T0)
    assert not Trade.objects.exists() and not Fill.objects.exists() and not Position.objects.exists()
    assert OpenOrder.objects.filter(pk=order.pk, status="NEW").exists()
    assert kinds(order) == []

    crash_disable_all()
    assert fill_apply(order=order, state=state, source="REST", now=T0) == D("1")
    assert fill_apply(order=order, state=state, source="REST", now=T0) == 0
    assert Fill.objects.count() == 1 and position(order).quantity == D("1")
    assert kinds(order) == ["filled"]


def test_a_spot_sell_below_zero_is_recorded_then_adjusted_to_zero_with_an_alert(caplog):
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    buy = OpenOrderFactory(strategy_account=sa, quantity=D("1"), side="BUY")
    fill_apply(
        order=buy, state=state_of(buy, filled="1", average="3000", status=OrderStatus.FILLED), source="REST", now=T0
    )
    sell = OpenOrderFactory(strategy_account=sa, quantity=D("1.5"), side="SELL")
    fill_apply(
        order=sell, state=state_of(sell, filled="1.5", average="3200", status=OrderStatus.FILLED), source="REST", now=T0
    )
    pos = position(sell)
    assert pos.quantity == 0 and pos.realized_pnl == D("200")
    adjustment = Fill.objects.get(source=Fill.Source.ADJUSTMENT)
    assert adjustment.trade is None and adjustment.delta_qty == D("0.5") and adjustment.realized_pnl == 0
    assert Fill.objects.get(trade__exchange_order_id=sell.exchange_order_id).delta_qty == D("-1.5")
    assert AlertThrottle.objects.filter(key=f"spot_negative:{sa.pk}:ETH/USDT").exists()
    assert "would go below zero" in caplog.text


def test_a_dust_remainder_below_min_qty_after_a_close_is_closed_by_an_adjustment():
    MarketInfoFactory(exchange="PAPER", market_type="FUTURES", symbol="BTC/USDT", min_qty=D("0.001"))
    sa = StrategyAccountFactory(strategy__market_type="FUTURES")
    buy = OpenOrderFactory(strategy_account=sa, symbol="BTC/USDT", quantity=D("0.0105"), side="BUY")
    fill_apply(
        order=buy,
        state=state_of(buy, filled="0.0105", average="60000", status=OrderStatus.FILLED),
        source="REST",
        now=T0,
    )
    sell = OpenOrderFactory(strategy_account=sa, symbol="BTC/USDT", quantity=D("0.01"), side="SELL")
    fill_apply(
        order=sell,
        state=state_of(sell, filled="0.01", average="61000", status=OrderStatus.FILLED),
        source="REST",
        now=T0,
    )
    pos = position(sell)
    assert pos.quantity == 0 and pos.average_entry == 0
    assert pos.realized_pnl == D("10")  # 0.01 × 1000; the adjustment realizes nothing
    adjustment = Fill.objects.get(source=Fill.Source.ADJUSTMENT)
    assert adjustment.delta_qty == D("-0.0005") and adjustment.price == D("60000")


def test_an_order_filling_across_kst_midnight_splits_realized_pnl_by_fill_time():
    """Two match steps of the PAPER engine on either side of 00:00 KST; each Fill carries its exchange time."""
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    gateway: PaperGateway = gateway_for(sa.account)  # type: ignore[assignment]
    before_midnight = datetime(2025, 3, 1, 23, 59, 50, tzinfo=KST)
    with time_machine.travel(before_midnight, tick=False) as traveller:
        gateway.engine.price_script("PAPER", "ETH/USDT", ["3000"])
        bought = gateway.create_order(
            OrderRequest("ETH/USDT", MarketType.SPOT, Side.BUY, OrderType.MARKET, D("8"), client_order_id="b1")
        )
        buy = OpenOrderFactory(
            strategy_account=sa,
            side="BUY",
            order_type="MARKET",
            quantity=D("8"),
            exchange_order_id=bought.exchange_order_id,
        )
        fill_apply(order=buy, state=bought, source="REST", now=bought.updated_at)

        gateway.engine.price_script("PAPER", "ETH/USDT", ["3000", "3100"], start_at=before_midnight, step_seconds=1)
        traveller.shift(2)
        placed = gateway.create_order(
            OrderRequest(
                "ETH/USDT", MarketType.SPOT, Side.SELL, OrderType.LIMIT, D("8"), price=D("3100"), client_order_id="s1"
            )
        )  # marketable at 3100: one liquidity slice (5 ETH) fills at once, before midnight
        sell = OpenOrderFactory(
            strategy_account=sa,
            side="SELL",
            quantity=D("8"),
            price=D("3100"),
            exchange_order_id=placed.exchange_order_id,
        )
        state = gateway.fetch_order(
            symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=placed.exchange_order_id
        )
        assert state.filled_quantity == D("5")
        fill_apply(order=sell, state=state, source="REST", now=state.updated_at)

        traveller.move_to(datetime(2025, 3, 2, 0, 0, 5, tzinfo=KST))
        state = gateway.fetch_order(
            symbol="ETH/USDT", market_type=MarketType.SPOT, exchange_order_id=placed.exchange_order_id
        )
        assert state.status == OrderStatus.FILLED
        fill_apply(order=sell, state=state, source="STREAM", now=state.updated_at)

    def realized_on(day: datetime) -> Decimal:
        start = day.astimezone(UTC)
        window = Fill.objects.filter(filled_at__gte=start, filled_at__lt=start + timedelta(days=1))
        return sum(window.values_list("realized_pnl", flat=True), D("0"))

    assert realized_on(datetime(2025, 3, 1, tzinfo=KST)) == D("500")  # 5 × (3100 − 3000)
    assert realized_on(datetime(2025, 3, 2, tzinfo=KST)) == D("300")  # 3 × (3100 − 3000)
    assert position(sell).quantity == 0
    assert kinds(sell) == ["partially_filled", "filled"]


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_threads_applying_the_same_fill_change_the_position_once():
    order = OpenOrderFactory(quantity=D("2"))
    state = state_of(order, filled="2", average="3000", status=OrderStatus.FILLED)
    barrier = threading.Barrier(2)
    results: list[Decimal] = []
    errors: list[BaseException] = []

    def worker(source: str) -> None:
        try:
            barrier.wait(timeout=10)
            results.append(fill_apply(order=order, state=state, source=source, now=T0))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=(s,)) for s in ("REST", "STREAM")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert sorted(results) == [D("0"), D("2")]
    assert Fill.objects.count() == 1 and Trade.objects.count() == 1
    assert position(order).quantity == D("2")
    assert kinds(order) == ["filled"]
    assert connection.vendor == "postgresql"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_two_threads_applying_different_fills_to_one_position_both_count():
    sa = StrategyAccountFactory(strategy__market_type="FUTURES")
    orders = [OpenOrderFactory(strategy_account=sa, quantity=D("1"), side="BUY") for _ in range(2)]
    prices = ["3000", "3100"]
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []

    def worker(order: OpenOrder, price: str) -> None:
        try:
            barrier.wait(timeout=10)
            state = state_of(order, filled="1", average=price, status=OrderStatus.FILLED)
            fill_apply(order=order, state=state, source="STREAM", now=T0)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=worker, args=pair) for pair in zip(orders, prices, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    pos = position(orders[0])
    assert pos.quantity == D("2") and pos.average_entry == D("3050")  # neither update was skipped
    assert Fill.objects.count() == 2


def test_a_spot_fee_in_the_base_asset_leaves_the_position_and_a_close_sells_what_exists():
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    buy = OpenOrderFactory(strategy_account=sa, quantity=D("1"), side="BUY")  # ETH/USDT
    bought = state_of(buy, filled="1", average="3000", status=OrderStatus.FILLED, fee="0.001")
    fill_apply(order=buy, state=replace(bought, fee_currency="ETH"), source="REST", now=T0)
    pos = position(buy)
    assert pos.quantity == D("0.999") and pos.average_entry == D("3000") and pos.realized_pnl == 0
    ledger = Fill.objects.get(trade__exchange_order_id=buy.exchange_order_id)
    assert (ledger.delta_qty, ledger.fee, ledger.fee_currency) == (D("0.999"), D("0.001"), "ETH")
    assert Trade.objects.get(exchange_order_id=buy.exchange_order_id).cumulative_filled == D("1")  # the order's fill

    # Closing sells the 0.999 the wallet holds: flat, no adjustment, no "below zero" alert.
    sell = OpenOrderFactory(strategy_account=sa, quantity=pos.quantity, side="SELL")
    sold = state_of(sell, filled="0.999", average="3100", status=OrderStatus.FILLED, fee="3.0969")
    fill_apply(order=sell, state=sold, source="REST", now=T0)
    pos = position(sell)
    assert pos.quantity == 0 and pos.realized_pnl == D("99.9")  # gross: 0.999 × (3100 − 3000)
    assert not Fill.objects.filter(source=Fill.Source.ADJUSTMENT).exists()
    assert not AlertThrottle.objects.filter(key__startswith="spot_negative").exists()


def test_fees_in_the_base_asset_do_not_touch_futures_positions():
    sa = StrategyAccountFactory(strategy__market_type="FUTURES")
    buy = OpenOrderFactory(strategy_account=sa, quantity=D("1"), side="BUY", symbol="BTC/USDT", market_type="FUTURES")
    bought = state_of(buy, filled="1", average="40000", status=OrderStatus.FILLED, fee="0.001")
    fill_apply(order=buy, state=replace(bought, fee_currency="BTC"), source="REST", now=T0)
    assert position(buy).quantity == D("1")
