"""User-data streams of many accounts in one loop: one slow account never delays the others' updates.

A local Bybit-style private stream server (auth, subscribe, ping/pong, pushed order messages)
serves 20 accounts with their own keys. One account's handshake stalls, one account's updates
take seconds each to apply, and five accounts' REST catch-ups hang; every other account's
order update is applied at once, and the slow account's updates are applied in order afterwards.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
from django.db import transaction
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from exchanges.streams import StreamClock, UserStreamManager
from exchanges.streams.messages import StreamUpdate
from exchanges.streams.pool import KeyedSerialPool
from orders.models import OpenOrder, OrderEvent
from orders.reconcile import ReconcileReport
from orders.streams import OrderStreamHandler
from positions.fills import position_matches_fills
from positions.models import Fill
from tests.exchanges.test_streams import FAST, wait_for
from tests.orders.factories import OpenOrderFactory, StrategyAccountFactory

D = Decimal
ACCOUNTS = 20
APPLY_BLOCK = 3.0  # seconds each update of the slow account takes to apply
REST_HANG = 6.0  # seconds the REST catch-up of the hanging accounts takes


class StreamServer:
    """Bybit v5 private stream dialect on 127.0.0.1: keys in `stalled` get no auth reply until released."""

    def __init__(self) -> None:
        self.stalled: set[str] = set()
        self.connections: dict[str, ServerConnection] = {}
        self.loop = asyncio.new_event_loop()
        self.port = 0
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="stream-server", daemon=True)

    def start(self) -> StreamServer:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(5)

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with serve(self._serve, "127.0.0.1", 0) as server:
            self.port = next(iter(server.sockets)).getsockname()[1]
            self._ready.set()
            await self._stop.wait()

    async def _serve(self, ws: ServerConnection) -> None:
        key = ""
        try:
            async for raw in ws:
                message = json.loads(raw)
                op = message.get("op")
                if op == "auth":
                    key = message["args"][0]
                    while key in self.stalled:  # the handshake hangs: no reply at all
                        await asyncio.sleep(0.05)
                    await ws.send(json.dumps({"op": "auth", "req_id": "auth", "success": True}))
                elif op == "subscribe":
                    self.connections[key] = ws
                    await ws.send(json.dumps({"op": "subscribe", "req_id": "subscribe", "success": True}))
                elif op == "ping":
                    await ws.send(json.dumps({"op": "pong", "req_id": message.get("req_id")}))
        except ConnectionClosed:
            pass

    def push(self, key: str, item: dict) -> None:
        """Send one order message to the account's current connection (from the test thread)."""
        message = json.dumps({"topic": "order", "creationTime": int(time.time() * 1000), "data": [item]})
        asyncio.run_coroutine_threadsafe(self.connections[key].send(message), self.loop).result(5)


def order_item(row: OpenOrder, *, status: str, filled: str) -> dict:
    return {
        "orderId": row.exchange_order_id,
        "orderLinkId": row.client_order_id,
        "symbol": "ETHUSDT",
        "side": "Buy",
        "orderType": "Limit",
        "price": "2900",
        "qty": str(row.quantity),
        "orderStatus": status,
        "cumExecQty": filled,
        "avgPrice": "2900",
        "cumExecFee": "0.1",
        "category": "linear",
        "updatedTime": str(int(time.time() * 1000)),
    }


class SlowHandler(OrderStreamHandler):
    """The real orders-side handler, with one account whose applies block and some whose REST catch-ups hang
    (a row lock held elsewhere, an exchange answering slowly); records when each update was applied."""

    def __init__(self, *, slow_apply: int | None = None, hanging_rest: frozenset[int] = frozenset()):
        self.slow_apply = slow_apply
        self.hanging_rest = hanging_rest
        self.applied: dict[int, list[tuple[float, str]]] = {}
        self.lock = threading.Lock()

    def update_apply(self, *, account_id: int, update: StreamUpdate, now: datetime) -> str:
        if account_id == self.slow_apply:
            time.sleep(APPLY_BLOCK)
        outcome = super().update_apply(account_id=account_id, update=update, now=now)
        with self.lock:
            self.applied.setdefault(account_id, []).append((time.monotonic(), outcome))
        return outcome

    def reconcile(self, *, account_id: int, now: datetime) -> ReconcileReport:
        if account_id in self.hanging_rest:
            time.sleep(REST_HANG)
        return ReconcileReport()  # no open order changed while no stream listened: nothing to catch up

    def applied_at(self, account_id: int) -> list[float]:
        with self.lock:
            return [at for at, _ in self.applied.get(account_id, [])]


