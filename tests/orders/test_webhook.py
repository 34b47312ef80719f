"""POST /api/webhook/ (SPEC §6): token check, fan-out sizing, close, all-or-nothing validation, dedupe,
CANCEL/CANCEL_ALL, and concurrency on PostgreSQL (identical deliveries; CANCEL_ALL beside the queue job)."""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
import time_machine
from django.core.cache import cache
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import StrategyCapital
from accounts.services import strategy_account_ref, strategy_webhook_token_set
from orders.models import OpenOrder, OrderEvent, PendingOrder, QueueDirty, SignalOrder, WebhookDelivery
from orders.validation import capital_quantity
from orders.webhook import webhook_payload_hash
from tests.orders.factories import (
    AccountFactory,
    MarketInfoFactory,
    OpenOrderFactory,
    PendingOrderFactory,
    PositionFactory,
    PriceQuoteFactory,
    StrategyAccountFactory,
    StrategyFactory,
    UserFactory,
    btc_futures_market,
    paper_market_info,
    strategy_link,
    webhook_strategy,
)

URL = "/api/webhook/"
TOKEN = "tv-alert-secret-123"
D = Decimal


@pytest.fixture(autouse=True)
def _no_cached_prices():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def world(db) -> dict[str, Any]:  # noqa: ANN001
    """A FUTURES strategy on two PAPER accounts (capital 10,000 at leverage 2; 5,000 at leverage 1), BTC/USDT
    rules (step 0.001, tick 0.1) and a fresh market quote of 40,000."""
    user = UserFactory()
    strategy = webhook_strategy(group_name="trend", market_type="FUTURES", token=TOKEN)
    a = strategy_link(strategy, AccountFactory(user=user, exchange="PAPER"), capital="10000", leverage="2")
    b = strategy_link(strategy, AccountFactory(user=user, exchange="PAPER"), capital="5000")
    btc_futures_market(max_qty=D("100"))
    return {"user": user, "strategy": strategy, "a": a, "b": b}


