"""Drive `nitrofusion app` in a real headless Chromium (Selenium with Debian's `chromium` and `chromium-driver`):
type a prompt as a visitor would, wait for the image the live mode makes, take a screenshot. Used by the app's
browser test and by scripts/app_screenshot.py."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from ..errors import NitroFusionError

CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


def find_browser() -> tuple[str, str] | None:
    """(browser binary, chromedriver) if both are installed."""
    browser = next((shutil.which(b) for b in CHROMIUM if shutil.which(b)), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


def open_browser(width: int = 1280, height: int = 900):
    found = find_browser()
    if found is None:
        raise NitroFusionError("no headless browser: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=found[1]), options=options)


def type_and_wait(driver, url: str, prompt: str, timeout: float = 120.0, keystroke_pause: float = 0.05) -> dict:
    """Open the app, replace the prompt by typing `prompt` key by key (no click, no Enter), and wait until the
    page shows an image and the latency line of the WHOLE prompt (the live mode also draws the partial ones on
    the way). Returns that line and the seconds from the first keystroke."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    box = wait.until(ec.element_to_be_clickable((By.CSS_SELECTOR, "textarea")))
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    t0 = time.perf_counter()
    for ch in prompt:  # one key at a time, like a visitor: each keystroke is an input event
        box.send_keys(ch)
        time.sleep(keystroke_pause)

    def shown(d):
        texts = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".prose, .md")
                 if " ms" in e.text and f"“{prompt}”" in e.text]
        images = [e for e in d.find_elements(By.CSS_SELECTOR, "img") if (e.get_attribute("src") or "")
                  .startswith(("data:", "http")) and e.size.get("width", 0) > 50]
        return (texts[-1], images) if texts and images else False

    text, _ = wait.until(shown)
    return {"latency_text": text, "seconds": time.perf_counter() - t0}


def paste_and_generate(driver, prompt: str, timeout: float = 60.0) -> str:
    """On an open app page, put `prompt` in the box as a script would (past the box's maxlength, which only stops
    typing), click generate, and return what the page shows for it: the latency line of that prompt (one not
    shown before on this page), or the message of the error toast."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    toast = (By.CSS_SELECTOR, "[data-testid=toast-text]")
    wait = WebDriverWait(driver, timeout, ignored_exceptions=(StaleElementReferenceException,))
    for old in driver.find_elements(By.CSS_SELECTOR, "[data-testid=toast-close]"):  # an earlier request's error
        old.click()
    wait.until(lambda d: not d.find_elements(*toast))
    box = driver.find_element(By.CSS_SELECTOR, "textarea")
    driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input', "
                          "{bubbles: true}));", box, prompt)
    driver.find_element(By.XPATH, "//button[normalize-space()='generate']").click()

    def shown(d):
        errors = [e.text for e in d.find_elements(*toast) if e.text]
        lines = [e.text for e in d.find_elements(By.CSS_SELECTOR, ".prose, .md")
                 if " ms" in e.text and e.text.startswith(f"“{prompt}”")]
        return (errors or lines or [False])[-1]

    return wait.until(shown)


def screenshot(driver, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(path))
    return path
