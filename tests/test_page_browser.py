"""The status page in a real headless Chromium (Debian's `chromium`), driven by Playwright.

Checks what an operator relies on: every task is listed, failed and disabled tasks stand out, and
the chart draws every bar it was sent. Saves screenshots under test-artifacts/.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from obs_data import FIVE_MIN, NOW, add_derived_bars, add_symbols, quality_of, standard_fixture
from web_client import closed_port_database, running_server

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def find_chromium() -> str | None:
    candidates = [
        os.environ.get("BARAGG_CHROMIUM"),
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
        shutil.which("google-chrome"),
    ]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


CHROMIUM = find_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="no Chromium binary (install Debian's chromium, or set BARAGG_CHROMIUM)"
)


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 900}, device_scale_factor=1)
    p = context.new_page()
    errors: list[str] = []
    p.on("pageerror", lambda exc: errors.append(str(exc)))
    p.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    yield p
    context.close()
    # Each test stops its server before this fixture closes the page; a poll the page sends in that
    # moment cannot connect (the browser logs it as an error). A refused connection can happen only
    # then: while a server runs it accepts.
    errors = [e for e in errors if "net::ERR_CONNECTION_REFUSED" not in e]
    if getattr(p, "expect_503", False):  # the browser logs each 503 response as an error
        errors = [e for e in errors if "status of 503" not in e]
    assert errors == [], f"the page logged errors: {errors}"


# Predicates are passed as functions: a string expression would be eval'ed in the page, which its
# Content-Security-Policy (no 'unsafe-eval') forbids.
def wait_for_chart(page, timeout: float = 60_000) -> None:
    page.wait_for_function("() => window.baraggChart && window.baraggChart.ready", timeout=timeout)


def test_status_page_lists_tasks_and_draws_candles(db, conn, page):
    fixture = standard_fixture(conn, bars=600)
    with running_server(db, now=NOW) as server:  # the page's clock is the fixture's
        page.goto(server.url + "/#symbol=ESZ4&tf=5m")
        page.wait_for_selector("#tasks tbody tr")
        wait_for_chart(page)

        rows = page.locator("#tasks tbody tr")
        assert rows.count() == len(fixture["tasks"])
        listed = {(r.get_attribute("data-symbol"), r.get_attribute("data-timeframe")) for r in rows.all()}
        assert listed == {(t.symbol, t.timeframe) for t in fixture["tasks"]}
        # Problems first: the hard_failed task tops the table, the disabled one is marked.
        first = rows.nth(0)
        assert (first.get_attribute("data-symbol"), first.get_attribute("data-timeframe")) == ("GCZ4", "5m")
        assert "hard_failed" in first.get_attribute("class")
        assert "division by zero" in first.inner_text()
        disabled = page.locator('#tasks tbody tr[data-symbol="CLZ4"][data-timeframe="15m"]')
        assert "disabled" in disabled.get_attribute("class")
        assert page.locator(".chip.bad").filter(has_text="hard failed").count() == 1

        assert page.evaluate("window.baraggChart.candleCount") == 600
        assert page.get_attribute("#chart", "data-candle-count") == "600"
        assert page.evaluate("[window.baraggChart.symbol, window.baraggChart.timeframe]") == ["ESZ4", "5m"]

        # Hovering a poor bar shows its values and its quality (it is drawn faded).
        i = next(i for i in range(550, 600) if quality_of(i) == (0, 3))
        ts = int((fixture["start_5m"] + i * FIVE_MIN).timestamp())
        point = page.evaluate(f"window.baraggChart.coordinateOf({ts})")
        assert point is not None, "the bar is on screen"
        box = page.locator("#chart").bounding_box()
        page.mouse.move(box["x"] + point["x"], box["y"] + point["y"])
        page.wait_for_selector("#tooltip:not([hidden])")
        tooltip = page.inner_text("#tooltip")
        assert "quality 0 poor" in tooltip
        assert "(3/5 source bars)" in tooltip

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "status-page.png"))

        # The filter and "problems only" narrow the table (hard_failed, disabled, lagging, failing).
        page.fill("#filter", "GCZ4")
        assert rows.count() == 2
        page.fill("#filter", "")
        page.check("#problems-only")
        problems = {(r.get_attribute("data-symbol"), r.get_attribute("data-timeframe")) for r in rows.all()}
        assert problems == {("GCZ4", "5m"), ("CLZ4", "15m"), ("ESZ4", "1h")}
        page.uncheck("#problems-only")
        assert rows.count() == len(fixture["tasks"])

        # A new bar in the database appears on the chart at the next refresh (every second here).
        add_derived_bars(conn, "ESZ4", "5m", fixture["end_5m"], 1, step=FIVE_MIN, start_price=6080.0)
        page.wait_for_function("() => window.baraggChart.candleCount === 601", timeout=30_000)

        # Clicking a task charts it; the 1h task has no bars yet, and the page says so.
        page.locator('#tasks tbody tr[data-symbol="ESZ4"][data-timeframe="1h"]').click()
        page.wait_for_function("() => window.baraggChart.ready && window.baraggChart.timeframe === '1h'")
        assert page.evaluate("window.baraggChart.candleCount") == 0
        assert "no 1h bars" in page.inner_text("#chart")
        # ... and charts its first bars as soon as the worker writes them.
        add_derived_bars(
            conn, "ESZ4", "1h", NOW.replace(hour=13, minute=0, second=0), 2, step=timedelta(hours=1)
        )
        page.wait_for_function(
            "() => window.baraggChart.candleCount === 2 && window.baraggChart.ready", timeout=30_000
        )


def test_a_year_of_5m_bars_loads_and_zooms(db, conn, page):
    """105,120 bars (a year of 5m, around the clock): all drawn, and the page still answers."""
    add_symbols(conn, "BTCUSD")
    n = 365 * 288
    start = datetime(2023, 11, 22, tzinfo=UTC)
    add_derived_bars(conn, "BTCUSD", "5m", start, n, step=FIVE_MIN, start_price=36000.0, seed=7)
    conn.execute(
        "INSERT INTO data_agg_state (canonical_symbol, timeframe, source_timeframe, last_agg_bar_ts_utc)"
        " VALUES ('BTCUSD', '5m', '1m', %s)",
        (start + n * FIVE_MIN,),
    )
    with running_server(db) as server:
        page.goto(server.url + "/#symbol=BTCUSD&tf=5m")
        wait_for_chart(page, timeout=120_000)
        assert page.evaluate("window.baraggChart.candleCount") == n
        span = "(() => { const r = window.baraggChart.visibleRange(); return r.to - r.from; })()"
        initial = page.evaluate(span)
        assert initial < 1000  # opens on the latest bars, readable
        # Zoom out with the wheel: more bars on screen, and the page still answers.
        box = page.locator("#chart").bounding_box()
        page.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] / 3)
        for _ in range(10):
            page.mouse.wheel(0, 500)
        page.wait_for_function(f"() => {span} > {initial * 2}")
        # "fit all" shows the whole year at once.
        page.click("#fit")
        page.wait_for_function(f"() => {span} >= {n - 1}")
        # Load only the latest 20k: panning to the oldest of them brings 20k more.
        page.select_option("#limit", "20000")
        page.wait_for_function("() => window.baraggChart.ready && window.baraggChart.candleCount === 20000")
        page.click("#fit")
        page.wait_for_function("() => window.baraggChart.candleCount === 40000")
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "status-page-year.png"))


def test_page_says_when_the_database_is_down(page):
    page.expect_503 = True
    with running_server(closed_port_database(), db_timeout=1) as server:
        page.goto(server.url + "/")
        page.wait_for_selector("#banner:not([hidden])")
        assert "database unreachable" in page.inner_text("#banner")
        assert page.inner_text("#ready") == "not ready"
        page.wait_for_selector("#chart .chart-msg")
        assert page.inner_text("#chart .chart-msg") == "waiting for the database"


def test_page_behind_a_token_works_once_the_browser_has_it(browser, db, conn):
    """With a token the browser is asked for it (HTTP Basic); given it, the page and its API calls work
    (the 401 without it: tests/test_web_hardening.py)."""
    standard_fixture(conn, bars=50)
    token = "0123456789abcdef0123456789abcdef"
    with running_server(db, now=NOW, token=token) as server:
        context = browser.new_context(http_credentials={"username": "ops", "password": token})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        try:
            response = page.goto(server.url + "/")
            assert response.status == 200
            page.wait_for_selector("#tasks tbody tr")
            assert page.locator("#tasks tbody tr").count() == 7
            page.wait_for_function("() => document.querySelector('#ready').textContent === 'ready'")
            assert errors == []
        finally:
            context.close()
