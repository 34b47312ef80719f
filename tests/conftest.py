"""Shared fixtures: users, API clients, database vendor markers."""

from __future__ import annotations

import os

import pytest
from django.db import connection
from rest_framework.test import APIClient

from core.tokens import api_token_issue

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def pytest_collection_modifyitems(config, items):  # noqa: ANN001
    skip_pg = pytest.mark.skip(reason="needs PostgreSQL (set DATABASE_URL=postgres://...)")
    # Browser tests run once, in the PostgreSQL pass (the pass CI installs Chromium for).
    skip_browser_db = pytest.mark.skip(
        reason="browser tests run only in the PostgreSQL pass (DATABASE_URL=postgres://...)"
    )
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    skip_browser_bin = pytest.mark.skip(
        reason=f"no {' or '.join(missing)}: apt-get install chromium chromium-driver (Debian's packages)"
    )
    is_pg = connection.vendor == "postgresql"
    for item in items:
        if ("postgres" in item.keywords or "drill" in item.keywords) and not is_pg:
            item.add_marker(skip_pg)
        if "browser" in item.keywords:
            if not is_pg:
                item.add_marker(skip_browser_db)
            elif missing:
                item.add_marker(skip_browser_bin)


@pytest.fixture(autouse=True)
def _execution_inline(settings):  # noqa: ANN001
    """Exchange work runs inline in the calling thread by default: most tests keep their rows in one
    uncommitted transaction that worker threads cannot see. Tests of the concurrent engine use
    `execution_workers` (committed data), and subprocess tests and the drill run the real pools.
    """
    from core.counters import counters_buffer_discard
    from exchanges.ratelimit import rate_budget_reset
    from orders.execution import execution_pools_close

    settings.EXECUTION_WORKERS = 0
    settings.RECONCILE_WORKERS = 0
    rate_budget_reset()  # a 429 block or spent budget of one test never reaches the next
    yield
    execution_pools_close()
    rate_budget_reset()
    counters_buffer_discard()  # counts a test's late tasks buffered never reach the next test's rows


@pytest.fixture
def execution_workers(settings, transactional_db):  # noqa: ANN001
    """Real worker pools (8 threads each) over committed data; closed (connections included) afterwards."""
    settings.EXECUTION_WORKERS = 8
    settings.RECONCILE_WORKERS = 8
    return 8


@pytest.fixture
def staff_user(django_user_model):  # noqa: ANN001
    return django_user_model.objects.create_user(username="ops", password="ops-pass-123", is_staff=True)


@pytest.fixture
def plain_user(django_user_model):  # noqa: ANN001
    return django_user_model.objects.create_user(username="viewer", password="viewer-pass-123")


@pytest.fixture
def staff_client(staff_user):  # noqa: ANN001
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token_issue(user=staff_user)[1]}")
    return client


@pytest.fixture
def user_client(plain_user):  # noqa: ANN001
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token_issue(user=plain_user)[1]}")
    return client


@pytest.fixture(scope="session")
def proc_sqlite_template(tmp_path_factory):  # noqa: ANN001
    """A migrated SQLite file, copied per test for processes started by the test."""
    from tests import procs

    return procs.sqlite_template(tmp_path_factory.mktemp("sqlite-template"))


@pytest.fixture
def proc_sqlite_db(proc_sqlite_template, tmp_path):  # noqa: ANN001
    from tests import procs

    return procs.sqlite_db(proc_sqlite_template, tmp_path / "proc")


@pytest.fixture(scope="session")
def proc_pg_template(tmp_path_factory):  # noqa: ANN001
    """A migrated PostgreSQL template database; each test gets a copy (CREATE DATABASE ... TEMPLATE)."""
    from tests import procs

    name = procs.pg_template(tmp_path_factory.mktemp("pg-template"))
    yield name
    procs.pg_drop(name)


@pytest.fixture
def proc_pg_db(proc_pg_template, tmp_path):  # noqa: ANN001
    from tests import procs

    db = procs.pg_db(proc_pg_template, tmp_path / "proc")
    yield db
    procs.pg_drop(db.url)


@pytest.fixture(autouse=True)
def _throttle_isolation(settings):  # noqa: ANN001
    """Each test counts throttled requests from zero: a fresh key prefix in the shared throttle cache
    (no database access needed, so it suits tests with and without a database)."""
    import uuid

    caches = {name: dict(config) for name, config in settings.CACHES.items()}
    caches["throttle"]["KEY_PREFIX"] = f"throttle-{uuid.uuid4().hex[:12]}"
    settings.CACHES = caches
