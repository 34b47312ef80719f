"""Position and ledger readers, and the (exchange, market type) pairs in use or held that the exchange refresh
jobs need."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from django.contrib.auth.models import User
from django.db.models import QuerySet

from accounts.models import Account, StrategyAccount
from exchanges.gateway import MarketType
from exchanges.selectors import EMBEDDED_TARGETS, exchange_pairs, market_pairs_known
from positions.models import Position, Trade


def position_list_for_user(
    *,
    user: User,
    account_id: int | None = None,
    symbol: str | None = None,
    include_flat: bool = False,
) -> QuerySet[Position]:
    """The user's positions (open ones unless include_flat), with strategy and account loaded."""
    positions = Position.objects.filter(strategy_account__account__user=user).select_related(
        "strategy_account__strategy", "strategy_account__account"
    )
    if account_id is not None:
        positions = positions.filter(strategy_account__account_id=account_id)
    if symbol is not None:
        positions = positions.filter(symbol=symbol)
    if not include_flat:
        positions = positions.exclude(quantity=0)
    return positions.order_by("strategy_account__account_id", "symbol", "strategy_account_id")


def trade_cumulative_filled(*, strategy_account_id: int, exchange_order_id: str) -> Decimal | None:
    """What the ledger holds of one exchange order (its Trade's cumulative fill); None before its first fill.

    Unlocked: a cheap probe before the fill path takes its locks.
    """
    return (
        Trade.objects.filter(strategy_account_id=strategy_account_id, exchange_order_id=exchange_order_id)
        .values_list("cumulative_filled", flat=True)
        .first()
    )


def trade_fee_known(*, strategy_account_id: int, exchange_order_id: str) -> tuple[Decimal, str, Decimal] | None:
    """(fees, fee currency, cumulative fill) the ledger holds of one exchange order; None before its first fill."""
    return (
        Trade.objects.filter(strategy_account_id=strategy_account_id, exchange_order_id=exchange_order_id)
        .values_list("fees", "fee_currency", "cumulative_filled")
        .first()
    )


# --- what the exchange jobs refresh: pairs in use or held (SPEC §4.4, §4.8) ----------------------


@dataclass(frozen=True)
class PriceTargets:
    """What update_price_cache refreshes (SPEC §4.4), one bulk call per pair.

    `in_use`: (exchange, market_type) pairs of active crypto accounts trading through an
    active StrategyAccount of an active Strategy (the market type is the strategy's).
    `positions_only`: pairs holding open positions (quantity ≠ 0) but used by no active
    account — refreshed too, so PnL of a paused account keeps its prices.
    """

    in_use: list[tuple[str, MarketType]]
    positions_only: list[tuple[str, MarketType]]

    @property
    def pairs(self) -> list[tuple[str, MarketType, str]]:
        """Every pair once, with the reason it is refreshed ("accounts" or "positions")."""
        return [(e, m, "accounts") for e, m in self.in_use] + [(e, m, "positions") for e, m in self.positions_only]


def price_targets() -> PriceTargets:
    """The (exchange, market_type) pairs whose prices are refreshed: used by active accounts, plus pairs
    that only positions need. Two DISTINCT queries; no exchange calls."""
    crypto = Account.AccountType.CRYPTO
    in_use = exchange_pairs(
        StrategyAccount.objects.filter(
            is_active=True, strategy__is_active=True, account__is_active=True, account__account_type=crypto
        )
        .values_list("account__exchange", "strategy__market_type")
        .distinct()
    )
    held = exchange_pairs(
        Position.objects.exclude(quantity=0)
        .filter(strategy_account__account__account_type=crypto)
        .values_list("strategy_account__account__exchange", "market_type")
        .distinct()
    )
    return PriceTargets(in_use=sorted(in_use), positions_only=sorted(held - in_use))


def market_targets() -> list[tuple[str, MarketType]]:
    """(exchange, market_type) pairs whose market rules are refreshed: every pair known to MarketInfo, the
    pairs prices are refreshed for, and the embedded PAPER exchange (so a fresh install has markets)."""
    known = market_pairs_known()
    targets = price_targets()
    return sorted(known | set(targets.in_use) | set(targets.positions_only) | set(EMBEDDED_TARGETS))
