"""The queue's safety-net sweep (SPEC §4.1): which pairs a full sweep must look at, from two aggregate queries.

Beside orders.ranking: a superset of the pairs whose ranking plan may be non-empty, found
without loading every row. Reads only; the queue pass (orders.queue) acts on what it finds.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from exchanges.gateway import OrderType
from orders import selectors
from orders.models import OpenOrder
from orders.ranking import Bucket, bucket_for
from orders.selectors import Pair, queue_slots_for

_NO_PRICE = (1, 0, Decimal(0))  # rank_key's head for an order without a price: last
_EPSILON = Decimal("1e-9")


def _number(value: Any) -> Decimal:
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _group_extremes(bucket: Bucket, g: tuple) -> tuple[tuple, tuple]:
    """(best, worst) of rank_key's head (missing price, priority, nearest) over one group's rows.

    `g`: (priority, n, n_price, price_min, price_max, n_stop, stop_min, stop_max). Raw prices, not
    rounded to the tick: rounding is monotone, so the extremes stay the extremes; the comparison
    (`_may_outrank`) allows for it.
    """
    priority, n, n_price, price_min, price_max, n_stop, stop_min, stop_max = g
    if bucket in (Bucket.LIMIT_BUY, Bucket.LIMIT_SELL):
        have, lo, hi, prio = n_price, price_min, price_max, priority
        negate = bucket == Bucket.LIMIT_BUY  # BUY: higher price first
    else:
        have, lo, hi, prio = n_stop, stop_min, stop_max, 0
        negate = bucket == Bucket.STOP_SELL  # STOP-BUY: lower stop first; STOP-SELL: higher first
    if not have:
        return _NO_PRICE, _NO_PRICE
    lo, hi = _number(lo), _number(hi)
    best = (0, prio, -hi if negate else lo)
    worst = _NO_PRICE if n > have else (0, prio, -lo if negate else hi)
    return best, worst


def _may_outrank(queued: tuple, live: tuple, tick: Decimal | None) -> bool:
    """Whether a queued order with rank head `queued` may rank at or before a live one with `live`.

    Ties count (the tails decide, unknown here), and so does anything within one tick (prices rank
    after rounding down to the tick): a superset of the ranking's real overlaps.
    """
    if queued[0] != live[0]:
        return queued[0] < live[0]
    if queued[1] != live[1]:
        return queued[1] < live[1]
    slack = (tick if tick and tick > 0 else Decimal(0)) + _EPSILON * (1 + abs(live[2]))
    return queued[2] <= live[2] + slack


@dataclass
class _BucketBook:
    live: int = 0
    pinned: int = 0
    queued: int = 0
    best_queued: tuple | None = None
    worst_live: tuple | None = None

    def needs_work(self, slots: int, tick: Decimal | None) -> bool:
        """A superset of plan_bucket's non-empty plans for a bucket with no SUBMITTING/CANCELLING order."""
        occupied = self.live + self.pinned
        if self.live and occupied > slots:
            return True  # more live than the slots left by pinned orders: a demotion
        if self.queued and occupied < slots:
            return True  # a free slot and an eligible queued order: a promotion
        return bool(
            self.queued
            and self.live
            and self.best_queued is not None
            and self.worst_live is not None
            and _may_outrank(self.best_queued, self.worst_live, tick)
        )


def queue_sweep_detect(*, now: datetime) -> set[Pair]:
    """The pairs a full sweep must look at, found by two aggregate queries instead of loading every row.

    A superset of the pairs for which the pass would do or schedule anything: any SUBMITTING row
    (a lookup), CANCELLING row or refused cancel's backoff, queued backoff still running, express
    or MARKET row, user cancel; and any bucket whose plan (orders.ranking.plan_bucket) may be
    non-empty: live orders beyond the slots, a free slot with an eligible queued order, or a queued
    order that may rank at or before a live one. A flagged pair that needs nothing costs only its
    normal pass (which then does nothing).
    """
    pending, live = selectors.queue_sweep_groups(now=now)
    found: set[Pair] = set()
    books: dict[tuple[Pair, Bucket], _BucketBook] = {}
    for account_id, market_type, symbol, order_type, side, priority, other, n, *rest in pending:
        pair = (account_id, market_type, symbol)
        if other:
            found.add(pair)
        if not n or pair in found:
            continue
        bucket = bucket_for(order_type=order_type, side=side)
        book = books.setdefault((pair, bucket), _BucketBook())
        book.queued += n
        best, _ = _group_extremes(bucket, (priority, n, *rest))
        if book.best_queued is None or best < book.best_queued:
            book.best_queued = best
    for account_id, market_type, symbol, order_type, side, priority, status, before, other, n, *rest in live:
        pair = (account_id, market_type, symbol)
        if other:
            found.add(pair)
        if pair in found or order_type == OrderType.MARKET:
            continue
        triggered = OpenOrder.Status.TRIGGERED in (status, before)
        bucket = bucket_for(order_type=order_type, side=side, triggered=triggered)
        book = books.setdefault((pair, bucket), _BucketBook())
        if status == OpenOrder.Status.NEW:
            book.live += n
            _, worst = _group_extremes(bucket, (priority, n, *rest))
            if book.worst_live is None or worst > book.worst_live:
                book.worst_live = worst
        else:
            book.pinned += n  # PARTIALLY_FILLED, TRIGGERED (as _entries: anything not NEW/CANCELLING)
    exchanges = selectors.account_exchanges(account_ids={pair[0] for pair, _ in books})
    ticks = selectors.market_ticks(keys={(exchanges[p[0]], p[1]) for p, _ in books if p[0] in exchanges})
    for (pair, _), book in books.items():
        exchange = exchanges.get(pair[0])
        if exchange is None or pair in found:
            continue  # the account is gone (its orders with it)
        slots = queue_slots_for(exchange=exchange, market_type=pair[1])
        tick = ticks.get((exchange, pair[1], pair[2]), (None, None))[0]
        if book.needs_work(slots, tick):
            found.add(pair)
    return found
