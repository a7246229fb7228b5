"""Progress lines (transforms/progress.py): each stage's count, rate and time left, per job."""

from __future__ import annotations

import json
import re

from lmc_audit.pipelines.audit import run
from lmc_audit.transforms.progress import Progress


def test_a_line_names_each_stage_with_its_rate_and_the_time_left():
    Progress.reset()
    Progress.expect(10_000)
    Progress.add("reading", items=1, bytes=2_048)
    Progress.add("scoring", items=2, bytes=1_024)
    Progress.add("writing", items=5)
    line = Progress.line()
    assert re.fullmatch(r"\[lmc-audit\] reading 1 docs, 2 KiB \([\d.,]+ KiB/s, ~\d+:\d\d:\d\d left\) \| "
                        r"scoring 2 chunks, 1 KiB \([\d.,]+ KiB/s, ~\d+:\d\d:\d\d left\) \| "
                        r"writing 5 rows \([\d.,]+/s\)", line), line
    assert Progress.line() is None  # nothing moved since
    Progress.reset()
    assert Progress.line() is None


def test_a_second_job_in_one_process_counts_from_zero(tiny_byte_model, tmp_path):
    """DirectRunner's workers count in the launching process: a job run after another shows its own
    documents and bytes, not the sum of both."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 300}) + "\n" for i in range(6)))
    lines = []
    for i in range(2):
        run(["--input", str(corpus), "--output", str(tmp_path / f"out{i}"), "--model", tiny_byte_model,
             "--no-coding", "--quiet"])
        lines.append(Progress.line())
    reading = [re.search(r"reading (\d+) docs, ([\d,]+) KiB", line).groups() for line in lines]
    assert reading[0] == reading[1] and reading[0][0] == "6", lines  # 12 when the counts carried over
