"""Admin pages (credentials and webhook tokens write-only, order tables read-only) and seed_demo."""

from __future__ import annotations

import re
from io import StringIO

import pytest
from django.contrib import admin
from django.contrib.auth import authenticate, get_user_model
from django.contrib.auth.hashers import make_password
from django.core.cache import cache
from django.core.management import call_command
from django.db import connection

from accounts.models import Account, Strategy, StrategyAccount, StrategyCapital
from accounts.services import account_create, strategy_create, strategy_webhook_token_check
from core.models import ApiToken
from core.tokens import api_token_digest
from exchanges.models import MarketInfo, PriceQuote
from orders.models import CircuitState, OpenOrder, OrderEvent, PendingOrder, QueueDirty
from tests.orders.factories import (
    OpenOrderFactory,
    PendingOrderFactory,
    PositionFactory,
    StrategyAccountFactory,
)

pytestmark = pytest.mark.django_db

API_KEY = "AKIA-known-api-key-7Q3Z"
API_SECRET = "known-api-secret-9f8e7d6c5b4a"
PASSPHRASE = "known-passphrase-1234"


@pytest.fixture
def secret_account(admin_user):  # noqa: ANN001
    return account_create(
        user=admin_user,
        name="binance-main",
        exchange="BINANCE",
        credentials={"api_key": API_KEY, "api_secret": API_SECRET, "passphrase": PASSPHRASE},
    )


def _ciphertexts(account: Account) -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT api_key, api_secret, passphrase FROM accounts_account WHERE id = %s", [account.pk])
        return list(cursor.fetchone())


def _assert_no_secret(html: str, account: Account) -> None:
    for secret in (API_KEY, API_SECRET, PASSPHRASE, *_ciphertexts(account)):
        assert secret not in html


def test_account_pages_never_show_credentials(admin_client, secret_account):  # noqa: ANN001
    for url in (
        "/admin/accounts/account/",
        f"/admin/accounts/account/{secret_account.pk}/change/",
        f"/admin/accounts/account/{secret_account.pk}/history/",
        f"/admin/accounts/account/{secret_account.pk}/delete/",
        "/admin/accounts/account/add/",
    ):
        response = admin_client.get(url)
        assert response.status_code == 200, url
        _assert_no_secret(response.content.decode(), secret_account)
    change = admin_client.get(f"/admin/accounts/account/{secret_account.pk}/change/").content.decode()
    assert 'type="password"' in change
    assert "API key, API secret, API passphrase" in change  # which are set — names only


def _change_form(account: Account, **fields: str) -> dict[str, str]:
    data = {
        "user": str(account.user_id),
        "name": account.name,
        "exchange": account.exchange,
        "account_type": account.account_type,
        "is_active": "on",
    }
    data.update(fields)
    return data


def test_account_credentials_are_set_write_only_and_blank_keeps(admin_client, secret_account):  # noqa: ANN001
    url = f"/admin/accounts/account/{secret_account.pk}/change/"

    response = admin_client.post(url, _change_form(secret_account, new_api_key="rotated-key-0001"))

    assert response.status_code == 302
    account = Account.objects.get(pk=secret_account.pk)
    assert account.api_key == "rotated-key-0001"
    assert (account.api_secret, account.passphrase) == (API_SECRET, PASSPHRASE)
    assert "rotated-key-0001" not in admin_client.get(url).content.decode()
    assert "rotated-key-0001" not in admin_client.get(f"{url.replace('change/', 'history/')}").content.decode()


def test_account_form_error_does_not_echo_a_typed_secret(admin_client, secret_account):  # noqa: ANN001
    url = f"/admin/accounts/account/{secret_account.pk}/change/"

    response = admin_client.post(url, _change_form(secret_account, name="", new_api_secret="typed-secret-555"))

    assert response.status_code == 200  # the form again, with its error
    assert "typed-secret-555" not in response.content.decode()
    assert Account.objects.get(pk=secret_account.pk).api_secret == API_SECRET


def test_account_credentials_can_be_cleared(admin_client, secret_account):  # noqa: ANN001
    url = f"/admin/accounts/account/{secret_account.pk}/change/"

    admin_client.post(url, _change_form(secret_account, clear_credentials="on"))

    account = Account.objects.get(pk=secret_account.pk)
    assert [getattr(account, name) for name in Account.SECRET_FIELDS] == [""] * len(Account.SECRET_FIELDS)


