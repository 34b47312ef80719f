"""Issue 13 probes of the intake, each turned into a test of its effect (status, body, rows not written):
out-of-range values, deep JSON, overflowing ids, unbounded echoes, strategy enumeration, STOP_MARKET
sizing and body caps — on SQLite and PostgreSQL alike."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal
from typing import Any

import pytest
from asgiref.testing import ApplicationCommunicator
from django.core.cache import cache
from django.utils import timezone
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from rest_framework.test import APIClient

from accounts.services import strategy_account_ref
from core.middleware import asgi_body_limit
from core.parsers import MAX_JSON_DEPTH, json_depth_exceeds
from core.text import echo
from exchanges.gateway import MarketRule, MarketType
from exchanges.models import MarketInfo, PriceQuote
from orders.models import OpenOrder, OrderEvent, PendingOrder, QueueDirty, Signal, SignalOrder, WebhookDelivery
from orders.validation import order_market_check
from tests.orders.factories import (
    AccountFactory,
    MarketInfoFactory,
    PriceQuoteFactory,
    StrategyAccountFactory,
    StrategyFactory,
    UserFactory,
    btc_futures_market,
    strategy_link,
    webhook_strategy,
)

pytestmark = pytest.mark.django_db

ORDERS = "/api/orders/"
WEBHOOK = "/api/webhook/"
TOKEN = "tv-alert-secret-123"
D = Decimal


@pytest.fixture(autouse=True)
def _no_cached_prices():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def desk(plain_user) -> dict[str, Any]:  # noqa: ANN001
    """The plain user's PAPER account on a SPOT strategy ("spot-a", ETH/USDT: tick 0.01, step 0.0001, max qty
    1000, max price 1,000,000, quote 3,000) and a FUTURES webhook strategy ("trend", BTC/USDT, no maxima,
    quote 40,000) on two accounts with capital 10,000 × leverage 2 and 5,000 × 1."""
    account = AccountFactory(user=plain_user, exchange="PAPER", name="main")
    spot = StrategyAccountFactory(account=account, strategy=StrategyFactory(group_name="spot-a", market_type="SPOT"))
    MarketInfoFactory(
        market_type="SPOT",
        symbol="ETH/USDT",
        tick_size=D("0.01"),
        step_size=D("0.0001"),
        min_qty=D("0.001"),
        max_qty=D("1000"),
        max_price=D("1000000"),
        min_notional=D("5"),
    )
    PriceQuoteFactory(market_type="SPOT", symbol="ETH/USDT", price=D("3000"), as_of=timezone.now())
    trend = webhook_strategy(group_name="trend", market_type="FUTURES", token=TOKEN)
    links = [
        strategy_link(trend, AccountFactory(user=UserFactory()), capital=capital, leverage=leverage)
        for capital, leverage in (("10000", "2"), ("5000", "1"))
    ]
    btc_futures_market(max_qty=None)
    return {"account": account, "spot": spot, "a": links[0], "b": links[1]}


def order(desk: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    data = {
        "account": desk["account"].pk,
        "strategy": "spot-a",
        "symbol": "ETH/USDT",
        "side": "BUY",
        "order_type": "LIMIT",
        "price": "2500",
        "quantity": "0.01",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def signal(**overrides: Any) -> dict[str, Any]:
    data = {
        "group_name": "trend",
        "token": TOKEN,
        "symbol": "BTC/USDT",
        "side": "BUY",
        "order_type": "LIMIT",
        "price": "50000",
        "qty_per": "10",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


def rows() -> tuple[int, ...]:
    return (
        PendingOrder.objects.count(),
        OpenOrder.objects.count(),
        OrderEvent.objects.count(),
        QueueDirty.objects.count(),
        WebhookDelivery.objects.count(),
        Signal.objects.count(),
        SignalOrder.objects.count(),
    )


def messages_of(response: Any, field: str, ref: str | None = None) -> list[str]:
    body = response.json()
    errors = body["account_errors"][ref] if ref is not None else body["errors"]
    assert field in errors, body
    return errors[field]


# --- Out-of-range values: the column's digits, the market's maxima, the order's value ---------------


@pytest.mark.parametrize(
    ("overrides", "field", "fragment"),
    [
        # The probe: 16 nines fit the column on PostgreSQL, read back as 10^16 on SQLite, and break the queue.
        ({"price": "9999999999999999"}, "price", "above the largest accepted 10^15"),
        ({"price": "1000000000000000"}, "price", "above the largest accepted 10^15"),
        ({"price": "1000000.01"}, "price", "above the maximum 1000000 for ETH/USDT"),
        (
            {"order_type": "STOP_LIMIT", "stop_price": "9999999999999999"},
            "stop_price",
            "above the largest accepted 10^15",
        ),
        ({"quantity": "5000000000000000"}, "quantity", "above the largest accepted 10^15"),
        ({"quantity": "1000.0001"}, "quantity", "above the maximum 1000 for ETH/USDT"),
        ({"quantity": "1e16"}, "quantity", "below 10^16"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_field(user_client, desk, overrides, field, fragment):  # noqa: ANN001
    before = rows()

    response = user_client.post(ORDERS, order(desk, **overrides), format="json")

    assert response.status_code == 400, response.json()
    assert any(fragment in message for message in messages_of(response, field)), response.json()
    assert rows() == before


def test_an_out_of_range_price_is_named_beside_an_unknown_account(user_client, desk):  # noqa: ANN001
    response = user_client.post(ORDERS, order(desk, account=424242, price="9999999999999999"), format="json")

    assert response.status_code == 400
    errors = response.json()["errors"]
    assert set(errors) == {"account", "price"}
    assert errors["price"] == ["price 9999999999999999 is above the largest accepted 10^15"]


def test_an_order_whose_value_would_overflow_the_money_columns_is_refused(user_client, desk):  # noqa: ANN001
    MarketInfo.objects.filter(symbol="ETH/USDT").update(max_qty=None, max_price=None)
    before = rows()

    # 1,000,000 × 10^9: each value fits, their product (and the reservation, fees, PnL derived from it) does not.
    response = user_client.post(ORDERS, order(desk, quantity="1000000", price="1000000000"), format="json")

    assert response.status_code == 400
    [message] = messages_of(response, "quantity")
    assert "order value 1000000 × 1000000000 = 1000000000000000 is above the largest accepted 10^15" in message
    assert rows() == before
    accepted = user_client.post(ORDERS, order(desk, quantity="999999", price="1000000000"), format="json")
    assert accepted.status_code == 202, accepted.json()


def test_webhook_out_of_range_price_and_computed_quantities_are_refused(desk):  # noqa: ANN001
    client = APIClient()
    before = rows()
    ref_a = strategy_account_ref(desk["a"].pk)

    # The sender's own field: named at the payload level, before any account is looked at.
    response = client.post(WEBHOOK, signal(price="9999999999999999"), format="json")
    assert response.status_code == 400
    assert messages_of(response, "price") == ["price 9999999999999999 is above the largest accepted 10^15"]
    assert response.json()["account_errors"] == {}

    # 10,000 × 10^15 % / 0.1 × 2: a sized quantity far past anything a column holds.
    response = client.post(WEBHOOK, signal(price="0.1", qty_per="1000000000000000"), format="json")
    assert response.status_code == 400
    [message] = messages_of(response, "quantity", ref_a)
    assert message == "the quantity (sized from the account's capital) is above the largest accepted 10^15"

    # A sized quantity that fits (4·10^13 BTC) but whose value at 50,000 does not.
    response = client.post(WEBHOOK, signal(qty_per="9999999999999999"), format="json")
    assert response.status_code == 400
    [message] = messages_of(response, "quantity", ref_a)
    assert "the order value (sized from the account's capital, at 50000) is above the largest accepted" in message
    assert rows() == before


def test_market_check_refuses_a_price_above_the_markets_maximum():
    rule = MarketRule(
        symbol="BTC/USDT",
        market_type=MarketType.SPOT,
        base="BTC",
        quote="USDT",
        tick_size=D("0.01"),
        step_size=D("0.00001"),
        min_qty=D("0.00001"),
        max_price=D("10000000"),
    )
    check = order_market_check(
        rule=rule, order_type="LIMIT", quantity=D("0.1"), price=D("10000000.01"), stop_price=None, market_price=None
    )
    assert check.errors == {"price": ["price 10000000.01 is above the maximum 10000000 for BTC/USDT"]}
    assert check.price is None


# --- Malformed requests: 400, never 500 ----------------------------------------------------------


@pytest.mark.parametrize("url", [ORDERS, WEBHOOK])
@pytest.mark.parametrize("depth", [100_000, 20_000, MAX_JSON_DEPTH + 1])
def test_deeply_nested_json_is_a_400(user_client, desk, url, depth, settings):  # noqa: ANN001
    # The probe's 100,000 brackets are above the webhook's 64 KiB cap (a 413, tested below): the caps
    # are raised here so the parser itself is what answers.
    settings.BODY_LIMITS = {WEBHOOK: 1 << 20, "/api/": 1 << 20}
    before = rows()

    response = user_client.post(url, "[" * depth + "]" * depth, content_type="application/json")

    assert response.status_code == 400
    assert "nested deeper than" in response.json()["detail"]
    assert rows() == before


def test_the_deep_json_probe_on_the_webhook_meets_the_body_cap_first(desk):  # noqa: ANN001
    response = APIClient().post(WEBHOOK, "[" * 100_000, content_type="application/json")
    assert response.status_code == 413
    assert rows() == (0,) * 7


def test_deeply_nested_text_plain_webhook_is_a_400(desk):  # noqa: ANN001
    response = APIClient().post(WEBHOOK, '{"a":' * 10_000, content_type="text/plain")
    assert response.status_code == 400
    assert rows() == (0,) * 7


def test_json_depth_is_measured_without_recursion():
    deep: Any = []
    for _ in range(200_000):
        deep = [deep]
    assert json_depth_exceeds(deep, 32)
    assert not json_depth_exceeds({"a": [1, {"b": 2}]}, 3)
    assert json_depth_exceeds({"a": [1, {"b": []}]}, 3)


@pytest.mark.parametrize("url", [ORDERS, "/api/positions/"])
def test_an_account_id_beyond_64_bits_is_a_400_naming_the_parameter(user_client, desk, url):  # noqa: ANN001
    response = user_client.get(url, {"account": "9223372036854775808"})

    assert response.status_code == 400
    assert "account" in response.json()["errors"]
    assert user_client.get(url, {"account": "9223372036854775807"}).status_code == 200


def test_posting_an_account_id_beyond_64_bits_is_a_400(user_client, desk):  # noqa: ANN001
    response = user_client.post(ORDERS, order(desk, account=2**63), format="json")
    assert response.status_code == 400
    assert "account" in response.json()["errors"]
    assert rows() == (0,) * 7


# --- Error bodies never grow with the input -------------------------------------------------------


def test_a_tiny_quantity_is_not_echoed_as_a_million_zeros(user_client, desk):  # noqa: ANN001
    response = user_client.post(ORDERS, order(desk, quantity="1e-1000000"), format="json")

    assert response.status_code == 400
    assert len(response.content) < 1000
    [message] = messages_of(response, "quantity")
    assert message == "quantity 1E-1000000 (floored to 0) is below the minimum 0.001 for ETH/USDT"


@pytest.mark.parametrize("field", ["side", "order_type"])
def test_a_huge_bad_choice_is_quoted_at_most_40_characters(user_client, desk, field):  # noqa: ANN001
    response = user_client.post(ORDERS, order(desk, **{field: "X" * 100_000}), format="json")

    assert response.status_code == 400
    assert len(response.content) < 1000
    [message] = messages_of(response, field)
    assert message == f'"{"X" * 39}…" is not a valid choice.'


def test_webhook_error_bodies_are_bounded(desk):  # noqa: ANN001
    response = APIClient().post(WEBHOOK, signal(side="B" * 50_000, price="1e-999999"), format="json")
    assert response.status_code == 400
    assert len(response.content) < 1000


def test_echo_cuts_long_values_and_keeps_numbers_plain():
    assert echo(D("0.001000")) == "0.001"
    assert echo(D("1E+2")) == "100"
    assert echo(D("1e-1000000")) == "1E-1000000"
    assert echo("y" * 50) == "y" * 39 + "…"


# --- Strategy names cannot be enumerated --------------------------------------------------------------


def test_unknown_strategy_and_one_not_active_on_the_account_read_the_same(user_client, desk):  # noqa: ANN001
    StrategyFactory(group_name="someone-elses", market_type="SPOT")  # exists, not linked to this user
    paused_link = StrategyAccountFactory(
        account=desk["account"], strategy=StrategyFactory(group_name="unlinked-now"), is_active=False
    )
    account = desk["account"].pk

    replies = {
        name: user_client.post(ORDERS, order(desk, strategy=name), format="json").json()["errors"]["strategy"]
        for name in ("no-such-strategy", "someone-elses", "trend", paused_link.strategy.group_name)
    }

    assert replies == {
        name: [f"unknown strategy {name!r}, or not active on account {account}"]
        for name in ("no-such-strategy", "someone-elses", "trend", "unlinked-now")
    }
    assert rows() == (0,) * 7


# --- STOP_MARKET is sized and valued at its stop --------------------------------------------------


def test_api_stop_market_is_valued_at_its_stop_and_needs_no_fresh_quote(user_client, desk):  # noqa: ANN001
    PriceQuote.objects.all().delete()
    stop = {"order_type": "STOP_MARKET", "price": None, "stop_price": "2800"}

    response = user_client.post(ORDERS, order(desk, quantity="0.001", **stop), format="json")
    assert response.status_code == 400
    assert "order value 0.001 × 2800 = 2.8 is below the minimum notional 5" in messages_of(response, "quantity")[0]

    response = user_client.post(ORDERS, order(desk, quantity="0.002", **stop), format="json")
    assert response.status_code == 202, response.json()
    assert PendingOrder.objects.get().stop_price == D("2800")


def test_webhook_stop_market_is_sized_on_the_stop_not_the_market(desk):  # noqa: ANN001
    # Market 40,000; stop 20,000: sized at the market it would be half as large as it fills.
    response = APIClient().post(
        WEBHOOK, signal(order_type="STOP_MARKET", price=None, stop_price="20000"), format="json"
    )

    assert response.status_code == 202, response.json()
    quantities = dict(PendingOrder.objects.values_list("strategy_account_id", "quantity"))
    # A: 10,000 × 10 % / 20,000 × 2 = 0.1; B: 5,000 × 10 % / 20,000 = 0.025.
    assert quantities == {desk["a"].pk: D("0.1"), desk["b"].pk: D("0.025")}


# --- Body caps: 413 before parsing or the token check -------------------------------------------------


def test_webhook_body_above_its_cap_is_a_413_before_the_token_is_checked(desk, settings, caplog):  # noqa: ANN001
    settings.BODY_LIMITS = {WEBHOOK: 1024, "/api/": 4096}
    padded = json.dumps(signal(id="p" * 100, note="x" * 2000))

    response = APIClient().post(WEBHOOK, padded, content_type="application/json")

    assert response.status_code == 413
    assert response.json() == {"detail": "request body too large: at most 1024 bytes"}
    assert "webhook refused" not in caplog.text  # the token was never looked at
    assert rows() == (0,) * 7
    assert APIClient().post(WEBHOOK, signal(), format="json").status_code == 202


def test_orders_body_above_its_cap_is_a_413(user_client, desk, settings):  # noqa: ANN001
    settings.BODY_LIMITS = {WEBHOOK: 1024, "/api/": 4096}

    response = user_client.post(ORDERS, json.dumps(order(desk, note="x" * 5000)), content_type="application/json")

    assert response.status_code == 413
    assert response.json()["detail"] == "request body too large: at most 4096 bytes"
    assert rows() == (0,) * 7
    assert user_client.post(ORDERS, order(desk), format="json").status_code == 202


def test_the_default_caps_are_64_and_256_kib(settings):  # noqa: ANN001
    assert settings.BODY_LIMITS == {WEBHOOK: 64 * 1024, "/api/": 256 * 1024}


def test_djangos_own_cap_is_a_413_not_a_400(client, settings):  # noqa: ANN001
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000
    response = client.post("/admin/login/", "username=" + "u" * 5000, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 413
    assert response.json()["detail"] == "request body too large: at most 1000 bytes"


async def _asgi_post(app: Any, path: str, chunks: list[bytes], headers: list | None = None) -> tuple[int, bytes]:
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers or [], "query_string": b""}
    communicator = ApplicationCommunicator(app, scope)
    for i, chunk in enumerate(chunks):
        await communicator.send_input({"type": "http.request", "body": chunk, "more_body": i < len(chunks) - 1})
    start = await communicator.receive_output(5)
    body = await communicator.receive_output(5)
    await communicator.wait(5)
    return start["status"], body["body"]


def test_a_chunked_body_is_cut_off_at_the_cap_while_it_arrives(settings):  # noqa: ANN001
    """No Content-Length: the ASGI wrapper counts chunks and answers 413 without the app seeing the request."""
    settings.BODY_LIMITS = {WEBHOOK: 1000}
    asyncio.run(_chunked_checks())


async def _chunked_checks() -> None:
    seen: list[bytes] = []

    async def app(scope: dict, receive: Any, send: Any) -> None:
        message = await receive()
        seen.append(message["body"])
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limited = asgi_body_limit(app)

    status, body = await _asgi_post(limited, WEBHOOK, [b"x" * 600, b"x" * 600])
    assert (status, json.loads(body)) == (413, {"detail": "request body too large: at most 1000 bytes"})
    assert seen == []

    status, _ = await _asgi_post(limited, WEBHOOK, [b"{}"], headers=[(b"content-length", b"5000")])
    assert status == 413 and seen == []

    status, body = await _asgi_post(limited, WEBHOOK, [b"a" * 500, b"b" * 500])
    assert (status, body) == (202, b"ok")
    assert seen == [b"a" * 500 + b"b" * 500]  # replayed whole to the app

    status, _ = await _asgi_post(limited, "/elsewhere/", [b"z" * 5000])
    assert status == 202  # no cap on this path: passed through untouched


def test_the_served_asgi_application_caps_chunked_webhook_bodies(settings):  # noqa: ANN001
    from tradingsite.asgi import application

    settings.BODY_LIMITS = {WEBHOOK: 1000, "/api/": 4000}
    status, body = asyncio.run(_asgi_post(application, WEBHOOK, [b"{" * 700, b"{" * 700]))
    assert status == 413
    assert json.loads(body)["detail"] == "request body too large: at most 1000 bytes"


# --- Fuzz: random JSON, values and parameters never make a 5xx, and a 4xx writes nothing --------------

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # the same examples on every run and both databases: CI stays deterministic
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
NUMBERS = st.one_of(
    st.decimals(allow_nan=True, allow_infinity=True).map(str),
    st.sampled_from(["1e-1000000", "1e999999999", "9999999999999999", "1000000000000000", "-0", "0.00000001"]),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=False, allow_infinity=False),
)
JSON = st.recursive(
    # Finite floats only: the test client itself cannot encode NaN or Infinity as JSON (raw bodies cover them).
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def _field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes any JSON value, sometimes a missing field (None is dropped)."""
    return st.one_of(valid, valid, JSON, st.just(None))


