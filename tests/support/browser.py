"""Headless Chromium for the tree view's tests and benchmark, driven by Playwright.

Playwright's own browser download is not used: the browser is the system's
Chromium (Debian's `chromium` package; .ci/run installs it), found at the path
in $W2S_CHROMIUM or as `chromium` / `chromium-browser` on PATH.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CHROMIUM_ENV = "W2S_CHROMIUM"
# Headless, and nothing that would reach the network or touch a profile.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run",
]
AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"


def find_chromium() -> str | None:
    """The Chromium to drive, or None when there is none."""
    given = os.environ.get(CHROMIUM_ENV)
    if given:
        return given if Path(given).is_file() else None
    return shutil.which("chromium") or shutil.which("chromium-browser")


def missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "Playwright is not installed: pip install -e '.[test]'"
    if find_chromium() is None:
        given = os.environ.get(CHROMIUM_ENV)
        if given:
            return f"${CHROMIUM_ENV} is {given!r}, which is not a file"
        return f"no Chromium: apt-get install chromium, or set ${CHROMIUM_ENV} to a Chromium binary"
    return None


def launch(playwright):
    """A headless Chromium browser (Playwright's Browser)."""
    return playwright.chromium.launch(executable_path=find_chromium(), args=CHROMIUM_FLAGS)


def axe_findings(page, impacts=("serious", "critical")) -> list[str]:
    """axe-core's violations of the given impacts on the page as it is now, one line each."""
    page.add_script_tag(path=str(AXE))
    violations = page.evaluate("async () => (await axe.run(document)).violations")
    return [
        f"{v['impact']}: {v['id']}: {v['help']} ({len(v['nodes'])}x, e.g. {v['nodes'][0]['target']})"
        for v in violations
        if v["impact"] in impacts
    ]
