"""The report folder opened from disk in headless Chromium: every image loads, no console errors, the title,
and no table or provenance line wider than the page (wide tables scroll in their own box)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from clusterattack.reports import write_report
from tests.reports.helpers import full_data

pytestmark = pytest.mark.slow


def _driver(width: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        # CI installs both (Debian packages chromium and chromium-driver): a missing one is a broken set-up.
        pytest.fail(
            f"headless Chromium is needed for this test: chromium={chromium!r}, chromedriver={chromedriver!r}; "
            "install the Debian packages 'chromium' and 'chromium-driver'"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={width},2000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


# Elements wider than the page: anything whose right edge passes the body's, except what sits
# inside a scrolling box (the wide tables), which scrolls instead.
_OVERFLOW = """
const limit = document.body.getBoundingClientRect().right + 1;
return Array.from(document.querySelectorAll('body *'))
  .filter(e => !e.closest('.scroll') && e.getBoundingClientRect().right > limit)
  .map(e => e.tagName + (e.id ? '#' + e.id : '') + ' ' + (e.textContent || '').slice(0, 60));
"""


def open_in_chromium(index: Path, width: int = 1280, screenshot: Path | None = None) -> dict[str, Any]:
    """What a reader's browser makes of the report: title, images (src, loaded), sections, severe console
    entries, page and window widths, elements that overflow the page, and the widest table's box."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _driver(width)
    try:
        driver.get(index.resolve().as_uri())
        WebDriverWait(driver, 20).until(lambda d: d.execute_script("return document.readyState") == "complete")
        out = {
            "title": driver.title,
            "images": driver.execute_script(
                "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
            ),
            "sections": driver.execute_script(
                "return Array.from(document.querySelectorAll('section')).map(s => [s.id, s.dataset.state])"
            ),
            "severe": [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"],
            "page_width": driver.execute_script("return document.documentElement.scrollWidth"),
            "window_width": driver.execute_script("return document.documentElement.clientWidth"),
            "overflow": driver.execute_script(_OVERFLOW),
            # a wide table is wider than its box, and its box no wider than the page
            "scrolling_tables": driver.execute_script(
                "return Array.from(document.querySelectorAll('.scroll')).filter(b => b.scrollWidth > b.clientWidth)"
                ".map(b => [b.firstElementChild.id, b.getBoundingClientRect().right <= "
                "document.body.getBoundingClientRect().right + 1])"
            ),
        }
        if screenshot is not None:
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(width, min(int(height), 16000))
            driver.save_screenshot(str(screenshot))
        return out
    finally:
        driver.quit()


def test_report_opens_offline_in_chromium(tmp_path):
    data = full_data()
    index = write_report(data, tmp_path / "report")
    for width in (1280, 720):
        seen = open_in_chromium(index, width)
        assert seen["title"] == data.title  # the browser unescapes what the writer escaped
        assert len(seen["images"]) == 9, seen["images"]
        assert [src for src, ok in seen["images"] if not ok] == [], "images that did not load"
        assert len(seen["sections"]) == 11
        assert seen["severe"] == [], seen["severe"]
        # wide tables scroll inside their box; nothing else runs off the page
        assert seen["page_width"] <= seen["window_width"], (width, seen["page_width"], seen["overflow"])
        assert seen["overflow"] == [], seen["overflow"]
        assert seen["scrolling_tables"] and all(fits for _, fits in seen["scrolling_tables"]), seen["scrolling_tables"]
