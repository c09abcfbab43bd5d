"""The built-in spend page at /admin/, driven in real headless Chromium (selenium + chromedriver).

Without chromium, chromedriver or selenium the tests fail under CI=true and skip loudly elsewhere.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Config
from proxy.core.budgets import Budget
from proxy.core.pricing import format_usd
from proxy.ledger import IN_FLIGHT

from .support import CHAT_MODEL, MESSAGES, Meter, StartMeter

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "docs" / "img" / "admin-page.png"
RENDER_WAIT_S = 15.0
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1180,600",
)


def missing(what: str) -> None:
    """No browser here: a failure in CI, a loud skip on a developer's machine."""
    message = f"{what}; install the Debian packages chromium and chromium-driver and `pip install selenium`"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(f"SKIPPED (no headless browser): {message}")


@pytest.fixture
def browser() -> Iterator[Any]:
    """A headless Chromium session with its own throwaway profile, always quit at teardown."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing("the Python package selenium is not installed")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not chromium or not driver_path:
        missing(f"chromium ({chromium or 'missing'}) or chromedriver ({driver_path or 'missing'}) not found")
    with tempfile.TemporaryDirectory(prefix="tm-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for flag in (*CHROME_FLAGS, f"--user-data-dir={profile}"):
            options.add_argument(flag)
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
        try:
            driver.set_page_load_timeout(RENDER_WAIT_S)
            yield driver
        finally:
            driver.quit()


def small_budgets(config: Config) -> Config:
    """Budgets small enough that a few simulated requests fill a visible part of the bar."""
    tenants = dict(config.tenants)
    tenants["acme"] = replace(tenants["acme"], budget=Budget(120_000_000, hard_limit=False))  # $0.00012
    tenants["globex"] = replace(tenants["globex"], budget=Budget(1_000_000_000, hard_limit=True))  # $0.001
    return replace(config, tenants=tenants)


async def send_traffic(meter: Meter) -> None:
    for tenant, count in (("acme", 3), ("globex", 2)):
        client = meter.openai(tenant)
        for _ in range(count):
            await client.chat.completions.create(
                model=CHAT_MODEL,
                messages=MESSAGES,
                max_tokens=20,
                extra_body={"simulate": {"completion_tokens": 12}},
            )
    await meter.wait_terminal(5)


async def ledger_spend(meter: Meter) -> dict[str, str]:
    """Each tenant's period spend summed from the ledger rows, as the exact decimal string."""
    totals: dict[str, int] = {}
    for r in await meter.rows():
        if r.status != IN_FLIGHT and r.period == meter.proxy.budgets.period and r.cost_pusd is not None:
            totals[r.tenant] = totals.get(r.tenant, 0) + r.cost_pusd
    return {t: format_usd(p) for t, p in totals.items()}


async def budgets_view(meter: Meter) -> dict[str, Any]:
    status, body = await meter.admin_get("/admin/budgets", {"Authorization": f"Bearer {meter.admin_token}"})
    assert status == 200, body
    return json.loads(body)


def wait_for(driver: Any, condition: Callable[[Any], Any], what: str) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, RENDER_WAIT_S, poll_frequency=0.1).until(
        condition, f"page never showed {what}"
    )


