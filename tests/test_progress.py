"""Progress lines (transforms/progress.py): each stage's count, rate and time left, per job."""

from __future__ import annotations

import json
import re

import pytest

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
    assert Progress.counts() == {"reading": (1, 2_048), "scoring": (2, 1_024), "writing": (5, 0)}
    Progress.reset()
    assert Progress.line() is None and Progress.counts() == {}


def test_decoding_estimates_its_time_left_against_its_own_total():
    """The verifier expects the verified fraction of the input: its stage shows the time left against
    that, not against the input's size; a stage with no total shows none."""
    Progress.reset()
    Progress.expect(1_000_000)
    Progress.expect(8_192, stages=("decoding",))
    Progress.add("decoding", bytes=2_048)
    Progress.add("writing", items=3)
    line = Progress.line()
    assert re.fullmatch(r"\[lmc-audit\] writing 3 rows \([\d.,]+/s\) \| "
                        r"decoding 0 chunks, 2 KiB \([\d.,]+ KiB/s, ~\d+:\d\d:\d\d left\)", line), line
    Progress.add("decoding", items=4, bytes=6_144)
    assert "left" not in Progress.line()  # the total is reached
    with pytest.raises(ValueError, match="unknown progress stage"):
        Progress.expect(1, stages=("verifying",))
    Progress.reset()


def test_a_second_job_in_one_process_counts_from_zero(tiny_byte_model, tmp_path):
    """DirectRunner's workers count in the launching process: a job run after another shows its own
    documents and bytes, not the sum of both."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 300}) + "\n" for i in range(6)))
    counts = []
    for i in range(2):
        run(["--input", str(corpus), "--output", str(tmp_path / f"out{i}"), "--model", tiny_byte_model,
             "--no-coding", "--quiet"])
        counts.append(Progress.counts())
    text_bytes = sum(len(json.loads(line)["text"].encode()) for line in (corpus / "a.jsonl").open())
    assert counts[0]["reading"] == counts[1]["reading"] == (6, text_bytes), counts  # (12, ...) when carried over
    assert counts[0]["scoring"] == counts[1]["scoring"], counts
