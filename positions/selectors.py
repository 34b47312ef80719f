"""Position and ledger readers."""

from __future__ import annotations

from decimal import Decimal

from django.contrib.auth.models import User
from django.db.models import QuerySet

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
