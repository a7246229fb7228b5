"""The HTML report: rendered from real manifests and opened in headless Chromium (Debian's package)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import MEMORIZED, UNSEEN
from lmc_audit.pipelines.audit import run
from lmc_audit.pipelines.cli import main as cli_main
from lmc_audit.pipelines.report import render

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def audited(tmp_path_factory, memorizing_model):
    corpus = tmp_path_factory.mktemp("report_corpus")
    (corpus / "memorized.txt").write_bytes(MEMORIZED)
    (corpus / "unseen.txt").write_bytes(UNSEEN)
    lines = [{"text": f"<b>html & quotes \"{i}\"</b> " + UNSEEN.decode()} for i in range(3)]
    (corpus / "copies.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path_factory.mktemp("report_out")
    run(["--input", str(corpus), "--output", str(out), "--model", memorizing_model, "--quiet", "--no-coding",
         "--chunk-bytes", "256"])
    return out


def test_the_job_writes_a_self_contained_report(audited):
    text = (audited / "report.html").read_text()
    assert text == render(str(audited))  # the same bytes for the same manifests
    assert text.count("<svg") == 2 and "<script" not in text
    assert "src=\"http" not in text and "href=\"http" not in text  # nothing fetched from elsewhere
    assert "&lt;b&gt;html &amp; quotes" in text and "<b>html" not in text  # snippets are escaped
    assert "memorized.txt" in text and "Largest duplicate clusters" in text


def test_report_command(audited, tmp_path, capsys):
    target = tmp_path / "r.html"
    assert cli_main(["report", "--manifests", str(audited), "--output", str(target)]) == 0
    assert target.read_text() == (audited / "report.html").read_text()


def test_report_renders_in_headless_chromium_without_console_errors(audited, tmp_path):
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "install Debian's chromium package (apt-get install chromium)"
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
        page.goto((audited / "report.html").as_uri())
        page.wait_for_load_state("load")
        assert page.title() == "lmc-audit report"
        headings = page.locator("h2").all_inner_texts()
        assert headings == ["Shards", "Bits per byte", "Most suspicious documents", "Largest duplicate clusters"]
        figures = page.locator("figure svg")
        assert figures.count() == 2
        for i in range(2):
            box = figures.nth(i).bounding_box()
            assert box and box["width"] > 200 and box["height"] > 100
        # The memorized document leads the suspicious list, with the signal that flags it.
        suspicious = page.locator("table").nth(2).locator("tbody tr")
        assert "memorized.txt" in suspicious.first.inner_text() and "zlib_ratio" in suspicious.first.inner_text()
        clusters = page.locator("table").nth(3).locator("tbody tr")
        assert clusters.count() == 1 and clusters.first.locator("td").nth(1).inner_text() == "4"  # unseen.txt + 3 copies
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert problems == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