def body(**overrides: Any) -> dict[str, Any]:
    data = {
        "group_name": "trend",
        "token": TOKEN,
        "symbol": "BTC/USDT",
        "side": "BUY",
        "order_type": "LIMIT",
        "price": 50000,
        "qty_per": 10,
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def post(data: Any, **kwargs: Any) -> Any:
    return APIClient().post(URL, data, format="json", **kwargs)


def snapshot() -> tuple[int, ...]:
    return (
        PendingOrder.objects.count(),
        OpenOrder.objects.count(),
        OrderEvent.objects.count(),
        QueueDirty.objects.count(),
        WebhookDelivery.objects.count(),
    )


def orders_of(sa) -> list[PendingOrder]:  # noqa: ANN001
    return list(PendingOrder.objects.filter(strategy_account=sa).order_by("id"))


# --- Sizing and fan-out ----------------------------------------------------------------------------


def test_quantity_formula_by_hand():
    # 10,000 × 10 % = 1,000 of capital; / 50,000 = 0.02 BTC; × leverage 2 = 0.04 BTC.
    assert capital_quantity(capital=D("10000"), qty_per=D("10"), price=D("50000"), leverage=D("2")) == D("0.04")


def test_limit_signal_fans_out_to_every_active_account_sized_by_capital_and_leverage(world):  # noqa: ANN001
    inactive = strategy_link(world["strategy"], AccountFactory(exchange="PAPER"), capital="99999", is_active=False)
    paused_account = strategy_link(
        world["strategy"], AccountFactory(exchange="PAPER", is_active=False), capital="99999"
    )

    response = post(body())

    assert response.status_code == 202, response.json()
    a, b = world["a"], world["b"]
    (order_a,) = orders_of(a)
    (order_b,) = orders_of(b)
    # A: 10,000 × 10 % / 50,000 × 2 = 0.04; B: 5,000 × 10 % / 50,000 × 1 = 0.01.
    assert (order_a.quantity, order_a.price, order_a.side, order_a.order_type) == (
        D("0.04"),
        D("50000"),
        "BUY",
        "LIMIT",
    )
    assert (order_b.quantity, order_b.price) == (D("0.01"), D("50000"))
    assert order_a.market_type == order_b.market_type == "FUTURES"
    assert not orders_of(inactive) and not orders_of(paused_account)
    assert response.json() == {
        "orders": {str(a.account_id): [str(order_a.order_key)], str(b.account_id): [str(order_b.order_key)]},
        "cancelled": {},
        "signal": SignalOrder.objects.get(order_key=order_a.order_key).signal_id,  # the execution report's id
    }
    for order in (order_a, order_b):
        assert list(OrderEvent.objects.filter(order_key=order.order_key).values_list("kind", flat=True)) == ["queued"]
        assert QueueDirty.objects.filter(account_id=order.account_id, symbol="BTC/USDT").exists()
    delivery = WebhookDelivery.objects.get()
    assert delivery.reply == response.json() and delivery.delivery_id == "" and delivery.hash_window_open


def test_market_signal_is_sized_by_the_fresh_quote_floored_to_the_step(world):  # noqa: ANN001
    response = post(body(order_type="market", side="sell", price=None, qty_per="3.3333"))

    assert response.status_code == 202, response.json()
    (order_a,) = orders_of(world["a"])
    (order_b,) = orders_of(world["b"])
    # A: 10,000 × 3.3333 % / 40,000 × 2 = 0.0166665 → 0.016; B: 5,000 × 3.3333 % / 40,000 = 0.00416... → 0.004.
    assert (order_a.quantity, order_a.side, order_a.order_type, order_a.price) == (D("0.016"), "SELL", "MARKET", None)
    assert order_b.quantity == D("0.004")
    assert order_a.express and order_b.express


def test_stop_market_is_sized_on_its_stop_price_and_stop_limit_on_its_own_price(world):  # noqa: ANN001
    # A STOP_MARKET fills near its stop once triggered, not at today's 40,000 (issue 13).
    assert post(body(order_type="STOP_MARKET", price=None, stop_price="41000.05")).status_code == 202
    (stop_market,) = orders_of(world["a"])
    assert (stop_market.quantity, stop_market.stop_price) == (D("0.048"), D("41000"))  # 1,000 / 41,000 × 2
    PendingOrder.objects.all().delete()
    response = post(body(id="sl-1", order_type="STOP_LIMIT", price="25000", stop_price="26000"))
    assert response.status_code == 202, response.json()
    (stop_limit,) = orders_of(world["a"])
    assert (stop_limit.quantity, stop_limit.price, stop_limit.stop_price) == (D("0.08"), D("25000"), D("26000"))


def test_plain_text_content_type_is_parsed_as_json(world):  # noqa: ANN001
    import json

    response = APIClient().post(URL, json.dumps(body()), content_type="text/plain")
    assert response.status_code == 202, response.json()
    assert PendingOrder.objects.count() == 2


# --- Close (qty_per = -100) ---------------------------------------------------------------------


def test_minus_100_closes_each_position_with_an_opposite_market_order(world):  # noqa: ANN001
    c = strategy_link(world["strategy"], AccountFactory(exchange="PAPER"), capital="1000")
    PositionFactory(strategy_account=world["a"], symbol="BTC/USDT", quantity=D("0.5"), average_entry=D("39000"))
    PositionFactory(strategy_account=world["b"], symbol="BTC/USDT", quantity=D("-0.2"), average_entry=D("41000"))
    PositionFactory(strategy_account=c, symbol="ETH/USDT", quantity=D("3"))  # another symbol: not closed

    response = post(body(side="SELL", order_type="MARKET", price=None, qty_per=-100))

    assert response.status_code == 202, response.json()
    (close_a,) = orders_of(world["a"])
    (close_b,) = orders_of(world["b"])
    assert (close_a.side, close_a.order_type, close_a.quantity, close_a.price) == ("SELL", "MARKET", D("0.5"), None)
    assert (close_b.side, close_b.order_type, close_b.quantity) == ("BUY", "MARKET", D("0.2"))
    assert close_a.express and close_b.express
    assert not orders_of(c)
    assert response.json()["orders"][str(c.account_id)] == []


# --- Rejections: nothing written ----------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"token": "wrong"},
        {"token": None},
        {"token": ""},
        {"group_name": "no-such-group"},
        {"group_name": None},
        {"group_name": 7},
    ],
    ids=["bad-token", "no-token", "empty-token", "unknown-group", "no-group", "group-not-text"],
)
def test_bad_credentials_get_one_and_the_same_403(world, overrides):  # noqa: ANN001
    before = snapshot()
    response = post(body(**overrides))
    assert response.status_code == 403
    assert response.json() == {"detail": "invalid group_name or token"}
    assert snapshot() == before


