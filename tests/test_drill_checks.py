"""The drill's own arithmetic: live-at-once counting for slots and double placements, rate-limit counting."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from drill.checks import Interval, _max_overlap, check_fanout, rate_limit_figures
from drill.load import FanSignal
from drill.seed import ExchangeAccount
from exchanges.models import SimOrder
from orders.models import OrderEvent
from orders.services import client_order_id_for
from tests.orders.factories import AccountFactory

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_max_overlap_counts_orders_live_at_one_moment():
    assert _max_overlap([]) == 0
    sequential = [Interval(_at(0), _at(1)), Interval(_at(1), _at(2)), Interval(_at(2), None)]
    assert _max_overlap(sequential) == 1  # one ends the instant the next starts: never two at once
    overlapping = [Interval(_at(0), _at(5)), Interval(_at(1), _at(2)), Interval(_at(1.5), None)]
    assert _max_overlap(overlapping) == 3
    assert _max_overlap([Interval(_at(0), None), Interval(_at(10), None)]) == 2


def test_rate_limit_figures_count_refusals_by_status_and_the_clients_reactions(tmp_path):
    sim = tmp_path / "simexchange-00.log"
    sim.write_text(
        "2026-12-04 INFO sim BINANCE rate limit: /fapi/v1/order refused with HTTP 429 (ORDERS)\n"
        "2026-12-04 INFO sim BINANCE rate limit: /fapi/v1/order refused with HTTP 429 (ORDERS)\n"
        "2026-12-04 INFO sim BINANCE rate limit: /fapi/v1/openOrders refused with HTTP 418 (ban)\n"
        "2026-12-04 INFO sim BYBIT rate limit: /v5/order/create refused with HTTP 200 (UID:/v5/order/create:FUTURES)\n"
        "2026-12-04 INFO sim BYBIT rate limit: /v5/order/realtime refused with HTTP 403 (IP:5s)\n"
        "2026-12-04 INFO something else entirely\n"
    )
    scheduler = tmp_path / "scheduler-03.log"
    scheduler.write_text(
        "WARNING BINANCE FUTURES rate limited: no calls for 4.0 s\n"
        "WARNING BYBIT FUTURES rate limited: no calls for 1.0 s\n"
        "INFO queue: BINANCE FUTURES create_order: request budget spent here; next call in 3.10 s\n"
    )
    figures = rate_limit_figures(simulator_logs=[sim], client_logs=[scheduler, tmp_path / "missing.log"])
    assert figures == {
        "BINANCE 429": 2,
        "BINANCE 418 ban": 1,
        "BYBIT 10006": 1,
        "BYBIT 403": 1,
        "client back-off BINANCE": 1,
        "client back-off BYBIT": 1,
        "client budget held a call": 1,
    }


# --- check_fanout over rows: what it must catch ---------------------------------------------------


def _sim_order(account: ExchangeAccount, cid: str, *, start: float, end: float | None, status: str = "CANCELED"):
    return SimOrder.objects.create(
        exchange=account.exchange,
        account=account.key,
        market_type="FUTURES",
        symbol="BTC/USDT:USDT",
        side="BUY",
        order_type="LIMIT",
        status="NEW" if end is None else status,
        client_order_id=cid,
        quantity=Decimal("0.01"),
        price=Decimal("60000"),
        created_at=_at(start),
        updated_at=_at(end if end is not None else start),
    )


def _history(account: ExchangeAccount, key: uuid.UUID, *kinds: str, placements: int = 1) -> None:
    for kind in kinds:
        details = {}
        if kind == "submitting":
            details = {
                "placement_no": placements,
                "client_order_id": client_order_id_for(order_key=key, placement_no=placements),
            }
        OrderEvent.objects.create(
            order_key=key, kind=kind, account_id=account.account_id, symbol="BTC/USDT", details=details
        )


@pytest.mark.django_db
def test_check_fanout_passes_clean_orders_and_catches_doubles_losses_and_slots():
    followers = [
        ExchangeAccount(AccountFactory(exchange="BINANCE").pk, "BINANCE", f"follower-key-{i}") for i in range(2)
    ]
    a, b = followers
    keys = {name: uuid.uuid4() for name in ("a1", "b1", "a2", "b2", "a3", "b3")}
    signals = [
        FanSignal(
            "d1",
            "LIMIT",
            "BTC/USDT",
            "BUY",
            202,
            {str(a.account_id): [str(keys["a1"])], str(b.account_id): [str(keys["b1"])]},
        ),
        FanSignal(
            "d2",
            "LIMIT",
            "BTC/USDT",
            "BUY",
            202,
            {str(a.account_id): [str(keys["a2"])], str(b.account_id): [str(keys["b2"])]},
        ),
    ]
    # Clean: each placed once, then cancelled; never two of one follower's orders live at once.
    for name in ("a1", "b1", "a2", "b2"):
        account = a if name.startswith("a") else b
        _history(account, keys[name], "queued", "submitting", "placed", "cancelled")
        start = 10.0 * int(name[1])
        _sim_order(account, client_order_id_for(order_key=keys[name], placement_no=1), start=start, end=start + 5)
    clean = check_fanout(signals=signals, followers=followers, slots=1, converged=True)
    assert clean.ok, clean.problems
    assert "2 signals to 2 followers, 4 follower orders: cancelled 4" in clean.note

    # A third signal: follower a's order was created twice at once (a placement of p2 while p1 was
    # live, and a p3 nobody submitted), follower b's never got an order nor events, and a's orders now
    # overlap: two LIMIT BUY BTC live at once with one slot.
    signals.append(FanSignal("d3", "LIMIT", "BTC/USDT", "BUY", 202, {str(a.account_id): [str(keys["a3"])]}))
    _history(a, keys["a3"], "queued", "submitting", "placed")
    OrderEvent.objects.create(
        order_key=keys["a3"],
        kind="requeued",
        account_id=a.account_id,
        symbol="BTC/USDT",
    )
    _history(a, keys["a3"], "submitting", "placed", placements=2)
    _sim_order(a, client_order_id_for(order_key=keys["a3"], placement_no=1), start=30, end=40)
    _sim_order(a, client_order_id_for(order_key=keys["a3"], placement_no=2), start=35, end=None)
    _sim_order(a, client_order_id_for(order_key=keys["a3"], placement_no=3), start=50, end=51)
    found = check_fanout(signals=signals, followers=followers, slots=1, converged=True)
    text = "\n".join(found.problems)
    assert f"follower {b.account_id} got 0 orders" in text
    assert "live on the exchange 2 times at once (3 placements)" in text
    assert (
        f"{client_order_id_for(order_key=keys['a3'], placement_no=3)} on the exchange, placed by no recorded submission"
        in text
    )
    assert "placed but no OpenOrder row" in text  # a3's last event says live; there is no row
    assert "2 LIMIT orders live at once (slots 1)" in text


@pytest.mark.django_db
def test_settled_waits_for_queued_market_orders_deferred_pairs_and_every_shards_reconciliation(settings):
    from django.utils import timezone

    from drill.checks import settled
    from orders.models import PendingOrder, QueueDirty
    from scheduler.models import JobRun
    from tests.orders.factories import PendingOrderFactory

    settings.ACCOUNT_SHARDS = 4
    now = timezone.now()
    since = now - timedelta(seconds=60)

    def run(shards: str) -> None:
        JobRun.objects.create(
            job_id="update_open_orders",
            scheduled_at=now,
            term=1,
            host="h",
            pid=1,
            started_at=now,
            outcome=JobRun.Outcome.OK,
            summary="2/2 account markets",
            shards=shards,
        )

    run("0,1")
    done, waiting = settled(since=since, now=now)
    assert not done and "no clean reconciliation of every shard yet (2 covered)" in waiting
    run("2,3")
    assert settled(since=since, now=now) == (True, "")

    market = PendingOrderFactory(order_type="MARKET", express=True, status=PendingOrder.Status.QUEUED)
    assert settled(since=since, now=now) == (False, "1 market orders queued")
    market.delete()
    QueueDirty.objects.create(
        account_id=market.account_id, market_type="SPOT", symbol="ETH/USDT", marked_at=now + timedelta(seconds=20)
    )
    assert settled(since=since, now=now) == (False, "1 dirty pairs"), "a pair deferred 20 s is still pending"
