"""The dashboard in a real headless Chromium against daphne: sign in, every job listed, a new run appears live."""

from __future__ import annotations

from pathlib import Path

import pytest

from scheduler.registry import registry_specs_lenient
from tests import procs
from tests.conftest import CHROMEDRIVER, CHROMIUM

pytestmark = pytest.mark.browser

USERNAME = "dash-ops"
PASSWORD = "dash-pass-123"
# Debian's Chromium as root, on a machine without outside network: no sandbox, and none of the
# background connections (updates, sync, metrics) it would otherwise keep retrying.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--no-first-run",
    "--window-size=1400,1300",
)


@pytest.fixture
def web(proc_pg_db, tmp_path):  # noqa: ANN001
    """daphne serving tradingsite.asgi on a free port, against a fresh migrated database with a staff user."""
    created = procs.manage(
        "shell",
        "-c",
        "from django.contrib.auth import get_user_model; "
        f"get_user_model().objects.create_user({USERNAME!r}, password={PASSWORD!r}, is_staff=True)",
        env=proc_pg_db.env(),
    )
    assert created.returncode == 0, created.stderr
    with procs.daphne(proc_pg_db.env(), tmp_path / "daphne.log") as base:
        yield base, proc_pg_db


@pytest.fixture
def browser(tmp_path, monkeypatch):  # noqa: ANN001
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    # Both paths are given, so Selenium Manager has nothing to resolve; offline makes sure it never downloads.
    monkeypatch.setenv("SE_OFFLINE", "true")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(
        options=options, service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    )
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_lists_jobs_and_shows_a_new_run_without_reloading(web, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    base, db = web
    browser.get(f"{base}/admin/login/?next=/dashboard/")
    browser.find_element(By.ID, "id_username").send_keys(USERNAME)
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form#login-form [type=submit]").click()
    WebDriverWait(browser, 15).until(ec.url_to_be(f"{base}/dashboard/"))
    WebDriverWait(browser, 15).until(ec.text_to_be_present_in_element((By.ID, "feed-state"), "live"))

    listed = [
        row.get_attribute("data-job-id") for row in browser.find_elements(By.CSS_SELECTOR, "#jobs tr[data-job-id]")
    ]
    assert listed == [spec.id for spec in registry_specs_lenient()]
    # No job is paused in a fresh database, so no pause badge may show.
    assert [badge for badge in browser.find_elements(By.CSS_SELECTOR, ".badge.paused") if badge.is_displayed()] == []
    page_text = browser.find_element(By.TAG_NAME, "body").text
    for job_id in listed:
        assert job_id in page_text

    # A marker that only survives if the page is never reloaded.
    browser.execute_script("window.__noReload = 'still here';")
    db.query(
        "INSERT INTO scheduler_schedulerinstance (instance_id, host, pid, role, started_at, last_heartbeat, "
        "thread_alive, version) VALUES ('browser-standby', 'standby-host', 4711, 'standby', now(), now(), false, '')"
    )
    run_id = db.scalar(
        "INSERT INTO scheduler_jobrun (job_id, scheduled_at, term, host, pid, kind, started_at, finished_at, "
        "duration_ms, lateness_ms, outcome, summary, error) VALUES "
        "('update_price_cache', now() - interval '40 milliseconds', 1, 'browser-host', 4242, 'SCHEDULED', now(), "
        "now(), 17, 40, 'ok', 'refreshed 12 prices from the browser test', '') RETURNING id"
    )

    WebDriverWait(browser, 15).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, f'#recent-runs tr[data-run-id="{run_id}"]'))
    )
    row = browser.find_element(By.CSS_SELECTOR, '#jobs tr[data-job-id="update_price_cache"]')
    WebDriverWait(browser, 15).until(
        lambda _: "refreshed 12 prices" in row.find_element(By.CSS_SELECTOR, '[data-field="summary"]').text
    )
    assert row.find_element(By.CSS_SELECTOR, '[data-field="outcome"]').text == "ok"
    assert row.find_element(By.CSS_SELECTOR, '[data-field="duration_ms"]').text == "17 ms"
    assert row.find_element(By.CSS_SELECTOR, '[data-field="lateness_ms"]').text == "40 ms"
    recent = browser.find_element(By.CSS_SELECTOR, "#recent-runs tbody tr:first-child").text
    assert "update_price_cache" in recent and "browser-host:4242" in recent
    WebDriverWait(browser, 15).until(ec.text_to_be_present_in_element((By.ID, "standbys"), "standby-host:4711"))
    assert browser.execute_script("return window.__noReload;") == "still here"

    screenshot = Path(tmp_path) / "dashboard.png"
    assert browser.save_screenshot(str(screenshot))
    print(f"dashboard screenshot: {screenshot}")
