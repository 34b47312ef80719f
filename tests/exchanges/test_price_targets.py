"""update_price_cache refreshes only what is in use (SPEC §4.4), and the leader warm-up runs it (SPEC §2.2)."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest
import time_machine
from django.core.cache import cache

from accounts.models import Account, Strategy, StrategyAccount
from exchanges import services
from exchanges.gateway import MarketType
from exchanges.models import MarketInfo, PriceQuote, SimFault
from exchanges.paper import PaperGateway
from exchanges.simulator.catalog import FUTURES_MARKETS, SPOT_MARKETS
from exchanges.simulator.engine import default_engine
from positions.jobs import precision_cache_update, update_price_cache
from positions.models import Position
from positions.selectors import PriceTargets, market_targets, price_targets
from scheduler.models import JobControl, JobRun
from scheduler.registry import catch_up_specs
from scheduler.services import leader_catch_up, leadership_begin_term

pytestmark = pytest.mark.django_db

T0 = datetime(2025, 3, 1, 3, 7, tzinfo=UTC)
SPOT, FUTURES = MarketType.SPOT, MarketType.FUTURES


@pytest.fixture(autouse=True)
def _clear_cache():
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def spy(monkeypatch):
    """Every exchange served by the in-process engine under its own name; counts gateways built
    by the factory table and bulk price calls per (exchange, market type)."""
    built: Counter[str] = Counter()
    prices: Counter[tuple[str, MarketType]] = Counter()

    def factory(account_like):  # noqa: ANN001, ANN202
        exchange = str(account_like.exchange).upper()
        built[exchange] += 1
        return PaperGateway(services._account_key(account_like), exchange=exchange)

    original = PaperGateway.fetch_last_prices

    def fetch_last_prices(self, market_type, symbols=None):  # noqa: ANN001, ANN202
        prices[(self.exchange, MarketType(market_type))] += 1
        return original(self, market_type, symbols)

    for exchange in ("PAPER", "BINANCE", "BYBIT"):
        monkeypatch.setitem(services.GATEWAY_FACTORIES, exchange, factory)
    monkeypatch.setattr(PaperGateway, "fetch_last_prices", fetch_last_prices)
    return SimpleNamespace(built=built, prices=prices)


class World:
    """Accounts, strategies and positions made plainly, one helper per row kind."""

    def __init__(self, user):  # noqa: ANN001
        self.user = user
        self.n = 0

    def link(
        self,
        exchange: str,
        market_type: str,
        *,
        account_active: bool = True,
        strategy_active: bool = True,
        link_active: bool = True,
        account_type: str = Account.AccountType.CRYPTO,
        account: Account | None = None,
    ) -> StrategyAccount:
        self.n += 1
        account = account or Account.objects.create(
            user=self.user,
            name=f"acct-{self.n}",
            exchange=exchange,
            is_active=account_active,
            account_type=account_type,
        )
        strategy = Strategy.objects.create(
            name=f"s{self.n}", group_name=f"g{self.n}", market_type=market_type, is_active=strategy_active
        )
        return StrategyAccount.objects.create(strategy=strategy, account=account, is_active=link_active)

    @staticmethod
    def position(link: StrategyAccount, symbol: str, quantity: str) -> Position:
        return Position.objects.create(
            strategy_account=link, symbol=symbol, market_type=link.strategy.market_type, quantity=Decimal(quantity)
        )


@pytest.fixture
def world(django_user_model):  # noqa: ANN001
    return World(django_user_model.objects.create_user(username="owner"))


def test_targets_are_pairs_of_active_accounts_and_positions_without_one(world):
    first = world.link("PAPER", "FUTURES")
    world.link("PAPER", "FUTURES", account=first.account)  # the same account in a second strategy
    world.link("PAPER", "FUTURES")  # a second account on the same exchange and market
    world.link("BINANCE", "SPOT", account_active=False)
    world.link("BINANCE", "FUTURES", strategy_active=False)
    world.link("BYBIT", "FUTURES", link_active=False)
    world.link("PAPER", "SPOT", account_type=Account.AccountType.SECURITIES)
    held = world.link("BYBIT", "SPOT", account_active=False)
    world.position(held, "ETH/USDT", "1.5")
    flat = world.link("BINANCE", "SPOT", account_active=False)
    world.position(flat, "BTC/USDT", "0")  # closed: no price needed
    active_with_position = world.link("PAPER", "FUTURES")
    world.position(active_with_position, "BTC/USDT", "-0.2")

    targets = price_targets()
    assert targets == PriceTargets(in_use=[("PAPER", FUTURES)], positions_only=[("BYBIT", SPOT)])
    assert targets.pairs == [("PAPER", FUTURES, "accounts"), ("BYBIT", SPOT, "positions")]
    # Market rules follow the same pairs, plus whatever MarketInfo knows and the embedded PAPER.
    assert market_targets() == [("BYBIT", SPOT), ("PAPER", FUTURES), ("PAPER", SPOT)]


def test_one_call_per_pair_in_use_and_one_more_for_positions_only(world, spy):
    world.link("PAPER", "FUTURES")
    world.link("PAPER", "FUTURES")  # two accounts, same exchange and market: still one call
    world.link("BINANCE", "FUTURES", account_active=False)  # no active account, no position: no call
    orphan = world.link("BYBIT", "SPOT", account_active=False)
    world.position(orphan, "ETH/USDT", "2")

    with time_machine.travel(T0, tick=False):
        update_price_cache()

    assert spy.prices == {("PAPER", FUTURES): 1, ("BYBIT", SPOT): 1}
    assert spy.built == {"PAPER": 1, "BYBIT": 1}
    stored = Counter(PriceQuote.objects.values_list("exchange", "market_type"))
    assert stored == {("PAPER", "FUTURES"): len(FUTURES_MARKETS), ("BYBIT", "SPOT"): len(SPOT_MARKETS)}
    run = JobRun.objects.get(job_id="update_price_cache")
    assert run.outcome == JobRun.Outcome.OK
    assert run.summary == (
        f"{len(FUTURES_MARKETS) + len(SPOT_MARKETS)} quotes from 2/2 pairs "
        "(1 used by active accounts, 1 with positions only) in 2 exchange calls"
    )


def test_no_calls_when_nothing_is_in_use(world, spy):
    world.link("BINANCE", "SPOT", account_active=False)
    update_price_cache()
    assert spy.prices == {} and spy.built == {}
    assert JobRun.objects.get(job_id="update_price_cache").outcome == JobRun.Outcome.NOOP


def test_failed_positions_pair_is_named_in_the_summary(world, spy):
    world.link("PAPER", "SPOT")
    orphan = world.link("BYBIT", "FUTURES", account_active=False)
    world.position(orphan, "BTC/USDT", "0.1")
    default_engine.fault_add(SimFault.Kind.HTTP_429, exchange="BYBIT", endpoint="fetch_last_prices", remaining=1)
    update_price_cache()
    run = JobRun.objects.get(job_id="update_price_cache")
    assert run.outcome == JobRun.Outcome.OK
    assert run.summary.endswith("in 2 exchange calls; failed BYBIT/FUTURES: RateLimited")
    assert not PriceQuote.objects.filter(exchange="BYBIT").exists()
    assert PriceQuote.objects.filter(exchange="PAPER", market_type="SPOT").count() == len(SPOT_MARKETS)


# --- leader warm-up --------------------------------------------------------------------------


WARMUP = ("precision_cache_update", "update_price_cache")  # the price and market-rule catch-ups


def _leader(term_host: str = "test-host") -> SimpleNamespace:
    term = leadership_begin_term(instance_id=f"{term_host}:1", host=term_host, pid=1, backend_pid=None)
    return SimpleNamespace(term=term)


def test_warmup_on_an_empty_market_table_loads_rules_then_prices(world, spy):
    world.link("PAPER", "SPOT")
    host = _leader()
    with time_machine.travel(T0, tick=False):
        assert leader_catch_up(host=host, job_ids=WARMUP) == ["precision_cache_update", "update_price_cache"]
    runs = list(JobRun.objects.order_by("pk").values_list("job_id", "kind", "term", "outcome"))
    assert runs == [
        ("precision_cache_update", JobRun.Kind.CATCHUP, host.term, JobRun.Outcome.OK),
        ("update_price_cache", JobRun.Kind.CATCHUP, host.term, JobRun.Outcome.OK),
    ]
    assert MarketInfo.objects.filter(exchange="PAPER").count() == len(SPOT_MARKETS) + len(FUTURES_MARKETS)
    assert PriceQuote.objects.filter(exchange="PAPER", market_type="SPOT", as_of=T0).count() == len(SPOT_MARKETS)
    assert spy.prices == {("PAPER", SPOT): 1}


def test_warmup_with_fresh_rules_only_refreshes_prices(world, spy):
    world.link("PAPER", "FUTURES")
    with time_machine.travel(T0, tick=False):
        precision_cache_update()
    host = _leader()
    with time_machine.travel(T0 + timedelta(hours=23, minutes=59), tick=False):
        assert leader_catch_up(host=host, job_ids=WARMUP) == ["update_price_cache"]
    catchup = JobRun.objects.filter(kind=JobRun.Kind.CATCHUP)
    assert list(catchup.values_list("job_id", "term")) == [("update_price_cache", host.term)]
    assert MarketInfo.objects.filter(updated_at__gt=T0).count() == 0  # rules untouched


def test_warmup_reloads_rules_older_than_a_day(world, spy):
    world.link("PAPER", "FUTURES")
    with time_machine.travel(T0, tick=False):
        precision_cache_update()
    later = T0 + timedelta(hours=24, seconds=1)
    with time_machine.travel(later, tick=False):
        assert leader_catch_up(host=_leader(), job_ids=WARMUP) == ["precision_cache_update", "update_price_cache"]
    assert set(MarketInfo.objects.values_list("updated_at", flat=True)) == {later}


def test_warmup_of_a_stale_term_writes_nothing(world, spy):
    world.link("PAPER", "SPOT")
    stale = _leader("old-host")
    _leader("new-host")  # another process took over before the hook ran
    leader_catch_up(host=stale, job_ids=WARMUP)
    assert not JobRun.objects.exists()  # both claims refused by term
    assert MarketInfo.objects.count() == 0 and PriceQuote.objects.count() == 0
    assert spy.prices == {}


def test_warmup_step_failure_does_not_stop_the_price_refresh(world, spy):
    world.link("PAPER", "SPOT")
    default_engine.fault_add(SimFault.Kind.MAINTENANCE, exchange="PAPER", endpoint="load_markets", remaining=None)
    host = _leader()
    assert leader_catch_up(host=host, job_ids=WARMUP) == ["precision_cache_update", "update_price_cache"]
    outcomes = dict(JobRun.objects.values_list("job_id", "outcome"))
    assert outcomes == {"precision_cache_update": JobRun.Outcome.ERROR, "update_price_cache": JobRun.Outcome.OK}


def test_warmup_skips_a_paused_job_and_a_host_without_term(world, spy):
    world.link("PAPER", "SPOT")
    assert leader_catch_up(host=SimpleNamespace(term=None), job_ids=WARMUP) == []
    JobControl.objects.create(job_id="precision_cache_update", paused=True, pause_reason="exchange down")
    assert leader_catch_up(host=_leader(), job_ids=WARMUP) == ["update_price_cache"]
    assert list(JobRun.objects.values_list("job_id", flat=True)) == ["update_price_cache"]


def test_warmup_is_a_leader_hook():
    from scheduler import runner

    hooks = runner.LEADER_HOOKS
    assert "scheduler.services:leader_catch_up" in hooks
    # Rules, then prices, before the other catch-ups; then the announcement (SPEC §2.2 order).
    assert [spec.id for spec in catch_up_specs()][:2] == list(WARMUP)
    assert hooks.index("scheduler.services:leader_catch_up") < hooks.index("scheduler.services:leader_announce")
