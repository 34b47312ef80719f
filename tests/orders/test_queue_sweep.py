"""The sweep's SQL detector (orders.sweep.queue_sweep_detect) never misses a pair the full sweep would act on.

For random books (queued, live, pinned, submitting, cancelling rows; priorities, prices and stops
with ties and near-ties under the tick), every pair for which the old full sweep would do or
schedule anything — `_next_due` of its rows is not None, which includes a non-empty `plan_pair` —
is flagged by the detector. Runs on SQLite and on PostgreSQL (DATABASE_URL).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import transaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import Account
from orders import selectors
from orders.models import OpenOrder, PendingOrder
from orders.queue import QueueWork, _entries, _next_due, _plan
from orders.selectors import queue_slots_for
from orders.sweep import queue_sweep_detect
from tests.orders.factories import MarketInfoFactory, OpenOrderFactory, PendingOrderFactory, StrategyAccountFactory
from tests.orders.queue_support import T0

pytestmark = pytest.mark.django_db

NOW = T0
TIMES = (None, NOW - timedelta(seconds=10), NOW, NOW + timedelta(seconds=10))
SYMBOLS = ("A/USDT", "B/USDT")


class _Rollback(Exception):
    pass


@st.composite
def order_rows(draw):  # noqa: ANN001, ANN201
    """One queued or live order; most are plain (so the ranking decides), some carry a state of their own."""
    live = draw(st.booleans())
    quirky = draw(st.integers(0, 5)) == 0
    kinds = ["LIMIT", "LIMIT", "LIMIT", "STOP_LIMIT", "STOP_MARKET"] + (["MARKET"] if quirky else [])
    order_type = draw(st.sampled_from(kinds))
    price = None if order_type in ("MARKET", "STOP_MARKET") else Decimal(draw(st.integers(0, 8))) / 4
    if order_type == "LIMIT" and draw(st.integers(0, 9)) == 0:
        price = None  # an order without a price ranks last
    stop = Decimal(draw(st.integers(0, 8))) / 4 if order_type.startswith("STOP") else None
    row = {
        "live": live,
        "symbol": draw(st.sampled_from(SYMBOLS)),
        "side": draw(st.sampled_from(["BUY", "SELL"])),
        "order_type": order_type,
        "price": price,
        "stop_price": stop,
        "priority": draw(st.integers(0, 2)),
        "signal_at": NOW - timedelta(minutes=draw(st.integers(1, 3))),
        "express": order_type == "MARKET" and draw(st.booleans()),
        "cancel_requested_by": draw(st.sampled_from(["NONE", "USER", "DEMOTION"])) if quirky else "NONE",
    }
    times = TIMES if quirky else (None, NOW - timedelta(seconds=10), NOW)  # plain: nothing still running
    if live:
        statuses = ["NEW", "PARTIALLY_FILLED", "TRIGGERED"] + (["CANCELLING"] if quirky else [])
        status = draw(st.sampled_from(["NEW", "NEW", "NEW", *statuses]))
        row["status"] = status
        row["status_before_cancel"] = (
            draw(st.sampled_from(["NEW", "TRIGGERED", "PARTIALLY_FILLED"])) if status == "CANCELLING" else ""
        )
        row["next_cancel_at"] = draw(st.sampled_from(times))
        if row["cancel_requested_by"] == "USER":
            row["status"], row["status_before_cancel"] = "CANCELLING", "NEW"
    else:
        row["status"] = "SUBMITTING" if quirky and draw(st.booleans()) else "QUEUED"
        row["next_attempt_at"] = draw(st.sampled_from(times))
        if row["status"] == "SUBMITTING":
            row["submitting_at"] = NOW - timedelta(seconds=draw(st.integers(0, 60)))
        elif row["cancel_requested_by"] == "USER":
            row["cancel_requested_by"] = "NONE"  # a queued order is removed at once by a user cancel
    return row


def _create(sa, rows: list[dict]) -> None:  # noqa: ANN001
    for row in rows:
        fields = {k: v for k, v in row.items() if k != "live"}
        if row["live"]:
            OpenOrderFactory(strategy_account=sa, **fields)
        else:
            PendingOrderFactory(strategy_account=sa, **fields)


def _work(accounts: dict[int, Account]) -> QueueWork:
    """The old full sweep's view: every row of every pair."""
    rows = selectors.queue_rows_for_pairs(pairs=(), everything=True)
    ticks = selectors.market_ticks(keys={(a.exchange, p[1]) for p in rows if (a := accounts.get(p[0]))})
    return QueueWork(
        now=NOW,
        dirty={},
        express=[],
        rows=rows,
        pairs=sorted(rows),
        accounts=accounts,
        ticks=ticks,
        breakers={},
        swept=True,
    )