ORDER_FIELDS = st.fixed_dictionaries(
    {
        "account": _field(st.sampled_from(["ACCOUNT", 2**63, 0, -1, "9223372036854775808"])),
        "strategy": _field(st.sampled_from(["spot-a", "trend", "nope", "x" * 200])),
        "symbol": _field(st.sampled_from(["ETH/USDT", "eth/usdt", "BTC/USDT", "DOGE/USDT", "ETHUSDT", "É/U"])),
        "side": _field(st.sampled_from(["BUY", "SELL", "buy", "HOLD"])),
        "order_type": _field(st.sampled_from(["LIMIT", "MARKET", "STOP_LIMIT", "STOP_MARKET", "ICEBERG"])),
        "price": _field(NUMBERS),
        "stop_price": _field(NUMBERS),
        "quantity": _field(NUMBERS),
        "priority": _field(st.integers(min_value=-(2**70), max_value=2**70)),
    }
)
SIGNAL_FIELDS = st.fixed_dictionaries(
    {
        "id": _field(st.text(max_size=120)),
        "group_name": st.sampled_from(["trend", "trend", "trend", "nope"]),
        "token": st.sampled_from([TOKEN, TOKEN, TOKEN, "wrong"]),
        "symbol": _field(st.sampled_from(["BTC/USDT", "btc/usdt", "ETH/USDT", "BTCUSDT"])),
        "side": _field(st.sampled_from(["BUY", "sell", "LONG"])),
        "order_type": _field(
            st.sampled_from(["LIMIT", "MARKET", "STOP_LIMIT", "STOP_MARKET", "CANCEL", "CANCEL_ALL", "market"])
        ),
        "price": _field(NUMBERS),
        "stop_price": _field(NUMBERS),
        "qty_per": _field(st.one_of(NUMBERS, st.sampled_from([-100, "-100", 100, "0.5"]))),
    }
)


