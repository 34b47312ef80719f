"""Order intake API (SPEC §6): validation naming every bad field with nothing written, enqueueing,
listing, user cancel, positions and the OpenAPI schema."""

from __future__ import annotations

import uuid
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.core.cache import cache
from django.utils import timezone
from rest_framework.test import APIClient

from exchanges.gateway import MarketRule, MarketType
from orders.models import OpenOrder, OrderEvent, PendingOrder, QueueDirty
from orders.validation import order_market_check, spot_sell_check
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
)

pytestmark = pytest.mark.django_db

URL = "/api/orders/"


@pytest.fixture(autouse=True)
def _no_cached_prices():
    # Quotes are read through Django's cache first; a quote cached by another test must not leak in.
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def market(plain_user):  # noqa: ANN001
    """The plain user's PAPER account with a spot and a futures strategy, ETH/USDT rules and fresh quotes."""
    account = AccountFactory(user=plain_user, exchange="PAPER", name="main")
    spot = StrategyAccountFactory(account=account, strategy=StrategyFactory(group_name="spot-a", market_type="SPOT"))
    futures = StrategyAccountFactory(
        account=account, strategy=StrategyFactory(group_name="fut-a", market_type="FUTURES")
    )
    for market_type in ("SPOT", "FUTURES"):
        MarketInfoFactory(
            market_type=market_type,
            symbol="ETH/USDT",
            tick_size=Decimal("0.01"),
            step_size=Decimal("0.0001"),
            min_qty=Decimal("0.001"),
            max_qty=Decimal("1000"),
            min_notional=Decimal("5"),
        )
        PriceQuoteFactory(market_type=market_type, symbol="ETH/USDT", price=Decimal("3000"), as_of=timezone.now())
    MarketInfoFactory(market_type="SPOT", symbol="XRP/USDT", active=False)
    return {"account": account, "spot": spot, "futures": futures}


