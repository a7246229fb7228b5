"""A PNG of a run's report, as Chromium renders it (the README's screenshot).

    python benchmarks/report_screenshot.py OUT/report.html docs/report.png

Needs Debian's chromium package and the ``playwright`` Python package (in the
``test`` extra); no browser is downloaded.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from playwright.sync_api import sync_playwright


def main(html: str, png: str, width: int = 1280) -> None:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium",
                                    args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": width, "height": 900})
        page.goto(Path(html).resolve().as_uri())
        page.screenshot(path=png, full_page=True)
        browser.close()
    print(png)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