def _no_5xx_and_4xx_writes_nothing(send: Any) -> Any:
    before = rows()
    response = send()
    event(f"status {response.status_code}")  # shown by --hypothesis-show-statistics
    assert response.status_code < 500, response.content[:500]
    if 400 <= response.status_code < 500:
        assert rows() == before, response.content[:500]
    return response


@FUZZ
@given(fields=ORDER_FIELDS)
def test_fuzz_order_intake(user_client, desk, fields):  # noqa: ANN001
    data = {k: (desk["account"].pk if v == "ACCOUNT" else v) for k, v in fields.items() if v is not None}
    _no_5xx_and_4xx_writes_nothing(lambda: user_client.post(ORDERS, data, format="json"))


@FUZZ
@given(fields=SIGNAL_FIELDS)
def test_fuzz_webhook(desk, fields):  # noqa: ANN001
    data = {k: v for k, v in fields.items() if v is not None}
    _no_5xx_and_4xx_writes_nothing(lambda: APIClient().post(WEBHOOK, data, format="json"))


@FUZZ
@given(
    body=st.one_of(
        st.binary(max_size=300),
        JSON.map(lambda v: json.dumps(v).encode()),
        st.sampled_from([b"NaN", b'{"quantity": Infinity}', b'{"qty_per": -Infinity, "price": NaN}']),
    ),
    to_webhook=st.booleans(),
)
def test_fuzz_raw_bodies(user_client, desk, body, to_webhook):  # noqa: ANN001
    url = WEBHOOK if to_webhook else ORDERS
    _no_5xx_and_4xx_writes_nothing(lambda: user_client.generic("POST", url, body, content_type="application/json"))


