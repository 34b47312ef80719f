"""KIS tokens (SPEC §4.7): issue, keep, refresh, throttle, single flight, the refresh job, and scrubbing.

A local HTTP server speaks KIS's POST /oauth2/tokenP; settings.KIS_BASE_URL points at it.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
from collections import deque
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from zoneinfo import ZoneInfo

import factory
import pytest
import time_machine
from django.contrib.auth import get_user_model
from django.db import connection

from accounts.jobs import securities_token_refresh
from accounts.kis import (
    REAL_BASE_URL,
    VIRTUAL_BASE_URL,
    KisAuthError,
    KisThrottledError,
    KisUnavailableError,
    expires_at_parse,
    kis_base_url,
)
from accounts.models import Account, SecuritiesToken
from accounts.tokens import TokenIssuePendingError, ensure_token
from core.fields import decrypt
from notifications.models import AlertThrottle
from scheduler.models import JobRun
from scheduler.runs import JobFailedError

KST = ZoneInfo("Asia/Seoul")
T0 = datetime(2025, 3, 1, 3, 0, tzinfo=UTC)  # 12:00 KST
_tokens = itertools.count(1)


def kst(moment: datetime) -> str:
    return moment.astimezone(KST).strftime("%Y-%m-%d %H:%M:%S")


def ok(*, token: str | None = None, expires: datetime | None = None) -> tuple[int, dict]:
    """A KIS success reply; `expires` (UTC) goes out as KST wall time like the real API."""
    token = token or f"eyJ0eXAiOiJKV1Qi.tok{next(_tokens)}.{'s' * 40}"
    body = {"access_token": token, "token_type": "Bearer", "expires_in": 86400}
    if expires is not None:
        body["access_token_token_expired"] = kst(expires)
    return 200, body


THROTTLED = (403, {"error_description": "접근토큰 발급 잠시 후 다시 시도하세요(1분당 1회)", "error_code": "EGW00133"})
BAD_APPKEY = (403, {"error_description": "유효하지 않은 AppKey입니다.", "error_code": "EGW00103"})
SERVER_ERROR = (500, {"error_description": "internal error", "error_code": "EGW00500"})


class FakeKis:
    """Scriptable replies per appkey (else the shared script); records every request body."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self.scripts: dict[str | None, deque] = {}
        self.default: deque = deque()
        self.delay = 0.0
        self.lock = threading.Lock()
        self.url = ""

    def script(self, *replies: tuple[int, dict], appkey: str | None = None) -> None:
        target = self.default if appkey is None else self.scripts.setdefault(appkey, deque())
        target.extend(replies)

    def reply_for(self, body: dict) -> tuple[int, dict]:
        with self.lock:
            self.calls.append(body)
            queue = self.scripts.get(body.get("appkey"), self.default)
            if queue:
                return queue.popleft()
        return 500, {"error_description": "no reply scripted", "error_code": "TEST"}

    def calls_for(self, appkey: str) -> int:
        return sum(1 for call in self.calls if call.get("appkey") == appkey)


@pytest.fixture
def kis(settings):
    fake = FakeKis()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            if self.path != "/oauth2/tokenP":
                status, reply = 404, {"error_description": "not found", "error_code": "TEST"}
            else:
                status, reply = fake.reply_for(body)
            if fake.delay:
                threading.Event().wait(fake.delay)
            data = json.dumps(reply, ensure_ascii=False).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format, *args):  # noqa: A002
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="fake-kis", daemon=True)
    thread.start()
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    settings.KIS_BASE_URL = fake.url
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(5)


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = "kis-owner"


class KisAccountFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Account

    user = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"kis-{n}")
    exchange = "KIS"
    account_type = Account.AccountType.SECURITIES
    kis_appkey = factory.Sequence(lambda n: f"PSappkey{n:04d}AbCdEfGhIjKlMnOp")
    kis_appsecret = factory.Sequence(lambda n: f"appsecret{n:04d}/{'Z' * 150}=")
    kis_account_no = "50123456-01"


def raw_token_column(account: Account) -> str:
    with connection.cursor() as cursor:
        cursor.execute("SELECT access_token FROM accounts_securitiestoken WHERE account_id = %s", [account.pk])
        return cursor.fetchone()[0]


# --- pure parts -----------------------------------------------------------------------------


def test_base_url_real_virtual_and_override():
    assert kis_base_url(is_virtual=False) == REAL_BASE_URL == "https://openapi.koreainvestment.com:9443"
    assert kis_base_url(is_virtual=True) == VIRTUAL_BASE_URL == "https://openapivts.koreainvestment.com:29443"
    assert kis_base_url(is_virtual=True, override="http://127.0.0.1:9/") == "http://127.0.0.1:9"
    assert kis_base_url(is_virtual=False, override="http://127.0.0.1:9") == "http://127.0.0.1:9"


