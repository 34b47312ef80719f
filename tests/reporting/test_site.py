"""The site a newcomer meets: landing page, static files in every mode, offline API docs, one time zone."""

from __future__ import annotations

import logging
import re
from datetime import timedelta

import pytest
from django.utils import timezone

from scheduler.models import JobRun
from tests.scheduler.test_live_feed import make_run
from tradingsite.logformat import OffsetFormatter

pytestmark = pytest.mark.django_db


def _get_static(client, url: str):  # noqa: ANN001
    response = client.get(url)
    body = b"".join(response.streaming_content) if response.streaming else response.content
    return response, body


def test_landing_page_links_dashboards_admin_and_docs(client):  # noqa: ANN001
    response = client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    for href in ("/trader/", "/dashboard/", "/admin/", "/api/docs/", "/api/redoc/", "/api/schema/"):
        assert f'href="{href}"' in html, href
    assert "issue_api_token" in html


def test_admin_view_site_leads_to_the_landing_page(admin_client):  # noqa: ANN001
    html = admin_client.get("/admin/").content.decode()
    assert re.search(r'<a href="/">View site</a>', html)
    assert admin_client.get("/").status_code == 200


def test_admin_css_is_served_without_a_separate_static_server(client):  # noqa: ANN001
    html = client.get("/admin/login/").content.decode()
    css = re.search(r'href="(/static/admin/css/[^"]+\.css)"', html)[1]
    response, body = _get_static(client, css)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/css")
    assert b"body" in body


@pytest.mark.parametrize(
    ("page", "asset"),
    [
        ("/api/docs/", "/static/drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js"),
        ("/api/redoc/", "/static/drf_spectacular_sidecar/redoc/bundles/redoc.standalone.js"),
    ],
)
def test_api_docs_load_their_bundles_from_this_site(admin_client, page, asset):  # noqa: ANN001
    html = admin_client.get(page).content.decode()
    assert asset in html
    assert not re.search(r'(src|href)="https?://', html), "the docs must not load anything from another site"
    response, body = _get_static(admin_client, asset)
    assert response.status_code == 200 and len(body) > 100_000


def test_vendored_chart_library_is_served_with_its_licence(client):  # noqa: ANN001
    base = "/static/vendor/lightweight-charts/"
    response, body = _get_static(client, base + "lightweight-charts.standalone.production.js")
    assert response.status_code == 200 and b"Lightweight Charts" in body and b"v5.3.0" in body
    response, body = _get_static(client, base + "LICENSE")
    assert response.status_code == 200 and b"Apache License" in body


def test_log_lines_carry_the_display_zone_offset(settings):  # noqa: ANN001
    assert settings.TIME_ZONE == settings.DISPLAY_TIMEZONE == "Asia/Seoul"
    formatter = OffsetFormatter("%(asctime)s.%(msecs)03d%(tz)s %(message)s", datefmt="%Y-%m-%dT%H:%M:%S")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "hello", None, None)
    record.created = 1_764_900_000.25  # 2025-12-05 02:00:00.250 UTC
    record.msecs = 250
    assert formatter.format(record) == "2025-12-05T11:00:00.250+0900 hello"


# --- the scheduler page: no-op runs collapsed, charts per job -------------------------------------------


def test_scheduler_dashboard_collapses_noop_runs_and_keeps_the_rest(client, staff_user):  # noqa: ANN001
    busy = make_run("update_open_orders", summary="synced 2 orders")
    base = timezone.now() - timedelta(minutes=5)
    noops = [
        make_run(outcome=JobRun.Outcome.NOOP, summary="nothing dirty", scheduled_at=base + timedelta(seconds=i))
        for i in range(40)
    ]
    client.force_login(staff_user)
    html = client.get("/dashboard/").content.decode()
    assert f'<tr data-run-id="{busy.id}">' in html  # listed and shown
    assert html.count(' class="noop">') == 30  # the newest 30 no-ops, hidden until "show no-op runs"
    assert f'data-run-id="{noops[-1].id}" class="noop"' in html
    assert f'data-run-id="{noops[0].id}"' not in html
    assert 'id="show-noop"' in html and 'id="job-chart"' in html


def test_job_series_gives_duration_and_lateness_oldest_first(client, staff_user, plain_user):  # noqa: ANN001
    now = timezone.now()
    for i in range(3):
        make_run("update_price_cache", scheduled_at=now - timedelta(seconds=30 * (3 - i)), duration_ms=10 + i)
    make_run("update_price_cache", scheduled_at=now, outcome=JobRun.Outcome.RUNNING, duration_ms=None)
    client.force_login(staff_user)
    body = client.get("/dashboard/jobs/update_price_cache/runs.json").json()
    assert [r["duration_ms"] for r in body["runs"]] == [10, 11, 12]  # the running one is left out
    assert body["runs"][0]["scheduled_at"].endswith("+09:00")
    assert client.get("/dashboard/jobs/no_such_job/runs.json").status_code == 404
    client.force_login(plain_user)
    assert client.get("/dashboard/jobs/update_price_cache/runs.json").status_code == 302


def test_admin_change_lists_show_decimals_without_the_storage_padding(admin_client):  # noqa: ANN001
    from decimal import Decimal

    from tests.orders.factories import PositionFactory, PriceQuoteFactory

    PriceQuoteFactory(symbol="ETH/USDT", price=Decimal("3001.25"))
    PositionFactory(quantity=Decimal("0.015"), average_entry=Decimal("2999.5"))
    quotes = admin_client.get("/admin/exchanges/pricequote/").content.decode()
    assert '<td class="field-price">3001.25</td>' in quotes
    positions = admin_client.get("/admin/positions/position/?o=4").content.decode()  # sorted by a decimal column
    assert '<td class="field-quantity">0.015</td>' in positions
    assert '<td class="field-average_entry">2999.5</td>' in positions