def test_a_strategy_without_a_token_accepts_no_webhook(world):  # noqa: ANN001
    strategy_webhook_token_set(strategy=world["strategy"], token="")
    assert post(body()).status_code == 403
    assert post(body(token="")).status_code == 403
    assert snapshot() == (0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"symbol": None}, "symbol", "required"),
        ({"symbol": "BTCUSDT"}, "symbol", "canonical"),
        ({"side": None}, "side", "required"),
        ({"side": "HOLD"}, "side", "not a valid choice"),
        ({"order_type": None}, "order_type", "required"),
        ({"order_type": "TRAILING_STOP"}, "order_type", "not a valid choice"),
        ({"qty_per": None}, "qty_per", "required"),
        ({"qty_per": "ten"}, "qty_per", "valid number"),
        ({"qty_per": True}, "qty_per", "valid number"),
        ({"qty_per": -50}, "qty_per", "-100 to close"),
        ({"qty_per": -100.5}, "qty_per", "-100 to close"),
        ({"qty_per": 0}, "qty_per", "-100 to close"),
        ({"price": None}, "price", "required for LIMIT"),
        ({"price": "abc"}, "price", "valid number"),
        ({"price": -5}, "price", "greater than zero"),
        ({"order_type": "MARKET"}, "price", "must be empty"),
        ({"order_type": "STOP_LIMIT"}, "stop_price", "required"),
        ({"id": "x" * 101}, "id", "no more than 100"),
        ({"order_type": "CANCEL", "symbol": None}, "symbol", "required for CANCEL"),
    ],
)
def test_each_bad_field_is_a_400_naming_it_and_nothing_is_written(world, overrides, field, fragment):  # noqa: ANN001
    before = snapshot()
    response = post(body(**overrides))
    assert response.status_code == 400, response.json()
    errors = response.json()["errors"]
    assert field in errors, errors
    assert any(fragment in message for message in errors[field]), errors
    assert snapshot() == before


def test_several_bad_fields_are_named_together(world):  # noqa: ANN001
    response = post(body(side="UP", qty_per=-3, price=None))
    assert response.status_code == 400
    assert set(response.json()["errors"]) == {"side", "qty_per", "price"}


def test_not_an_object_is_a_400(world):  # noqa: ANN001
    assert post([1, 2]).status_code == 400
    response = APIClient().post(URL, "{not json", content_type="application/json")
    assert response.status_code == 400
    assert snapshot() == (0, 0, 0, 0, 0)


def test_an_inactive_strategy_is_a_400_once_authenticated(world):  # noqa: ANN001
    world["strategy"].is_active = False
    world["strategy"].save()
    response = post(body())
    assert response.status_code == 400
    assert "inactive" in response.json()["errors"]["group_name"][0]
    assert post(body(token="wrong")).status_code == 403  # the token is still checked first
    assert snapshot() == (0, 0, 0, 0, 0)


def test_one_invalid_account_rejects_the_whole_fan_out_naming_it(world):  # noqa: ANN001
    # A third account on another exchange whose rules make its share too small: 1,000 × 10 % / 50,000 = 0.002
    # BTC, below that exchange's minimum 0.01.
    strict = strategy_link(world["strategy"], AccountFactory(exchange="BINANCE"), capital="1000")
    MarketInfoFactory(
        exchange="BINANCE", market_type="FUTURES", symbol="BTC/USDT", tick_size=D("0.1"), step_size=D("0.001"),
        min_qty=D("0.01"), min_notional=D("100"),
    )  # fmt: skip
    before = snapshot()

    response = post(body())

    assert response.status_code == 400
    reply = response.json()
    assert reply["errors"] == {}
    # Named by its opaque reference and the rule: the token holder learns no account id, capital or size.
    assert list(reply["account_errors"]) == [strategy_account_ref(strict.pk)]
    messages = reply["account_errors"][strategy_account_ref(strict.pk)]["quantity"]
    assert "below the minimum 0.01" in messages[0]
    assert "sized from the account's capital" in messages[0]
    text = response.content.decode()
    assert "1000" not in text and "0.002" not in text and "leverage" not in text
    assert all(str(sa.account_id) not in reply["account_errors"] for sa in (world["a"], world["b"], strict))
    assert snapshot() == before
    assert not PendingOrder.objects.exists()


