"""A local stand-in for the Telegram Bot API, a fake clock, and Telegram settings pointed at them."""

from __future__ import annotations

import json
import re
import threading
from collections import deque
from collections.abc import Iterator
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest
from django.utils import timezone

BOT_TOKEN = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsawQ"
USER_BOT_TOKEN = "987654321:ZZxyUserOwnBotTokenSecretValue_12345"
CHAT_ID = "-1001234567890"

_PATH = re.compile(r"^/bot(?P<token>[^/]+)/sendMessage$")


def ok_reply() -> tuple[int, dict]:
    return 200, {"ok": True}  # the server fills in result.message_id


def too_many(retry_after: int) -> tuple[int, dict]:
    return 429, {
        "ok": False,
        "error_code": 429,
        "description": f"Too Many Requests: retry after {retry_after}",
        "parameters": {"retry_after": retry_after},
    }


def server_error() -> tuple[int, dict]:
    return 502, {"ok": False, "error_code": 502, "description": "Bad Gateway"}


def bad_request(description: str = "Bad Request: chat not found") -> tuple[int, dict]:
    return 400, {"ok": False, "error_code": 400, "description": description}


class FakeBotApi:
    """Records every sendMessage; replies from a script (FIFO), then 200 with increasing message ids."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: deque[tuple[int, dict]] = deque()
        self.lock = threading.Lock()
        self.next_message_id = 1000
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                match = _PATH.match(self.path)
                with api.lock:
                    if match is None:
                        status, reply = 404, {"ok": False, "error_code": 404, "description": "Not Found"}
                    else:
                        api.requests.append({"token": match.group("token"), **body})
                        status, reply = api.script.popleft() if api.script else ok_reply()
                        if status == 200 and reply.get("ok"):
                            api.next_message_id += 1
                            reply = {"ok": True, "result": {"message_id": api.next_message_id, "text": body["text"]}}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def queue(self, *replies: tuple[int, dict]) -> None:
        with self.lock:
            self.script.extend(replies)

    def texts(self, chat_id: str | None = None) -> list[str]:
        with self.lock:
            return [r["text"] for r in self.requests if chat_id is None or r["chat_id"] == chat_id]


@pytest.fixture
def bot_api() -> Iterator[FakeBotApi]:
    api = FakeBotApi()
    api.thread.start()
    yield api
    api.server.shutdown()
    api.server.server_close()


@pytest.fixture
def telegram(settings, bot_api):  # noqa: ANN001
    """The global bot and chat configured, the API aimed at the local server."""
    settings.TELEGRAM_API_URL = bot_api.url
    settings.TELEGRAM_BOT_TOKEN = BOT_TOKEN
    settings.TELEGRAM_CHAT_ID = CHAT_ID
    return bot_api


@pytest.fixture
def no_telegram(settings):  # noqa: ANN001
    settings.TELEGRAM_BOT_TOKEN = ""
    settings.TELEGRAM_CHAT_ID = ""


class FakeClock:
    """now() for the sender; sleep() advances it instead of sleeping."""

    def __init__(self, start: datetime) -> None:
        self.t = start

    def now(self) -> datetime:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.advance(seconds)

    def advance(self, seconds: float) -> None:
        self.t += timedelta(seconds=seconds)


@pytest.fixture
def clock() -> FakeClock:
    # A little ahead of the wall clock, so rows enqueued by the test (at wall time) are due.
    return FakeClock(timezone.now() + timedelta(seconds=5))


@pytest.fixture
def host() -> SimpleNamespace:
    return SimpleNamespace(instance_id="testhost:4242:cafe0001", term=7, stop_event=threading.Event())