def test_strategy_webhook_token_is_hashed_on_save(admin_client, secret_account):  # noqa: ANN001
    response = admin_client.post(
        "/admin/accounts/strategy/add/",
        {
            "name": "Trend",
            "group_name": "trend-1",
            "market_type": "SPOT",
            "is_active": "on",
            "webhook_token": "hook-token-abc-123",
            "strategy_accounts-TOTAL_FORMS": "1",
            "strategy_accounts-INITIAL_FORMS": "0",
            "strategy_accounts-0-account": str(secret_account.pk),
            "strategy_accounts-0-weight": "2",
            "strategy_accounts-0-leverage": "1",
            "strategy_accounts-0-is_active": "on",
        },
    )

    assert response.status_code == 302, response.content.decode()[:2000]
    strategy = Strategy.objects.get(group_name="trend-1")
    assert strategy.webhook_token_hash != "hook-token-abc-123"
    assert strategy_webhook_token_check(strategy=strategy, token="hook-token-abc-123")
    assert not strategy_webhook_token_check(strategy=strategy, token="hook-token-abc-124")
    strategy_account = StrategyAccount.objects.get(strategy=strategy)
    assert StrategyCapital.objects.filter(strategy_account=strategy_account).exists()

    change_url = f"/admin/accounts/strategy/{strategy.pk}/change/"
    page = admin_client.get(change_url).content.decode()
    assert "hook-token-abc-123" not in page
    assert strategy.webhook_token_hash not in page

    # Blank keeps the token.
    admin_client.post(
        change_url,
        {
            "name": "Trend",
            "group_name": "trend-1",
            "market_type": "SPOT",
            "is_active": "on",
            "webhook_token": "",
            "strategy_accounts-TOTAL_FORMS": "1",
            "strategy_accounts-INITIAL_FORMS": "1",
            "strategy_accounts-0-id": str(strategy_account.pk),
            "strategy_accounts-0-strategy": str(strategy.pk),
            "strategy_accounts-0-account": str(secret_account.pk),
            "strategy_accounts-0-weight": "3",
            "strategy_accounts-0-leverage": "1",
            "strategy_accounts-0-is_active": "on",
        },
    )
    strategy.refresh_from_db()
    assert strategy_webhook_token_check(strategy=strategy, token="hook-token-abc-123")
    assert not strategy_webhook_token_check(strategy=strategy, token="wrong")
    assert StrategyAccount.objects.get(pk=strategy_account.pk).weight == 3


def test_read_only_admins_render_and_refuse_edits(admin_client):  # noqa: ANN001
    strategy_account = StrategyAccountFactory()
    queued = PendingOrderFactory(strategy_account=strategy_account)
    live = OpenOrderFactory(strategy_account=strategy_account)
    PositionFactory(strategy_account=strategy_account)
    OrderEvent.objects.create(order_key=queued.order_key, kind="queued", account=queued.account, symbol=queued.symbol)
    QueueDirty.objects.create(account=queued.account, market_type="SPOT", symbol="ETH/USDT", marked_at=queued.signal_at)
    CircuitState.objects.create(scope="exchange:PAPER:SPOT", failures=3)

    for model in (PendingOrder, OpenOrder, OrderEvent):
        model_admin = admin.site._registry[model]
        assert not model_admin.has_change_permission(None)
        assert not model_admin.has_add_permission(None)

    for url in (
        "/admin/orders/pendingorder/",
        "/admin/orders/pendingorder/?status__exact=QUEUED&symbol=ETH%2FUSDT",
        f"/admin/orders/pendingorder/{queued.pk}/change/",
        "/admin/orders/openorder/",
        f"/admin/orders/openorder/{live.pk}/change/",
        "/admin/orders/orderevent/",
        "/admin/positions/trade/",
        "/admin/positions/fill/",
        "/admin/orders/queuedirty/",
        "/admin/orders/circuitstate/",
        "/admin/positions/position/",
        "/admin/accounts/strategycapital/",
        "/admin/accounts/securitiestoken/",
        "/admin/accounts/strategy/",
        "/admin/accounts/capitalsnapshot/",
        "/admin/positions/strategydailyperformance/",
    ):
        assert admin_client.get(url).status_code == 200, url

    found = admin_client.get("/admin/orders/orderevent/", {"q": str(queued.order_key)}).content.decode()
    assert str(queued.order_key) in found
    assert admin_client.get("/admin/orders/orderevent/", {"q": "ETH"}).status_code == 200
    assert PendingOrder.objects.count() == 1