def payload(market: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    body = {
        "account": market["account"].pk,
        "strategy": "spot-a",
        "symbol": "ETH/USDT",
        "side": "BUY",
        "order_type": "LIMIT",
        "price": "2500",
        "quantity": "0.01",
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


def counts() -> tuple[int, int, int, int]:
    return (
        PendingOrder.objects.count(),
        OpenOrder.objects.count(),
        OrderEvent.objects.count(),
        QueueDirty.objects.count(),
    )


# --- Accepted orders ---------------------------------------------------------------------------


def test_valid_limit_is_queued_with_event_and_dirty_mark(user_client, market):  # noqa: ANN001
    before = timezone.now()
    response = user_client.post(URL, payload(market), format="json")

    assert response.status_code == 202, response.json()
    body = response.json()
    assert len(body["order_keys"]) == 1
    key = uuid.UUID(body["order_keys"][0])
    order = PendingOrder.objects.get(order_key=key)
    assert order.status == PendingOrder.Status.QUEUED
    assert order.strategy_account == market["spot"]
    assert order.market_type == "SPOT"
    assert (order.side, order.order_type, order.price, order.quantity) == (
        "BUY",
        "LIMIT",
        Decimal("2500"),
        Decimal("0.01"),
    )
    assert order.queue_seq > 0
    assert before <= order.signal_at <= timezone.now()
    assert order.express is False
    assert list(OrderEvent.objects.filter(order_key=key).values_list("kind", flat=True)) == ["queued"]
    assert QueueDirty.objects.filter(account=market["account"], market_type="SPOT", symbol="ETH/USDT").exists()
    assert body["orders"][0]["quantity"] == "0.01"
    assert body["orders"][0]["price"] == "2500"


def test_quantity_and_prices_are_floored_to_step_and_tick(user_client, market):  # noqa: ANN001
    response = user_client.post(
        URL,
        payload(market, order_type="STOP_LIMIT", price="2500.129", stop_price="2600.999", quantity="0.123456"),
        format="json",
    )

    assert response.status_code == 202, response.json()
    order = PendingOrder.objects.get()
    assert (order.quantity, order.price, order.stop_price) == (
        Decimal("0.1234"),
        Decimal("2500.12"),
        Decimal("2600.99"),
    )
    assert response.json()["orders"][0]["quantity"] == "0.1234"


def test_market_order_is_express_and_sized_by_the_quote(user_client, market):  # noqa: ANN001
    response = user_client.post(
        URL, payload(market, order_type="MARKET", price=None, symbol="eth/usdt", priority=-5), format="json"
    )

    assert response.status_code == 202, response.json()
    order = PendingOrder.objects.get()
    assert order.express is True
    assert order.price is None
    assert order.symbol == "ETH/USDT"
    assert order.priority == -5


def test_stop_market_on_futures_sell_needs_no_position(user_client, market):  # noqa: ANN001
    response = user_client.post(
        URL,
        payload(market, strategy="fut-a", side="SELL", order_type="STOP_MARKET", price=None, stop_price="2800"),
        format="json",
    )

    assert response.status_code == 202, response.json()
    order = PendingOrder.objects.get()
    assert (order.market_type, order.stop_price, order.express) == ("FUTURES", Decimal("2800"), False)


def test_spot_sell_within_the_position_is_accepted(user_client, market):  # noqa: ANN001
    PositionFactory(strategy_account=market["spot"], symbol="ETH/USDT", quantity=Decimal("1"))
    PendingOrderFactory(strategy_account=market["spot"], side="SELL", quantity=Decimal("0.5"), price=Decimal("4000"))

    response = user_client.post(URL, payload(market, side="SELL", price="3500", quantity="0.5"), format="json")

    assert response.status_code == 202, response.json()


# --- Rejections: the field is named and nothing is written --------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        ({"symbol": "DOGE/USDT"}, "symbol", "unknown symbol DOGE/USDT"),
        ({"symbol": "XRP/USDT"}, "symbol", "not active"),
        ({"symbol": "ETHUSDT"}, "symbol", "BASE/QUOTE"),
        ({"quantity": "0.0005"}, "quantity", "below the minimum 0.001"),
        ({"quantity": "0.00009"}, "quantity", "floored to 0"),
        ({"quantity": "2000"}, "quantity", "above the maximum 1000"),
        ({"quantity": "0.001", "price": "3000"}, "quantity", "minimum notional 5"),
        ({"price": None}, "price", "required for LIMIT"),
        ({"price": "0.001"}, "price", "below the tick size"),
        ({"order_type": "STOP_LIMIT"}, "stop_price", "required for STOP_LIMIT"),
        ({"order_type": "STOP_MARKET", "price": None}, "stop_price", "required for STOP_MARKET"),
        ({"order_type": "MARKET"}, "price", "must be empty for MARKET"),
        ({"stop_price": "2000"}, "stop_price", "must be empty for LIMIT"),
        ({"quantity": "-1"}, "quantity", "greater than zero"),
        ({"quantity": "0"}, "quantity", "greater than zero"),
        ({"price": "-2500"}, "price", "greater than zero"),
        ({"quantity": "abc"}, "quantity", "valid number"),
        ({"price": "NaN"}, "price", "valid number"),
        ({"quantity": "1e20"}, "quantity", "below 10^16"),
        ({"priority": "high"}, "priority", "valid integer"),
        ({"side": "HOLD"}, "side", "not a valid choice"),
        ({"order_type": "ICEBERG"}, "order_type", "not a valid choice"),
        ({"account": 999999}, "account", "unknown account 999999"),
        ({"account": "one"}, "account", "valid integer"),
        ({"account": None}, "account", "required"),
        ({"strategy": "nope"}, "strategy", "unknown strategy"),
        ({"strategy": None}, "strategy", "required"),
        ({"quantity": None}, "quantity", "required"),
    ],
)
def test_rejection_names_the_field_and_writes_nothing(user_client, market, overrides, field, fragment):  # noqa: ANN001
    before = counts()

    response = user_client.post(URL, payload(market, **overrides), format="json")

    assert response.status_code == 400
    errors = response.json()["errors"]
    assert field in errors, errors
    assert any(fragment in message for message in errors[field]), errors[field]
    assert counts() == before


def test_market_order_without_a_fresh_price_is_rejected(user_client, market):  # noqa: ANN001
    from exchanges.models import PriceQuote

    PriceQuote.objects.filter(market_type="SPOT").update(as_of=timezone.now() - timedelta(seconds=121))
    before = counts()

    response = user_client.post(URL, payload(market, order_type="MARKET", price=None), format="json")

    assert response.status_code == 400
    assert any("no fresh market price" in m for m in response.json()["errors"]["price"])
    assert counts() == before


