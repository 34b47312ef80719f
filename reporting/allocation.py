"""Capital snapshots, allocation and compounding of StrategyCapital (SPEC §4.11)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from accounts.allocation import allocate, should_rebalance
from accounts.models import Account, CapitalSnapshot, StrategyAccount, StrategyCapital
from core.counters import counter_add
from core.money import ZERO
from core.scrub import scrub
from exchanges.gateway import GatewayError, MarketType
from exchanges.services import UnknownExchangeError, exchange_error_count, gateway_for
from positions.models import Fill, Position

logger = logging.getLogger(__name__)

FALLBACK_MAX_AGE = timedelta(hours=24)
# Fills carry the exchange's execution time and may be recorded minutes later (REST catch-up
# after a dropped stream). Compounding stops this far before now so a late fill still lands
# after the watermark instead of behind it, where it would never be counted.
COMPOUND_SETTLE = timedelta(minutes=5)


def quote_currency() -> str:
    """The currency capital is counted in (USDT unless CAPITAL_QUOTE_CURRENCY says otherwise)."""
    return getattr(settings, "CAPITAL_QUOTE_CURRENCY", "USDT")


@dataclass(frozen=True)
class CapitalOutcome:
    """What one (account, market type) got this run."""

    account_id: int
    market_type: str
    source: str | None  # LIVE | FALLBACK | None (no usable total)
    total: Decimal | None
    rebalanced: bool = False
    compounded: int = 0  # StrategyCapitals that received realized PnL
    compounded_pnl: Decimal = ZERO
    balance_error: str = ""  # the balance call's error (scrubbed)
    problem: str = ""  # why no allocation could be made although a total was known

    @property
    def skipped(self) -> bool:
        """No allocation decision could be made this run (compounding still happened)."""
        return self.source is None or bool(self.problem)

    @property
    def error(self) -> str:
        return "; ".join(part for part in (self.balance_error, self.problem) if part)

    @property
    def key(self) -> str:
        return f"account {self.account_id} {self.market_type}"


def capital_pairs_active() -> list[tuple[Account, str]]:
    """(account, market type) pairs used by active StrategyAccounts of active strategies on active
    crypto accounts, ordered by account id then market type (the lock order)."""
    rows = (
        StrategyAccount.objects.filter(
            is_active=True,
            strategy__is_active=True,
            account__is_active=True,
            account__account_type=Account.AccountType.CRYPTO,
        )
        .values_list("account_id", "strategy__market_type")
        .distinct()
    )
    pairs = sorted(set(rows))
    accounts = Account.objects.in_bulk({account_id for account_id, _ in pairs})
    return [(accounts[account_id], market_type) for account_id, market_type in pairs]


def capital_total_read(*, account: Account, market_type: str) -> Decimal:
    """One balance call: spot free + used of the quote currency; futures the wallet balance of the
    quote currency (Balance.total, which leaves unrealized PnL out). Gateway errors propagate."""

    counter_add(name="exchange_calls", labels=f"exchange={account.exchange}")
    balance = gateway_for(account).fetch_balance(MarketType(market_type))
    return balance.total(quote_currency())


def capital_snapshot_take(*, account: Account, market_type: str, now: datetime) -> tuple[CapitalSnapshot | None, str]:
    """Read the live total and store a LIVE snapshot; no lock is held during the call.

    On a gateway error: store a FALLBACK snapshot repeating the newest LIVE one at most 24 h old
    (`fallback_of`), or return no snapshot. Returns (snapshot or None, scrubbed error or "").
    The LIVE row's taken_at is when the reply arrived: the moment the total reflects.
    """
    try:
        total = capital_total_read(account=account, market_type=market_type)
    except (GatewayError, UnknownExchangeError) as exc:
        error = scrub(f"{type(exc).__name__}: {exc}")
        exchange_error_count(exchange=account.exchange)
        recent = (
            CapitalSnapshot.objects.filter(
                account=account,
                market_type=market_type,
                source=CapitalSnapshot.Source.LIVE,
                taken_at__gte=now - FALLBACK_MAX_AGE,
            )
            .order_by("-taken_at", "-pk")
            .first()
        )
        if recent is None:
            return None, error
        snapshot = CapitalSnapshot.objects.create(
            account=account,
            market_type=market_type,
            total=recent.total,
            source=CapitalSnapshot.Source.FALLBACK,
            taken_at=now,
            fallback_of=recent,
        )
        return snapshot, error
    snapshot = CapitalSnapshot.objects.create(
        account=account,
        market_type=market_type,
        total=total,
        source=CapitalSnapshot.Source.LIVE,
        taken_at=timezone.now(),
    )
    return snapshot, ""


def _basis_time(snapshot: CapitalSnapshot) -> datetime:
    """When the snapshot's total was true: a FALLBACK repeats an older LIVE reading."""
    if snapshot.source == CapitalSnapshot.Source.FALLBACK and snapshot.fallback_of is not None:
        return snapshot.fallback_of.taken_at
    return snapshot.taken_at


