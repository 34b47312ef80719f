"""Issue 13 hardening: throttles (orders, webhook), admin lockout, hashed API tokens, API docs access,
credentials kept out of the debug page."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from axes.models import AccessAttempt
from django.contrib.auth import get_user_model
from django.db import connection
from django.test import Client
from rest_framework.test import APIClient

from accounts.services import strategy_webhook_token_set
from core.models import ApiToken
from core.tokens import api_token_digest, api_token_issue
from tests import procs
from tests.orders.factories import StrategyFactory, UserFactory

ORDERS = "/api/orders/"
WEBHOOK = "/api/webhook/"


def _rates(settings: Any, **rates: str) -> None:
    rest = dict(settings.REST_FRAMEWORK)
    rest["DEFAULT_THROTTLE_RATES"] = {**rest["DEFAULT_THROTTLE_RATES"], **rates}
    settings.REST_FRAMEWORK = rest


def _token_client(user: Any) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token_issue(user=user)[1]}")
    return client


def _strategy(group_name: str, token: str) -> Any:
    strategy = StrategyFactory(group_name=group_name, market_type="FUTURES")
    strategy_webhook_token_set(strategy=strategy, token=token)
    return strategy


def _cancel_all(group_name: str, token: str) -> dict[str, str]:
    return {"group_name": group_name, "token": token, "order_type": "CANCEL_ALL"}


# --- throttles ------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_orders_are_throttled_per_user_with_retry_after(settings):  # noqa: ANN001
    _rates(settings, orders="3/min")
    alice, bob = UserFactory(), UserFactory()
    client = _token_client(alice)
    # Bad bodies (400) still spend the budget: the throttle runs before validation.
    codes = [client.post(ORDERS, {}, format="json").status_code for _ in range(3)]
    assert codes == [400, 400, 400]
    refused = client.post(ORDERS, {}, format="json")
    assert refused.status_code == 429
    assert 0 < int(refused["Retry-After"]) <= 60
    # The user cancel shares the budget; reads are not throttled; another user has their own budget.
    assert client.delete(f"{ORDERS}{uuid.uuid4()}/").status_code == 429
    assert client.get(ORDERS).status_code == 200
    assert _token_client(bob).post(ORDERS, {}, format="json").status_code == 400


@pytest.mark.django_db
def test_webhooks_are_throttled_per_strategy(settings):  # noqa: ANN001
    _rates(settings, webhook_strategy="2/min")
    _strategy("alpha", "alpha-token-123")
    _strategy("beta", "beta-token-123")
    client = APIClient()
    codes = [client.post(WEBHOOK, _cancel_all("alpha", "alpha-token-123"), format="json").status_code for _ in range(3)]
    assert codes == [202, 202, 429]
    # Wrong tokens naming "beta" do not spend beta's budget (counted after the token check).
    for _ in range(3):
        assert client.post(WEBHOOK, _cancel_all("beta", "wrong-token-1"), format="json").status_code == 403
    assert client.post(WEBHOOK, _cancel_all("beta", "beta-token-123"), format="json").status_code == 202


@pytest.mark.django_db
def test_wrong_webhook_tokens_are_throttled_per_ip(settings):  # noqa: ANN001
    _rates(settings, webhook_bad_token="3/min")
    _strategy("alpha", "alpha-token-123")
    attacker = APIClient(REMOTE_ADDR="203.0.113.9")
    assert [
        attacker.post(WEBHOOK, _cancel_all("alpha", f"guess-{n}"), format="json").status_code for n in range(3)
    ] == [403, 403, 403]
    # Spent: even the right token from that address waits; a forged X-Forwarded-For changes nothing.
    refused = attacker.post(
        WEBHOOK, _cancel_all("alpha", "alpha-token-123"), format="json", HTTP_X_FORWARDED_FOR="198.51.100.1"
    )
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    # Another address is unaffected, and its successes never count as failures.
    other = APIClient(REMOTE_ADDR="198.51.100.7")
    assert {
        other.post(WEBHOOK, _cancel_all("alpha", "alpha-token-123"), format="json").status_code for _ in range(5)
    } == {202}


@pytest.mark.django_db
def test_webhooks_are_throttled_per_ip(settings):  # noqa: ANN001
    _rates(settings, webhook_ip="2/min")
    client = APIClient(REMOTE_ADDR="203.0.113.10")
    codes = [client.post(WEBHOOK, _cancel_all("nobody", "x-token-123"), format="json").status_code for _ in range(3)]
    assert codes == [403, 403, 429]
    assert APIClient(REMOTE_ADDR="203.0.113.11").post(WEBHOOK, {}, format="json").status_code != 429


def test_throttle_rates_come_from_the_environment():
    env = procs.base_env(THROTTLE_ORDERS_RATE="7/min", THROTTLE_WEBHOOK_IP_RATE="off", API_DOCS_ACCESS="staff")
    code = (
        "from django.conf import settings as s; import json; "
        "print(json.dumps([s.REST_FRAMEWORK['DEFAULT_THROTTLE_RATES'], s.API_DOCS_ACCESS, "
        "s.CACHES['throttle']['BACKEND']]))"
    )
    out = procs.manage("shell", "-c", code, env={k: v for k, v in env.items() if k != "REDIS_URL"})
    assert out.returncode == 0, out.stderr
    rates, docs, backend = json.loads(out.stdout.strip().splitlines()[-1])
    assert rates == {"orders": "7/min", "webhook_strategy": "60/min", "webhook_ip": None, "webhook_bad_token": "30/min"}
    assert docs == "staff"
    # Without Redis the counters live in the database cache table: shared by every process.
    assert backend == "django.core.cache.backends.db.DatabaseCache"


# --- shared across processes (throttle counters and admin lockout) --------------------------------


def _subprocess_env(settings: Any, **extra: str) -> dict[str, str]:
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        url = f"sqlite:///{db['NAME']}"
    else:
        url = f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"
    env = procs.base_env(DATABASE_URL=url, **extra)
    env.pop("REDIS_URL", None)
    return env


@pytest.mark.django_db(transaction=True)
def test_wrong_tokens_and_admin_lockout_count_across_processes(settings):  # noqa: ANN001
    """Another process spends the wrong-token budget and the login attempts; this process is refused."""
    _rates(settings, webhook_bad_token="3/min")
    settings.AXES_FAILURE_LIMIT = 3
    _strategy("alpha", "alpha-token-123")
    get_user_model().objects.create_user(username="admin1", password="right-pass-123", is_staff=True)
    prefix = settings.CACHES["throttle"]["KEY_PREFIX"]
    script = f"""
