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
    assert text.count("<svg") == 2 and text.count("<script") == 1 and "<script src" not in text
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
        # The shard filter hides rows whose name does not match, and says how many are shown.
        shard_rows = page.locator("#shards tbody tr")
        assert shard_rows.count() == 3
        page.fill("#shard-filter", "copies")
        assert page.locator("#shards tbody tr:visible").count() == 1
        assert page.locator("#shard-count").inner_text() == "1 of 3 shards"
        page.fill("#shard-filter", "")
        page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
        browser.close()
    assert problems == []
    assert (tmp_path / "report.png").stat().st_size > 10_000


def _synthetic_manifests(root: Path, shards: int, docs: int, cluster: int) -> list[dict]:
    """Manifests as a large run writes them (schemas.py), made directly: ``docs`` documents over ``shards``
    shards and one duplicate cluster of ``cluster`` members. Returns the document rows."""
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmc_audit.transforms.manifests import schemas

    def table(schema: pa.Schema, rows: list[dict]) -> pa.Table:
        filler = {pa.string(): "", pa.int64(): 0, pa.int32(): 0, pa.float64(): 0.0, pa.bool_(): False,
                  pa.list_(pa.string()): []}
        return pa.Table.from_pylist([{f.name: r.get(f.name, filler[f.type]) for f in schema} for r in rows], schema)

    rng = random.Random(0)
    documents = []
    for i in range(docs):
        model = rng.uniform(0.5, 3.0)
        zlib = rng.uniform(2.0, 4.0)
        documents.append({"doc_id": f"d{i}", "shard": f"s{i % shards:05d}.jsonl", "position": i // shards,
                          "bpb": model, "zlib_bpb": zlib, "zlib_ratio": model / zlib, "min_k": rng.random(),
                          "min_k_pp": rng.random(), "snippet": f"snippet {i}",
                          "memorization_flags": ["zlib_ratio"] if model / zlib < 0.2 else []})
    for name, schema, rows, parts in (
            ("documents", schemas.DOCUMENTS, documents, 7),
            ("shards", schemas.SHARDS, [{"shard": f"s{i:05d}.jsonl", "documents": docs // shards}
                                        for i in range(shards)], 1),
            ("duplicates", schemas.DUPLICATES, [{"doc_id": f"d{i}", "shard": "s00000.jsonl", "position": i,
                                                  "cluster_id": 5, "cluster_size": cluster, "keep": i == 0,
                                                  "kept_doc_id": "d0", "reason": "exact", "matched_doc_id": "d0",
                                                  "jaccard": 1.0, "rule": "exact"} for i in range(cluster)], 2)):
        (root / name).mkdir(parents=True)
        step = -(-len(rows) // parts)
        for p in range(parts):
            pq.write_table(table(schema, rows[p * step:(p + 1) * step]), root / name / f"part-{p:05d}.parquet")
    return documents


def test_report_of_a_large_run_is_reduced_in_batches_and_independent_of_the_batch_size(tmp_path, monkeypatch):
    """10,000 shards and 60,000 documents: the top documents are those of a full sort, the histogram counts
    every document, the scatter shows a bounded sample, a cluster lists its first members and counts the
    rest, and the bytes do not depend on how the manifests are batched."""
    from lmc_audit.pipelines import report

    documents = _synthetic_manifests(tmp_path, shards=10_000, docs=60_000, cluster=500)
    monkeypatch.setattr(report, "BATCH_ROWS", 4_096)
    summary = report.summarize_documents(str(tmp_path))
    assert summary.documents == 60_000 and summary.flagged == sum(bool(d["memorization_flags"]) for d in documents)
    expected = sorted(documents, key=report._suspicion_order)[:report.TOP_DOCUMENTS]
    assert [d["doc_id"] for d in summary.top] == [d["doc_id"] for d in expected]
    _, model, zlib = summary.histograms()
    assert model.sum() == zlib.sum() == 60_000 and len(model) <= 50
    assert len(summary.sample()) == report.SCATTER_POINTS
    text = report.render(str(tmp_path), {})
    assert text.count("<tr><td>s0") == 10_000 and ">10000 shards<" in text
    assert f"… and {500 - 1 - report.CLUSTER_MEMBERS} more" in text
    assert f"A sample of {report.SCATTER_POINTS} of 60000 documents" in text
    monkeypatch.setattr(report, "BATCH_ROWS", 50_000)
    assert report.render(str(tmp_path), {}) == text
