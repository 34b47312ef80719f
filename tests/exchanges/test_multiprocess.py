"""PAPER is one exchange for every process on one database: orders, balances and quotes are shared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from decimal import Decimal
from pathlib import Path
from urllib.parse import quote

import pytest
from django.db import connection

from exchanges.gateway import MarketType, OrderStatus
from exchanges.paper import PaperGateway
from exchanges.selectors import price_for_trading
from exchanges.simulator.engine import default_engine
from scheduler.models import Leadership
from tests.exchanges.conftest import order

ROOT = Path(__file__).resolve().parents[2]

PRELUDE = """
import json, sys
import django
django.setup()
from decimal import Decimal
from django.utils import timezone
from exchanges.gateway import MarketType
from exchanges.paper import PaperGateway
from exchanges.simulator.engine import default_engine
from tests.exchanges.conftest import order
gw = PaperGateway("shared")

def state(s):
    return {"id": s.exchange_order_id, "cid": s.client_order_id, "status": str(s.status),
            "filled": str(s.filled_quantity.normalize())}

def out(value):
    print("RESULT " + json.dumps(value))

def paper_in_use():
    # update_price_cache refreshes only pairs that active accounts use (SPEC 4.4).
    from django.contrib.auth import get_user_model
    from accounts.models import Account, Strategy, StrategyAccount
    user, _ = get_user_model().objects.get_or_create(username="mp-trader")
    account, _ = Account.objects.get_or_create(user=user, name="mp-paper", defaults={"exchange": "PAPER"})
    strategy, _ = Strategy.objects.get_or_create(group_name="mp-spot", defaults={"name": "mp", "market_type": "SPOT"})
    StrategyAccount.objects.get_or_create(strategy=strategy, account=account)
"""


def run_python(body: str, database_url: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    env.update({"DJANGO_SETTINGS_MODULE": "tradingsite.settings", "DATABASE_URL": database_url})
    script = PRELUDE + textwrap.dedent(body)
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


WRITER = """
default_engine.price_script("PAPER", "ETH/USDT", ["3000"])
resting = gw.create_order(order("ETH/USDT", "BUY", "LIMIT", "1", price="2500", client_order_id="mp-rest"))
bought = gw.create_order(order("ETH/USDT", "BUY", "MARKET", "2", client_order_id="mp-mkt"))
b = gw.fetch_balance(MarketType.SPOT)
out({"resting": state(resting), "bought": state(bought), "usdt_free": str(b.free("USDT")),
     "usdt_used": str(b.used("USDT")), "eth": str(b.free("ETH"))})
"""

READER = """
rest = gw.fetch_order(symbol="ETH/USDT", market_type=MarketType.SPOT, client_order_id="mp-rest")
mkt = gw.fetch_order(symbol="ETH/USDT", market_type=MarketType.SPOT, client_order_id="mp-mkt")
b = gw.fetch_balance(MarketType.SPOT)
opened = [s.client_order_id for s in gw.fetch_open_orders(MarketType.SPOT)]
cancelled = gw.cancel_order(symbol="ETH/USDT", market_type=MarketType.SPOT, client_order_id="mp-rest")
out({"resting": state(rest), "bought": state(mkt), "usdt_free": str(b.free("USDT")),
     "usdt_used": str(b.used("USDT")), "eth": str(b.free("ETH")), "open": opened,
     "cancelled": state(cancelled)})