def test_the_operator_finds_the_rejected_account_and_its_figures_in_the_log(world, caplog):  # noqa: ANN001
    StrategyCapital.objects.filter(strategy_account=world["b"]).update(allocated_capital=D("40"))

    response = post(body())

    assert response.status_code == 400
    ref = strategy_account_ref(world["b"].pk)
    assert list(response.json()["account_errors"]) == [ref]
    # 40 × 10 % / 50,000 = 0.00008 BTC, below the step: the log names the account and shows the sizing.
    line = next(r.getMessage() for r in caplog.records if ref in r.getMessage())
    assert f"account {world['b'].account_id} ({ref})" in line
    assert "40 × 10 % ÷ 50000 × leverage 1" in line


def test_accounts_without_capital_or_a_fresh_price_are_named(world, settings):  # noqa: ANN001
    StrategyCapital.objects.filter(strategy_account=world["b"]).update(allocated_capital=0)
    response = post(body())
    assert response.status_code == 400
    ref_a, ref_b = strategy_account_ref(world["a"].pk), strategy_account_ref(world["b"].pk)
    assert list(response.json()["account_errors"]) == [ref_b]
    assert response.json()["account_errors"][ref_b]["quantity"] == [
        "no capital allocated to BTC/USDT trading on this account"
    ]

    settings.PRICE_MAX_AGE_TRADE = 120
    cache.clear()
    with time_machine.travel(timezone.now() + timedelta(minutes=5), tick=False):
        response = post(body(order_type="MARKET", price=None))
    assert response.status_code == 400
    assert "no fresh market price" in response.json()["account_errors"][ref_a]["price"][0]
    assert snapshot() == (0, 0, 0, 0, 0)


def test_unknown_symbol_and_spot_sell_beyond_the_position_are_account_errors(db):  # noqa: ANN001
    strategy = webhook_strategy(group_name="spotty", market_type="SPOT", token=TOKEN)
    sa = strategy_link(strategy, AccountFactory(exchange="PAPER"), capital="10000")
    MarketInfoFactory(market_type="SPOT", symbol="ETH/USDT", step_size=D("0.0001"), min_qty=D("0.0001"))
    PositionFactory(strategy_account=sa, symbol="ETH/USDT", quantity=D("0.1"))

    ref = strategy_account_ref(sa.pk)
    response = post(body(group_name="spotty", symbol="DOGE/USDT"))
    assert response.status_code == 400
    assert "unknown symbol DOGE/USDT" in response.json()["account_errors"][ref]["symbol"][0]

    # 10,000 × 10 % / 2,000 = 0.5 ETH to sell, but only 0.1 is held: the rule, not the position, is shown.
    response = post(body(group_name="spotty", symbol="ETH/USDT", side="SELL", price=2000))
    assert response.status_code == 400
    [message] = response.json()["account_errors"][ref]["quantity"]
    assert "exceeds the sellable ETH/USDT" in message
    assert "0.1" not in message and "0.5" not in message
    # Closing sells exactly what is held.
    response = post(body(group_name="spotty", symbol="ETH/USDT", side="SELL", order_type="MARKET", price=None,
                         qty_per=-100))  # fmt: skip
    assert response.status_code == 400  # no quote yet for the MARKET close
    PriceQuoteFactory(market_type="SPOT", symbol="ETH/USDT", price=D("2000"), as_of=timezone.now())
    response = post(body(group_name="spotty", symbol="ETH/USDT", side="SELL", order_type="MARKET", price=None,
                         qty_per=-100))  # fmt: skip
    assert response.status_code == 202, response.json()
    assert PendingOrder.objects.get().quantity == D("0.1")


