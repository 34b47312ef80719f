"""Fixtures for the real-ccxt tests: the dialect server in a background thread and gateways aimed at it."""

from __future__ import annotations

import pytest

from exchanges import ccxt_gateway
from exchanges.ccxt_gateway import CcxtGateway
from exchanges.gateway import MarketType
from exchanges.simulator.server import ServerConfig, ServerThread

API_KEY = "sim-test-key-0123456789"
API_SECRET = "sim-test-secret-abcdefghijklmnop"
# A second account of the same server (runsimexchange --keys): its own key and secret.
OTHER_KEY = "sim-test-key-other-98765"
OTHER_SECRET = "sim-test-secret-other-zyxwvutsrq"


@pytest.fixture(scope="session")
def sim_server(django_db_setup):  # noqa: ANN001
    # Depends on the test database so that it stops (and its threads' connections close) first.
    server = ServerThread(
        ServerConfig(api_key=API_KEY, api_secret=API_SECRET, timeout_hold=3.0, keys={OTHER_KEY: OTHER_SECRET})
    ).start()
    yield server
    server.stop()


@pytest.fixture
def sim_urls(sim_server, settings, transactional_db):
    settings.EXCHANGE_URL_OVERRIDES = {"BINANCE": sim_server.base_url, "BYBIT": sim_server.base_url}
    settings.EXCHANGE_HTTP_TIMEOUT_MS = 1500
    ccxt_gateway.caches_clear()
    yield sim_server
    ccxt_gateway.caches_clear()


@pytest.fixture
def make_gateway(sim_urls):
    def make(exchange: str, market_type: MarketType, *, account: str = "acct-1", secret: str = API_SECRET, **kw):
        return CcxtGateway(
            exchange,
            market_type,
            API_KEY,
            secret,
            account_key=account,
            retries=kw.pop("retries", 0),
            backoff_seconds=0.01,
            **kw,
        )

    return make
