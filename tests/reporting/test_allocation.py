"""Capital allocation (SPEC §4.11): the decision, exact splits, snapshots, fallback, compounding, the job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import cast

import pytest
import time_machine
from hypothesis import given
from hypothesis import strategies as st

from accounts.allocation import allocate, should_rebalance
from accounts.models import Account, CapitalSnapshot, StrategyCapital
from exchanges.gateway import ExchangeGateway, MarketType, Network
from exchanges.models import SimFault
from exchanges.simulator.engine import default_engine
from notifications.models import AlertThrottle
from positions.models import Fill, Position
from reporting import allocation
from reporting.allocation import capital_pair_update, capital_pairs_active
from reporting.jobs import auto_rebalance_accounts
from scheduler.models import JobRun
from scheduler.runs import JobFailedError
from tests.orders.factories import AccountFactory, StrategyAccountFactory, StrategyFactory

D = Decimal
T0 = datetime(2025, 3, 1, 3, 17, tzinfo=UTC)


# --- pure decision -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "total", "expected"),
    [
        ("1000", "1005", False),  # 5 quote: below 10
        ("10000", "10015", True),  # 15 quote and 0.15 %
        ("100000", "100015", False),  # 15 quote but 0.015 %
        ("10000", "9985", True),  # falls count too
        ("10000", "10010", False),  # exactly 0.1 % is not more than 0.1 %
        ("5000", "5010", True),  # exactly 10 quote (0.2 %) is enough
    ],
)
def test_should_rebalance_worked_examples(last, total, expected):  # noqa: ANN001
    assert (
        should_rebalance(total=D(total), last_allocated_total=D(last), has_allocation=True, has_open_position=False)
        is expected
    )


def test_should_rebalance_first_time_and_open_position():
    assert should_rebalance(total=D("1000"), last_allocated_total=None, has_allocation=False, has_open_position=False)
    assert not should_rebalance(
        total=D("1000"), last_allocated_total=None, has_allocation=False, has_open_position=True
    )
    assert not should_rebalance(
        total=D("20000"), last_allocated_total=D("10000"), has_allocation=True, has_open_position=True
    )


def test_allocate_splits_exactly_with_the_remainder_on_the_largest_weight():
    parts = allocate(D("100"), {1: D("1"), 2: D("1"), 3: D("1")})
    assert parts == {1: D("33.33333334"), 2: D("33.33333333"), 3: D("33.33333333")}
    parts = allocate(D("100"), {7: D("1"), 3: D("2"), 5: D("2")})
    assert parts == {7: D("20"), 3: D("40"), 5: D("40")}
    parts = allocate(D("10"), {1: D("1"), 2: D("2"), 4: D("0")})
    assert parts == {1: D("3.33333333"), 2: D("6.66666667"), 4: D("0")}
    assert sum(parts.values()) == D("10")


def test_allocate_refuses_weights_that_sum_to_zero_or_are_negative():
    with pytest.raises(ValueError, match="sum to 0"):
        allocate(D("10"), {1: D("0")})
    with pytest.raises(ValueError, match="negative"):
        allocate(D("10"), {1: D("-1"), 2: D("2")})
    assert allocate(D("10"), {}) == {}


@given(
    total=st.decimals(min_value=0, max_value=10**9, places=8, allow_nan=False, allow_infinity=False),
    weights=st.lists(st.decimals(min_value=D("0.000001"), max_value=1000, places=6), min_size=1, max_size=8),
)
def test_allocate_parts_always_sum_to_the_total(total, weights):  # noqa: ANN001
    parts = allocate(total, dict(enumerate(weights)))
    assert sum(parts.values()) == total
    assert all(part >= 0 for part in parts.values())
    assert parts == allocate(total, dict(enumerate(weights)))


# --- services ------------------------------------------------------------------------------


def sim_key(account: Account) -> str:
    return f"account-{account.pk}"


def set_usdt(account: Account, free: str, used: str = "0", market_type: str = "SPOT") -> None:
    default_engine.balance_set("PAPER", sim_key(account), MarketType(market_type), "USDT", free=D(free), used=D(used))


def capitals(account: Account) -> dict[str, StrategyCapital]:
    return {
        c.strategy_account.strategy.group_name: c
        for c in StrategyCapital.objects.filter(strategy_account__account=account).select_related(
            "strategy_account__strategy"
        )
    }


def realized(sa, at: datetime, pnl: str) -> Fill:  # noqa: ANN001
    return Fill.objects.create(
        trade=None,
        strategy_account=sa,
        symbol="BTC/USDT",
        cum_filled_after=0,
        delta_qty=D("-1"),
        price=D("100"),
        realized_pnl=D(pnl),
        filled_at=at,
        source=Fill.Source.ADJUSTMENT,
    )


@pytest.fixture
def account(db):  # noqa: ANN001
    account = AccountFactory()
    StrategyAccountFactory(account=account, strategy=StrategyFactory(group_name="a"), weight=D("1"))
    StrategyAccountFactory(account=account, strategy=StrategyFactory(group_name="b"), weight=D("3"))
    # Inactive ones never take a share: an inactive link and an inactive strategy.
    StrategyAccountFactory(account=account, strategy=StrategyFactory(group_name="off"), weight=D("5"), is_active=False)
    StrategyAccountFactory(account=account, strategy=StrategyFactory(group_name="dead", is_active=False), weight=D("5"))
    set_usdt(account, "9000", "1000")
    return account


def update(account: Account, at: datetime):  # noqa: ANN201
    with time_machine.travel(at, tick=False):
        return capital_pair_update(account=account, market_type="SPOT", now=at)


def test_first_allocation_splits_the_live_spot_total_by_weight(account):  # noqa: ANN001
    outcome = update(account, T0)
    assert outcome.rebalanced and outcome.source == "LIVE" and outcome.total == D("10000")
    got = capitals(account)
    assert got["a"].allocated_capital == D("2500")
    assert got["b"].allocated_capital == D("7500")
    assert "off" not in got and "dead" not in got  # no capital row is created for inactive links
    for capital in (got["a"], got["b"]):
        assert capital.pnl_reflected_until == T0 and capital.last_rebalance_at == T0
    snapshot = CapitalSnapshot.objects.get()
    assert (snapshot.source, snapshot.total, snapshot.used_for_allocation) == ("LIVE", D("10000"), True)


def test_futures_total_is_the_usdt_wallet_balance(db):  # noqa: ANN001
    account = AccountFactory()
    StrategyAccountFactory(account=account, strategy=StrategyFactory(market_type="FUTURES"))
    set_usdt(account, "5000", "200", market_type="FUTURES")
    with time_machine.travel(T0, tick=False):
        outcome = capital_pair_update(account=account, market_type="FUTURES", now=T0)
    assert outcome.rebalanced and outcome.total == D("5200")
    assert capital_pairs_active() == [(account, "FUTURES")]


def test_small_changes_do_not_rebalance_large_ones_do(account):  # noqa: ANN001
    update(account, T0)
    set_usdt(account, "9005", "1000")  # 10000 → 10005
    assert not update(account, T0 + timedelta(hours=1)).rebalanced
    set_usdt(account, "9015", "1000")  # 10000 → 10015, against the snapshot of the last allocation
    outcome = update(account, T0 + timedelta(hours=2))
    assert outcome.rebalanced
    assert capitals(account)["b"].allocated_capital == D("7511.25")
    assert list(CapitalSnapshot.objects.order_by("taken_at").values_list("used_for_allocation", flat=True)) == [
        True,
        False,
        True,
    ]


def test_open_position_blocks_rebalancing_even_the_first(account):  # noqa: ANN001
    sa = account.strategy_accounts.get(strategy__group_name="a")
    Position.objects.create(strategy_account=sa, symbol="BTC/USDT", market_type="SPOT", quantity=D("0.1"))
    outcome = update(account, T0)
    assert not outcome.rebalanced
    assert all(c.allocated_capital == 0 and c.last_rebalance_at is None for c in capitals(account).values())
    Position.objects.update(quantity=0)  # closed: a flat position does not block
    assert update(account, T0 + timedelta(hours=1)).rebalanced


def test_a_new_strategy_account_triggers_an_allocation(account):  # noqa: ANN001
    update(account, T0)
    StrategyAccountFactory(account=account, strategy=StrategyFactory(group_name="new"), weight=D("4"))
    assert update(account, T0 + timedelta(hours=1)).rebalanced
    got = capitals(account)
    assert (got["a"].allocated_capital, got["b"].allocated_capital, got["new"].allocated_capital) == (
        D("1250"),
        D("3750"),
        D("5000"),
    )


def test_a_deactivated_link_gives_its_capital_back_at_the_next_allocation(account):  # noqa: ANN001
    update(account, T0)
    account.strategy_accounts.filter(strategy__group_name="a").update(is_active=False)
    set_usdt(account, "9100", "1000")  # 10000 → 10100
    assert update(account, T0 + timedelta(hours=1)).rebalanced
    got = capitals(account)
    assert got["a"].allocated_capital == 0 and got["b"].allocated_capital == D("10100")


def test_compounding_adds_realized_pnl_once(account):  # noqa: ANN001
    update(account, T0)
    a = account.strategy_accounts.get(strategy__group_name="a")
    b = account.strategy_accounts.get(strategy__group_name="b")
    realized(a, T0 - timedelta(minutes=1), "999")  # before the allocation: already in the balance
    realized(a, T0 + timedelta(minutes=10), "100")
    realized(a, T0 + timedelta(minutes=20), "-30")
    realized(b, T0 + timedelta(minutes=58), "40")  # younger than 5 min at the next run: waits
    first = update(account, T0 + timedelta(hours=1))
    assert not first.rebalanced and first.compounded == 1 and first.compounded_pnl == D("70")
    got = capitals(account)
    assert got["a"].allocated_capital == D("2570") and got["b"].allocated_capital == D("7500")
    assert got["a"].pnl_reflected_until == T0 + timedelta(minutes=55)
    # The same fills again (a re-run, or the next hour): nothing is added twice.
    update(account, T0 + timedelta(hours=1))
    second = update(account, T0 + timedelta(hours=2))
    got = capitals(account)
    assert got["a"].allocated_capital == D("2570")
    assert got["b"].allocated_capital == D("7540") and second.compounded_pnl == D("40")


def test_failing_balance_call_falls_back_to_a_recent_live_snapshot(account):  # noqa: ANN001
    update(account, T0)
    default_engine.fault_add("timeout", exchange="PAPER", endpoint="fetch_balance", account=sim_key(account))
    set_usdt(account, "20000")  # would rebalance, but the exchange cannot be read
    outcome = update(account, T0 + timedelta(hours=23))
    assert outcome.source == "FALLBACK" and outcome.total == D("10000")
    assert "Network" in outcome.balance_error and not outcome.skipped
    fallback = CapitalSnapshot.objects.get(source="FALLBACK")
    assert fallback.fallback_of == CapitalSnapshot.objects.get(source="LIVE")
    assert not fallback.used_for_allocation
    assert SimFault.objects.get().fired == 1


def test_fallback_allocation_watermarks_at_the_live_reading(account):  # noqa: ANN001
    Position.objects.create(
        strategy_account=account.strategy_accounts.get(strategy__group_name="a"),
        symbol="BTC/USDT",
        market_type="SPOT",
        quantity=D("1"),
    )
    update(account, T0)  # LIVE snapshot, but no allocation: a position is open
    Position.objects.update(quantity=0)
    allocation_services_gateway = allocation.gateway_for

    class Down:
        def fetch_balance(self, market_type):  # noqa: ANN001, ANN201
            raise Network("PAPER fetch_balance: connection reset")

    allocation.gateway_for = lambda account: cast(ExchangeGateway, Down())  # fetch_balance is all it needs
    try:
        outcome = update(account, T0 + timedelta(hours=3))
    finally:
        allocation.gateway_for = allocation_services_gateway
    assert outcome.rebalanced and outcome.source == "FALLBACK"
    got = capitals(account)
    assert got["a"].allocated_capital == D("2500")
    # The total was true at the LIVE reading: fills after it are compounded next time.
    assert got["a"].pnl_reflected_until == T0 and got["a"].last_rebalance_at == T0 + timedelta(hours=3)
    assert CapitalSnapshot.objects.get(source="FALLBACK").used_for_allocation


def test_no_recent_snapshot_skips_with_an_event_and_still_compounds(account, monkeypatch):  # noqa: ANN001
    update(account, T0)
    a = account.strategy_accounts.get(strategy__group_name="a")
    realized(a, T0 + timedelta(hours=2), "25")

    class Down:
        def fetch_balance(self, market_type):  # noqa: ANN001, ANN201
            raise Network("PAPER fetch_balance: timed out")

    monkeypatch.setattr(allocation, "gateway_for", lambda account: Down())
    later = T0 + timedelta(hours=25)  # the only LIVE snapshot is now older than 24 h
    with time_machine.travel(later, tick=False), pytest.raises(JobFailedError, match="1 skipped"):
        auto_rebalance_accounts()
    assert not CapitalSnapshot.objects.filter(source="FALLBACK").exists()
    assert capitals(account)["a"].allocated_capital == D("2525")  # compounding does not need the balance
    run = JobRun.objects.get(job_id="auto_rebalance_accounts")
    assert run.outcome == JobRun.Outcome.ERROR and f"account {account.pk} SPOT" in run.summary
    assert AlertThrottle.objects.filter(key=f"capital:{account.pk}:SPOT").exists()


def test_job_summarises_each_account_market(account):  # noqa: ANN001
    other = AccountFactory()
    StrategyAccountFactory(account=other, strategy=StrategyFactory(market_type="FUTURES"))
    kis = AccountFactory(exchange="KIS", account_type=Account.AccountType.SECURITIES)
    StrategyAccountFactory(account=kis)  # securities accounts are not allocated here
    with time_machine.travel(T0, tick=False):
        result = auto_rebalance_accounts()
    assert result.summary.startswith("2 account markets: 2 rebalanced")
    assert CapitalSnapshot.objects.filter(account=other, market_type="FUTURES", source="LIVE").exists()
    assert not CapitalSnapshot.objects.filter(account=kis).exists()
    with time_machine.travel(T0 + timedelta(hours=1), tick=False):
        result = auto_rebalance_accounts()
    assert "0 rebalanced" in result.summary and result.noop
    assert JobRun.objects.filter(job_id="auto_rebalance_accounts").count() == 2


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_allocation_waits_for_the_account_lock():
    """A second allocator blocks on the account row until the first commits (PostgreSQL)."""
    import threading

    from django.db import connection, transaction

    account = AccountFactory()
    StrategyAccountFactory(account=account, strategy=StrategyFactory(group_name="solo"))
    set_usdt(account, "1000")
    order: list[str] = []
    locked = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with transaction.atomic():
            Account.objects.select_for_update().get(pk=account.pk)
            locked.set()
            release.wait(5)
            order.append("holder done")
        connection.close()

    thread = threading.Thread(target=holder)
    thread.start()
    locked.wait(5)
    timer = threading.Timer(0.5, release.set)
    timer.start()
    with time_machine.travel(T0, tick=False):
        outcome = capital_pair_update(account=account, market_type="SPOT", now=T0)
    order.append("allocator done")
    thread.join()
    assert outcome.rebalanced
    assert order == ["holder done", "allocator done"]