def test_expires_at_is_kst_wall_time_converted_to_utc():
    assert expires_at_parse({"access_token_token_expired": "2025-03-02 12:00:00", "expires_in": 5}, now=T0) == (
        datetime(2025, 3, 2, 3, 0, tzinfo=UTC)
    )
    # Missing or garbled: now + expires_in.
    assert expires_at_parse({"expires_in": 86400}, now=T0) == T0 + timedelta(days=1)
    assert expires_at_parse({"access_token_token_expired": "soon", "expires_in": 60}, now=T0) == T0 + timedelta(
        seconds=60
    )
    with pytest.raises(KisUnavailableError):
        expires_at_parse({}, now=T0)


# --- ensure_token ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_first_issue_stores_the_token_encrypted(kis):
    account = KisAccountFactory()
    status, body = ok(expires=T0 + timedelta(days=1))
    kis.script((status, body))

    token = ensure_token(account, now=T0)

    assert kis.calls == [
        {"grant_type": "client_credentials", "appkey": account.kis_appkey, "appsecret": account.kis_appsecret}
    ]
    stored = SecuritiesToken.objects.get(account=account)
    assert stored.access_token == token.access_token == body["access_token"]
    assert (stored.token_type, stored.expires_at) == ("Bearer", datetime(2025, 3, 2, 3, 0, tzinfo=UTC))
    assert stored.last_refreshed_at == stored.last_issue_attempt_at == T0
    assert stored.last_error == ""
    raw = raw_token_column(account)
    assert body["access_token"] not in raw
    assert decrypt(raw) == body["access_token"]
    assert body["access_token"] not in repr(stored)


@pytest.mark.django_db
def test_kept_inside_six_hours_reissued_after(kis):
    account = KisAccountFactory()
    kis.script(ok(expires=T0 + timedelta(days=1)))
    first = ensure_token(account, now=T0).access_token

    with time_machine.travel(T0 + timedelta(hours=5, minutes=59), tick=False):
        assert ensure_token(account).access_token == first
    assert len(kis.calls) == 1

    status, body = ok(expires=T0 + timedelta(hours=30))
    kis.script((status, body))
    later = T0 + timedelta(hours=6, seconds=1)
    with time_machine.travel(later, tick=False):
        token = ensure_token(account)
    assert len(kis.calls) == 2
    assert token.access_token == body["access_token"] != first
    stored = SecuritiesToken.objects.get(account=account)
    assert (stored.access_token, stored.last_refreshed_at) == (body["access_token"], later)
    assert stored.expires_at == T0 + timedelta(hours=30)


@pytest.mark.django_db
def test_reissued_when_less_than_five_minutes_remain(kis):
    account = KisAccountFactory()
    kis.script(ok(expires=T0 + timedelta(hours=2)))  # a short-lived token
    first = ensure_token(account, now=T0).access_token

    with time_machine.travel(T0 + timedelta(hours=1, minutes=55), tick=False):  # 5 min left: kept
        assert ensure_token(account).access_token == first
    assert len(kis.calls) == 1

    kis.script(ok(expires=T0 + timedelta(days=1)))
    with time_machine.travel(T0 + timedelta(hours=1, minutes=55, seconds=1), tick=False):
        assert ensure_token(account).access_token != first
    assert len(kis.calls) == 2


@pytest.mark.django_db
def test_throttle_keeps_the_old_token_and_the_next_attempt_waits_61_seconds(kis):
    account = KisAccountFactory()
    kis.script(ok(expires=T0 + timedelta(days=1)))
    old = ensure_token(account, now=T0).access_token

    t1 = T0 + timedelta(hours=7)
    kis.script(THROTTLED)
    token = ensure_token(account, now=t1)
    assert len(kis.calls) == 2
    assert token.access_token == old
    stored = SecuritiesToken.objects.get(account=account)
    assert (stored.access_token, stored.last_refreshed_at, stored.last_issue_attempt_at) == (old, T0, t1)
    assert "KisThrottledError" in stored.last_error and "EGW00133" in stored.last_error

    # Inside the claim window nobody calls KIS; the old token is still served.
    assert ensure_token(account, now=t1 + timedelta(seconds=60)).access_token == old
    assert len(kis.calls) == 2

    status, body = ok(expires=T0 + timedelta(days=2))
    kis.script((status, body))
    token = ensure_token(account, now=t1 + timedelta(seconds=62))
    assert len(kis.calls) == 3
    assert token.access_token == body["access_token"]
    assert SecuritiesToken.objects.get(account=account).last_error == ""


