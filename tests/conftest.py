"""Shared fixtures: users, API clients, database vendor markers."""

from __future__ import annotations

import pytest
from django.db import connection
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    skip_pg = pytest.mark.skip(reason="needs PostgreSQL (set DATABASE_URL=postgres://...)")
    is_pg = connection.vendor == "postgresql"
    for item in items:
        if "postgres" in item.keywords and not is_pg:
            item.add_marker(skip_pg)


@pytest.fixture
def staff_user(django_user_model):  # noqa: ANN001
    return django_user_model.objects.create_user(username="ops", password="ops-pass-123", is_staff=True)


@pytest.fixture
def plain_user(django_user_model):  # noqa: ANN001
    return django_user_model.objects.create_user(username="viewer", password="viewer-pass-123")


@pytest.fixture
def staff_client(staff_user):  # noqa: ANN001
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=staff_user).key}")
    return client


@pytest.fixture
def user_client(plain_user):  # noqa: ANN001
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=plain_user).key}")
    return client