@pytest.fixture
def stream_server(settings, transactional_db) -> Iterator[StreamServer]:  # noqa: ANN001
    server = StreamServer().start()
    settings.EXCHANGE_URL_OVERRIDES = {"BYBIT": f"http://127.0.0.1:{server.port}"}
    yield server
    server.stop()


def test_keyed_pool_keeps_one_keys_order_and_lets_other_keys_pass_a_blocked_one():
    pool = KeyedSerialPool(2, name="test-keyed")
    done: list[tuple[str, int]] = []
    release = threading.Event()
    try:

        def work(key: str, n: int) -> None:
            if key == "slow" and n == 0:
                release.wait(10)
            done.append((key, n))

        futures = [pool.submit("slow", work, "slow", n) for n in range(3)]
        futures += [pool.submit(f"k{i}", work, f"k{i}", n) for n in range(3) for i in range(5)]
        wait_for(lambda: len(done) == 15, timeout=5, what="the other keys' calls")
        assert pool.pending("slow") == 3 and all(key != "slow" for key, _ in done)
        for i in range(5):
            assert [n for key, n in done if key == f"k{i}"] == [0, 1, 2]
        release.set()
        for future in futures:
            future.result(5)
        assert [n for key, n in done if key == "slow"] == [0, 1, 2]
    finally:
        release.set()
        pool.close()


def streamed_accounts() -> list[tuple[Any, Any]]:
    """ACCOUNTS Bybit futures accounts with their own keys, each with one live BUY 12 @ 2900."""
    accounts: list[tuple[Any, Any]] = []
    for i in range(ACCOUNTS):
        sa = StrategyAccountFactory(
            account__exchange="BYBIT",
            account__api_key=f"stream-key-{i:02d}",
            account__api_secret=f"stream-secret-{i:02d}",
            strategy__market_type="FUTURES",
        )
        row = OpenOrderFactory(strategy_account=sa, account=sa.account, price=D("2900"), quantity=D("12"))
        accounts.append((sa, row))
    return accounts


def test_one_slow_account_never_delays_the_others(stream_server):
    accounts = streamed_accounts()
    stalled_sa, _ = accounts[0]  # its handshake hangs
    slow_sa, slow_row = accounts[1]  # each of its updates takes APPLY_BLOCK seconds to apply
    hanging = {sa.account_id for sa, _ in accounts[2:7]}  # REST catch-ups hanging (more than db_workers)
    stream_server.stalled.add(stalled_sa.account.api_key)
    handler = SlowHandler(slow_apply=slow_sa.account_id, hanging_rest=frozenset(hanging))
    config = dataclasses.replace(FAST, connect_timeout=1.0, db_workers=4, reconcile_workers=4)
    manager = UserStreamManager(None, handler=handler, config=config, clock=StreamClock())
    manager.start()
    try:
        others = accounts[1:]
        wait_for(
            lambda: all(sa.account.api_key in stream_server.connections for sa, _ in others),
            what="19 streams open while one handshake hangs",
        )

        pushed = time.monotonic()
        stream_server.push(slow_sa.account.api_key, order_item(slow_row, status="PartiallyFilled", filled="5"))
        stream_server.push(slow_sa.account.api_key, order_item(slow_row, status="Filled", filled="12"))
        for sa, row in accounts[2:]:
            stream_server.push(sa.account.api_key, order_item(row, status="Filled", filled="12"))
        fast = [sa.account_id for sa, _ in accounts[2:]]
        wait_for(
            lambda: all(handler.applied_at(aid) for aid in fast), timeout=APPLY_BLOCK * 2, what="the others applied"
        )
        others_done = time.monotonic()
        delays = [handler.applied_at(aid)[0] - pushed for aid in fast]
        hanging_delays = [handler.applied_at(aid)[0] - pushed for aid in hanging]
        print(
            f"{len(fast)} accounts applied {statistics.median(delays) * 1000:.0f} ms median, "
            f"{max(delays) * 1000:.0f} ms max after the push (the 5 with hanging REST catch-ups: "
            f"{max(hanging_delays) * 1000:.0f} ms max); the slow account's first update still blocked"
        )
        # All of them while the slow account's first update is still being applied and one handshake hangs.
        assert handler.applied_at(slow_sa.account_id) == []
        assert not OpenOrder.objects.filter(account_id__in=fast).exists()
        assert Fill.objects.filter(strategy_account__account_id__in=fast).count() == len(fast)
        filled_events = OrderEvent.objects.filter(kind=OrderEvent.Kind.FILLED, account_id__in=fast)
        assert filled_events.count() == len(fast)
        assert all(manager.stream(aid).reconciles == 0 for aid in hanging)  # their catch-ups still hang
        assert stalled_sa.account.api_key not in stream_server.connections

        # The slow account's two updates, applied afterwards and in order.
        wait_for(lambda: len(handler.applied_at(slow_sa.account_id)) == 2, timeout=APPLY_BLOCK * 4, what="slow")
        first, second = (at - pushed for at in handler.applied_at(slow_sa.account_id))
        fills = Fill.objects.filter(strategy_account=slow_sa).order_by("pk")
        assert [(f.cum_filled_after, f.delta_qty) for f in fills] == [(D("5"), D("5")), (D("12"), D("7"))]
        assert [o for _, o in handler.applied[slow_sa.account_id]] == ["fill", "filled"]
        assert first >= APPLY_BLOCK and second >= 2 * APPLY_BLOCK and others_done - pushed < first

        # The stalled handshake timed out and retried without holding anyone; released, it streams.
        stalled = manager.stream(stalled_sa.account_id)
        assert stalled.sessions >= 1 and "connect failed" in stalled.last_error
        stream_server.stalled.clear()
        wait_for(lambda: stalled_sa.account.api_key in stream_server.connections, what="the stalled stream open")
        stalled_row = accounts[0][1]
        released = time.monotonic()
        stream_server.push(stalled_sa.account.api_key, order_item(stalled_row, status="Filled", filled="12"))
        wait_for(lambda: handler.applied_at(stalled_sa.account_id), what="the stalled account's update")
        print(
            f"slow account's updates applied {first:.2f} s and {second:.2f} s after the push "
            f"({APPLY_BLOCK:.0f} s each); the stalled handshake's account, once released, "
            f"{(handler.applied_at(stalled_sa.account_id)[0] - released) * 1000:.0f} ms after its push"
        )
        assert not OpenOrder.objects.filter(pk=stalled_row.pk).exists()
        wait_for(lambda: all(manager.stream(aid).reconciles == 1 for aid in hanging), what="catch-ups finished")
    finally:
        manager.stop(timeout=REST_HANG + 5)
    assert position_matches_fills() == []