def test_foreign_account_reads_as_unknown(user_client, market):  # noqa: ANN001
    other = AccountFactory(user=UserFactory(), exchange="PAPER")
    StrategyAccountFactory(account=other, strategy=market["spot"].strategy)
    before = counts()

    response = user_client.post(URL, payload(market, account=other.pk), format="json")

    assert response.status_code == 400
    assert response.json()["errors"]["account"] == [f"unknown account {other.pk}"]
    assert counts() == before


def test_staff_cannot_order_on_another_users_account(staff_client, market):  # noqa: ANN001
    response = staff_client.post(URL, payload(market), format="json")

    assert response.status_code == 400
    assert "account" in response.json()["errors"]
    assert PendingOrder.objects.count() == 0


def test_inactive_account_strategy_and_missing_link(user_client, market):  # noqa: ANN001
    market["account"].is_active = False
    market["account"].save()
    response = user_client.post(URL, payload(market), format="json")
    assert response.json()["errors"]["account"] == [f"account {market['account'].pk} is inactive"]

    market["account"].is_active = True
    market["account"].save()
    strategy = market["spot"].strategy
    strategy.is_active = False
    strategy.save()
    response = user_client.post(URL, payload(market), format="json")
    assert response.json()["errors"]["strategy"] == ["strategy 'spot-a' is inactive"]

    StrategyFactory(group_name="unlinked", market_type="SPOT")
    response = user_client.post(URL, payload(market, strategy="unlinked"), format="json")
    assert response.status_code == 400
    assert "not active on account" in response.json()["errors"]["strategy"][0]
    assert counts() == (0, 0, 0, 0)


def test_spot_sell_beyond_the_position_is_rejected(user_client, market):  # noqa: ANN001
    PositionFactory(strategy_account=market["spot"], symbol="ETH/USDT", quantity=Decimal("1"))
    PendingOrderFactory(strategy_account=market["spot"], side="SELL", quantity=Decimal("0.4"), price=Decimal("4000"))
    OpenOrderFactory(
        strategy_account=market["spot"],
        side="SELL",
        quantity=Decimal("0.5"),
        filled_quantity=Decimal("0.2"),
        price=Decimal("4100"),
    )
    before = counts()

    # Sellable: 1 − 0.4 (queued) − 0.3 (live remainder) = 0.3.
    response = user_client.post(URL, payload(market, side="SELL", price="3500", quantity="0.31"), format="json")

    assert response.status_code == 400
    [message] = response.json()["errors"]["quantity"]
    assert "exceeds the sellable 0.3 ETH/USDT" in message
    assert counts() == before
    assert (
        user_client.post(URL, payload(market, side="SELL", price="3500", quantity="0.3"), format="json").status_code
        == 202
    )


def test_spot_sell_without_any_position_is_rejected(user_client, market):  # noqa: ANN001
    response = user_client.post(URL, payload(market, side="SELL", price="3500"), format="json")

    assert response.status_code == 400
    assert "exceeds the sellable 0" in response.json()["errors"]["quantity"][0]
    assert counts() == (0, 0, 0, 0)


def test_every_bad_field_is_named_at_once(user_client, market):  # noqa: ANN001
    response = user_client.post(
        URL,
        {
            "account": 424242,
            "strategy": "nope",
            "symbol": "BTCUSDT",
            "side": "LONG",
            "order_type": "LIMIT",
            "quantity": "-3",
            "stop_price": "abc",
        },
        format="json",
    )

    assert response.status_code == 400
    errors = response.json()["errors"]
    assert set(errors) == {"account", "strategy", "symbol", "side", "quantity", "price", "stop_price"}
    assert counts() == (0, 0, 0, 0)


def test_market_rules_and_shape_errors_are_reported_together(user_client, market):  # noqa: ANN001
    response = user_client.post(
        URL, payload(market, order_type="STOP_LIMIT", quantity="0.0005", price="0.001"), format="json"
    )

    errors = response.json()["errors"]
    assert set(errors) == {"quantity", "price", "stop_price"}


def test_not_a_json_object(user_client, market):  # noqa: ANN001
    response = user_client.post(URL, [1, 2], format="json")

    assert response.status_code == 400
    assert "non_field_errors" in response.json()["errors"]


def test_anonymous_requests_get_401():
    client = APIClient()
    assert client.post(URL, {}, format="json").status_code == 401
    assert client.get(URL).status_code == 401
    assert client.get("/api/positions/").status_code == 401
    assert client.delete(f"{URL}{uuid.uuid4()}/").status_code == 401


