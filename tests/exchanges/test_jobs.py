"""The exchange jobs and their services: price cache, precision cache, symbol validator, gateway factory."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import time_machine
from django.core.cache import cache
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext

from accounts.models import Account, Strategy, StrategyAccount
from core.models import MetricCounter
from exchanges.gateway import MarketType
from exchanges.models import MarketInfo, PriceQuote, SimFault
from exchanges.paper import PaperGateway
from exchanges.selectors import price_for_trading, price_for_valuation
from exchanges.services import PublicAccess, UnknownExchangeError, gateway_for
from exchanges.simulator.catalog import FUTURES_MARKETS, SPOT_MARKETS
from exchanges.simulator.engine import default_engine
from positions.jobs import precision_cache_update, symbol_validator_refresh, update_price_cache
from positions.selectors import price_targets
from scheduler.models import JobRun
from scheduler.runs import JobFailedError

pytestmark = pytest.mark.django_db

T0 = datetime(2025, 3, 1, 3, 7, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def paper_in_use(django_user_model):
    """An active PAPER account trading SPOT and FUTURES, so update_price_cache has both pairs to refresh."""
    user = django_user_model.objects.create_user(username="paper-trader")
    account = Account.objects.create(user=user, name="paper", exchange="PAPER")
    for market_type in ("SPOT", "FUTURES"):
        strategy = Strategy.objects.create(name=market_type, group_name=f"paper-{market_type}", market_type=market_type)
        StrategyAccount.objects.create(strategy=strategy, account=account)
    return account


def counter(name: str, labels: str = "exchange=PAPER") -> int:
    return MetricCounter.objects.filter(name=name, labels=labels).aggregate(total=Sum("value"))["total"] or 0


def snapshot() -> list[tuple]:
    return list(MarketInfo.objects.order_by("pk").values_list())


def test_gateway_for_paper_and_unknown():
    gateway = gateway_for(PublicAccess(exchange="paper", account_key="k1"))
    assert isinstance(gateway, PaperGateway) and gateway.account_key == "k1"
    with pytest.raises(UnknownExchangeError, match="NOWHERE"):
        gateway_for(PublicAccess(exchange="NOWHERE"))


def test_precision_cache_update_loads_every_market_once():
    with time_machine.travel(T0, tick=False):
        precision_cache_update()
    run = JobRun.objects.get(job_id="precision_cache_update")
    assert run.kind == JobRun.Kind.MANUAL and run.outcome == JobRun.Outcome.OK
    assert MarketInfo.objects.filter(exchange="PAPER", market_type="SPOT").count() == len(SPOT_MARKETS)
    assert MarketInfo.objects.filter(exchange="PAPER", market_type="FUTURES").count() == len(FUTURES_MARKETS)
    eth = MarketInfo.objects.get(exchange="PAPER", market_type="SPOT", symbol="ETH/USDT")
    assert (eth.tick_size, eth.step_size, eth.min_notional, eth.active) == (
        Decimal("0.01"),
        Decimal("0.0001"),
        Decimal("5"),
        True,
    )
    assert eth.updated_at == T0
    assert (eth.max_qty, eth.max_price) == (Decimal("9000"), Decimal("10000000"))  # the catalog's maxima
    assert counter("exchange_calls") == 2  # one load per (exchange, market type)


def test_precision_cache_update_repairs_rules_and_symbol_refresh_leaves_them():
    precision_cache_update()
    MarketInfo.objects.filter(symbol="ETH/USDT", market_type="SPOT").update(tick_size=Decimal("9"))
    symbol_validator_refresh()
    assert MarketInfo.objects.get(symbol="ETH/USDT", market_type="SPOT").tick_size == Decimal("9")
    precision_cache_update()
    assert MarketInfo.objects.get(symbol="ETH/USDT", market_type="SPOT").tick_size == Decimal("0.01")


def test_precision_refresh_with_the_exchange_down_keeps_the_last_good_rows():
    precision_cache_update()
    before = snapshot()
    default_engine.fault_add(SimFault.Kind.MAINTENANCE, exchange="PAPER", endpoint="load_markets", remaining=None)
    with pytest.raises(JobFailedError, match="Maintenance"):
        precision_cache_update()
    assert snapshot() == before
    failed = JobRun.objects.filter(job_id="precision_cache_update").order_by("-pk").first()
    assert failed.outcome == JobRun.Outcome.ERROR
    assert "kept last good rules" in failed.summary
    assert counter("exchange_errors") == 2


def test_delisted_symbol_becomes_inactive_and_comes_back():
    symbol_validator_refresh()  # a fresh install: inserts every listed symbol with its rules
    assert MarketInfo.objects.filter(active=True).count() == len(SPOT_MARKETS) + len(FUTURES_MARKETS)
    default_engine.market_delist("PAPER", MarketType.SPOT, "XRP/USDT")
    symbol_validator_refresh()
    xrp = MarketInfo.objects.get(exchange="PAPER", market_type="SPOT", symbol="XRP/USDT")
    assert xrp.active is False  # kept, never deleted
    assert MarketInfo.objects.get(exchange="PAPER", market_type="FUTURES", symbol="XRP/USDT").active is True
    assert "1 delisted" in JobRun.objects.filter(job_id="symbol_validator_refresh").order_by("-pk").first().summary
    precision_cache_update()  # the daily reload does not resurrect it
    assert MarketInfo.objects.get(pk=xrp.pk).active is False
    default_engine.market_relist("PAPER", MarketType.SPOT, "XRP/USDT")
    symbol_validator_refresh()
    assert MarketInfo.objects.get(pk=xrp.pk).active is True


def test_update_price_cache_one_call_and_one_upsert_per_market(monkeypatch, paper_in_use):
    precision_cache_update()
    calls = []
    original = PaperGateway.fetch_last_prices

    def spy(self, market_type, symbols=None):  # noqa: ANN001
        calls.append((self.exchange, market_type, symbols))
        return original(self, market_type, symbols)

    monkeypatch.setattr(PaperGateway, "fetch_last_prices", spy)
    assert price_targets().in_use == [("PAPER", MarketType.FUTURES), ("PAPER", MarketType.SPOT)]
    calls_before = counter("exchange_calls")
    with CaptureQueriesContext(connection) as queries, time_machine.travel(T0, tick=False):
        update_price_cache()
    assert sorted(calls) == [("PAPER", MarketType.FUTURES, None), ("PAPER", MarketType.SPOT, None)]
    assert counter("exchange_calls") - calls_before == 2
    upserts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith('INSERT INTO "exchanges_pricequote"')]
    assert len(upserts) == 2
    assert PriceQuote.objects.count() == len(SPOT_MARKETS) + len(FUTURES_MARKETS)
    assert set(PriceQuote.objects.values_list("as_of", flat=True)) == {T0}
    run = JobRun.objects.get(job_id="update_price_cache")
    assert run.outcome == JobRun.Outcome.OK and run.summary == (
        "15 quotes from 2/2 pairs (2 used by active accounts, 0 with positions only) in 2 exchange calls"
    )


def test_update_price_cache_noop_without_accounts_or_positions():
    precision_cache_update()  # markets known, but no account uses them
    update_price_cache()
    assert JobRun.objects.get(job_id="update_price_cache").outcome == JobRun.Outcome.NOOP
    assert PriceQuote.objects.count() == 0


def test_one_failing_market_keeps_its_quotes_and_counts_an_error(paper_in_use):
    precision_cache_update()
    update_price_cache()
    old = dict(PriceQuote.objects.filter(market_type="FUTURES").values_list("symbol", "as_of"))
    # Pairs run in sorted order: FUTURES first takes the single 429.
    default_engine.fault_add(SimFault.Kind.HTTP_429, exchange="PAPER", endpoint="fetch_last_prices", remaining=1)
    with time_machine.travel(datetime.now(UTC) + timedelta(seconds=31), tick=False):
        update_price_cache()
    run = JobRun.objects.filter(job_id="update_price_cache").order_by("-pk").first()
    assert run.outcome == JobRun.Outcome.OK
    assert "failed PAPER/FUTURES: RateLimited" in run.summary
    assert dict(PriceQuote.objects.filter(market_type="FUTURES").values_list("symbol", "as_of")) == old
    assert counter("exchange_errors") == 1


def test_every_market_failing_fails_the_run(paper_in_use):
    precision_cache_update()
    default_engine.fault_add(SimFault.Kind.TIMEOUT, endpoint="fetch_last_prices", remaining=None)
    with pytest.raises(JobFailedError):
        update_price_cache()
    assert JobRun.objects.get(job_id="update_price_cache").outcome == JobRun.Outcome.ERROR


def test_readers_apply_the_freshness_limits(paper_in_use):
    precision_cache_update()
    with time_machine.travel(T0, tick=False):
        update_price_cache()
    stored = PriceQuote.objects.get(exchange="PAPER", market_type="SPOT", symbol="BTC/USDT").price
    args = {"exchange": "PAPER", "market_type": "SPOT", "symbol": "BTC/USDT"}

    assert price_for_trading(**args, now=T0 + timedelta(seconds=120)) == stored
    stale_before = counter("stale_prices", "exchange=PAPER,use=trade")
    assert price_for_trading(**args, now=T0 + timedelta(seconds=121)) is None
    assert counter("stale_prices", "exchange=PAPER,use=trade") == stale_before + 1
    assert price_for_valuation(**args, now=T0 + timedelta(seconds=121)) == stored
    assert price_for_valuation(**args, now=T0 + timedelta(minutes=59)) == stored
    assert price_for_valuation(**args, now=T0 + timedelta(seconds=3601)) is None
    assert counter("stale_prices", "exchange=PAPER,use=value") == 1
    assert price_for_trading(exchange="PAPER", market_type="SPOT", symbol="NOPE/USDT", now=T0) is None


def test_readers_fall_back_to_the_table_another_process_wrote(paper_in_use):
    precision_cache_update()
    with time_machine.travel(T0, tick=False):
        update_price_cache()
    cached = price_for_trading(exchange="PAPER", market_type="SPOT", symbol="ETH/USDT", now=T0)
    cache.clear()  # another process: no shared cache without Redis, same database
    assert price_for_trading(exchange="PAPER", market_type="SPOT", symbol="ETH/USDT", now=T0) == cached
