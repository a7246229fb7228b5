"""Incremental runs and restarts: the manifests equal those of one uninterrupted run over the final input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmc_audit.pipelines.audit import run


def write_shard(corpus: Path, i: int, tag: str = "") -> None:
    lines = [json.dumps({"text": f"shard {i}{tag} record {j}: " + "lorem ipsum dolor sit amet " * (2 + (i + j) % 5)})
             for j in range(6)]
    (corpus / f"part-{i:02d}.jsonl").write_text("\n".join(lines) + "\n")


def options(corpus: Path, out: Path, model: str) -> list[str]:
    return ["--input", str(corpus), "--output", str(out), "--model", model, "--quiet", "--chunk-bytes", "96",
            "--coding-rows", "8", "--verify-fraction", "0"]


def parquet_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.parquet"))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_byte_model):
    """One uninterrupted run over the final corpus: shards 0-5, shard 2 in its changed form."""
    corpus = tmp_path_factory.mktemp("final_corpus")
    for i in range(6):
        write_shard(corpus, i, "-changed" if i == 2 else "")
    out = tmp_path_factory.mktemp("reference_out")
    record = run(options(corpus, out, tiny_byte_model))
    return corpus, parquet_files(out), record


def test_incremental_run_audits_only_new_and_changed_shards(tmp_path, tiny_byte_model):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    for i in range(5):
        write_shard(corpus, i)
    (corpus / "part-09.jsonl").write_text('{"text": "a shard that will be deleted"}\n')
    first = run(options(corpus, out, tiny_byte_model))
    assert first["counts"]["shards"] == 6
    # Later: shard 2 changes, shard 5 arrives, shard 9 is gone.
    time.sleep(0.01)
    write_shard(corpus, 2, "-changed")
    write_shard(corpus, 5)
    (corpus / "part-09.jsonl").unlink()
    with pytest.raises(SystemExit, match="already holds manifests"):
        run(options(corpus, out, tiny_byte_model))
    second = run(options(corpus, out, tiny_byte_model) + ["--incremental"])
    # The same input audited in one go (document ids hold the corpus path, so it is the same folder).
    expected_record = run(options(corpus, tmp_path / "whole", tiny_byte_model))
    expected = parquet_files(tmp_path / "whole")
    assert second["counts"]["shards_kept_from_earlier_runs"] == 4  # 0, 1, 3, 4
    assert second["counts"]["reconciled"] and second["counts"] == {
        **expected_record["counts"], "shards_kept_from_earlier_runs": 4}
    assert parquet_files(out) == expected
    # Other options: nothing can be kept.
    third = run(options(corpus, out, tiny_byte_model) + ["--incremental", "--min-k", "0.3"])
    assert third["counts"]["shards_kept_from_earlier_runs"] == 0


def test_a_killed_job_started_again_gives_the_same_manifests(reference, tmp_path, tiny_byte_model):
    corpus, expected, _ = reference
    out = tmp_path / "out"
    argv = [sys.executable, "-m", "lmc_audit.pipelines.cli", "run", *options(corpus, out, tiny_byte_model)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    commits = out / "_state" / "commits"
    deadline = time.time() + 300
    while not (commits.exists() and any(commits.glob("*.json"))):
        assert proc.poll() is None, "the job ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # A reader can tell: no run record, so the manifests are not complete.
    assert not (out / "run.json").exists()
    done = len(list(commits.glob("*.json")))
    record = run(options(corpus, out, tiny_byte_model) + ["--incremental"])
    assert record["counts"]["shards_kept_from_earlier_runs"] == done
    assert record["counts"]["reconciled"]
    assert parquet_files(out) == expected


def test_placeholders_go_once_a_later_run_brings_rows(tmp_path, tiny_byte_model):
    """A first run with nothing to score leaves empty placeholder files; an incremental run that adds
    documents removes them, so the folder holds exactly what one run over the final input holds."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    (corpus / "part-00.jsonl").write_text('{"text": ""}\n')  # one empty document: a dead letter only
    first = run(options(corpus, out, tiny_byte_model))
    assert first["counts"]["documents"] == 0 and first["counts"]["dead_letters"] == 1
    assert (out / "chunks" / "empty.parquet").exists() and (out / "documents" / "empty.parquet").exists()
    write_shard(corpus, 1)
    second = run(options(corpus, out, tiny_byte_model) + ["--incremental"])
    assert second["counts"]["documents"] == 6 and second["counts"]["reconciled"]
    assert not (out / "chunks" / "empty.parquet").exists() and not (out / "documents" / "empty.parquet").exists()
    once = tmp_path / "once"
    run(options(corpus, once, tiny_byte_model))
    assert parquet_files(out) == parquet_files(once)
