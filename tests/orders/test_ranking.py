"""Queue ranking properties (hypothesis): deterministic, top N per bucket, order-independent, stable."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from orders.ranking import Bucket, QueueEntry, Slot, bucket_for, plan_bucket, plan_pair, rank_key

T0 = datetime(2026, 11, 24, tzinfo=UTC)


@st.composite
def entries(draw, max_size=12):  # noqa: ANN001, ANN201
    n = draw(st.integers(0, max_size))
    out = []
    for i in range(n):
        order_type = draw(st.sampled_from(["LIMIT", "STOP_LIMIT", "STOP_MARKET"]))
        side = draw(st.sampled_from(["BUY", "SELL"]))
        out.append(
            QueueEntry(
                key=f"k{i:03d}",
                bucket=bucket_for(order_type=order_type, side=side),
                slot=draw(st.sampled_from([Slot.QUEUED, Slot.QUEUED, Slot.LIVE])),
                side=side,
                price=Decimal(draw(st.integers(90, 110))) / 2 if order_type != "STOP_MARKET" else None,
                stop_price=Decimal(draw(st.integers(90, 110))) if order_type != "LIMIT" else None,
                priority=draw(st.integers(0, 2)),
                signal_at=T0 + timedelta(seconds=draw(st.integers(0, 3))),
                queue_seq=i,
            )
        )
    return out


def apply(plan, items):  # noqa: ANN001, ANN201
    """The state after the plan's moves succeed on the exchange."""
    moved = []
    for e in items:
        if e.key in plan.demote:
            e = QueueEntry(**{**e.__dict__, "slot": Slot.QUEUED})
        elif e.key in plan.promote:
            e = QueueEntry(**{**e.__dict__, "slot": Slot.LIVE})
        moved.append(e)
    return moved


def converge(items, slots):  # noqa: ANN001, ANN201
    for _ in range(4):
        plan = plan_pair(items, slots=slots)
        if plan.empty:
            return items
        items = apply(plan, items)
    raise AssertionError("did not converge")


@settings(max_examples=300, deadline=None)
@given(entries(), st.integers(1, 4), st.randoms())
def test_live_set_is_exactly_top_n_per_bucket_and_shuffling_changes_nothing(items, slots, rnd):
    final = converge(items, slots)
    for bucket in Bucket:
        members = sorted((e for e in final if e.bucket == bucket), key=rank_key)
        live = {e.key for e in members if e.slot == Slot.LIVE}
        assert live == {e.key for e in members[:slots]}
    shuffled = list(items)
    rnd.shuffle(shuffled)
    assert {e.key for e in converge(shuffled, slots) if e.slot == Slot.LIVE} == {
        e.key for e in final if e.slot == Slot.LIVE
    }
    # Converged: a second pass plans nothing (zero exchange calls, zero writes).
    assert plan_pair(final, slots=slots).empty
    assert plan_pair(list(reversed(final)), slots=slots).empty


@settings(max_examples=200, deadline=None)
@given(entries(), st.integers(1, 4))
def test_plan_is_deterministic_and_never_exceeds_the_cap(items, slots):
    assert plan_pair(items, slots=slots) == plan_pair(list(items), slots=slots)
    plan = plan_pair(items, slots=slots)
    after = apply(plan, items)
    for bucket in Bucket:
        occupied = [e for e in after if e.bucket == bucket and e.slot != Slot.QUEUED]
        before = [e for e in items if e.bucket == bucket and e.slot != Slot.QUEUED]
        assert len(occupied) <= max(slots, len(before))


def entry(key, *, slot=Slot.QUEUED, side="BUY", price="100", priority=0, seq=0, order_type="LIMIT", stop=None):  # noqa: ANN001, ANN201
    return QueueEntry(
        key=key,
        bucket=bucket_for(order_type=order_type, side=side),
        slot=slot,
        side=side,
        price=Decimal(price) if price else None,
        stop_price=Decimal(stop) if stop else None,
        priority=priority,
        signal_at=T0,
        queue_seq=seq,
    )


def test_limit_ranking_priority_then_nearest_then_arrival():
    items = [
        entry("far", price="90", seq=1),
        entry("near", price="99", seq=2),
        entry("urgent", price="80", priority=-1, seq=3),
        entry("near-later", price="99", seq=4),
    ]
    assert [e.key for e in sorted(items, key=rank_key)] == ["urgent", "near", "near-later", "far"]
    sells = [entry("hi", side="SELL", price="110"), entry("lo", side="SELL", price="101")]
    assert [e.key for e in sorted(sells, key=rank_key)] == ["lo", "hi"]


def test_stop_ranking_ignores_priority():
    buys = [
        entry("b-high", order_type="STOP_MARKET", price=None, stop="105", priority=-5),
        entry("b-low", order_type="STOP_MARKET", price=None, stop="101"),
    ]
    assert [e.key for e in sorted(buys, key=rank_key)] == ["b-low", "b-high"]
    sells = [
        entry("s-low", side="SELL", order_type="STOP_LIMIT", stop="95"),
        entry("s-high", side="SELL", order_type="STOP_LIMIT", stop="99"),
    ]
    assert [e.key for e in sorted(sells, key=rank_key)] == ["s-high", "s-low"]


def test_prices_compare_after_rounding_to_tick():
    a = entry("a", price="100.004", seq=2)
    b = entry("b", price="100.001", seq=1)
    assert sorted([a, b], key=lambda e: rank_key(e, Decimal("0.01")))[0].key == "b"


def test_pinned_orders_are_never_demoted_and_hold_their_slot():
    items = [
        entry("partial", slot=Slot.PINNED, price="90"),
        entry("better", price="99"),
        entry("best", price="100"),
    ]
    plan = plan_bucket(items, slots=2)
    assert plan.demote == () and plan.promote == ("best",)


def test_no_promotion_while_a_demotion_is_pending():
    items = [entry("worse", slot=Slot.LIVE, price="90"), entry("better", price="99")]
    assert plan_bucket(items, slots=1).demote == ("worse",)
    assert plan_bucket(items, slots=1).promote == ()
    cancelling = [entry("leaving", slot=Slot.CANCELLING, price="90"), entry("better", price="99")]
    assert plan_bucket(cancelling, slots=1).empty


def test_ineligible_orders_wait_and_triggered_stop_limit_is_a_limit():
    backoff = QueueEntry(**{**entry("backoff", price="100").__dict__, "eligible": False})
    assert plan_bucket([backoff, entry("other", price="90")], slots=1).promote == ("other",)
    assert bucket_for(order_type="STOP_LIMIT", side="BUY", triggered=True) == Bucket.LIMIT_BUY
    assert bucket_for(order_type="STOP_MARKET", side="SELL", triggered=True) == Bucket.STOP_SELL


def test_shuffle_large_random_book():
    rnd = random.Random(7)
    items = [entry(f"o{i}", price=str(rnd.randint(90, 110)), seq=i) for i in range(200)]
    final = converge(items, 5)
    assert len([e for e in final if e.slot == Slot.LIVE]) == 5
