"""The site in a real headless Chromium against daphne as `make web` runs it (collected static files,
DJANGO_DEBUG=false): admin styled, API docs rendered offline, dashboards' charts drawn, a fill shown live.

Screenshots go to $CI_ARTIFACTS/screenshots (CI keeps that directory), else to the test's tmp dir.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import pytest
from cryptography.fernet import Fernet

from tests import procs
from tests.scheduler.test_dashboard_browser import browser  # noqa: F401 (a fixture)

pytestmark = pytest.mark.browser

USERNAME = "trader-ops"
PASSWORD = "trader-pass-123"

SEED = f"""
import json, uuid
from datetime import timedelta
from decimal import Decimal as D
from django.contrib.auth import get_user_model
from django.utils import timezone
from accounts.models import Account, Strategy, StrategyAccount, StrategyCapital
from exchanges.models import MarketInfo, PriceQuote
from orders.models import OpenOrder, PendingOrder
from orders.services import OrderSpec, SignalSource, orders_enqueue, signal_record
from positions.models import Position, StrategyDailyPerformance
from positions.performance import local_day
from scheduler.models import JobRun

now = timezone.now()
user = get_user_model().objects.create_superuser({USERNAME!r}, password={PASSWORD!r})
account = Account.objects.create(user=user, name="browser-spot", exchange="PAPER")
strategy = Strategy.objects.create(name="Browser trend", group_name="browser-trend", market_type="SPOT")
sa = StrategyAccount.objects.create(strategy=strategy, account=account)
StrategyCapital.objects.create(strategy_account=sa, allocated_capital=D("1000"))
MarketInfo.objects.create(exchange="PAPER", market_type="SPOT", symbol="ETH/USDT", tick_size=D("0.01"),
    step_size=D("0.0001"), min_qty=D("0.0001"), min_notional=D("5"), price_precision=2, amount_precision=4,
    updated_at=now)
PriceQuote.objects.create(exchange="PAPER", market_type="SPOT", symbol="ETH/USDT", price=D("3010"), as_of=now)
Position.objects.create(strategy_account=sa, symbol="ETH/USDT", market_type="SPOT", quantity=D("0.5"),
    average_entry=D("3000"))
today = local_day(now, "Asia/Seoul")
cumulative = D(0)
for back, pnl in ((6, "12"), (5, "-5"), (4, "20"), (3, "-8"), (2, "15"), (1, "4")):
    cumulative += D(pnl)
    StrategyDailyPerformance.objects.create(strategy=strategy, day=today - timedelta(days=back),
        capital_base=D("1000"), daily_pnl=D(pnl), cumulative_pnl=cumulative, computed_at=now)
specs = [OrderSpec(strategy_account_id=sa.pk, account_id=account.pk, symbol="ETH/USDT", market_type="SPOT",
    side="BUY", order_type="LIMIT", quantity=D("0.1"), price=D(p)) for p in ("2950", "2940", "2930")]
orders = orders_enqueue(specs=specs, signal_at=now, now=now)
signal_record(source=SignalSource(source="api", strategy_id=strategy.pk, symbol="ETH/USDT", side="BUY",
    order_type="LIMIT"), orders=orders, specs=specs, now=now)
for i in range(40):
    at = now - timedelta(seconds=41 - i)
    JobRun.objects.create(job_id="rebalance_order_queue", scheduled_at=at, term=1, host="browser", pid=1,
        started_at=at, finished_at=at, duration_ms=5 + i % 7, lateness_ms=2 + i % 3,
        outcome="ok" if i % 4 == 0 else "noop", summary="moved 1 order" if i % 4 == 0 else "nothing dirty")
print(json.dumps({{"account": account.pk, "orders": [str(o.order_key) for o in orders]}}))
"""

POST_FILL = """
import uuid
from decimal import Decimal as D
from django.utils import timezone
from accounts.models import StrategyAccount
from positions.models import Fill, Trade
sa = StrategyAccount.objects.get(strategy__group_name="browser-trend")
trade = Trade.objects.create(strategy_account=sa, account=sa.account, exchange_order_id="browser-fill",
    order_key=uuid.uuid4(), symbol="ETH/USDT", market_type="SPOT", side="SELL", cumulative_filled=D("0.25"),
    average_price=D("3049.5"), realized_pnl=D("12.375"))
fill = Fill.objects.create(trade=trade, strategy_account=sa, symbol="ETH/USDT", cum_filled_after=D("0.25"),
    delta_qty=D("-0.25"), price=D("3049.5"), fee=D("0.76"), fee_currency="USDT", realized_pnl=D("12.375"),
    filled_at=timezone.now(), source="REST")