def _missed(work: QueueWork) -> list:
    found = queue_sweep_detect(now=NOW)
    missed = []
    for pair, rows in work.rows.items():
        if _next_due(work, pair, rows) is not None and pair not in found:
            plan = _plan(work, pair, rows)[0]
            missed.append((pair, plan, _entries(rows, NOW)[0]))
    return missed


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    books=st.lists(order_rows(), min_size=0, max_size=14),
    slots=st.integers(1, 3),
    ticks=st.tuples(*[st.sampled_from([None, Decimal("0.25"), Decimal("0.5"), Decimal("1")])] * len(SYMBOLS)),
)
def test_the_detector_flags_every_pair_the_full_sweep_would_act_on(books, slots, ticks, settings) -> None:  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": 2, "PAPER:SPOT": slots}
    try:
        with transaction.atomic():
            sa = StrategyAccountFactory(strategy__market_type="SPOT")
            assert queue_slots_for(exchange=sa.account.exchange, market_type="SPOT") == slots
            for symbol, tick in zip(SYMBOLS, ticks, strict=True):
                if tick is not None:
                    MarketInfoFactory(exchange=sa.account.exchange, symbol=symbol, tick_size=tick)
            _create(sa, books)
            work = _work({sa.account_id: sa.account})
            assert _missed(work) == []
            raise _Rollback
    except _Rollback:
        pass


def _converged_pair(sa, symbol: str) -> None:  # noqa: ANN001
    """The benchmark's book: top 2 of each limit bucket live, 2 queued; one live stop per stop bucket."""
    for side, order_type, price, stop, live in (
        ("BUY", "LIMIT", "100", None, True),
        ("BUY", "LIMIT", "99", None, True),
        ("BUY", "LIMIT", "98", None, False),
        ("BUY", "LIMIT", "97", None, False),
        ("SELL", "LIMIT", "101", None, True),
        ("SELL", "LIMIT", "102", None, True),
        ("SELL", "LIMIT", "103", None, False),
        ("SELL", "LIMIT", "104", None, False),
        ("BUY", "STOP_LIMIT", "111", "110", True),
        ("SELL", "STOP_MARKET", None, "90", True),
    ):
        factory = OpenOrderFactory if live else PendingOrderFactory
        factory(
            strategy_account=sa,
            symbol=symbol,
            side=side,
            order_type=order_type,
            price=Decimal(price) if price else None,
            stop_price=Decimal(stop) if stop else None,
            signal_at=NOW - timedelta(minutes=1),
        )


def test_converged_pairs_are_not_flagged_and_each_kind_of_work_is(settings) -> None:  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": 2}
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    for symbol in ("A/USDT", "B/USDT", "C/USDT", "D/USDT", "E/USDT", "F/USDT"):
        MarketInfoFactory(exchange=sa.account.exchange, symbol=symbol, tick_size=Decimal("0.01"))
        _converged_pair(sa, symbol)
    assert queue_sweep_detect(now=NOW) == set()

    def pair(symbol: str) -> tuple:
        return (sa.account_id, "SPOT", symbol)

    # A queued order that outranks a live one (same priority, better price): a swap.
    PendingOrder.objects.filter(symbol="A/USDT", side="BUY", price=Decimal("98")).update(price=Decimal("100.5"))
    # A free slot: a live SELL ended.
    OpenOrder.objects.filter(symbol="B/USDT", side="SELL", price=Decimal("102")).delete()
    # A SUBMITTING row (a lookup is due).
    PendingOrder.objects.filter(symbol="C/USDT", side="SELL", price=Decimal("104")).update(
        status="SUBMITTING", submitting_at=NOW
    )
    # A queued backoff still running (the pair is due again then).
    PendingOrder.objects.filter(symbol="D/USDT", side="SELL", price=Decimal("104")).update(
        next_attempt_at=NOW + timedelta(seconds=30)
    )
    # A higher-priority (lower number) queued order.
    PendingOrder.objects.filter(symbol="E/USDT", side="SELL", price=Decimal("104")).update(priority=-1)
    assert queue_sweep_detect(now=NOW) == {pair(s) for s in ("A/USDT", "B/USDT", "C/USDT", "D/USDT", "E/USDT")}


