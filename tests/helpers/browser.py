"""Headless Chromium for the browser tests: Debian's ``chromium`` driven by Playwright.

The MLflow 3 UI is a React single-page app: a static ``--dump-dom`` cannot click its menus, so the
browser test opens the page, clicks like a user (Playwright's clicks are real mouse events at the
element's centre, after waiting until it is visible, still and not covered, which is what Radix
menus listen to) and reads ``innerText``. Playwright starts the system browser through
``executable_path``: its own browser download (``playwright install``) is never used, so nothing
beyond the Python package (its Node.js driver inside) and Debian's package is needed.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from playwright.sync_api import Page, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

# Flags that work as root in a container; the resolver rule makes every host other than
# 127.0.0.1 unresolvable, so the page cannot reach the internet even if it tries (fonts,
# telemetry): the test then shows what the UI does offline, as on a CI machine. Playwright adds
# most of the others itself today; they are all listed so that this command line does not depend
# on its defaults.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]

INSTALL_HINT = (
    "run `.ci/run` (it provisions the browser) or "
    "`apt-get update && apt-get install -y --no-install-recommends chromium`"
)


def find_chromium() -> str:
    """Path of Debian's ``chromium``; raises with the install command when it is missing."""
    path = shutil.which("chromium")
    if path is None:
        raise RuntimeError(f"chromium is not installed: {INSTALL_HINT}")
    return path


@contextmanager
def chromium_page(width: int = 1600, height: int = 1000, timeout: float = 60.0) -> Iterator[Page]:
    """A fresh headless Chromium (new temporary profile) and one ``width`` x ``height`` tab; every
    action waits at most ``timeout`` seconds; the browser is stopped on exit."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_FLAGS, timeout=timeout * 1000)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, device_scale_factor=1)
            page.set_default_timeout(timeout * 1000)
            yield page
        finally:
            browser.close()


def wait_for(page: Page, expression: str, timeout: float, what: str) -> Any:
    """Value of a JavaScript expression once it is truthy (polled every 250 ms); on timeout, an
    error naming ``what`` with the start of the page's text, to show what the page showed."""
    try:
        return page.wait_for_function(expression, polling=250, timeout=timeout * 1000).json_value()
    except PlaywrightTimeout:
        text = page.evaluate("document.body ? document.body.innerText : ''")
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}; page text:\n{text[:3000]}") from None