def capital_allocate_or_compound(
    *, account: Account, market_type: str, snapshot: CapitalSnapshot | None, now: datetime
) -> tuple[bool, int, Decimal, str]:
    """One short transaction with the account row locked (then its StrategyCapitals, by id).

    Rebalance when no position of (account, market type) is open and `should_rebalance` agrees
    against the snapshot used at the last allocation (a new active StrategyAccount without an
    allocation counts as "first time"): allocated = total × weight / Σ weight over the active
    StrategyAccounts (inactive ones go to 0), every watermark moves to the moment the total
    was read, last_rebalance_at = now, the snapshot is marked used. Otherwise compound: the
    realized PnL of each capital's Fills in (watermark, now − 5 min] is added and its watermark
    moved there in the same transaction, so a fill is never counted twice.
    Returns (rebalanced, capitals compounded, PnL compounded, problem or "").
    """
    with transaction.atomic():
        Account.objects.select_for_update().only("pk").get(pk=account.pk)
        strategy_accounts = list(
            StrategyAccount.objects.filter(account=account, strategy__market_type=market_type)
            .select_related("strategy")
            .order_by("pk")
        )
        active = [sa for sa in strategy_accounts if sa.is_active and sa.strategy.is_active]
        StrategyCapital.objects.bulk_create(
            [StrategyCapital(strategy_account=sa) for sa in active], ignore_conflicts=True
        )
        capitals = {
            capital.strategy_account_id: capital
            for capital in StrategyCapital.objects.select_for_update()
            .filter(strategy_account_id__in=[sa.pk for sa in strategy_accounts])
            .order_by("strategy_account_id")
        }
        last_used = (
            CapitalSnapshot.objects.filter(account=account, market_type=market_type, used_for_allocation=True)
            .order_by("-taken_at", "-pk")
            .first()
        )
        has_allocation = last_used is not None and all(capitals[sa.pk].last_rebalance_at is not None for sa in active)
        has_open_position = (
            Position.objects.filter(strategy_account__account=account, market_type=market_type)
            .exclude(quantity=0)
            .exists()
        )
        weights = {sa.pk: sa.weight for sa in active}
        problem = ""
        if (
            snapshot is not None
            and active
            and should_rebalance(
                total=snapshot.total,
                last_allocated_total=last_used.total if last_used else None,
                has_allocation=has_allocation,
                has_open_position=has_open_position,
            )
        ):
            if sum(weights.values(), ZERO) > 0:
                parts = allocate(snapshot.total, weights)
                basis = _basis_time(snapshot)
                for capital in capitals.values():
                    capital.allocated_capital = parts.get(capital.strategy_account_id, ZERO)
                    capital.pnl_reflected_until = basis
                    capital.last_rebalance_at = now
                StrategyCapital.objects.bulk_update(
                    list(capitals.values()), ["allocated_capital", "pnl_reflected_until", "last_rebalance_at"]
                )
                CapitalSnapshot.objects.filter(pk=snapshot.pk).update(used_for_allocation=True)
                snapshot.used_for_allocation = True
                return True, 0, ZERO, ""
            problem = "the active strategy weights sum to 0: nothing allocated"
        compounded, pnl = _compound(list(capitals.values()), until=now - COMPOUND_SETTLE)
        return False, compounded, pnl, problem


def _compound(capitals: list[StrategyCapital], *, until: datetime) -> tuple[int, Decimal]:
    """Add realized PnL of Fills in (watermark, until] and move the watermark to `until`.

    Capitals never allocated (no watermark) are left alone. Runs inside the caller's transaction,
    with the capital rows locked.
    """
    changed: list[StrategyCapital] = []
    total = ZERO
    received = 0
    for capital in capitals:
        watermark = capital.pnl_reflected_until
        if watermark is None or watermark >= until:
            continue
        pnl = Fill.objects.filter(
            strategy_account_id=capital.strategy_account_id, filled_at__gt=watermark, filled_at__lte=until
        ).aggregate(total=Sum("realized_pnl"))["total"]
        capital.pnl_reflected_until = until
        if pnl:
            capital.allocated_capital += pnl
            total += pnl
            received += 1
        changed.append(capital)
    StrategyCapital.objects.bulk_update(changed, ["allocated_capital", "pnl_reflected_until"])
    return received, total


def capital_pair_update(*, account: Account, market_type: str, now: datetime) -> CapitalOutcome:
    """SPEC §4.11 for one (account, market type): the balance call first (no lock held), then one
    short locked transaction that either reallocates or compounds. Without a usable total the
    capitals still compound; the outcome carries the error for the caller to report."""
    snapshot, error = capital_snapshot_take(account=account, market_type=market_type, now=now)
    rebalanced, compounded, pnl, problem = capital_allocate_or_compound(
        account=account, market_type=market_type, snapshot=snapshot, now=now
    )
    return CapitalOutcome(
        account_id=account.pk,
        market_type=market_type,
        source=snapshot.source if snapshot else None,
        total=snapshot.total if snapshot else None,
        rebalanced=rebalanced,
        compounded=compounded,
        compounded_pnl=pnl,
        balance_error=error,
        problem=problem,
    )
