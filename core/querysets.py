"""Queryset helpers shared by the apps' selectors."""

from __future__ import annotations

from typing import Any, TypeVar

from django.db.models import QuerySet

Q_ = TypeVar("Q_", bound=QuerySet)


def filter_given(queryset: Q_, **lookups: Any) -> Q_:
    """`queryset` filtered by those lookups whose value was given (not None): an API's optional filters."""
    given = {lookup: value for lookup, value in lookups.items() if value is not None}
    return queryset.filter(**given) if given else queryset