@FUZZ
@given(
    params=st.dictionaries(
        st.sampled_from(["account", "symbol", "status", "limit", "offset", "include_flat"]),
        st.one_of(st.text(max_size=30), st.integers(min_value=-(2**70), max_value=2**70).map(str)),
        max_size=4,
    ),
    key=st.one_of(st.uuids().map(str), st.text(alphabet="abcdef0123456789-", max_size=40)),
)
def test_fuzz_list_and_cancel(user_client, desk, params, key):  # noqa: ANN001
    for url in (ORDERS, "/api/positions/"):
        response = _no_5xx_and_4xx_writes_nothing(lambda url=url: user_client.get(url, params))
        assert response.status_code in (200, 400)
    response = _no_5xx_and_4xx_writes_nothing(lambda: user_client.delete(f"{ORDERS}{key}/"))
    assert response.status_code in (202, 404, 409)


# --- One pipeline (issue 11): the API and every account of a webhook fan-out go through it --------------


def test_the_api_and_the_webhook_fan_out_share_one_intake_pipeline(user_client, desk, monkeypatch):  # noqa: ANN001
    import orders.intake as intake

    checked: list[tuple[int, bool]] = []
    placed: list[int] = []
    real_check, real_place = intake.order_check, intake.orders_place

    def spy_check(**kwargs: Any) -> Any:
        checked.append((kwargs["draft"].strategy_account_id, kwargs.get("private", False)))
        return real_check(**kwargs)

    def spy_place(**kwargs: Any) -> Any:
        placed.append(len(kwargs["specs"]))
        return real_place(**kwargs)

    monkeypatch.setattr(intake, "order_check", spy_check)
    monkeypatch.setattr(intake, "orders_place", spy_place)
    monkeypatch.setattr("orders.webhook.order_check", spy_check)
    monkeypatch.setattr("orders.webhook.orders_place", spy_place)

    assert user_client.post(ORDERS, order(desk), format="json").status_code == 202
    assert APIClient().post(WEBHOOK, signal(), format="json").status_code == 202

    # The user's own order shows its figures; the webhook's accounts are checked as private.
    assert checked == [(desk["spot"].pk, False), (desk["a"].pk, True), (desk["b"].pk, True)]
    assert placed == [1, 2]


def test_close_decision_and_reference_price_are_pure_functions():
    from orders.validation import CloseOrder, order_reference_price, position_close_order

    assert position_close_order(held=D("0.5")) == CloseOrder(side="SELL", quantity=D("0.5"))
    assert position_close_order(held=D("-0.2")) == CloseOrder(side="BUY", quantity=D("0.2"))
    assert position_close_order(held=D("0")) is None
    prices = {"price": D("100"), "stop_price": D("90"), "market_price": D("95")}
    assert order_reference_price(order_type="LIMIT", **prices) == D("100")
    assert order_reference_price(order_type="STOP_LIMIT", **prices) == D("100")
    assert order_reference_price(order_type="STOP_MARKET", **prices) == D("90")
    assert order_reference_price(order_type="MARKET", **prices) == D("95")