def read_page(driver: Any, url: str) -> dict[str, Any]:
    """Open the page, wait (bounded) for the tenant rows and read what it shows."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#rows tr.tenant"), "tenant rows")
    shown: dict[str, Any] = {"url": driver.current_url, "tenants": {}}
    for tr in driver.find_elements(By.CSS_SELECTOR, "#rows tr.tenant"):
        cells = {c: tr.find_element(By.CSS_SELECTOR, "." + c).text for c in ("spent", "budget", "projected")}
        bars = tr.find_elements(By.CSS_SELECTOR, ".track")
        if bars:
            track = bars[0].rect["width"]
            used = bars[0].find_element(By.CSS_SELECTOR, ".used")
            cells["bar_share"] = used.rect["width"] / track
            cells["bar_class"] = used.get_attribute("class")
        shown["tenants"][tr.get_attribute("data-tenant")] = cells
    shown["total_spent"] = driver.find_element(By.CSS_SELECTOR, '#totals [data-field="spent"]').text
    shown["period"] = driver.find_element(By.ID, "period").text
    png = driver.get_screenshot_as_png()
    (Path(tempfile.gettempdir()) / "together-meter-admin-page.png").write_bytes(png)
    # the committed screenshot (docs) is refreshed only on request, so `make test` leaves the
    # tree clean: TOGETHER_METER_UPDATE_SCREENSHOTS=1 make test
    if os.environ.get("TOGETHER_METER_UPDATE_SCREENSHOTS") or not SCREENSHOT.exists():
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)
    return shown


def read_without_token(driver: Any, url: str) -> dict[str, Any]:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait_for(driver, lambda d: d.find_element(By.ID, "login").is_displayed(), "the token prompt")
    return {
        "view_shown": driver.find_element(By.ID, "view").is_displayed(),
        "rows": len(driver.find_elements(By.CSS_SELECTOR, "#rows tr")),
        "status": driver.find_element(By.ID, "status").text,
    }


async def test_page_shows_each_tenants_ledger_spend_and_budget_bar(
    start_meter: StartMeter, browser: Any
) -> None:
    """With #token=..., the page lists every tenant with its ledger spend and a bar as wide as used %."""
    async with start_meter(change=small_budgets) as meter:
        await send_traffic(meter)
        api = await budgets_view(meter)
        spend = await ledger_spend(meter)
        url = f"{meter.admin}/admin/#token={meter.admin_token}"
        # selenium blocks: drive it from a thread so the proxy keeps serving on this loop
        shown = await asyncio.to_thread(read_page, browser, url)
        later = await budgets_view(meter)

    assert "#token" not in shown["url"]  # the page drops the token from the address bar
    assert api["period"] in shown["period"]
    assert set(shown["tenants"]) == set(api["tenants"]) == set(meter.config.tenants)
    for tenant, seen in shown["tenants"].items():
        entry = api["tenants"][tenant]
        assert seen["spent"] == entry["spent_usd"] == spend.get(tenant, "0"), tenant
        # a linear projection of fixed spend shrinks as the month goes on: the page's lies between
        projection = Decimal(seen["projected"])
        assert Decimal(later["tenants"][tenant]["projected_month_end_usd"]) <= projection, tenant
        assert projection <= Decimal(entry["projected_month_end_usd"]), tenant
        assert seen["budget"] == entry["budget"]["budget_usd"], tenant
        ratio = entry["budget"]["used_ratio"]
        assert abs(seen["bar_share"] - min(ratio, 1)) < 0.01, (tenant, seen, ratio)
    assert {"acme", "globex"} <= set(spend)
    assert shown["total_spent"] == format_usd(sum(int(Decimal(v) * 10**12) for v in spend.values()))
    acme_ratio = api["tenants"]["acme"]["budget"]["used_ratio"]
    assert acme_ratio > 0
    expected = "over" if acme_ratio >= 1 else "warn" if acme_ratio >= 0.5 else "ok"
    assert expected in shown["tenants"]["acme"]["bar_class"]
    assert SCREENSHOT.stat().st_size < 200_000


async def test_page_without_token_shows_a_prompt_and_no_data(meter: Meter, browser: Any) -> None:
    """Opened without a token, the page asks for one and shows no rows."""
    await meter.openai().chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=5)
    page = await asyncio.to_thread(read_without_token, browser, meter.admin + "/admin/")
    assert page == {"view_shown": False, "rows": 0, "status": "Paste the operator token to see spend."}


async def test_page_is_served_without_token_and_holds_no_data(meter: Meter) -> None:
    """GET /admin/ needs no token, carries a strict CSP, and has no tenant in it; /admin redirects."""
    status, body = await meter.admin_get("/admin/")
    assert status == 200
    assert b"<table>" in body and b"acme" not in body and b"globex" not in body
    for asset in ("/admin/admin.js", "/admin/admin.css"):
        status, _ = await meter.admin_get(asset)
        assert status == 200, asset
    status, body = await meter.admin_get("/admin/budgets")
    assert status == 401
    async with aiohttp.ClientSession() as s, s.get(meter.admin + "/admin/") as r:
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert r.content_type == "text/html"
    async with aiohttp.ClientSession() as s, s.get(meter.admin + "/admin", allow_redirects=False) as r:
        assert r.status == 302 and r.headers["Location"] == "/admin/"