# --- Dedupe ---------------------------------------------------------------------------------------


def test_same_id_is_one_delivery_and_replays_the_first_reply(world):  # noqa: ANN001
    first = post(body(id="alert-42"))
    assert first.status_code == 202
    # Later, with another price, even hours later: still the same delivery.
    with time_machine.travel(timezone.now() + timedelta(hours=3), tick=False):
        again = post(body(id="alert-42", price=45000))
    assert again.status_code == 202
    assert again.json() == first.json()
    assert again["X-Webhook-Duplicate"] == "true"
    assert "X-Webhook-Duplicate" not in first
    assert PendingOrder.objects.count() == 2
    assert WebhookDelivery.objects.get().delivery_id == "alert-42"
    # A new id is a new delivery.
    assert post(body(id="alert-43")).status_code == 202
    assert PendingOrder.objects.count() == 4


def test_the_same_id_of_another_strategy_is_another_delivery(world):  # noqa: ANN001
    other = webhook_strategy(group_name="other", market_type="FUTURES", token=TOKEN)
    strategy_link(other, world["a"].account, capital="10000")
    assert post(body(id="same")).status_code == 202
    assert post(body(id="same", group_name="other")).status_code == 202
    assert PendingOrder.objects.count() == 3


def test_same_payload_without_id_is_deduped_for_60_seconds(world):  # noqa: ANN001
    start = timezone.now()
    with time_machine.travel(start, tick=False) as clock:
        first = post(body())
        clock.shift(timedelta(seconds=59))
        # The token is not part of the payload's identity (a rotated token repeats the same signal).
        again = post(body())
        assert again.json() == first.json() and again["X-Webhook-Duplicate"] == "true"
        assert PendingOrder.objects.count() == 2
        different = post(body(price=49000))
        assert different.status_code == 202 and "X-Webhook-Duplicate" not in different
        assert PendingOrder.objects.count() == 4
        clock.shift(timedelta(seconds=1))  # 60 s after the first: a new delivery
        later = post(body())
        assert later.status_code == 202 and "X-Webhook-Duplicate" not in later
        assert later.json() != first.json()
        assert PendingOrder.objects.count() == 6
        clock.shift(timedelta(seconds=30))
        assert post(body()).json() == later.json()  # the new window dedupes in turn
    assert PendingOrder.objects.count() == 6
    rows = list(WebhookDelivery.objects.order_by("id").values_list("payload_hash", "hash_window_open"))
    assert [open_ for _, open_ in rows] == [False, True, True]
    assert rows[0][0] == webhook_payload_hash(body()) == webhook_payload_hash({**body(), "token": "other"})


