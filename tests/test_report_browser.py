"""The demo's report in a real browser: headless Chromium driven by Playwright.

Playwright's own browser download cannot work on these machines, so the test drives the system's
Chromium (Debian's ``chromium`` package, ``/usr/bin/chromium``; or ``SENSPLAN_CHROMIUM``). It skips
when Playwright or the browser is missing. ``SENSPLAN_SCREENSHOT=PATH`` also saves the screenshot
there (the README's picture comes from it); ``SENSPLAN_REPORT=report.html`` opens that report
instead of the session's demo run (a full ``sensplan demo`` for that picture).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("SENSPLAN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright is not installed (pip install -e '.[browser]')")
pytestmark = pytest.mark.skipif(not CHROMIUM, reason="no Chromium here (apt-get install chromium)")

#: the flags of a headless Chromium on a machine with no network (no background connections)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def report(request) -> Path:
    """The demo's report: the session's demo run, or ``SENSPLAN_REPORT`` (a report.html, e.g. of a
    full ``sensplan demo`` for the README's screenshot)."""
    given = os.environ.get("SENSPLAN_REPORT")
    if given:
        return Path(given).resolve()
    run = request.getfixturevalue("demo_run")
    assert run["code"] == 0, run["err"]
    return Path(run["dir"]) / "report" / "report.html"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _open(browser, report: Path, width: int):
    page = browser.new_page(viewport={"width": width, "height": 900})
    page.set_default_timeout(15_000)
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("request", lambda r: requests.append(r.url))
    page.goto(report.as_uri())
    page.wait_for_load_state("load")
    return page, errors, requests


def _column(page, col: int) -> list[float]:
    return page.eval_on_selector_all(
        "#units tbody tr", f"rs => rs.filter(r => r.style.display !== 'none')"
                           f".map(r => r.cells[{col}].getAttribute('data-v'))"
                           f".filter(v => v !== null).map(Number)")


def test_the_demo_report_works_in_chromium(report, browser, tmp_path):
    page, errors, requests = _open(browser, report, 1280)

    # the page as it opens: the verdict, then the numbers
    shot = tmp_path / "report.png"
    page.screenshot(path=str(shot), full_page=False)
    assert shot.stat().st_size > 10_000
    if os.environ.get("SENSPLAN_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["SENSPLAN_SCREENSHOT"])

    # offline: nothing but the file itself and inline data
    assert requests and all(u.startswith(("file:", "data:")) for u in requests), requests
    # the verdict is the first thing on the page
    assert page.locator("#verdict").inner_text().startswith("Verdict:")

    # every figure renders: each inline SVG chart has a size and drawn marks; each PNG decoded
    charts = page.eval_on_selector_all("svg.chart", "ss => ss.map(s => [s.getBoundingClientRect().width, "
                                                    "s.getBoundingClientRect().height, "
                                                    "s.querySelectorAll('rect,circle,path,polyline').length])")
    assert len(charts) >= 2 and all(w > 100 and h > 50 and marks > 0 for w, h, marks in charts), charts
    images = page.eval_on_selector_all("img", "is => is.map(i => [i.complete, i.naturalWidth])")
    assert images and all(done and w > 0 for done, w in images), images

    # sorting the per-unit table by the largest scanned drop: ascending, then descending
    headers = page.locator("#units thead th")
    col = next(i for i in range(headers.count()) if headers.nth(i).inner_text().startswith("largest scanned drop"))
    headers.nth(col).click()
    up = _column(page, col)
    assert len(up) > 2 and up == sorted(up)
    headers.nth(col).click()
    assert _column(page, col) == sorted(up, reverse=True)

    # filtering: only the rows of one unit stay
    rows = page.locator("#units tbody tr")
    total = rows.count()
    unit = page.eval_on_selector("#units tbody tr", "r => r.getAttribute('data-unit')")
    page.fill("input[data-filter=units]", unit)
    shown = page.eval_on_selector_all("#units tbody tr", "rs => rs.filter(r => r.style.display !== 'none')"
                                                         ".map(r => r.textContent)")
    assert 0 < len(shown) < total and all(unit in text for text in shown)
    page.fill("input[data-filter=units]", "")
    assert page.eval_on_selector_all("#units tbody tr", "rs => rs.filter(r => r.style.display !== 'none')"
                                                        ".length") == total

    # hovering a heatmap cell shows its value; a click selects its unit in the table
    cell = page.locator("svg.chart g[data-tip] rect.cell").first
    cell.hover()
    tip = page.locator("#tip")
    assert tip.is_visible() and "drop" in tip.inner_text()
    cell.click()
    target = cell.evaluate("c => c.parentNode.getAttribute('data-unit')")
    selected = page.eval_on_selector_all("#units tr.sel", "rs => rs.map(r => r.getAttribute('data-unit'))")
    assert selected and set(selected) == {target}

    assert errors == []
    page.close()


def test_the_report_fits_a_phone_screen(report, browser):
    """At 400 px nothing but the tables' own boxes scrolls sideways."""
    page, errors, _ = _open(browser, report, 400)
    assert page.evaluate("document.documentElement.scrollWidth") <= 401
    assert errors == []
    page.close()
