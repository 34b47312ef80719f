"""ClientWarmer: a scheduler builds the exchange clients of the accounts it trades for before the first signal."""

from __future__ import annotations

import pytest

from exchanges import ccxt_gateway
from exchanges.gateway import MarketType
from orders.execution import ClientWarmer
from scheduler.shards import ShardSet
from tests.exchanges import ccxt_sim_support
from tests.exchanges.ccxt_sim_support import API_KEY, API_SECRET
from tests.orders.factories import StrategyAccountFactory

sim_server = ccxt_sim_support.sim_server
sim_urls = ccxt_sim_support.sim_urls


def follower(**kw):  # noqa: ANN003, ANN201
    return StrategyAccountFactory(
        strategy__market_type="FUTURES",
        account__exchange="BINANCE",
        account__api_key=API_KEY,
        account__api_secret=API_SECRET,
        **kw,
    )


def built() -> set[int]:
    """Account ids with a ccxt instance in this process (instances are keyed "account-<pk>")."""
    return {int(key.removeprefix("account-")) for (_, key, _) in ccxt_gateway._instances}


@pytest.mark.django_db(transaction=True)
def test_clients_of_active_links_are_built_once_and_only_for_owned_shards(sim_urls):  # noqa: ANN001
    live = [follower(), follower()]
    stopped = follower(account__is_active=False)
    paper = StrategyAccountFactory()  # a paper account: no client to build

    one = ShardSet(count=16, shards=frozenset({live[0].account_id % 16}))
    warmer = ClientWarmer()
    assert warmer.warm(one) == 1
    assert live[0].account_id in built() and live[1].account_id not in built()

    assert warmer.warm(None) == 1  # the other one; the first is not built again
    assert {sa.account_id for sa in live} <= built()
    assert stopped.account_id not in built()
    assert (paper.account_id, "SPOT") in warmer.warmed  # looked at, nothing to build
    assert warmer.warm(None) == 0
    # The clients share one loaded market table: the first order needs no load of its own.
    clients = [ccxt_gateway._instances[("binance", f"account-{sa.account_id}", MarketType.FUTURES)] for sa in live]
    assert clients[0].markets and clients[0].markets is clients[1].markets


@pytest.mark.django_db(transaction=True)
def test_the_warmer_thread_builds_a_new_followers_client_without_a_signal(sim_urls):  # noqa: ANN001
    from tests.procs import wait_for

    first = follower()
    warmer = ClientWarmer()
    warmer.WARM_RESCAN = 0.5  # new subscriptions picked up at once here
    warmer.start()
    try:
        wait_for(lambda: first.account_id in built(), timeout=15, what="the first client")
        later = follower()
        wait_for(lambda: later.account_id in built(), timeout=15, what="the new follower's client")
    finally:
        warmer.stop()
    assert not warmer._thread.is_alive()
