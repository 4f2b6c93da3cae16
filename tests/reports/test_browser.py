"""The report folder opened from disk in headless Chromium: every image loads, no console errors, the title."""

from __future__ import annotations

import shutil

import pytest

from clusterattack.reports import write_report
from tests.reports.helpers import full_data

pytestmark = pytest.mark.slow


def _driver():
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
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,2000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)


def test_report_opens_offline_in_chromium(tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    data = full_data()
    index = write_report(data, tmp_path / "report")
    driver = _driver()
    try:
        driver.get(index.resolve().as_uri())
        WebDriverWait(driver, 20).until(
            lambda d: d.execute_script("return document.readyState") == "complete"
        )
        assert driver.title == data.title  # the browser unescapes what the writer escaped
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
        )
        assert len(images) == 7, images
        assert [src for src, ok in images if not ok] == [], "images that did not load"
        sections = driver.execute_script(
            "return Array.from(document.querySelectorAll('section')).length"
        )
        assert sections == 9
        severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
        assert severe == [], severe
    finally:
        driver.quit()