print(fill.pk)
"""

# Canvas pixels that are neither transparent nor (near) white: what the charts drew.
DRAWN_PIXELS = """
const root = document.querySelector(arguments[0]);
let drawn = 0;
for (const canvas of root.querySelectorAll("canvas")) {
  if (!canvas.width || !canvas.height) continue;
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > 0 && (data[i] < 200 || data[i + 1] < 200 || data[i + 2] < 200)) drawn++;
  }
}
return drawn;
"""


def screenshot_dir(tmp_path: Path) -> Path:
    root = Path(os.environ["CI_ARTIFACTS"]) / "screenshots" if os.environ.get("CI_ARTIFACTS") else tmp_path
    root.mkdir(parents=True, exist_ok=True)
    return root


def shell(db, code: str) -> str:  # noqa: ANN001
    done = procs.manage("shell", "-c", code, env=db.env())
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture
def site(proc_pg_db, tmp_path):  # noqa: ANN001
    """daphne as in production: DJANGO_DEBUG=false, static files collected into STATIC_ROOT and served by
    WhiteNoise (no finders), on a free port against a fresh migrated database with demo-like data."""
    seeded = json.loads(shell(proc_pg_db, SEED))
    env = proc_pg_db.env(
        DJANGO_DEBUG="false",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        FIELD_ENCRYPTION_KEY=Fernet.generate_key().decode(),
        STATIC_ROOT=str(tmp_path / "static"),
    )
    collected = procs.manage("collectstatic", "--noinput", env=env, timeout=180)
    assert collected.returncode == 0, collected.stderr
    with procs.daphne(env, tmp_path / "daphne.log") as base:
        yield base, proc_pg_db, seeded


def test_site_in_a_browser_admin_docs_dashboards_and_a_live_fill(site, browser, tmp_path):  # noqa: ANN001, F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    base, db, seeded = site
    shots = screenshot_dir(tmp_path)
    wait = WebDriverWait(browser, 20)

    # Sign in through the admin: its stylesheet is served (a computed style, not just a 200).
    browser.get(f"{base}/admin/login/?next=/admin/")
    header = browser.find_element(By.ID, "header")
    assert header.value_of_css_property("background-color") not in ("rgba(0, 0, 0, 0)", "transparent")
    assert browser.find_element(By.ID, "login-form").value_of_css_property("display") != "inline"
    browser.find_element(By.ID, "id_username").send_keys(USERNAME)
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form#login-form [type=submit]").click()
    wait.until(ec.url_to_be(f"{base}/admin/"))
    assert browser.find_element(By.CSS_SELECTOR, "#site-name a").value_of_css_property("color") != "rgb(0, 0, 0)"
    browser.save_screenshot(str(shots / "admin.png"))

    # The landing page links everything.
    browser.get(f"{base}/")
    links = {a.get_attribute("pathname") for a in browser.find_elements(By.CSS_SELECTOR, "#links a")}
    assert {"/trader/", "/dashboard/", "/admin/", "/api/docs/"} <= links

    # Swagger UI renders the schema from bundled files only (the machine has no outside network anyway).
    browser.get(f"{base}/api/docs/")
    wait.until(ec.text_to_be_present_in_element((By.CSS_SELECTOR, ".swagger-ui .info .title"), "tradingsite API"))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, '.opblock[id*="orders_history"]')))
    resources = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name);")
    assert resources and all(url.startswith(base) for url in resources), resources
    browser.save_screenshot(str(shots / "api-docs.png"))
    browser.get(f"{base}/api/redoc/")
    wait.until(ec.text_to_be_present_in_element((By.TAG_NAME, "h1"), "tradingsite API"))

    # The trader dashboard: charts drawn with data, panels filled, the feed live.
    browser.get(f"{base}/trader/")
    wait.until(ec.text_to_be_present_in_element((By.ID, "feed-state"), "live"))
    points = browser.execute_script("return window.traderCharts.strategies['browser-trend'].points;")
    assert points == 7  # six stored days and today
    card = '[data-strategy="browser-trend"]'
    wait.until(lambda _: browser.execute_script(DRAWN_PIXELS, card) > 500)
    assert "0.5000" in browser.find_element(By.ID, "positions").text  # quantity to the step's 4 decimals
    assert "5.00" in browser.find_element(By.ID, "positions").text  # unrealized: 0.5 × (3010 − 3000)
    orders_text = browser.find_element(By.ID, "orders").text
    assert "rank 3 of 3" in orders_text and "2950.00" in orders_text

    signals_text = browser.find_element(By.CSS_SELECTOR, "#signals tbody tr[data-signal-id]").text
    assert "browser-trend" in signals_text and "queued 3" in signals_text

    browser.execute_script("window.__noReload = 'still here';")
    fill_id = int(shell(db, POST_FILL))
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, f'#fills tr[data-fill-id="{fill_id}"]')))
    assert "SELL" in row.text and "0.2500" in row.text and "3049.50" in row.text and "12.38" in row.text
    # Today's point of the PnL chart moved with the fill (the feed re-sends the panel).
    wait.until(lambda _: "today 12.38" in browser.find_element(By.CSS_SELECTOR, f"{card} .figures").text)
    wait.until(lambda _: browser.execute_script(DRAWN_PIXELS, "#intraday") > 50)
    assert browser.execute_script("return window.__noReload;") == "still here"
    browser.save_screenshot(str(shots / "trader-dashboard.png"))

    # The scheduler page: the per-job chart draws; no-op runs are collapsed until asked for.
    browser.get(f"{base}/dashboard/")
    wait.until(lambda _: browser.execute_script("return window.schedulerCharts.points;") == 40)
    wait.until(lambda _: browser.execute_script(DRAWN_PIXELS, "#job-chart") > 200)
    noop = browser.find_elements(By.CSS_SELECTOR, "#recent-runs tr.noop")
    assert len(noop) == 30 and not any(r.is_displayed() for r in noop)
    browser.find_element(By.ID, "show-noop").click()
    assert all(r.is_displayed() for r in noop)
    browser.save_screenshot(str(shots / "scheduler-dashboard.png"))
    print(f"screenshots: {shots}")