@st.composite
def plain_bucket_rows(draw):  # noqa: ANN001, ANN201
    """Plain rows of one bucket (a limit or a stop bucket, one side), dense in ties and near-ties."""
    order_type = draw(st.sampled_from(["LIMIT", "STOP_MARKET"]))
    side = draw(st.sampled_from(["BUY", "SELL"]))
    rows = []
    for _ in range(draw(st.integers(1, 7))):
        value = Decimal(draw(st.integers(0, 4))) / 4
        if draw(st.integers(0, 7)) == 0:
            value = None
        rows.append(
            {
                "live": draw(st.booleans()),
                "symbol": draw(st.sampled_from(SYMBOLS)),
                "side": side,
                "order_type": order_type,
                "price": value if order_type == "LIMIT" else None,
                "stop_price": value if order_type != "LIMIT" else None,
                "priority": draw(st.integers(0, 1)),
                "signal_at": NOW - timedelta(minutes=draw(st.integers(1, 2))),
                "status": "QUEUED",
            }
        )
        if rows[-1]["live"]:
            rows[-1]["status"] = draw(st.sampled_from(["NEW", "NEW", "NEW", "PARTIALLY_FILLED"]))
    return rows


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(
    books=plain_bucket_rows(),
    slots=st.integers(1, 2),
    ticks=st.tuples(*[st.sampled_from([None, Decimal("0.5"), Decimal("1")])] * len(SYMBOLS)),
)
def test_the_detector_flags_every_plain_bucket_the_ranking_would_change(books, slots, ticks, settings) -> None:  # noqa: ANN001
    settings.ORDER_QUEUE_SLOTS = {"default": slots}
    try:
        with transaction.atomic():
            sa = StrategyAccountFactory(strategy__market_type="SPOT")
            for symbol, tick in zip(SYMBOLS, ticks, strict=True):
                if tick is not None:
                    MarketInfoFactory(exchange=sa.account.exchange, symbol=symbol, tick_size=tick)
            _create(sa, books)
            work = _work({sa.account_id: sa.account})
            assert _missed(work) == []
            raise _Rollback
    except _Rollback:
        pass


@pytest.mark.parametrize(
    ("live", "queued", "tick"),
    [
        (("1.00", "2026-11-24T07:59"), ("1.00", "2026-11-24T07:58"), None),  # exact tie; the queued one is older
        (("1.25", "2026-11-24T07:59"), ("1.00", "2026-11-24T07:58"), "0.5"),  # a tie after rounding to the tick
        ((None, "2026-11-24T07:59"), ("0.25", "2026-11-24T07:59"), None),  # a live order without a price
    ],
)
def test_ties_and_near_ties_are_flagged(live, queued, tick, settings) -> None:  # noqa: ANN001
    """A full LIMIT-BUY bucket whose queued order ranks first only through the tie-break: a swap is due."""
    settings.ORDER_QUEUE_SLOTS = {"default": 1}
    sa = StrategyAccountFactory(strategy__market_type="SPOT")
    if tick:
        MarketInfoFactory(exchange=sa.account.exchange, symbol="A/USDT", tick_size=Decimal(tick))
    for factory, (price, at) in ((OpenOrderFactory, live), (PendingOrderFactory, queued)):
        factory(
            strategy_account=sa,
            symbol="A/USDT",
            price=Decimal(price) if price else None,
            signal_at=datetime.fromisoformat(at).replace(tzinfo=UTC),
        )
    work = _work({sa.account_id: sa.account})
    pair = (sa.account_id, "SPOT", "A/USDT")
    assert _plan(work, pair, work.rows[pair])[0].demote  # the ranking does want the swap
    assert _missed(work) == []
    assert queue_sweep_detect(now=NOW) == {pair}
