"""Headless Debian Chromium driven by Playwright, for the browser tests (no Playwright browser download: no internet).

    from browserkit import browser_page            # a pytest fixture: import it into the test module
    def test_page(browser_page):
        browser_page.goto(url)
        browser_page.get_by_role("button", name="Send").click()

or, outside pytest:

    with open_page() as page: page.goto(url)

`make browser` installs Debian's `chromium`; the fixture skips (with the reason) only when no chromium binary
or no playwright package is found, so a machine set up with `make test` always runs the browser tests.
"""
import contextlib
import os
import shutil

import pytest

__all__ = ["chromium_path", "open_page", "browser_page"]

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]


def chromium_path():
    "The Chromium binary: $CHROMIUM if set, else `chromium` (Debian) or `chromium-browser` on the PATH; None if absent."
    env = os.environ.get("CHROMIUM")
    if env: return env if os.path.isfile(env) else shutil.which(env)
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_reason():
    "Why the browser tests cannot run here (None when they can)."
    if chromium_path() is None: return "no chromium binary on the PATH: run `make browser` (Debian's chromium package)"
    try: import playwright.sync_api  # noqa: F401
    except ImportError: return "the playwright package is missing: run `make setup`"
    return None


@contextlib.contextmanager
def open_page(timeout_ms: int = 15000, viewport=(1000, 800)):
    "A Playwright page in a fresh headless Chromium (Debian's binary, --no-sandbox); everything is closed on exit."
    from playwright.sync_api import sync_playwright
    path = chromium_path()
    if path is None: raise RuntimeError(missing_reason())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport=dict(width=viewport[0], height=viewport[1]))
            page = context.new_page()
            page.set_default_timeout(timeout_ms)
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.js_errors = errors          # uncaught JavaScript errors on the page, for tests to assert on
            yield page
            context.close()
        finally:
            browser.close()


@pytest.fixture
def browser_page():
    "A Playwright page in headless Debian Chromium; skips with the reason only if chromium or playwright is absent."
    reason = missing_reason()
    if reason: pytest.skip(reason)
    with open_page() as page:
        yield page