@pytest.mark.postgres
def test_an_update_waiting_on_a_row_lock_holds_only_its_own_account(stream_server):
    """The slow apply for real: another transaction holds the account's order row, so its update waits in
    the database (order_state_apply's SELECT … FOR UPDATE); every other account's update is applied meanwhile."""
    accounts = streamed_accounts()
    locked_sa, locked_row = accounts[0]
    handler = SlowHandler()
    manager = UserStreamManager(None, handler=handler, config=dataclasses.replace(FAST, db_workers=4))
    manager.start()
    try:
        wait_for(lambda: len(stream_server.connections) == ACCOUNTS, what="every stream open")
        with transaction.atomic():
            OpenOrder.objects.select_for_update().get(pk=locked_row.pk)  # held until the block ends
            pushed = time.monotonic()
            stream_server.push(locked_sa.account.api_key, order_item(locked_row, status="PartiallyFilled", filled="5"))
            stream_server.push(locked_sa.account.api_key, order_item(locked_row, status="Filled", filled="12"))
            for sa, row in accounts[1:]:
                stream_server.push(sa.account.api_key, order_item(row, status="Filled", filled="12"))
            others = [sa.account_id for sa, _ in accounts[1:]]
            wait_for(lambda: all(handler.applied_at(aid) for aid in others), what="the others applied")
            delays = [handler.applied_at(aid)[0] - pushed for aid in others]
            time.sleep(1.0)  # the locked account's update is still waiting on its row
            assert handler.applied_at(locked_sa.account_id) == []
            held = time.monotonic() - pushed
        print(
            f"{len(others)} accounts applied {statistics.median(delays) * 1000:.0f} ms median, "
            f"{max(delays) * 1000:.0f} ms max after the push while one account's row stayed locked {held:.1f} s"
        )
        assert not OpenOrder.objects.filter(account_id__in=others).exists()
        assert Fill.objects.filter(strategy_account__account_id__in=others).count() == len(others)
        wait_for(lambda: len(handler.applied_at(locked_sa.account_id)) == 2, what="the locked account's updates")
        fills = Fill.objects.filter(strategy_account=locked_sa).order_by("pk")
        assert [(f.cum_filled_after, f.delta_qty) for f in fills] == [(D("5"), D("5")), (D("12"), D("7"))]
        assert [o for _, o in handler.applied[locked_sa.account_id]] == ["fill", "filled"]
    finally:
        manager.stop()
    assert position_matches_fills() == []
