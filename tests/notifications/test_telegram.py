"""The Bot API client against the local stand-in: request shape, typed errors, no token in any text."""

from __future__ import annotations

import socket
import traceback

import pytest

from notifications.telegram import (
    TelegramPermanentError,
    TelegramRetryAfter,
    TelegramTemporaryError,
    send_message,
)
from tests.notifications.conftest import BOT_TOKEN, CHAT_ID, bad_request, server_error, too_many


def _all_text(exc: BaseException) -> str:
    return str(exc) + "".join(traceback.format_exception(exc))


def test_send_message_posts_html_to_the_chat_and_returns_the_message_id(telegram):  # noqa: ANN001
    message_id = send_message(token=BOT_TOKEN, chat_id=CHAT_ID, text="<b>hello</b> &amp; bye")

    assert message_id == telegram.next_message_id
    [request] = telegram.requests
    assert request["token"] == BOT_TOKEN
    assert request["chat_id"] == CHAT_ID
    assert request["text"] == "<b>hello</b> &amp; bye"
    assert request["parse_mode"] == "HTML"


def test_429_carries_retry_after(telegram):  # noqa: ANN001
    telegram.queue(too_many(17))
    with pytest.raises(TelegramRetryAfter) as info:
        send_message(token=BOT_TOKEN, chat_id=CHAT_ID, text="x")
    assert info.value.retry_after == 17
    assert BOT_TOKEN not in _all_text(info.value)


def test_5xx_is_temporary_and_4xx_permanent_without_the_token(telegram):  # noqa: ANN001
    # A reply that echoes the token (as a proxy's error page might) must still not leak it.
    telegram.queue(server_error(), bad_request(f"Bad Request: chat not found via /bot{BOT_TOKEN}/sendMessage"))
    with pytest.raises(TelegramTemporaryError) as temporary:
        send_message(token=BOT_TOKEN, chat_id=CHAT_ID, text="x")
    with pytest.raises(TelegramPermanentError) as permanent:
        send_message(token=BOT_TOKEN, chat_id=CHAT_ID, text="x")

    assert "502" in str(temporary.value)
    assert "chat not found" in str(permanent.value)
    for exc in (temporary.value, permanent.value):
        assert BOT_TOKEN not in _all_text(exc)
        assert BOT_TOKEN.split(":")[1] not in _all_text(exc)


def test_network_error_is_temporary_and_its_url_is_scrubbed(settings):  # noqa: ANN001
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings.TELEGRAM_API_URL = f"http://127.0.0.1:{port}"

    with pytest.raises(TelegramTemporaryError) as info:
        send_message(token=BOT_TOKEN, chat_id=CHAT_ID, text="x")

    assert "network error" in str(info.value)
    assert "sendMessage" in str(info.value)  # requests' text, with the URL, made it through scrubbed
    assert BOT_TOKEN not in _all_text(info.value)
    assert BOT_TOKEN.split(":")[1] not in _all_text(info.value)
