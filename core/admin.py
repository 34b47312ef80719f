"""Admin helpers shared by the apps' read-only admins (no model of core is registered here)."""

from __future__ import annotations

import uuid

from django.db.models import QuerySet
from django.http import HttpRequest


class OrderKeySearchMixin:
    """Search by order key: a full UUID is an indexed exact match; anything else matches text fields."""

    def get_search_results(self, request: HttpRequest, queryset: QuerySet, search_term: str) -> tuple[QuerySet, bool]:
        term = search_term.strip()
        try:
            key = uuid.UUID(term)
        except ValueError:
            return super().get_search_results(request, queryset, search_term)  # type: ignore[misc]
        return queryset.filter(order_key=key), False
