"""Position readers."""

from __future__ import annotations

from django.contrib.auth.models import User
from django.db.models import QuerySet

from positions.models import Position


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