@pytest.mark.django_db
def test_throttle_without_any_token_raises_and_retries_after_61_seconds(kis):
    account = KisAccountFactory()
    kis.script(THROTTLED)
    with pytest.raises(KisThrottledError, match="EGW00133"):
        ensure_token(account, now=T0)

    with pytest.raises(TokenIssuePendingError, match="retry after 03:01:01"):
        ensure_token(account, now=T0 + timedelta(seconds=30))
    assert len(kis.calls) == 1

    kis.script(ok(expires=T0 + timedelta(days=1)))
    assert ensure_token(account, now=T0 + timedelta(seconds=61, microseconds=1)).access_token
    assert len(kis.calls) == 2


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("reply", "error"),
    [(SERVER_ERROR, KisUnavailableError), (BAD_APPKEY, KisAuthError), ((200, {"oops": 1}), KisUnavailableError)],
    ids=["500", "403-bad-appkey", "no-token"],
)
def test_error_replies_are_typed(kis, reply, error):
    account = KisAccountFactory()
    kis.script(reply)
    with pytest.raises(error):
        ensure_token(account, now=T0)
    assert not SecuritiesToken.objects.get(account=account).access_token


@pytest.mark.django_db
def test_unreachable_kis_is_unavailable(settings):
    with socket.socket() as sock:  # a port that was just free: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings.KIS_BASE_URL = f"http://127.0.0.1:{port}"
    with pytest.raises(KisUnavailableError, match="ConnectionError"):
        ensure_token(KisAccountFactory(), now=T0)


@pytest.mark.django_db
def test_account_without_credentials_spends_no_claim(kis):
    account = KisAccountFactory(kis_appsecret="")
    with pytest.raises(KisAuthError, match="no KIS appkey/appsecret"):
        ensure_token(account, now=T0)
    assert kis.calls == []
    assert SecuritiesToken.objects.get(account=account).last_issue_attempt_at is None


@pytest.mark.django_db
@pytest.mark.parametrize(("is_virtual", "base"), [(False, REAL_BASE_URL), (True, VIRTUAL_BASE_URL)])
def test_host_follows_is_virtual_when_no_override(settings, monkeypatch, is_virtual, base):
    settings.KIS_BASE_URL = ""
    seen = []

    class Reply:
        status_code = 200

        def json(self):
            return ok(expires=T0 + timedelta(days=1))[1]

    def post(url, *, json, timeout):  # noqa: A002
        seen.append((url, timeout))
        return Reply()

    monkeypatch.setattr("accounts.kis.requests.post", post)
    ensure_token(KisAccountFactory(is_virtual=is_virtual), now=T0)
    assert seen == [(f"{base}/oauth2/tokenP", (3.0, 10.0))]


@pytest.mark.postgres
@pytest.mark.parametrize("existing", [False, True], ids=["first-issue", "stale-token"])
def test_concurrent_callers_make_exactly_one_issue_call(transactional_db, kis, existing):
    account = KisAccountFactory()
    if existing:
        kis.script(ok(expires=T0 + timedelta(days=1)))
        old = ensure_token(account, now=T0).access_token
        kis.calls.clear()
    status, body = ok(expires=T0 + timedelta(days=2))
    kis.script((status, body), ok(), ok())
    kis.delay = 0.5  # both callers are past their claim before the first reply arrives
    now = T0 + timedelta(hours=7)
    barrier = threading.Barrier(4)
    results: list[object] = []

    def caller():
        try:
            barrier.wait(5)
            results.append(ensure_token(Account.objects.get(pk=account.pk), now=now).access_token)
        except Exception as exc:  # noqa: BLE001 -- collected and asserted below
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=caller) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)

    assert len(kis.calls) == 1
    assert len(results) == 4
    assert body["access_token"] in results
    if existing:
        # Losers are served the still-valid old token while the winner's issue is in flight.
        assert set(results) <= {old, body["access_token"]}
    else:
        losers = [r for r in results if r != body["access_token"]]
        assert all(isinstance(r, TokenIssuePendingError) for r in losers)
    assert SecuritiesToken.objects.get(account=account).access_token == body["access_token"]