from django.conf import settings
from django.test import Client
from django.test.utils import override_settings
caches = {{k: dict(v) for k, v in settings.CACHES.items()}}
caches["throttle"]["KEY_PREFIX"] = {prefix!r}
with override_settings(CACHES=caches):
    client = Client(REMOTE_ADDR="203.0.113.5")
    for n in range(3):
        r = client.post("/api/webhook/", {{"group_name": "alpha", "token": "bad-%d" % n, "order_type": "CANCEL_ALL"}},
                        content_type="application/json")
        print("webhook", r.status_code)
    for n in range(3):
        r = client.post("/admin/login/", {{"username": "admin1", "password": "wrong-%d" % n}})
        print("login", r.status_code)
"""
    out = procs.manage(
        "shell",
        "-c",
        script,
        env=_subprocess_env(settings, THROTTLE_WEBHOOK_BAD_TOKEN_RATE="3/min", AXES_FAILURE_LIMIT="3"),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split().count("403") == 3
    client = Client(REMOTE_ADDR="203.0.113.5")
    webhook = client.post(WEBHOOK, _cancel_all("alpha", "alpha-token-123"), content_type="application/json")
    assert webhook.status_code == 429
    login = client.post("/admin/login/", {"username": "admin1", "password": "right-pass-123"})
    assert login.status_code == 429
    assert "_auth_user_id" not in client.session
    assert AccessAttempt.objects.get(username="admin1").failures_since_start >= 3


@pytest.mark.django_db
def test_admin_login_locks_out_after_failures(settings):  # noqa: ANN001
    settings.AXES_FAILURE_LIMIT = 3
    get_user_model().objects.create_user(username="admin1", password="right-pass-123", is_staff=True)
    guesser = Client(REMOTE_ADDR="203.0.113.20")
    codes = [
        guesser.post("/admin/login/", {"username": "admin1", "password": f"wrong-{n}"}).status_code for n in range(3)
    ]
    assert codes == [200, 200, 429]  # the third failure reaches the limit and locks
    locked = guesser.post("/admin/login/", {"username": "admin1", "password": "right-pass-123"})
    assert locked.status_code == 429
    assert locked["Retry-After"] == str(15 * 60)  # AXES_COOLOFF_MINUTES
    assert "_auth_user_id" not in guesser.session
    # The operator at another address still gets in (lockout by source IP).
    operator = Client(REMOTE_ADDR="198.51.100.20")
    assert operator.post("/admin/login/", {"username": "admin1", "password": "right-pass-123"}).status_code == 302
    assert "_auth_user_id" in operator.session


# --- hashed API tokens -------------------------------------------------------------------------------


@pytest.mark.django_db
def test_api_tokens_are_stored_hashed_and_authenticate():
    user = UserFactory(is_staff=True)
    token, key = api_token_issue(user=user, name="bot")
    stored = ApiToken.objects.filter(pk=token.pk).values().get()
    assert key not in json.dumps(stored, default=str)
    assert stored["digest"] == api_token_digest(key) and stored["prefix"] == key[:8]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert client.get("/api/system/scheduler/status").status_code == 200
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token_digest(key)}")  # the digest is no key
    assert client.get("/api/system/scheduler/status").status_code == 401
    client.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    user.is_active = False
    user.save()
    assert client.get("/api/system/scheduler/status").status_code == 401


@pytest.mark.django_db
def test_admin_issues_a_token_once_and_lists_only_its_prefix():
    admin = get_user_model().objects.create_superuser(username="root", password="root-pass-123")
    owner = UserFactory()
    client = Client()
    client.force_login(admin)
    response = client.post("/admin/core/apitoken/add/", {"user": owner.pk, "name": "ci"}, follow=True)
    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    key = shown[0].split(": ")[1].split(" ")[0]
    token = ApiToken.objects.get(user=owner)
    assert token.digest == api_token_digest(key)
    listing = client.get("/admin/core/apitoken/").content.decode()
    assert token.prefix in listing and key not in listing
    assert key not in client.get(f"/admin/core/apitoken/{token.pk}/change/").content.decode()
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {key}")
    assert api.get(ORDERS).status_code == 200


@pytest.mark.django_db(transaction=True)
def test_plain_authtoken_rows_are_migrated_to_digests_and_deleted():
    import importlib

    from django.apps import apps

    migration = importlib.import_module("core.migrations.0002_api_token_throttle_cache")
    user = UserFactory()
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE authtoken_token (key varchar(40) PRIMARY KEY, user_id integer, created timestamp)")
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO authtoken_token (key, user_id, created) VALUES (%s, %s, CURRENT_TIMESTAMP)",
                ["a" * 40, user.pk],
            )
        with connection.schema_editor() as editor:
            migration.tokens_hash_existing(apps, editor)
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) FROM authtoken_token")
            assert cursor.fetchone()[0] == 0
        assert ApiToken.objects.get(user=user).digest == api_token_digest("a" * 40)
        client = APIClient()
        client.credentials(HTTP_AUTHORIZATION=f"Token {'a' * 40}")
        assert client.get(ORDERS).status_code == 200
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE authtoken_token")


# --- API docs ---------------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("access", "anonymous", "user", "staff"),
    [("authenticated", 401, 200, 200), ("staff", 401, 403, 200), ("public", 200, 200, 200)],
)
def test_api_docs_access(settings, access, anonymous, user, staff):  # noqa: ANN001
    settings.API_DOCS_ACCESS = access
    clients = {
        "anonymous": APIClient(),
        "user": _token_client(UserFactory()),
        "staff": _token_client(UserFactory(is_staff=True)),
    }
    for who, expected in (("anonymous", anonymous), ("user", user), ("staff", staff)):
        for url in ("/api/schema/", "/api/docs/"):
            assert clients[who].get(url).status_code == expected, (who, url)


# --- the debug page -----------------------------------------------------------------------------------


def test_settings_keep_no_raw_database_or_redis_url():
    env = procs.base_env(
        DATABASE_URL="postgres://trader:db-pass-4242@db.internal:5432/ts",
        REDIS_URL="redis://:redis-pass-4242@cache.internal:6379/0",
        DJANGO_DEBUG="true",
    )
    code = """