# --- Listing, cancelling, positions ------------------------------------------------------------


def test_list_shows_own_queued_and_live_orders_with_filters(user_client, market):  # noqa: ANN001
    queued = PendingOrderFactory(strategy_account=market["spot"], symbol="ETH/USDT")
    live = OpenOrderFactory(strategy_account=market["futures"], symbol="BTC/USDT", status="PARTIALLY_FILLED")
    PendingOrderFactory()  # another user's

    body = user_client.get(URL).json()
    assert body["count"] == 2
    by_key = {row["order_key"]: row for row in body["results"]}
    assert by_key[str(queued.order_key)]["location"] == "queued"
    assert by_key[str(queued.order_key)]["status"] == "QUEUED"
    assert by_key[str(queued.order_key)]["strategy"] == "spot-a"
    assert by_key[str(live.order_key)]["location"] == "live"
    assert by_key[str(live.order_key)]["exchange_order_id"] == live.exchange_order_id
    assert by_key[str(live.order_key)]["price"] == "3000"

    assert [r["order_key"] for r in user_client.get(URL, {"symbol": "btc/usdt"}).json()["results"]] == [
        str(live.order_key)
    ]
    assert user_client.get(URL, {"status": "QUEUED"}).json()["count"] == 1
    assert user_client.get(URL, {"account": market["account"].pk}).json()["count"] == 2
    assert user_client.get(URL, {"account": 999999}).json()["count"] == 0
    assert user_client.get(URL, {"account": "x"}).status_code == 400


def test_list_is_paginated_newest_first(user_client, market):  # noqa: ANN001
    orders = [PendingOrderFactory(strategy_account=market["spot"]) for _ in range(5)]

    page = user_client.get(URL, {"limit": 2, "offset": 0}).json()

    assert page["count"] == 5
    assert [r["order_key"] for r in page["results"]] == [str(o.order_key) for o in orders[::-1][:2]]
    assert page["next"] is not None


def test_delete_of_unknown_or_foreign_order_is_404(user_client, market):  # noqa: ANN001
    foreign = PendingOrderFactory()

    assert user_client.delete(f"{URL}{uuid.uuid4()}/").status_code == 404
    assert user_client.delete(f"{URL}{foreign.order_key}/").status_code == 404
    assert user_client.delete(f"{URL}not-a-uuid/").status_code == 404
    assert PendingOrder.objects.filter(pk=foreign.pk).exists()


def test_delete_of_a_queued_order_removes_it(user_client, market):  # noqa: ANN001
    key = user_client.post(URL, payload(market), format="json").json()["order_keys"][0]

    response = user_client.delete(f"{URL}{key}/")

    assert response.status_code == 202, response.content
    assert response.json() == {"order_key": key, "state": "cancelled"}
    assert not PendingOrder.objects.filter(order_key=key).exists()
    assert list(OrderEvent.objects.filter(order_key=key).order_by("id").values_list("kind", flat=True)) == [
        "queued",
        "cancelled",
    ]


def test_delete_of_a_live_order_marks_it_for_the_queue_job(user_client, market):  # noqa: ANN001
    live = OpenOrderFactory(strategy_account=market["spot"])

    response = user_client.delete(f"{URL}{live.order_key}/")

    assert response.status_code == 202
    assert response.json()["state"] == "cancelling"
    live.refresh_from_db()
    assert (live.status, live.cancel_requested_by) == ("CANCELLING", "USER")
    assert QueueDirty.objects.filter(account=market["account"], symbol=live.symbol).exists()


def test_delete_of_an_ended_order_is_409(user_client, market):  # noqa: ANN001
    key = uuid.uuid4()
    OrderEvent.objects.create(order_key=key, kind="queued", account=market["account"], symbol="ETH/USDT")
    OrderEvent.objects.create(order_key=key, kind="filled", account=market["account"], symbol="ETH/USDT")

    response = user_client.delete(f"{URL}{key}/")

    assert response.status_code == 409
    assert response.json() == {"order_key": str(key), "state": "ended"}
    assert OrderEvent.objects.filter(order_key=key).count() == 2


