"""Fills per second through the idempotent fill path (orders.fills.fill_apply) on PostgreSQL and SQLite (SPEC §9).

Each backend runs in its own process on a fresh, migrated database (PostgreSQL BENCH_PG_URL, default
tradingsite_bench_fills, dropped and created; SQLite a file in a temporary directory). Seed: one PAPER
FUTURES strategy account, BENCH_FILL_SYMBOLS symbols with MarketInfo, BENCH_FILL_ORDERS live LIMIT
orders (BUY and SELL alternating, so positions grow, shrink and flip), each filled in
BENCH_FILL_INCREMENTS equal cumulative reports (the last one FILLED, which ends the row).

Figures (name, value, baseline, ratio = value / baseline), all in fills per second:
  new        — every report applied once, in arrival order across orders (increment 1 of every order,
               then increment 2, …): Trade upsert, Fill insert, Position update, OpenOrder update or
               end, event and dirty mark, one transaction per fill under the pair lock;
  duplicate  — the same reports applied again: the idempotent no-op (the unlocked probe answers);
  baselines  — the same number of Fill rows inserted plainly: one bulk_create (batches of 1,000),
               and one INSERT per row (Fill.objects.create, autocommit: a commit per fill, as fill_apply has).

Environment: BENCH_PG_URL, BENCH_FILL_BACKENDS (postgres,sqlite), BENCH_FILL_ORDERS (500),
BENCH_FILL_INCREMENTS (4), BENCH_FILL_SYMBOLS (20).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

from bench.support import ROOT, bench_env, django_start, header, line, migrate, pg_recreate, statements, timed

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
QUANTITY = Decimal("4")
PRICE = Decimal("100")


def seed(n_orders: int, n_symbols: int) -> list:
    """The strategy account, MarketInfo and live orders; returns the orders with their account loaded."""
    from django.contrib.auth import get_user_model

    from accounts.models import Account, Strategy, StrategyAccount
    from exchanges.models import MarketInfo
    from orders.models import OpenOrder
    from orders.services import client_order_id_for

    user = get_user_model().objects.create(username="bench")
    account = Account.objects.create(user=user, name="bench", exchange="PAPER")
    strategy = Strategy.objects.create(name="bench", group_name="bench", market_type="FUTURES")
    sa = StrategyAccount.objects.create(strategy=strategy, account=account)
    symbols = [f"F{i:03d}/USDT" for i in range(n_symbols)]
    MarketInfo.objects.bulk_create(
        [
            MarketInfo(
                exchange="PAPER",
                market_type="FUTURES",
                symbol=s,
                tick_size=Decimal("0.01"),
                step_size=Decimal("0.001"),
                min_qty=Decimal("0.001"),
                updated_at=T0,
            )
            for s in symbols
        ]
    )
    orders = []
    for i in range(n_orders):
        order = OpenOrder(
            strategy_account=sa,
            account=account,
            symbol=symbols[i % n_symbols],
            market_type="FUTURES",
            side="BUY" if (i // n_symbols) % 2 == 0 else "SELL",
            order_type="LIMIT",
            price=PRICE,
            quantity=QUANTITY,
            signal_at=T0,
            queue_seq=i + 1,
            placement_no=1,
            exchange_order_id=f"x{i + 1}",
            status="NEW",
        )
        order.client_order_id = client_order_id_for(order_key=order.order_key, placement_no=1)
        orders.append(order)
    OpenOrder.objects.bulk_create(orders, batch_size=1000)
    return list(OpenOrder.objects.select_related("account").order_by("queue_seq"))


def reports(orders: list, increments: int) -> list[list]:
    """reports[j][i]: the exchange's cumulative report of order i after increment j (the last one FILLED)."""
    from exchanges.gateway import MarketType, OrderState, OrderStatus, OrderType, Side

    out = []
    for j in range(1, increments + 1):
        filled = QUANTITY * j / increments
        status = OrderStatus.FILLED if j == increments else OrderStatus.PARTIALLY_FILLED
        out.append(
            [
                OrderState(
                    exchange_order_id=o.exchange_order_id,
                    client_order_id=o.client_order_id,
                    symbol=o.symbol,
                    market_type=MarketType.FUTURES,
                    side=Side(o.side),
                    order_type=OrderType.LIMIT,
                    status=status,
                    quantity=QUANTITY,
                    filled_quantity=filled,
                    average_price=PRICE + Decimal(j) / 100,
                    price=PRICE,
                    stop_price=None,
                    fee=filled * Decimal("0.04"),
                    fee_currency="USDT",
                    updated_at=T0 + timedelta(seconds=j),
                )
                for o in orders
            ]
        )
    return out


def apply_all(orders: list, states: list[list], now: datetime) -> tuple[int, Decimal]:
    from orders.fills import fill_apply

    applied = 0
    total = Decimal(0)
    for row in states:
        for order, state in zip(orders, row, strict=True):
            delta = fill_apply(order=order, state=state, source="REST", now=now)
            applied += delta > 0
            total += delta
    return applied, total