"""


def test_paper_two_processes_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'paper.sqlite3'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "DJANGO_SETTINGS"))}
    env.update({"DJANGO_SETTINGS_MODULE": "tradingsite.settings", "DATABASE_URL": url})
    migrated = subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrated.returncode == 0, migrated.stderr[-3000:]

    written = run_python(WRITER, url)
    read = run_python(READER, url)
    assert written["resting"]["status"] == "NEW"
    assert written["bought"]["status"] == "FILLED"
    for key in ("usdt_free", "usdt_used", "eth"):
        assert Decimal(read[key]) == Decimal(written[key]), key
    assert read["resting"]["id"] == written["resting"]["id"]
    assert read["bought"] == written["bought"]
    assert read["open"] == ["mp-rest"]
    assert read["cancelled"]["status"] == "CANCELED"
    # and the first process's view of the cancel, a third time
    again = run_python(
        'out({"status": str(gw.fetch_order(symbol="ETH/USDT", market_type=MarketType.SPOT, '
        'client_order_id="mp-rest").status), "used": str(gw.fetch_balance(MarketType.SPOT).used("USDT"))})',
        url,
    )
    assert again["status"] == "CANCELED" and Decimal(again["used"]) == 0

    # Prices: one process refreshes the cache, another reads the same quote.
    refreshed = run_python(
        """
        from positions.jobs import precision_cache_update, update_price_cache
        paper_in_use()
        precision_cache_update()
        update_price_cache()
        from exchanges.models import PriceQuote
        q = PriceQuote.objects.get(exchange="PAPER", market_type="SPOT", symbol="ETH/USDT")
        out({"price": str(q.price), "as_of": q.as_of.isoformat()})
        """,
        url,
    )
    seen = run_python(
        """
        from exchanges.selectors import price_for_trading
        p = price_for_trading(exchange="PAPER", market_type="SPOT", symbol="ETH/USDT", now=timezone.now())
        out({"price": str(p)})
        """,
        url,
    )
    assert Decimal(seen["price"]) == Decimal(refreshed["price"]) == Decimal("3000")


def _pg_url() -> str:
    s = connection.settings_dict
    auth = quote(s["USER"] or "postgres")
    if s.get("PASSWORD"):
        auth += ":" + quote(s["PASSWORD"])
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_paper_two_processes_postgres():
    url = _pg_url()
    written = run_python(WRITER, url)
    # This process sees what the other wrote...
    gw = PaperGateway("shared")
    mine = gw.fetch_order(symbol="ETH/USDT", market_type=MarketType.SPOT, client_order_id="mp-rest")
    assert mine.exchange_order_id == written["resting"]["id"] and mine.status == OrderStatus.NEW
    assert gw.fetch_balance(MarketType.SPOT).free("USDT") == Decimal(written["usdt_free"])
    # ...and another process sees what this one does.
    gw.create_order(order("ETH/USDT", "SELL", "LIMIT", "0.5", price="3500", client_order_id="mp-sell"))
    read = run_python(READER, url)
    assert read["open"] == ["mp-rest", "mp-sell"]
    assert read["cancelled"]["status"] == "CANCELED"
    assert gw.fetch_balance(MarketType.SPOT).used("USDT") == 0
    assert gw.fetch_balance(MarketType.SPOT).used("ETH") == Decimal("0.5")


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_price_quote_written_by_another_process_postgres():
    url = _pg_url()
    # A transactional test before this one flushed the migration-made Leadership row the job claim needs.
    Leadership.objects.get_or_create(id=1)
    default_engine.price_script("PAPER", "BTC/USDT", ["61234.5"])
    run_python(
        """
        from positions.jobs import precision_cache_update, update_price_cache
        paper_in_use()
        precision_cache_update()
        update_price_cache()
        out({})
        """,
        url,
    )
    from django.utils import timezone

    assert price_for_trading(exchange="PAPER", market_type="SPOT", symbol="BTC/USDT", now=timezone.now()) == (
        Decimal("61234.5")
    )


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_concurrent_creates_respect_the_cap_and_client_ids_postgres():
    from concurrent.futures import ThreadPoolExecutor

    from django.db import connections

    from exchanges.gateway import DuplicateClientId, Rejected
    from exchanges.models import SimOrder

    default_engine.exchange_configure("PAPER", open_order_cap=3)
    default_engine.price_script("PAPER", "ETH/USDT", ["3000"])

    def place(i: int) -> str:
        try:
            # Two threads per client id; eight distinct ids against a cap of three.
            default_engine.order_create(
                "PAPER", "race", order("ETH/USDT", "BUY", "LIMIT", "0.1", price="2000", client_order_id=f"r{i // 2}")
            )
            return "ok"
        except DuplicateClientId:
            return "dup"
        except Rejected:
            return "cap"
        finally:
            connections.close_all()

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = list(pool.map(place, range(16)))
    assert outcomes.count("ok") == 3
    assert SimOrder.objects.filter(account="race").count() == 3
    assert len(set(SimOrder.objects.filter(account="race").values_list("client_order_id", flat=True))) == 3
    balance = default_engine.balance_get("PAPER", "race", MarketType.SPOT)
    assert balance.used("USDT") == 3 * Decimal("0.1") * Decimal("2000") * Decimal("1.001")
