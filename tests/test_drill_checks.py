"""The drill's own arithmetic: live-at-once counting for slots and double placements, rate-limit counting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from drill.checks import Interval, _max_overlap, rate_limit_figures

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
        "2026-12-04 INFO sim BYBIT rate limit: /v5/order/create refused with HTTP 200 (UID)\n"
        "2026-12-04 INFO sim BYBIT rate limit: /v5/order/realtime refused with HTTP 403 (IP)\n"
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
