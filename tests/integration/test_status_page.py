"""The controller's status page (``GET /``) in a real headless browser.

A real controller process and real in-process sidecars (the ``fleet`` fixture), Debian's
chromium driven by Playwright: the page must list the instances, and show a move started over
HTTP appear and finish with the job's own byte count, refreshed by the page's polling alone.

Needs ``scripts/setup-debian.sh`` (Debian's chromium + the ``playwright`` package). Without
them these tests fail, on purpose: CI runs the setup, so a missing browser is a broken set-up.
"""

from __future__ import annotations

import contextlib
import os
import random

import pytest

from tests.harness.api import LOC
from tests.harness.stores import fill

try:
    from playwright.sync_api import expect
except ImportError:  # reported by open_page, as a failure
    expect = None

CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps trying to reach Google on this
# offline machine and logs connection failures.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SETUP_HINT = ("run `bash scripts/setup-debian.sh` (installs Debian's chromium and the Python "
              "package playwright into .venv; never `playwright install`)")
WAIT_MS = 10_000


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under Playwright, or a sentence saying why it cannot start.

    Not a failing fixture: a missing browser must make each test FAIL (see :func:`open_page`),
    not error at set-up, and never skip.
    """
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        yield f"playwright is not importable ({e})"
        return
    if not os.access(CHROMIUM, os.X_OK):
        yield f"{CHROMIUM} is missing"
        return
    with sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except PlaywrightError as e:
            yield f"cannot launch {CHROMIUM} ({e})"
            return
        try:
            yield b
        finally:
            b.close()


@contextlib.contextmanager
def open_page(browser):
    """A fresh page; records uncaught page exceptions and console errors on it."""
    if isinstance(browser, str):
        pytest.fail(f"no headless browser: {browser}. Fix: {SETUP_HINT}", pytrace=False)
    ctx = browser.new_context(viewport={"width": 1360, "height": 900})
    try:
        pg = ctx.new_page()
        pg.set_default_timeout(WAIT_MS)
        pg.js_errors = []  # uncaught exceptions in the page
        pg.console_errors = []  # e.g. a failed request
        pg.on("pageerror", lambda e: pg.js_errors.append(str(e)))
        pg.on("console", lambda m: pg.console_errors.append(m.text) if m.type == "error" else None)
        yield pg
    finally:
        ctx.close()


@pytest.fixture(scope="module")
def sidecars(fleet):
    return fleet.add_sidecar("page-a"), fleet.add_sidecar("page-b")


def test_page_lists_instances_and_shows_a_move_finish(fleet, sidecars, browser, tmp_path):
    a, _ = sidecars
    with open_page(browser) as page:
        page.goto(str(fleet.http.base_url.join("/")))

        # Both instances, up, with their store size; the health header agrees with /health.
        api = {i["instance_id"]: i for i in fleet.http.get("/instances").json()["instances"]}
        health = fleet.http.get("/health").json()
        assert health["instances_up"] == health["instances"] >= 2
        for iid in ("page-a", "page-b"):
            row = page.locator(f'#instances tbody tr[data-instance-id="{iid}"]')
            expect(row).to_have_attribute("data-up", "true")
            expect(row.locator("td").first).to_have_text(iid)
            expect(row.locator(".badge")).to_have_text("up")
            # 64 slots of 2 KiB (the tiny layout's chunk: 2 blocks x 2 layers x 512 B)
            assert api[iid]["capacity_bytes"] == 64 * 2048
            expect(row.locator("td.usage")).to_have_attribute("data-capacity-bytes", str(64 * 2048))
            expect(row.locator("td.usage .text")).to_contain_text(" / 128 KiB")
            expect(row.locator("td.engine")).to_have_text(api[iid]["engine_url"])
        expect(page.locator("#health")).to_have_attribute("data-state", "ok")
        expect(page.locator("#health-up")).to_have_text(str(health["instances_up"]))
        expect(page.locator("#health-registered")).to_have_text(str(health["instances"]))
        expect(page).to_have_title(f"kvmove · {health['instances_up']}/{health['instances']} up")
        expect(page.locator("#error-banner")).to_be_hidden()

        # A move started over HTTP (not through the page) appears and finishes there.
        tokens = [random.Random(7).randrange(5000) for _ in range(100)]  # 3 full chunks + a tail
        fill(a, tokens, seed=11)
        assert fleet.wait_lookup(tokens, {"page-a": 100}) == {"page-a": 100}
        indexed = fleet.http.get("/health").json()["chunks_indexed"]
        expect(page.locator("#health-chunks")).to_have_text(str(indexed))
        r = fleet.http.post("/move", json={"old_position": ["page-a", LOC],
                                           "new_position": ["page-b", LOC], "tokens": tokens})
        assert r.status_code == 200, r.text
        eid = r.json()["event_id"]

        row = page.locator(f'#events tbody tr[data-event-id="{eid}"]')
        expect(row).to_have_count(1)
        expect(row).to_have_attribute("data-status", "done")
        job = fleet.http.get(f"/events/{eid}").json()
        # 3 full chunks of 2 KiB and a 4-token tail in one 1 KiB block: 7 KiB
        assert job["status"] == "done" and job["bytes"] == job["total_bytes"] == 7168, job
        expect(row).to_have_attribute("data-kind", "move")
        expect(row.locator(".badge")).to_have_text("done")
        expect(row.locator("td.event-id")).to_have_text(eid[:8])
        expect(row.locator(".source")).to_have_text("page-a")
        expect(row.locator(".destination")).to_have_text("page-b")
        cell = row.locator("td.bytes")
        expect(cell).to_have_attribute("data-bytes", str(job["bytes"]))
        expect(cell).to_have_attribute("data-total-bytes", str(job["total_bytes"]))
        expect(row.locator(".bytes-moved")).to_have_text("7.00 KiB")
        expect(row.locator(".bytes-total")).to_have_text("7.00 KiB")
        expect(row.locator("td.tokens")).to_have_text("100")
        # Newest first: the move is the top row.
        expect(page.locator("#events tbody tr").first).to_have_attribute("data-event-id", eid)

        # The instances table follows the move: the chunks left page-a for page-b.
        expect(page.locator('#instances tr[data-instance-id="page-b"] td.chunks')).to_have_text("4")
        expect(page.locator('#instances tr[data-instance-id="page-a"] td.chunks')).to_have_text("0")

        shot = tmp_path / "status.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 0
        if os.environ.get("KVMOVE_SCREENSHOT"):  # to look at the page: KVMOVE_SCREENSHOT=/tmp/x.png
            page.screenshot(path=os.environ["KVMOVE_SCREENSHOT"], full_page=True)
        assert page.js_errors == [] and page.console_errors == []


def test_data_is_inserted_as_text_never_as_html(fleet, sidecars, browser):
    with open_page(browser) as page:
        evil = '<img src=x onerror="window.__pwned=1">page-x'
        fleet.add_sidecar(evil)
        page.goto(str(fleet.http.base_url.join("/")))
        cell = page.locator("#instances tbody tr td strong", has_text="page-x")
        expect(cell).to_have_text(evil)
        assert page.locator("#instances img").count() == 0
        assert page.evaluate("window.__pwned") is None
        assert page.js_errors == []


def test_banner_shows_when_the_controller_is_unreachable(fleet, sidecars, browser):
    with open_page(browser) as page:
        page.goto(str(fleet.http.base_url.join("/")))
        expect(page.locator("#health")).to_have_attribute("data-state", "ok")
        banner = page.locator("#error-banner")
        expect(banner).to_be_hidden()
        fleet.kill_controller()
        try:
            expect(banner).to_be_visible()
            expect(banner).to_contain_text("Controller unreachable")
            expect(page.locator("#health")).to_have_attribute("data-state", "error")
            # The last data stays on screen.
            expect(page.locator('#instances tr[data-instance-id="page-a"]')).to_have_count(1)
        finally:
            fleet.start_controller()
        # Back, with the sidecars re-registered: the page recovers by itself.
        expect(banner).to_be_hidden(timeout=20_000)
        expect(page.locator('#instances tr[data-instance-id="page-a"]')).to_have_attribute(
            "data-up", "true", timeout=20_000)


def test_with_a_secret_the_page_asks_for_the_token_and_sends_it(browser, tmp_path):
    from tests.harness.fleet import Fleet

    token = "status-page-secret-0123"
    secured = Fleet(tmp_path, api_token=token)
    try:
        secured.add_sidecar("page-secured")
        base = f"http://localhost:{secured.port}/"
        with open_page(browser) as page:
            page.goto(base)
            expect(page.locator("#token-form")).to_be_visible()  # the API answered 401
            expect(page.locator("#error-banner")).to_contain_text("HTTP 401")
            page.fill("#token-input", token)
            page.click("#token-form button")
            expect(page.locator("#token-form")).to_be_hidden()
            expect(page.locator("#health")).to_have_attribute("data-state", "ok")
            expect(page.locator('#instances tr[data-instance-id="page-secured"]')).to_have_count(1)
        with open_page(browser) as page:  # a fresh tab, the token in the address's fragment
            page.goto(base + "#token=" + token)
            expect(page.locator("#health")).to_have_attribute("data-state", "ok")
            expect(page.locator("#token-form")).to_be_hidden()
            assert "token" not in page.url  # removed from the address at once
            assert page.js_errors == []
    finally:
        secured.close()