import sys
from django.conf import settings
from django.test import RequestFactory
from django.views.debug import get_default_exception_reporter_filter, technical_500_response
safe = repr(get_default_exception_reporter_filter().get_safe_settings())
try:
    url = "postgres://trader:db-pass-4242@db.internal:5432/ts"
    raise RuntimeError("boom")
except RuntimeError:
    # runserver copies the process environment into request.META: DATABASE_URL shows up there too.
    request = RequestFactory().get("/", DATABASE_URL="postgres://trader:db-pass-4242@db.internal:5432/ts")
    page = technical_500_response(request, *sys.exc_info()).content.decode()
names = [n for n in dir(settings) if n.isupper() and n in ("DATABASE_URL", "REDIS_URL")]
print("RESULT", "db-pass-4242" in safe, "redis-pass-4242" in safe, "pass-4242" in page, names,
      "cache.internal" in safe, "Traceback" in page, "trader:***@db.internal" in page)
"""
    out = procs.manage("shell", "-c", code, env=env)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("RESULT"))
    # No password anywhere; the hosts are still shown (the page stays useful); no raw URL settings.
    assert line == "RESULT False False False [] True True True"


def test_url_passwords_are_scrubbed_in_logs_too():
    from core.scrub import scrub

    assert scrub("could not connect: postgres://u:hunter2-secret@h:5432/db") == (
        "could not connect: postgres://u:***@h:5432/db"
    )
