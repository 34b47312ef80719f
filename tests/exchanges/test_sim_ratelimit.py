"""The simulated exchange's own rate limiter (server side): all-or-nothing charges, rolling windows, bans."""

from __future__ import annotations

from exchanges.simulator.ratelimit import Charge, RateLimiter, Window

MINUTE = Window("REQUEST_WEIGHT", limit=10, seconds=60)
TEN_S = Window("ORDERS", limit=2, seconds=10)


def test_weight_counts_within_the_window_and_resets_when_it_rolls():
    limiter = RateLimiter()
    t0 = 1_000_020.0
    start = (t0 // 60) * 60
    assert limiter.charge([Charge("ip", MINUTE, 6)], now=t0).usages[0].used == 6
    refused = limiter.charge([Charge("ip", MINUTE, 5)], now=t0 + 1)
    assert not refused.allowed and refused.over == MINUTE
    assert refused.retry_after == start + 60 - (t0 + 1)
    assert refused.usages[0].used == 6  # a refused request costs nothing
    assert limiter.charge([Charge("ip", MINUTE, 4)], now=t0 + 2).usages[0].used == 10
    rolled = limiter.charge([Charge("ip", MINUTE, 5)], now=start + 60)
    assert rolled.allowed and rolled.usages[0].used == 5


def test_charges_are_all_or_nothing():
    limiter = RateLimiter()
    now = 5000.0
    for _ in range(2):
        assert limiter.charge([Charge("ip", MINUTE, 1), Charge("acct", TEN_S, 1)], now=now).allowed
    verdict = limiter.charge([Charge("ip", MINUTE, 1), Charge("acct", TEN_S, 1)], now=now)
    assert not verdict.allowed and verdict.over == TEN_S
    assert [u.used for u in verdict.usages] == [2, 2]  # the weight was not spent either
    assert limiter.charge([Charge("ip", MINUTE, 1)], now=now).usages[0].used == 3


def test_repeated_refusals_ban_the_key_until_the_ban_ends():
    limiter = RateLimiter(ban_after=3, ban_seconds=120)
    now = 6000.0
    limiter.charge([Charge("ip", MINUTE, 10)], now=now)
    first, second = (limiter.charge([Charge("ip", MINUTE, 1)], now=now) for _ in range(2))
    assert first.banned_until is None and second.banned_until is None
    third = limiter.charge([Charge("ip", MINUTE, 1)], now=now)
    assert third.banned_until == now + 120 and third.retry_after == 120
    # Banned even once the minute rolled over; free again after the ban.
    assert not limiter.charge([Charge("ip", MINUTE, 1)], now=now + 61).allowed
    assert limiter.charge([Charge("ip", MINUTE, 1)], now=now + 121).allowed
    assert limiter.charge([Charge("other", MINUTE, 1)], now=now + 1).allowed  # keys are separate