# --- the job --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_job_refreshes_each_account_and_alerts_per_account_failures(kis, caplog):
    good, broken, kept = KisAccountFactory(), KisAccountFactory(), KisAccountFactory()
    KisAccountFactory(is_active=False)
    KisAccountFactory(exchange="BINANCE", account_type=Account.AccountType.CRYPTO)
    kis.script(ok(expires=T0 + timedelta(days=1)), appkey=kept.kis_appkey)
    ensure_token(kept, now=T0)
    kis.calls.clear()
    kis.script(ok(), appkey=good.kis_appkey)
    kis.script(SERVER_ERROR, appkey=broken.kis_appkey)

    with time_machine.travel(T0 + timedelta(hours=1), tick=False):
        result = securities_token_refresh()

    assert result.summary == (
        f"3 accounts: 1 issued, 1 kept, 1 failed; failed: account {broken.pk} KisUnavailableError"
    )
    assert [kis.calls_for(a.kis_appkey) for a in (good, broken, kept)] == [1, 1, 0]
    assert SecuritiesToken.objects.get(account=good).access_token
    assert not SecuritiesToken.objects.get(account=broken).access_token
    run = JobRun.objects.get(job_id="securities_token_refresh")
    assert (run.kind, run.outcome, run.summary) == (JobRun.Kind.MANUAL, JobRun.Outcome.OK, result.summary)
    assert AlertThrottle.objects.filter(key=f"kis:{broken.pk}").exists()
    assert not AlertThrottle.objects.filter(key=f"kis:{good.pk}").exists()
    assert f"ALERT kis:{broken.pk}: KIS token refresh for account {broken.pk} failed" in caplog.text


@pytest.mark.django_db
def test_job_counts_a_throttled_refresh_with_a_kept_token_as_failed(kis):
    account = KisAccountFactory()
    kis.script(ok(expires=T0 + timedelta(days=1)))
    old = ensure_token(account, now=T0).access_token
    kis.script(THROTTLED)

    expected = "1 accounts: 0 issued, 0 kept, 1 failed; failed: account .* KisThrottledError"
    with (
        time_machine.travel(T0 + timedelta(hours=6, minutes=1), tick=False),
        pytest.raises(JobFailedError, match=expected),
    ):
        securities_token_refresh()

    assert SecuritiesToken.objects.get(account=account).access_token == old
    run = JobRun.objects.get(job_id="securities_token_refresh")
    assert run.outcome == JobRun.Outcome.ERROR
    assert AlertThrottle.objects.filter(key=f"kis:{account.pk}").exists()
    assert AlertThrottle.objects.filter(key="job:securities_token_refresh").exists()


@pytest.mark.django_db
def test_job_with_nothing_due_is_a_noop(kis):
    account = KisAccountFactory()
    kis.script(ok(expires=T0 + timedelta(days=1)))
    ensure_token(account, now=T0)
    with time_machine.travel(T0 + timedelta(hours=2), tick=False):
        result = securities_token_refresh()
    assert (result.summary, result.noop) == ("1 accounts: 0 issued, 1 kept, 0 failed", True)
    assert JobRun.objects.get(job_id="securities_token_refresh").outcome == JobRun.Outcome.NOOP


@pytest.mark.django_db
def test_secrets_never_reach_jobrun_alerts_or_logs(kis, caplog):
    caplog.set_level(logging.DEBUG)
    account = KisAccountFactory()
    kis.script(ok(expires=T0 + timedelta(days=1)))
    token = ensure_token(account, now=T0).access_token
    # A misbehaving KIS echoing everything back into its error text.
    leak = f"bad request appkey {account.kis_appkey} secret {account.kis_appsecret} token {token}"
    kis.script((500, {"error_description": leak, "error_code": "EGW99999"}))

    with time_machine.travel(T0 + timedelta(hours=7), tick=False), pytest.raises(JobFailedError):
        securities_token_refresh()

    run = JobRun.objects.get(job_id="securities_token_refresh")
    stored = SecuritiesToken.objects.get(account=account)
    # The KIS error itself survives scrubbing; only the secrets go.
    assert (
        "KisUnavailableError: KIS token request failed: HTTP 500 EGW99999 bad request appkey ***" in stored.last_error
    )
    assert f"failed: account {account.pk} KisUnavailableError" in run.summary
    assert "(KIS token request failed: HTTP 500 EGW99999" in caplog.text
    texts = {
        "jobrun.summary": run.summary,
        "jobrun.error": run.error,
        "token.last_error": stored.last_error,
        "logs": caplog.text,
    }
    for secret in (account.kis_appkey, account.kis_appsecret, token):
        for where, text in texts.items():
            assert secret not in text, f"secret leaked into {where}"


@pytest.mark.django_db
def test_ensure_token_refuses_other_accounts(kis):
    account = KisAccountFactory(exchange="BINANCE", account_type=Account.AccountType.CRYPTO)
    with pytest.raises(ValueError, match="not a KIS securities account"):
        ensure_token(account, now=T0)
    assert not SecuritiesToken.objects.exists()
    assert kis.calls == []
