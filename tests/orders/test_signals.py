"""The per-signal execution report: a webhook's fan-out (or one API order) is stored as a Signal with its
followers' orders; GET /api/signals/{id}/execution and the admin show each follower's times, fill
price and slippage; the arithmetic is pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.utils import timezone
from rest_framework.test import APIClient

from core.tokens import api_token_issue
from orders.jobs import rebalance_order_queue
from orders.models import OrderEvent, Signal, SignalOrder
from orders.signal_report import FollowerExecution, execution_summarize, percentile, slippage_bps
from positions.models import Trade
from tests.orders.factories import AccountFactory, UserFactory, strategy_link
from tests.orders.test_webhook import TOKEN, body, post, world  # noqa: F401 - the `world` fixture

D = Decimal
T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)


# --- the arithmetic ------------------------------------------------------------------------------


def test_slippage_is_positive_when_the_fill_is_worse_for_the_side():
    assert slippage_bps(side="BUY", reference=D("100"), fill=D("100.5")) == D("50.00")
    assert slippage_bps(side="SELL", reference=D("100"), fill=D("100.5")) == D("-50.00")
    assert slippage_bps(side="SELL", reference=D("200"), fill=D("199")) == D("50.00")
    assert slippage_bps(side="BUY", reference=None, fill=D("1")) is None
    assert slippage_bps(side="BUY", reference=D("1"), fill=None) is None


def test_percentiles_are_nearest_rank_and_the_summary_weights_slippage_by_quantity():
    assert percentile([], 0.5) is None
    assert percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert percentile([3.0, 1.0, 2.0], 0.5) == 2.0

    def follower(n: int, *, ack: float | None, fill: str | None, qty: str, failure: str = "") -> FollowerExecution:
        return FollowerExecution(
            order_key=f"k{n}",
            account_id=n,
            side="BUY",
            order_type="MARKET",
            quantity=D(qty),
            reference_price=D("100"),
            queued_at=T0,
            submitted_at=T0 + timedelta(seconds=ack / 2) if ack is not None else None,
            acknowledged_at=T0 + timedelta(seconds=ack) if ack is not None else None,
            filled_at=T0 + timedelta(seconds=ack) if fill is not None and ack is not None else None,
            filled_quantity=D(qty) if fill else D(0),
            fill_price=D(fill) if fill else None,
            outcome="filled" if fill else ("rejected" if failure else "queued"),
            failure=failure,
        )

    summary = execution_summarize(
        received_at=T0,
        followers=[
            follower(1, ack=0.2, fill="101", qty="1"),  # 100 bps worse
            follower(2, ack=0.4, fill="100", qty="3"),  # at the reference
            follower(3, ack=None, fill=None, qty="1", failure="rejected: insufficient funds"),
        ],
    )
    assert summary.followers == 3
    assert summary.by_outcome == {"filled": 2, "rejected": 1}
    assert (summary.acknowledged.count, summary.acknowledged.first, summary.acknowledged.last) == (2, 0.2, 0.4)
    assert summary.slippage_avg_bps == D("25.00")  # (100 × 1 + 0 × 3) / 4
    assert summary.slippage_worst_bps == D("100.00")
    assert summary.failures == ["account 3: rejected: insufficient funds"]


# --- stored and reported -------------------------------------------------------------------------


def _client(user) -> APIClient:  # noqa: ANN001
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token_issue(user=user)[1]}")
    return client


def test_a_webhook_fan_out_is_one_signal_whose_followers_report_their_fills(world, staff_user):  # noqa: ANN001, F811
    response = post(body(order_type="MARKET", price=None, qty_per=10))
    assert response.status_code == 202, response.content
    signal_id = response.json()["signal"]
    signal = Signal.objects.get(pk=signal_id)
    assert (signal.source, signal.strategy, signal.symbol, signal.side, signal.order_type) == (
        "webhook",
        world["strategy"],
        "BTC/USDT",
        "BUY",
        "MARKET",
    )
    members = list(SignalOrder.objects.filter(signal=signal).order_by("id"))
    assert {m.strategy_account_id for m in members} == {world["a"].pk, world["b"].pk}
    assert {m.reference_price for m in members} == {D("40000")}  # the market quote the sizing used

    rebalance_order_queue()  # MARKET orders are express: placed (and filled, on PAPER) at once

    report = _client(staff_user).get(f"/api/signals/{signal_id}/execution")
    assert report.status_code == 200, report.content
    data = report.json()
    assert data["signal"]["id"] == signal_id and data["summary"]["followers"] == 2
    assert data["summary"]["by_outcome"] == {"filled": 2}
    assert data["summary"]["acknowledged"]["count"] == 2 and data["summary"]["filled"]["count"] == 2
    for row in data["followers"]:
        trade = Trade.objects.get(order_key=row["order_key"])
        assert D(row["fill_price"]) == trade.average_price
        assert D(row["filled_quantity"]) == trade.cumulative_filled
        expected = ((trade.average_price - D("40000")) / D("40000") * 10000).quantize(D("0.01"))
        assert D(row["slippage_bps"]) == expected
        placed = OrderEvent.objects.get(order_key=row["order_key"], kind="placed").created_at
        # API datetimes are ISO 8601 in DISPLAY_TIMEZONE with the offset (Asia/Seoul by default).
        assert row["acknowledged_at"] == timezone.localtime(placed).isoformat()
        assert row["acknowledged_at"].endswith("+09:00")
        assert row["outcome"] == "filled" and row["failure"] == ""


def test_a_user_sees_only_their_own_followers_and_others_get_404(world):  # noqa: ANN001, F811
    outsider = UserFactory()
    other_account_sa = strategy_link(world["strategy"], AccountFactory(user=outsider, exchange="PAPER"), capital="1000")
    signal_id = post(body(qty_per=10)).json()["signal"]
    assert SignalOrder.objects.filter(signal_id=signal_id).count() == 3

    mine = _client(world["user"]).get(f"/api/signals/{signal_id}/execution").json()
    assert {f["account_id"] for f in mine["followers"]} == {world["a"].account_id, world["b"].account_id}
    theirs = _client(outsider).get(f"/api/signals/{signal_id}/execution").json()
    assert [f["account_id"] for f in theirs["followers"]] == [other_account_sa.account_id]
    assert _client(UserFactory()).get(f"/api/signals/{signal_id}/execution").status_code == 404
    assert APIClient().get(f"/api/signals/{signal_id}/execution").status_code == 401

    listing = _client(outsider).get("/api/signals/", {"order_key": theirs["followers"][0]["order_key"]}).json()
    assert [s["id"] for s in listing["results"]] == [signal_id]
    assert _client(outsider).get("/api/signals/", {"order_key": "nope"}).status_code == 400


def test_a_refused_follower_is_reported_with_its_reason(world, staff_user, monkeypatch):  # noqa: ANN001, F811
    from exchanges.gateway import InsufficientFunds
    from tests.orders.queue_support import SpyFactory

    spy = SpyFactory()
    monkeypatch.setattr("orders.queue.gateway_for", spy)
    signal_id = post(body(order_type="MARKET", price=None, qty_per=10)).json()["signal"]
    spy.inject("create_order", lambda: InsufficientFunds("Margin is insufficient."), times=1)
    rebalance_order_queue()
    data = _client(staff_user).get(f"/api/signals/{signal_id}/execution").json()
    # The refused create stays SUBMITTING until a lookup settles it; meanwhile the report says why.
    assert data["summary"]["by_outcome"] == {"filled": 1, "submitting": 1}, data
    (failure,) = data["summary"]["failures"]
    assert "InsufficientFunds: Margin is insufficient." in failure


def test_an_api_order_is_a_signal_of_one(world):  # noqa: ANN001, F811
    from tests.orders.factories import paper_market_info

    paper_market_info(market_type="FUTURES", symbol="ETH/USDT")
    response = _client(world["user"]).post(
        "/api/orders/",
        {
            "account": world["a"].account_id,
            "strategy": "trend",
            "symbol": "BTC/USDT",
            "side": "BUY",
            "order_type": "LIMIT",
            "price": "39000",
            "quantity": "0.01",
        },
        format="json",
    )
    assert response.status_code == 202, response.content
    (order_key,) = response.json()["order_keys"]
    member = SignalOrder.objects.get(order_key=order_key)
    assert (member.signal.source, member.signal.user, member.reference_price) == ("api", world["user"], D("39000"))


def test_the_admin_shows_the_execution_report(world, admin_client):  # noqa: ANN001, F811
    signal_id = post(body(order_type="MARKET", price=None, qty_per=10)).json()["signal"]
    rebalance_order_queue()
    page = admin_client.get(f"/admin/orders/signal/{signal_id}/change/")
    assert page.status_code == 200
    text = page.content.decode()
    assert "followers: 2 (filled 2)" in text and "acknowledged by the exchange: 2: first" in text


def test_the_daily_summary_shows_the_days_copy_execution(world):  # noqa: ANN001, F811
    from django.conf import settings
    from django.utils import timezone

    from reporting.summary import summary_figures, summary_format, summary_local_day

    signal_id = post(body(order_type="MARKET", price=None, qty_per=10)).json()["signal"]
    rebalance_order_queue()
    figures = summary_figures(user=world["user"], day=summary_local_day(timezone.now()), tz=settings.SCHEDULER_TIMEZONE)
    execution = figures.execution
    assert execution is not None and (execution.signals, execution.orders) == (1, 2)
    assert execution.by_outcome == {"filled": 2} and execution.acknowledged.count == 2
    text = summary_format(figures)
    assert "<b>Copy execution</b>\nSignals: 1 · orders: 2 (2 filled)\nSignal to exchange: median " in text
    worst = max(
        ((t.average_price - D("40000")) / D("40000") * 10000).quantize(D("0.01"))
        for t in Trade.objects.filter(order_key__in=SignalOrder.objects.filter(signal_id=signal_id).values("order_key"))
    )
    assert f"worst {worst:+.1f} bps" in text
    # A user without signals that day gets no such section (the golden message is unchanged).
    assert summary_figures(user=UserFactory(), day=summary_local_day(timezone.now()), tz="Asia/Seoul").execution is None
