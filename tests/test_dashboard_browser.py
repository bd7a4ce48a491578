"""The router's /dashboard in a real headless browser (Debian's chromium, driven by Playwright through its
executable path): it renders the fleet, follows traffic as it flows without a reload, and an admin
action taken on the page (drain a worker, switch the strategy) takes effect in the router.

With MICROSERVE_SCREENSHOTS=DIR the screenshots go to DIR (docs/images for the documentation)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import playwright.sync_api as playwright_api  # the test extra; it drives Debian's chromium
import pytest

from tests.observed_fleet import ADMIN, ADMIN_TOKEN, Fleet, observed_fleet, traffic

pytestmark = pytest.mark.slow

TIMEOUT_MS = 30_000
NONE = "\u2013"  # what the page shows for a figure it does not have yet


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    # 20 ms a step: streams last long enough for requests to be seen in flight.
    with observed_fleet(tmp_path_factory.mktemp("fleet"), step_s=0.02) as fleet:
        yield fleet


@pytest.fixture
def page(fleet: Fleet) -> Iterator[playwright_api.Page]:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is missing: scripts/setup.sh installs Debian's chromium package"
    with playwright_api.sync_playwright() as p:
        # --no-sandbox: the sandbox needs user namespaces that containers and root shells often lack.
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            yield page
            assert errors == [], f"the page raised: {errors}"
        finally:
            browser.close()


def screenshot(page: playwright_api.Page, tmp_path: Path, name: str) -> None:
    folder = Path(os.environ.get("MICROSERVE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)


def test_the_dashboard_shows_the_fleet_and_follows_traffic(
    fleet: Fleet, page: playwright_api.Page, tmp_path: Path
) -> None:
    expect = playwright_api.expect
    page.goto(f"{fleet.url}/dashboard")
    rows = page.locator("#workers tbody tr")
    expect(rows).to_have_count(2)
    for engine in fleet.engines:
        row = page.locator(f'#workers tr[data-url="{engine.url}"]')
        expect(row.locator(".health")).to_have_text("up")
        expect(row.locator(".circuit")).to_have_text("closed")
        expect(row.locator("td").nth(1)).to_have_text("both")
    expect(page.locator("#strategy")).to_have_text("pd")
    expect(page.locator("#policy")).to_have_text("round_robin")
    expect(page.locator("#recent tbody tr")).to_have_count(0)

    statuses = traffic(fleet.url, 12)
    assert statuses == [200] * 12
    # The page catches up by itself: every request, each with its way through the fleet (PD's verbs).
    expect(page.locator("#recent tbody tr")).to_have_count(12)
    newest = page.locator("#recent tbody tr").first
    expect(newest.locator(".hops")).to_contain_text("prep_recv")
    expect(newest.locator(".hops")).to_contain_text("remote_send")
    expect(newest.locator(".hops")).to_contain_text("start_generate")
    expect(page.locator("#rate")).not_to_have_text(NONE)
    expect(page.locator("#ttft")).not_to_contain_text(NONE)
    expect(page.locator("#tpot")).not_to_contain_text(NONE)
    served = sum(int(t) for t in page.locator("#workers td.requests").all_inner_texts())
    assert served >= 24  # each PD request picks two workers
    expect(page.locator("#chart-rate rect")).not_to_have_count(0)
    screenshot(page, tmp_path, "dashboard.png")


def test_admin_actions_on_the_page_take_effect(
    fleet: Fleet, page: playwright_api.Page, tmp_path: Path
) -> None:
    expect = playwright_api.expect
    page.goto(f"{fleet.url}/dashboard")
    expect(page.locator("#workers tbody tr")).to_have_count(2)
    drain = page.locator("button.drain")
    expect(drain.first).to_be_hidden()  # no token yet: no admin controls

    page.fill("#token", "wrong")
    page.click("#token-form button")
    expect(page.locator("#admin-message")).to_contain_text("refused")
    expect(drain.first).to_be_hidden()

    page.fill("#token", ADMIN_TOKEN)
    page.click("#token-form button")
    expect(page.locator("#admin-message")).to_have_text("Admin actions are on.")
    victim, survivor = fleet.engines[0].url, fleet.engines[1].url
    page.locator(f'#workers tr[data-url="{victim}"] button.drain').click()
    expect(page.locator(f'#workers tr[data-url="{victim}"] .health')).to_have_text("draining")
    workers = httpx.get(f"{fleet.url}/admin/workers", headers=ADMIN).json()["workers"]
    assert {w["url"]: w["draining"] for w in workers} == {victim: True, survivor: False}

    page.select_option("#strategy-name", "data_parallel")
    page.click("#strategy-form button")
    expect(page.locator("#strategy")).to_have_text("data_parallel")
    assert httpx.get(f"{fleet.url}/admin/strategy", headers=ADMIN).json()["name"] == "data_parallel"

    assert traffic(fleet.url, 4, start=500) == [200] * 4
    newest = page.locator("#recent tbody tr").first
    expect(newest).to_contain_text("data_parallel")
    for text in page.locator("#recent tbody tr").all_inner_texts()[:4]:
        assert survivor.removeprefix("http://") in text and victim.removeprefix("http://") not in text
    screenshot(page, tmp_path, "dashboard-admin.png")

    page.locator(f'#workers tr[data-url="{victim}"] button.drain').click()  # undrain: leave it as found
    expect(page.locator(f'#workers tr[data-url="{victim}"] .health')).to_have_text("up")
