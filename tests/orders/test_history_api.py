"""Order history (every state, with events), fills and prices over the API; API tokens by command and admin."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from io import StringIO

import pytest
from django.contrib.admin.sites import site
from django.contrib.auth import get_user_model
from django.contrib.messages.storage.fallback import FallbackStorage
from django.core.management import CommandError, call_command
from django.test import RequestFactory
from django.utils import timezone
from rest_framework.test import APIClient

from core.models import ApiToken
from orders.models import OrderEvent
from orders.services import OrderSpec, orders_enqueue
from positions.models import Fill, Trade
from tests.orders.factories import AccountFactory, OpenOrderFactory, PriceQuoteFactory, StrategyAccountFactory

pytestmark = pytest.mark.django_db

D = Decimal
T0 = datetime(2026, 12, 4, 1, 0, tzinfo=UTC)


@pytest.fixture
def mine(plain_user):  # noqa: ANN001
    return StrategyAccountFactory(account=AccountFactory(user=plain_user, name="mine"))


def enqueue(sa, *, price: str, side: str = "BUY", at: datetime = T0):  # noqa: ANN001
    spec = OrderSpec(
        strategy_account_id=sa.pk,
        account_id=sa.account_id,
        symbol="ETH/USDT",
        market_type=sa.strategy.market_type,
        side=side,
        order_type="LIMIT",
        quantity=D("1.5"),
        price=D(price),
    )
    [order] = orders_enqueue(specs=[spec], signal_at=at, now=at)
    return order


def end_filled(order, sa) -> Trade:  # noqa: ANN001
    """What the queue and reconciliation leave behind for a filled order: events and a trade, no row."""
    OrderEvent.objects.create(order_key=order.order_key, kind="placed", account=sa.account, symbol=order.symbol)
    trade = Trade.objects.create(
        strategy_account=sa,
        account=sa.account,
        exchange_order_id="ex-1",
        order_key=order.order_key,
        symbol=order.symbol,
        market_type=order.market_type,
        side=order.side,
        cumulative_filled=D("1.5"),
        average_price=D("2999.5"),
        fees=D("0.3"),
    )
    Fill.objects.create(
        trade=trade,
        strategy_account=sa,
        symbol=order.symbol,
        cum_filled_after=D("1.5"),
        delta_qty=D("1.5"),
        price=D("2999.5"),
        fee=D("0.3"),
        fee_currency="USDT",
        filled_at=T0 + timedelta(minutes=5),
        source="REST",
    )
    OrderEvent.objects.create(
        order_key=order.order_key, kind="filled", account=sa.account, symbol=order.symbol, details={"filled": "1.5"}
    )
    order.delete()
    return trade


def test_history_lists_orders_in_every_state_with_their_events(user_client, mine, staff_user):  # noqa: ANN001
    filled = enqueue(mine, price="3000")
    end_filled(filled, mine)
    cancelled = enqueue(mine, price="2800")
    OrderEvent.objects.create(
        order_key=cancelled.order_key, kind="cancelled", account=mine.account, symbol="ETH/USDT", details={"by": "user"}
    )
    cancelled.delete()
    queued = enqueue(mine, price="2700", side="SELL")
    live = OpenOrderFactory(strategy_account=mine, price=D("2900"))
    OrderEvent.objects.create(order_key=live.order_key, kind="placed", account=mine.account, symbol="ETH/USDT")
    other = enqueue(StrategyAccountFactory(account=AccountFactory(user=staff_user)), price="1")  # not the user's

    response = user_client.get("/api/orders/history/")
    assert response.status_code == 200
    body = response.json()
    by_key = {row["order_key"]: row for row in body["results"]}
    assert body["count"] == 4 and str(other.order_key) not in by_key
    row = by_key[str(filled.order_key)]
    assert (row["state"], row["location"], row["status"]) == ("filled", "ended", None)
    assert (row["side"], row["order_type"], row["price"], row["quantity"]) == ("BUY", "LIMIT", "3000", "1.5")
    assert (row["filled_quantity"], row["average_price"], row["fees"]) == ("1.5", "2999.5", "0.3")
    assert (row["strategy"], row["market_type"], row["account"]) == (
        mine.strategy.group_name,
        "SPOT",
        mine.account_id,
    )
    assert [e["kind"] for e in row["events"]] == ["queued", "placed", "filled"]
    assert row["created_at"].endswith("+09:00")  # the display time zone, with its offset
    assert by_key[str(cancelled.order_key)]["state"] == "cancelled"
    assert by_key[str(cancelled.order_key)]["events"][-1]["details"] == {"by": "user"}
    assert (by_key[str(queued.order_key)]["location"], by_key[str(queued.order_key)]["status"]) == ("queued", "QUEUED")
    assert by_key[str(live.order_key)]["location"] == "live"

    only_filled = user_client.get("/api/orders/history/", {"state": "filled"}).json()
    assert [r["order_key"] for r in only_filled["results"]] == [str(filled.order_key)]
    assert user_client.get("/api/orders/history/", {"state": "bogus"}).status_code == 400


def test_order_detail_shows_an_ended_order_and_hides_other_users_orders(user_client, mine, staff_user):  # noqa: ANN001
    order = enqueue(mine, price="3000")
    end_filled(order, mine)
    detail = user_client.get(f"/api/orders/{order.order_key}/")
    assert detail.status_code == 200
    assert detail.json()["state"] == "filled" and len(detail.json()["events"]) == 3
    other = enqueue(StrategyAccountFactory(account=AccountFactory(user=staff_user)), price="1")
    assert user_client.get(f"/api/orders/{other.order_key}/").status_code == 404
    assert user_client.get(f"/api/orders/{uuid.uuid4()}/").status_code == 404


def test_fills_are_listed_newest_first_and_filterable(user_client, mine):  # noqa: ANN001
    order = enqueue(mine, price="3000")
    trade = end_filled(order, mine)
    body = user_client.get("/api/fills/").json()
    assert body["count"] == 1
    [row] = body["results"]
    assert (row["side"], row["quantity"], row["price"], row["fee"]) == ("BUY", "1.5", "2999.5", "0.3")
    assert (row["order_key"], row["exchange_order_id"]) == (str(order.order_key), trade.exchange_order_id)
    assert row["filled_at"] == "2026-12-04T10:05:00+09:00"
    assert user_client.get("/api/fills/", {"symbol": "BTC/USDT"}).json()["count"] == 0
    assert user_client.get("/api/fills/", {"since": "2026-12-04T10:06:00+09:00"}).json()["count"] == 0
    assert user_client.get("/api/fills/", {"order_key": str(order.order_key)}).json()["count"] == 1
    assert APIClient().get("/api/fills/").status_code == 401


def test_price_endpoint_reports_the_stored_price_and_its_freshness(user_client):  # noqa: ANN001
    now = timezone.now()
    PriceQuoteFactory(symbol="ETH/USDT", price=D("3001.250000000000"), as_of=now - timedelta(seconds=30))
    PriceQuoteFactory(symbol="BTC/USDT", price=D("65000"), as_of=now - timedelta(minutes=10))
    body = user_client.get("/api/prices/", {"exchange": "paper", "market_type": "SPOT"}).json()
    rows = {r["symbol"]: r for r in body["results"]}
    assert rows["ETH/USDT"]["price"] == "3001.25"
    assert rows["ETH/USDT"]["fresh_for_trading"] is True
    assert rows["BTC/USDT"]["fresh_for_trading"] is False and rows["BTC/USDT"]["fresh_for_valuation"] is True
    assert rows["ETH/USDT"]["as_of"].endswith("+09:00")
    one = user_client.get("/api/prices/", {"exchange": "PAPER", "symbol": "eth/usdt"}).json()["results"]
    assert [r["symbol"] for r in one] == ["ETH/USDT"]
    assert user_client.get("/api/prices/").status_code == 400  # exchange is required
    assert APIClient().get("/api/prices/", {"exchange": "PAPER"}).status_code == 401


# --- API tokens --------------------------------------------------------------------------------------


def _works(key: str) -> bool:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    return client.get("/api/orders/").status_code == 200


def test_issue_api_token_command_issues_a_working_key_and_rotates(plain_user):  # noqa: ANN001
    out = StringIO()
    call_command("issue_api_token", plain_user.username, stdout=out, stderr=StringIO())
    first = out.getvalue().strip()
    assert _works(first)
    token = ApiToken.objects.get(user=plain_user)
    assert token.prefix == first[:8] and first not in (token.digest, token.name)  # stored hashed
    second = StringIO()
    call_command("issue_api_token", plain_user.username, "--name", "bot", stdout=second, stderr=StringIO())
    assert _works(first) and _works(second.getvalue().strip())  # a second token; the first still works
    rotated = StringIO()
    call_command("issue_api_token", plain_user.username, "--rotate", stdout=rotated, stderr=StringIO())
    assert _works(rotated.getvalue().strip())
    assert not _works(first) and not _works(second.getvalue().strip())
    assert ApiToken.objects.filter(user=plain_user).count() == 1
    with pytest.raises(CommandError, match="no user"):
        call_command("issue_api_token", "nobody", stdout=StringIO(), stderr=StringIO())


def test_admin_action_issues_a_token_and_shows_it_once(plain_user, django_user_model):  # noqa: ANN001
    admin_user = django_user_model.objects.create_superuser("root", password="root-pass-123")
    model_admin = site._registry[get_user_model()]
    request = RequestFactory().post("/admin/auth/user/")
    request.user = admin_user
    request.session = {}
    request._messages = FallbackStorage(request)
    model_admin.issue_api_token(request, get_user_model().objects.filter(pk=plain_user.pk))
    [message] = [str(m) for m in request._messages]
    key = re.search(r"API token of viewer: (\S+) ", message)[1]
    assert _works(key)
    assert ApiToken.objects.get(user=plain_user).prefix == key[:8]
    assert "issue_api_token" in model_admin.get_actions(request)
    staff_only = django_user_model.objects.create_user("clerk", password="clerk-pass-123", is_staff=True)
    request.user = staff_only
    assert "issue_api_token" not in model_admin.get_actions(request)  # needs core.add_apitoken