def child(backend: str) -> int:
    """One backend, in this process (the parent set DATABASE_URL): prints its figure lines."""
    django_start({})
    from orders.models import OpenOrder
    from positions.fills import position_matches_fills
    from positions.models import Fill

    n_orders = int(os.environ.get("BENCH_FILL_ORDERS", "500"))
    increments = int(os.environ.get("BENCH_FILL_INCREMENTS", "4"))
    n_symbols = int(os.environ.get("BENCH_FILL_SYMBOLS", "20"))
    orders = seed(n_orders, n_symbols)
    states = reports(orders, increments)
    n = n_orders * increments
    now = T0 + timedelta(minutes=5)

    with statements() as seen:
        new_seconds, (applied, _) = timed(lambda: apply_all(orders, states, now))
    new_queries = len(seen)
    assert applied == n, (applied, n)
    assert Fill.objects.filter(source="REST").count() == n
    assert not OpenOrder.objects.exists(), "every order ends with its last fill"
    assert not position_matches_fills(), "positions equal the sum of their fills"
    with statements() as seen:
        dup_seconds, (dup_applied, _) = timed(lambda: apply_all(orders, states, now))
    dup_queries = len(seen)
    assert dup_applied == 0, dup_applied
    assert Fill.objects.count() == n + Fill.objects.filter(source="ADJUSTMENT").count()

    # Baselines: the same number of ledger rows, inserted plainly (no trade: the unique key stays out of it).
    template = list(Fill.objects.filter(source="REST").order_by("id"))
    copies = [
        Fill(
            strategy_account_id=f.strategy_account_id,
            symbol=f.symbol,
            cum_filled_after=f.cum_filled_after,
            delta_qty=f.delta_qty,
            price=f.price,
            fee=f.fee,
            fee_currency=f.fee_currency,
            realized_pnl=f.realized_pnl,
            filled_at=f.filled_at,
            source="STREAM",
        )
        for f in template
    ]
    bulk_seconds, _ = timed(lambda: Fill.objects.bulk_create(copies, batch_size=1000))
    for f in copies:
        f.pk = None

    def save_each() -> None:
        for f in copies:
            f.save(force_insert=True)

    single_seconds, _ = timed(save_each)
    assert Fill.objects.filter(source="STREAM").count() == 2 * n

    tag = f"[{backend}]"
    print(
        f"# fills {backend}: {n_orders} orders x {increments} increments = {n} fills; "
        f"new {new_seconds:.2f} s ({new_queries / n:.1f} statements/fill), "
        f"duplicates {dup_seconds:.2f} s ({dup_queries / n:.1f} statements/fill), "
        f"bulk insert {bulk_seconds:.3f} s, single inserts {single_seconds:.2f} s"
    )
    print(line(f"fills_new_per_s{tag}[vs bulk INSERT]", n / new_seconds, n / bulk_seconds))
    print(line(f"fills_new_per_s{tag}[vs single INSERTs]", n / new_seconds, n / single_seconds))
    print(line(f"fills_duplicate_per_s{tag}[vs bulk INSERT]", n / dup_seconds, n / bulk_seconds))
    print(line(f"fills_duplicate_per_s{tag}[vs single INSERTs]", n / dup_seconds, n / single_seconds))
    print(line(f"fills_new_statements_per_fill{tag}", new_queries / n, None))
    print(line(f"fills_duplicate_statements_per_fill{tag}", dup_queries / n, None))
    return 0


def main() -> int:
    backends = [b.strip() for b in os.environ.get("BENCH_FILL_BACKENDS", "postgres,sqlite").split(",") if b.strip()]
    pg_url = os.environ.get("BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/tradingsite_bench_fills")
    if not set(backends) <= {"postgres", "sqlite"}:
        print("BENCH_FILL_BACKENDS is a list of postgres,sqlite", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tradingsite-bench-fills-"))
    started = time.monotonic()
    print(header(), flush=True)
    failed = []
    for backend in backends:
        if backend == "postgres":
            url = pg_url
            pg_recreate(url)
        else:
            url = f"sqlite:///{work / 'db.sqlite3'}"
        env = bench_env(url, work)
        try:
            migrate(env)
            result = subprocess.run(  # noqa: S603 - this module, as a child
                [sys.executable, "-m", "bench.fills", "--child", backend],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
        finally:
            if backend == "postgres":
                pg_recreate(url, drop_only=True)
        sys.stdout.write(result.stdout)
        if result.returncode:
            failed.append(backend)
            print(f"error[{backend}]: exit {result.returncode}\n{result.stderr[-3000:]}", file=sys.stderr)
        sys.stdout.flush()
    print(f"# wall time {time.monotonic() - started:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2]))
    sys.exit(main())