def test_circuit_close_action(admin_client):  # noqa: ANN001
    circuit = CircuitState.objects.create(scope="exchange:PAPER:SPOT", failures=4, cooldown_seconds=120)

    admin_client.post("/admin/orders/circuitstate/", {"action": "close_circuit", "_selected_action": [str(circuit.pk)]})

    circuit.refresh_from_db()
    assert (circuit.failures, circuit.opened_until, circuit.cooldown_seconds) == (0, None, 0)


def test_strategy_create_service_hashes_the_token():
    strategy = strategy_create(name="S", group_name="s-1", market_type="FUTURES", webhook_token="tok-1")
    assert strategy.webhook_token_hash.startswith("sha256$") and "tok-1" not in strategy.webhook_token_hash
    assert strategy_webhook_token_check(strategy=strategy, token="tok-1")
    assert not strategy_webhook_token_check(strategy=strategy, token="tok-2")
    # A token stored by the earlier password hasher still checks.
    strategy.webhook_token_hash = make_password("tok-1")
    assert strategy_webhook_token_check(strategy=strategy, token="tok-1")


# --- seed_demo ---------------------------------------------------------------------------------


def _row_counts() -> dict[str, int]:
    models = (
        get_user_model(),
        ApiToken,
        Account,
        Strategy,
        StrategyAccount,
        StrategyCapital,
        MarketInfo,
        PriceQuote,
        PendingOrder,
        OpenOrder,
        OrderEvent,
        QueueDirty,
    )
    return {model.__name__: model.objects.count() for model in models}


def test_seed_demo_is_idempotent_and_prints_credentials_once(settings):  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    cache.clear()
    first = StringIO()
    call_command("seed_demo", stdout=first)
    counts = _row_counts()
    second = StringIO()
    call_command("seed_demo", stdout=second)

    assert _row_counts() == counts
    first_out, second_out = first.getvalue(), second.getvalue()
    password = re.search(r"password:\s+(\S+)", first_out).group(1)
    token = re.search(r"API token:\s+(\S+)", first_out).group(1)
    assert password not in second_out and token not in second_out
    assert "password:" not in second_out
    assert "exists" in second_out

    demo = authenticate(username="demo", password=password)
    assert demo is not None and demo.is_staff
    assert ApiToken.objects.get(user=demo).digest == api_token_digest(token)
    assert token not in {value for row in ApiToken.objects.values() for value in row.values() if isinstance(value, str)}
    assert Account.objects.filter(user=demo, exchange="PAPER").count() == 2
    assert set(Strategy.objects.values_list("market_type", flat=True)) == {"SPOT", "FUTURES"}
    assert StrategyCapital.objects.filter(allocated_capital__gt=0).count() == StrategyAccount.objects.count() == 3
    assert MarketInfo.objects.filter(exchange="PAPER", market_type="SPOT").exists()
    assert MarketInfo.objects.filter(exchange="PAPER", market_type="FUTURES").exists()

    # More queued orders per bucket than the bucket has slots, each with its queued event.
    per_bucket = {}
    for order in PendingOrder.objects.all():
        per_bucket.setdefault((order.account_id, order.market_type, order.symbol, order.side), []).append(order)
    assert len(per_bucket) == 6
    assert all(len(orders) == 5 for orders in per_bucket.values())
    assert OrderEvent.objects.filter(kind="queued").count() == counts["PendingOrder"] == 30
    assert QueueDirty.objects.count() == 5  # (account, market type, symbol) pairs
    for order in PendingOrder.objects.all():
        quote = PriceQuote.objects.get(exchange="PAPER", market_type=order.market_type, symbol=order.symbol).price
        # The second run refreshed the quotes, so allow for the walk having moved a little.
        far = order.price <= quote * 6 / 10 if order.side == "BUY" else order.price >= quote * 3 / 2
        assert far, (order.side, order.price, quote)
