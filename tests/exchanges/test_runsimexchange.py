"""`manage.py runsimexchange` as a real process on a file database, driven by real ccxt, stopped by SIGTERM."""

from __future__ import annotations

import json
import signal
from decimal import Decimal

import pytest
import requests

from exchanges import ccxt_gateway
from exchanges import gateway as gw
from exchanges.ccxt_gateway import CcxtGateway
from exchanges.gateway import MarketType, OrderRequest, OrderStatus, OrderType, Side
from tests import procs

API_KEY = "e2e-sim-key-0123456789"
API_SECRET = "e2e-sim-secret-abcdefghijklmnop"
OTHER_KEY = "e2e-sim-key-other-000042"
OTHER_SECRET = "e2e-sim-secret-other-qrstuvwxyz"


def _serving(base: str) -> bool:
    try:
        return requests.get(f"{base}/api/v3/ping", timeout=1).status_code == 200
    except requests.RequestException:
        return False


def _drive(db: procs.ProcDB, settings, tmp_path) -> None:  # noqa: ANN001
    port = procs.free_port()
    base = f"http://127.0.0.1:{port}"
    keys_file = tmp_path / "sim-keys.json"
    keys_file.write_text(json.dumps([{"key": OTHER_KEY, "secret": OTHER_SECRET}]))
    proc = procs.spawn(
        db,
        "runsimexchange",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--api-secret",
        API_SECRET,
        "--seed",
        "1",
        "--keys",
        str(keys_file),
        name="simexchange",
    )
    try:
        procs.wait_for(lambda: proc.popen.poll() is not None or _serving(base), timeout=60, what="runsimexchange")
        assert proc.popen.poll() is None, proc.log()
        settings.EXCHANGE_URL_OVERRIDES = {"BINANCE": base, "BYBIT": base}
        settings.EXCHANGE_HTTP_TIMEOUT_MS = 5000
        ccxt_gateway.caches_clear()
        for exchange, market_type in (("binance", MarketType.FUTURES), ("bybit", MarketType.SPOT)):
            gateway = CcxtGateway(exchange, market_type, API_KEY, API_SECRET, account_key="e2e", retries=0)
            rules = {rule.symbol: rule for rule in gateway.load_markets(market_type)}
            assert "BTC/USDT" in rules
            prices = gateway.fetch_last_prices(market_type)
            assert set(prices) == set(rules) and all(p > 0 for p in prices.values())
            assert gateway.fetch_balance(market_type).free("USDT") >= Decimal("100000")
            rule = rules["BTC/USDT"]
            price = (prices["BTC/USDT"] * Decimal("0.8") // rule.tick_size) * rule.tick_size
            cid = f"e2e-{exchange}-{market_type}".lower()
            created = gateway.create_order(
                OrderRequest(
                    symbol="BTC/USDT",
                    market_type=market_type,
                    side=Side.BUY,
                    order_type=OrderType.LIMIT,
                    quantity=Decimal("0.01"),
                    price=price,
                    client_order_id=cid,
                )
            )
            assert [o.client_order_id for o in gateway.fetch_open_orders(market_type)] == [cid]
            cancelled = gateway.cancel_order(
                symbol="BTC/USDT", market_type=market_type, exchange_order_id=created.exchange_order_id
            )
            assert cancelled.status == OrderStatus.CANCELED
            assert gateway.fetch_open_orders(market_type) == []
            # The process kept its state in the file database, the same one any other process reads.
            row = db.query("SELECT status, price, exchange FROM exchanges_simorder WHERE client_order_id = %s", (cid,))
            assert [(r[0], Decimal(str(r[1])), r[2]) for r in row] == [("CANCELED", price, exchange.upper())]
        with pytest.raises(gw.Auth):
            CcxtGateway("binance", MarketType.SPOT, API_KEY, "not-the-secret-000", account_key="bad").fetch_balance(
                MarketType.SPOT
            )
        # The --keys account: served with its own secret, its own (empty) books, refused with another's.
        other = CcxtGateway("binance", MarketType.FUTURES, OTHER_KEY, OTHER_SECRET, account_key="other", retries=0)
        assert other.fetch_balance(MarketType.FUTURES).free("USDT") >= Decimal("100000")
        assert other.fetch_open_orders(MarketType.FUTURES) == []
        with pytest.raises(gw.Auth):
            CcxtGateway("bybit", MarketType.SPOT, OTHER_KEY, API_SECRET, account_key="x", retries=0).fetch_balance(
                MarketType.SPOT
            )
        assert db.scalar("SELECT seed FROM exchanges_simexchange WHERE exchange = 'BINANCE'") == 1
    finally:
        ccxt_gateway.caches_clear()
        proc.signal(signal.SIGTERM)
        try:
            code = proc.popen.wait(30)
        except Exception:
            proc.popen.kill()
            raise
    log = proc.log()
    assert code == 0, log
    assert API_SECRET not in log and OTHER_SECRET not in log


def test_runsimexchange_process_sqlite(proc_sqlite_db, settings, tmp_path):  # noqa: ANN001
    _drive(proc_sqlite_db, settings, tmp_path)


@pytest.mark.postgres
def test_runsimexchange_process_postgres(proc_pg_db, settings, tmp_path):  # noqa: ANN001
    _drive(proc_pg_db, settings, tmp_path)