def test_a_rejected_delivery_leaves_no_trace_so_a_fixed_retry_goes_through(world):  # noqa: ANN001
    StrategyCapital.objects.filter(strategy_account=world["b"]).update(allocated_capital=0)
    assert post(body(id="retry-me")).status_code == 400
    assert not WebhookDelivery.objects.exists()
    StrategyCapital.objects.filter(strategy_account=world["b"]).update(allocated_capital=5000)
    assert post(body(id="retry-me")).status_code == 202
    assert PendingOrder.objects.count() == 2


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("with_id", [True, False], ids=["id", "payload-hash"])
def test_two_concurrent_identical_deliveries_make_one_set_of_orders(world, monkeypatch, caplog, with_id):  # noqa: ANN001
    """Both requests are inside their transactions at once (the first is held open after the claim):
    the second waits on the unique index, then replays the first reply."""
    import orders.intake as intake

    real_enqueue = intake.orders_enqueue

    def slow_enqueue(**kwargs: Any) -> Any:
        time.sleep(0.5)
        return real_enqueue(**kwargs)

    # The webhook enqueues through the intake pipeline (orders.intake.orders_place).
    monkeypatch.setattr(intake, "orders_enqueue", slow_enqueue)
    data = body(id="race-1") if with_id else body()
    barrier = threading.Barrier(2)
    replies: list[Any] = []

    def deliver() -> None:
        try:
            barrier.wait()
            response = post(data)
            replies.append((response.status_code, response.json(), response.get("X-Webhook-Duplicate")))
        finally:
            connection.close()

    threads = [threading.Thread(target=deliver) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(replies) == 2
    assert [code for code, _, _ in replies] == [202, 202]
    assert replies[0][1] == replies[1][1]
    assert sorted(str(dup) for _, _, dup in replies) == ["None", "true"]
    assert PendingOrder.objects.count() == 2
    assert OrderEvent.objects.count() == 2
    assert WebhookDelivery.objects.count() == 1
    # The second request really raced: it found no delivery before its transaction and waited on the index.
    assert "concurrent duplicate delivery, replayed" in caplog.text


# --- CANCEL / CANCEL_ALL --------------------------------------------------------------------------


@pytest.fixture
def book(world) -> dict[str, Any]:  # noqa: ANN001
    """Queued and live orders of the strategy on two symbols, and an order of another strategy."""
    a, b = world["a"], world["b"]
    other = StrategyAccountFactory(account=a.account, strategy=StrategyFactory(market_type="FUTURES"))
    rows = {
        "a_btc_queued": PendingOrderFactory(strategy_account=a, symbol="BTC/USDT"),
        "a_btc_live": OpenOrderFactory(strategy_account=a, symbol="BTC/USDT"),
        "a_eth_queued": PendingOrderFactory(strategy_account=a, symbol="ETH/USDT"),
        "b_btc_live": OpenOrderFactory(strategy_account=b, symbol="BTC/USDT", status="PARTIALLY_FILLED"),
        "b_eth_live": OpenOrderFactory(strategy_account=b, symbol="ETH/USDT"),
        "other_btc_queued": PendingOrderFactory(strategy_account=other, symbol="BTC/USDT"),
    }
    for row in rows.values():
        OrderEvent.objects.create(order_key=row.order_key, kind="queued", account_id=row.account_id, symbol=row.symbol)
    return rows


def test_cancel_removes_queued_and_marks_live_orders_of_the_symbol(world, book):  # noqa: ANN001
    response = post({"group_name": "trend", "token": TOKEN, "order_type": "CANCEL", "symbol": "BTC/USDT"})

    assert response.status_code == 202, response.json()
    a, b = str(world["a"].account_id), str(world["b"].account_id)
    assert response.json() == {
        "orders": {},
        "cancelled": {
            a: {str(book["a_btc_queued"].order_key): "cancelled", str(book["a_btc_live"].order_key): "cancelling"},
            b: {str(book["b_btc_live"].order_key): "cancelling"},
        },
    }
    assert not PendingOrder.objects.filter(order_key=book["a_btc_queued"].order_key).exists()
    assert OrderEvent.objects.filter(order_key=book["a_btc_queued"].order_key).last().kind == "cancelled"
    for key in ("a_btc_live", "b_btc_live"):
        live = OpenOrder.objects.get(order_key=book[key].order_key)
        assert (live.status, live.cancel_requested_by) == ("CANCELLING", "USER")
    # Other symbols and other strategies are untouched.
    assert PendingOrder.objects.filter(order_key=book["a_eth_queued"].order_key, status="QUEUED").exists()
    assert OpenOrder.objects.get(order_key=book["b_eth_live"].order_key).status == "NEW"
    assert PendingOrder.objects.filter(order_key=book["other_btc_queued"].order_key).exists()
    assert QueueDirty.objects.filter(account_id=world["a"].account_id, symbol="BTC/USDT").exists()


def test_cancel_all_covers_every_symbol_of_the_strategy_and_only_it(world, book):  # noqa: ANN001
    response = post({"group_name": "trend", "token": TOKEN, "order_type": "cancel_all"})

    assert response.status_code == 202, response.json()
    cancelled = response.json()["cancelled"]
    states = {key: state for per_account in cancelled.values() for key, state in per_account.items()}
    assert states == {
        str(book["a_btc_queued"].order_key): "cancelled",
        str(book["a_eth_queued"].order_key): "cancelled",
        str(book["a_btc_live"].order_key): "cancelling",
        str(book["b_btc_live"].order_key): "cancelling",
        str(book["b_eth_live"].order_key): "cancelling",
    }
    assert list(PendingOrder.objects.values_list("order_key", flat=True)) == [book["other_btc_queued"].order_key]
    assert set(OpenOrder.objects.values_list("status", "cancel_requested_by")) == {("CANCELLING", "USER")}
    # A repeat (no id, same payload, within 60 s) is the same delivery; a new id finds nothing left to remove.
    assert post({"group_name": "trend", "token": TOKEN, "order_type": "cancel_all"}).json() == response.json()
    again = post({"id": "c2", "group_name": "trend", "token": TOKEN, "order_type": "CANCEL_ALL"}).json()
    assert sorted(state for per in again["cancelled"].values() for state in per.values()) == ["cancelling"] * 3


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_cancel_all_beside_the_running_queue_job_loses_no_order(monkeypatch, settings):  # noqa: ANN001
    """The queue job runs in a loop in another thread (promoting and demoting on the PAPER exchange) while
    CANCEL_ALL arrives; afterwards every order ends cancelled, once, with a complete history, and the
    exchange has no live order left."""
    from orders.jobs import rebalance_order_queue
    from orders.queue import queue_sweep_reset
    from tests.orders.queue_support import SpyFactory, enqueue, invariant_problems

    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    queue_sweep_reset()
    monkeypatch.setattr("orders.queue.gateway_for", SpyFactory())
    for symbol in ("BTC/USDT", "ETH/USDT"):
        paper_market_info(market_type="SPOT", symbol=symbol)
    strategy = webhook_strategy(group_name="grid", market_type="SPOT", token=TOKEN)
    sas = [strategy_link(strategy, AccountFactory(exchange="PAPER"), capital="1000") for _ in range(2)]
    # Far from the simulator's prices (BTC ~65,000, ETH ~3,200), so nothing fills.
    prices = {"BTC/USDT": (30000, 120000), "ETH/USDT": (2000, 5000)}

    def add_orders(offset: int) -> None:
        for sa in sas:
            for symbol, (low, high) in prices.items():
                for i in range(3):
                    enqueue(sa, "BUY", str(low + offset + i), symbol=symbol, quantity="0.01")
                    enqueue(sa, "SELL", str(high - offset - i), symbol=symbol, quantity="0.01")

    add_orders(0)
    for _ in range(3):
        rebalance_order_queue()
    assert OpenOrder.objects.count() == 16  # 2 accounts × 2 symbols × 2 sides × 2 slots
    stop = threading.Event()
    runs = [0]

    def queue_loop() -> None:
        try:
            while not stop.is_set():
                rebalance_order_queue()
                runs[0] += 1
        finally:
            connection.close()

    thread = threading.Thread(target=queue_loop)
    thread.start()
    try:
        # Better-priced orders make the running job demote and promote while the cancel lands.
        add_orders(10)
        time.sleep(0.3)
        response = post({"group_name": "grid", "token": TOKEN, "order_type": "CANCEL_ALL"})
        time.sleep(0.3)
    finally:
        stop.set()
        thread.join(30)
    assert response.status_code == 202, response.json()
    assert runs[0] > 0
    states = [state for per in response.json()["cancelled"].values() for state in per.values()]
    keys = {key for per in response.json()["cancelled"].values() for key in per}
    assert len(keys) == 48
    # Both paths taken: queued orders removed at once, live (or placing) ones marked for the queue job.
    assert {"cancelled", "cancelling"} <= set(states)
    print(f"queue runs beside the cancel: {runs[0]}; cancel states: {Counter(states)}")

    deadline = time.monotonic() + 60
    while (PendingOrder.objects.exists() or OpenOrder.objects.exists()) and time.monotonic() < deadline:
        rebalance_order_queue()
        time.sleep(0.2)

    assert not PendingOrder.objects.exists() and not OpenOrder.objects.exists()
    assert invariant_problems([sa.account_id for sa in sas], "SPOT") == []
    last = {}
    for key, kind in OrderEvent.objects.order_by("id").values_list("order_key", "kind"):
        last[str(key)] = kind
    assert set(last) == keys
    assert set(last.values()) == {"cancelled"}
    assert all(OrderEvent.objects.filter(order_key=uuid.UUID(key), kind="cancelled").count() == 1 for key in keys)
