"""A real browser for the dashboard's tests: Debian's headless Chromium, driven by Playwright.

    with chromium_page() as page:
        page.goto(f"{server.url}/dashboard")

Chromium comes from Debian's ``chromium`` package (with ``chromium-driver``, its
WebDriver, for Selenium users); ``make system-deps`` installs both
(:func:`ensure_chromium`). Playwright for Python drives it through its
``executable_path``: Playwright's own browser download is never used. Each page
gets a fresh profile directory, so no cookie or cache survives from one test to
the next.

Like tests/servers.py this is a tool of the clone, not of the shipped test kit.
Nothing here skips: a missing browser raises :class:`NoChromium` with the reason.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

#: Where Debian's package puts the browser (a launcher script) and its WebDriver.
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
PACKAGES = ("chromium", "chromium-driver")
#: Headless, as root in CI (no sandbox), and nothing that reaches the network by itself.
ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1280, "height": 860}


class NoChromium(RuntimeError):
    """Chromium could not be found or installed."""


def find_chromium() -> str | None:
    for path in (CHROMIUM, shutil.which("chromium")):
        if path and os.access(path, os.X_OK):
            return path
    return None


def ensure_chromium() -> str:
    """Return the Chromium binary, installing Debian's packages when they are missing."""
    found = find_chromium()
    if found and os.access(CHROMEDRIVER, os.X_OK):
        return found
    apt = shutil.which("apt-get")
    if apt is None or os.geteuid() != 0:
        raise NoChromium(
            "Chromium is not installed: run `apt-get install -y chromium chromium-driver` "
            "(Debian/Ubuntu)"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-q"], [apt, "install", "-y", "-q", *PACKAGES]):
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0 and cmd[1] == "install":
            raise NoChromium(f"apt-get install chromium failed: {done.stderr.strip()[-500:]}")
    found = find_chromium()
    if not found:
        raise NoChromium("chromium is still missing after apt-get install chromium")
    return found


@contextmanager
def chromium_page(**context_options: Any) -> Iterator[Any]:
    """A page of a fresh headless Chromium (its own profile), closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = ensure_chromium()
    options = {"viewport": VIEWPORT, **context_options}
    with (
        sync_playwright() as playwright,
        tempfile.TemporaryDirectory(prefix="idemhook-chromium-") as profile,
    ):
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=list(ARGS), **options
        )
        try:
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()
