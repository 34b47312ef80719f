"""EXCHANGE_SOURCE_ADDRESS: a process's REST calls leave from its own local address, and the exchange
counts its request weight per address (one budget per egress IP, as Binance does)."""

from __future__ import annotations

import os

from exchanges import ccxt_gateway
from exchanges.gateway import MarketType
from tests.exchanges import ccxt_sim_support
from tests.procs import manage

sim_server = ccxt_sim_support.sim_server
sim_urls = ccxt_sim_support.sim_urls
make_gateway = ccxt_sim_support.make_gateway


def used_weight_after_two_calls(make_gateway, settings, source: str) -> int:  # noqa: ANN001
    """Fresh instances (markets loaded anew) from `source`: the exchange's used weight after a time call."""
    settings.EXCHANGE_SOURCE_ADDRESS = source
    ccxt_gateway.caches_clear()
    client = make_gateway("BINANCE", MarketType.FUTURES)._client(MarketType.FUTURES)
    client.fetch_time()
    return int(client.last_response_headers["X-MBX-USED-WEIGHT-1M"])


def test_each_source_address_has_its_own_weight_budget_at_the_exchange(make_gateway, settings):  # noqa: ANN001
    first = used_weight_after_two_calls(make_gateway, settings, "127.0.0.2")
    other = used_weight_after_two_calls(make_gateway, settings, "127.0.0.3")
    again = used_weight_after_two_calls(make_gateway, settings, "127.0.0.2")

    assert first > 0
    assert other == first, "a second address starts from an empty budget"
    assert again == 2 * first, "the same address adds up"


def test_a_source_address_that_is_not_an_ip_stops_the_process_at_start():
    result = manage("check", env={**os.environ, "EXCHANGE_SOURCE_ADDRESS": "eth0"})
    assert result.returncode != 0
    assert "EXCHANGE_SOURCE_ADDRESS must be an IP address of this host, not 'eth0'" in result.stderr
