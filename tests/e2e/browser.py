"""A real headless browser for the dashboard tests: the distribution's Chromium, driven by
Playwright for Python (Playwright's own browser download is not used).

:func:`module_browser` is the body of a module-scoped fixture: one browser per module, a fresh
context (no cookies, no sessionStorage) per test. The browser's processes come and go by
themselves (renderers), so its driver is registered in ``LONG_LIVED_PROCESSES`` and the
leak guard leaves that tree alone; the fixture ends it, and fails if any of it outlives the
module. Without Chromium or Playwright the tests are skipped with the reason (``./setup.sh
--test`` installs both on Debian, so CI runs them).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.helpers import LONG_LIVED_PROCESSES

#: Where Debian (and Ubuntu's non-snap builds) put it; LEMONADE_CHROMIUM overrides.
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
#: Generous: a busy 2-core machine may take seconds for what takes milliseconds here.
WAIT_MS = 60_000
ARTEFACTS = Path(os.environ.get("LEMONADE_TEST_ARTEFACTS")
                 or Path(__file__).resolve().parents[1] / "artefacts")


def chromium_path() -> str | None:
    override = os.environ.get("LEMONADE_CHROMIUM")
    if override:
        return override
    for candidate in CHROMIUM_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


def module_browser() -> Iterator[Any]:
    """Yields a Playwright ``Browser``; skips the module where there is none to drive."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the dashboard's browser tests need Playwright for Python "
                    "(pip install playwright, or ./setup.sh --test)")
    executable = chromium_path()
    if executable is None:
        pytest.skip("the dashboard's browser tests need Chromium (/usr/bin/chromium: "
                    "apt-get install chromium, or ./setup.sh --test as root on Debian)")
    me = psutil.Process()
    before = {p.pid for p in me.children()}
    playwright = sync_playwright().start()
    drivers = {p.pid for p in me.children()} - before
    LONG_LIVED_PROCESSES.update(drivers)
    tree: list[psutil.Process] = []
    try:
        args = ["--disable-dev-shm-usage"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
        browser = playwright.chromium.launch(executable_path=executable, headless=True,
                                             args=args)
        yield browser
        tree = [c for d in drivers for c in psutil.Process(d).children(recursive=True)]
        browser.close()
    finally:
        playwright.stop()
        LONG_LIVED_PROCESSES.difference_update(drivers)
        _, alive = psutil.wait_procs(tree, timeout=15)
        for process in alive:
            process.kill()
        assert not alive, f"browser processes outlived the browser: {alive}"


def screenshot(page: Any, name: str) -> Path:
    """A full-page screenshot kept as a test artefact for a person to look at."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTEFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
