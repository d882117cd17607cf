"""A headless Chromium for checking and picturing views: the system's browser, driven by Selenium.

Used by the browser tests (tests/integration/test_views.py) and the docs' screenshots (scripts/figures_views.py).
Nothing is downloaded: the browser and its driver are the system's (Debian: ``apt-get install chromium
chromium-driver``, which scripts/setup.sh does as root; the two packages share one version), found on PATH
or named by ``$LMSCOPE_CHROMIUM`` / ``$LMSCOPE_CHROMEDRIVER``. Selenium (the dev extra) gets both paths, so
its Selenium Manager never runs, and ``SE_OFFLINE`` keeps it offline if it did.

The browser runs with networking features off and a fresh profile, and the driver records the console and
every network request (Chrome's performance log), so a test can assert that a page made none.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile

FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--force-device-scale-factor=1")


def find_chromium() -> tuple[str, str] | str:
    """(browser, driver) paths, or a sentence saying what is missing."""
    browser = os.environ.get("LMSCOPE_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = os.environ.get("LMSCOPE_CHROMEDRIVER") or shutil.which("chromedriver")
    missing = [name for name, path in (("chromium", browser), ("chromedriver", driver)) if not path]
    if missing:
        return (f"{' and '.join(missing)} not found: install them (Debian: apt-get install chromium chromium-driver; "
                f"scripts/setup.sh does as root) or set LMSCOPE_CHROMIUM / LMSCOPE_CHROMEDRIVER")
    return browser, driver


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 900):
    """A headless Chromium driven by Selenium, with a fresh profile; closed on exit."""
    found = find_chromium()
    if isinstance(found, str):
        raise RuntimeError(found)
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = found
    with tempfile.TemporaryDirectory(prefix="lmscope-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for flag in FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
        try:
            yield driver
        finally:
            driver.quit()


def open_page(driver, path) -> None:
    """Load a local file and wait until its views have rendered."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(pathlib.Path(path).resolve().as_uri())
    WebDriverWait(driver, 20, poll_frequency=0.05).until(lambda d: d.execute_script(
        "const v = document.querySelectorAll('div.lmv');"
        "return v.length > 0 && [...v].every((n) => n.dataset.rendered === '1');"))


def console_messages(driver) -> list[dict]:
    """The console entries since the last call (level, message)."""
    return driver.get_log("browser")


def requested_urls(driver) -> list[str]:
    """Every URL the browser asked for since the last call (from the performance log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def screenshot(driver, path, selector: str = "div.lmv") -> None:
    """A PNG of the first element matching `selector`, the whole element even where it is wider or taller
    than the window (the window is resized to fit it first)."""
    from selenium.webdriver.common.by import By

    element = driver.find_element(By.CSS_SELECTOR, selector)
    width, height = driver.execute_script(
        "const r = arguments[0].getBoundingClientRect(); const s = arguments[0];"
        "return [Math.ceil(Math.max(r.width, s.scrollWidth) + 2 * r.left), Math.ceil(r.height + 2 * r.top)];", element)
    size = driver.get_window_size()
    inner = driver.execute_script("return [window.innerWidth, window.innerHeight];")
    driver.set_window_size(max(size["width"], width + size["width"] - inner[0]),
                           max(size["height"], height + size["height"] - inner[1]))
    element.screenshot(str(path))