def test_positions_lists_own_open_positions(user_client, market):  # noqa: ANN001
    held = PositionFactory(strategy_account=market["spot"], symbol="ETH/USDT", quantity=Decimal("1.5"))
    PositionFactory(strategy_account=market["futures"], symbol="BTC/USDT", quantity=Decimal("0"))
    PositionFactory(symbol="ETH/USDT")  # another user's

    body = user_client.get("/api/positions/").json()
    assert [(r["id"], r["quantity"], r["strategy"]) for r in body["results"]] == [(held.pk, "1.5", "spot-a")]
    assert user_client.get("/api/positions/", {"include_flat": "true"}).json()["count"] == 2
    assert user_client.get("/api/positions/", {"symbol": "BTC/USDT", "include_flat": "true"}).json()["count"] == 1


def test_schema_lists_the_order_and_position_paths(staff_client):  # noqa: ANN001
    response = staff_client.get("/api/schema/", HTTP_ACCEPT="application/json")

    assert response.status_code == 200
    paths = response.json()["paths"]
    assert {"post", "get"} <= set(paths["/api/orders/"])
    assert "delete" in paths["/api/orders/{order_key}/"]
    assert "get" in paths["/api/positions/"]
    assert staff_client.get("/api/docs/").status_code == 200


# --- The pure checks ---------------------------------------------------------------------------


def _rule(**overrides: Any) -> MarketRule:
    fields: dict[str, Any] = {
        "symbol": "1000PEPE/USDT",
        "market_type": MarketType.FUTURES,
        "base": "1000PEPE",
        "quote": "USDT",
        "tick_size": Decimal("0.0000005"),
        "step_size": Decimal("25"),
        "min_qty": Decimal("25"),
        "min_notional": Decimal("5"),
    }
    fields.update(overrides)
    return MarketRule(**fields)


def test_market_check_floors_to_non_power_of_ten_steps():
    check = order_market_check(
        rule=_rule(),
        order_type="LIMIT",
        quantity=Decimal("1074"),
        price=Decimal("0.0120007"),
        stop_price=None,
        market_price=None,
    )

    assert check.errors == {}
    assert (check.quantity, check.price) == (Decimal("1050"), Decimal("0.0120005"))


def test_market_check_prices_market_notional_by_the_quote():
    check = order_market_check(
        rule=_rule(),
        order_type="MARKET",
        quantity=Decimal("400"),
        price=None,
        stop_price=None,
        market_price=Decimal("0.012"),
    )

    assert list(check.errors) == ["quantity"]
    assert "400 × 0.012 = 4.8" in check.errors["quantity"][0]


def test_spot_sell_check_never_counts_a_negative_remainder():
    assert spot_sell_check(quantity=Decimal("1"), held=Decimal("1"), in_sell_orders=Decimal("0"), symbol="X/Y") == {}
    errors = spot_sell_check(quantity=Decimal("0.1"), held=Decimal("1"), in_sell_orders=Decimal("2"), symbol="X/Y")
    assert "exceeds the sellable 0 X/Y" in errors["quantity"][0]


# --- Concurrency (PostgreSQL: the pair lock is an advisory lock) -----------------------------


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_spot_sells_cannot_spend_the_same_position(plain_user):  # noqa: ANN001
    import threading

    from django.db import connection as thread_connection

    from orders.intake import IntakeRequest, order_intake
    from orders.validation import OrderRejectedError

    account = AccountFactory(user=plain_user, exchange="PAPER")
    spot = StrategyAccountFactory(account=account, strategy=StrategyFactory(group_name="race", market_type="SPOT"))
    MarketInfoFactory(market_type="SPOT", symbol="ETH/USDT")
    PositionFactory(strategy_account=spot, symbol="ETH/USDT", quantity=Decimal("1"))
    request = IntakeRequest(
        account_id=account.pk,
        strategy="race",
        symbol="ETH/USDT",
        side="SELL",
        order_type="LIMIT",
        quantity=Decimal("0.6"),
        price=Decimal("3500"),
    )
    barrier = threading.Barrier(4)
    outcomes: list[str] = []

    def sell() -> None:
        try:
            barrier.wait()
            order_intake(user=plain_user, request=request, now=timezone.now())
            outcomes.append("accepted")
        except OrderRejectedError:
            outcomes.append("rejected")
        finally:
            thread_connection.close()

    threads = [threading.Thread(target=sell) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert sorted(outcomes) == ["accepted", "rejected", "rejected", "rejected"]
    assert PendingOrder.objects.filter(side="SELL").count() == 1
