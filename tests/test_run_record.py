"""The run record is built inside the job from PCollections: counts of what was read and verified."""

from __future__ import annotations

import json

import apache_beam as beam
import pyarrow.dataset as ds
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from lmc_audit.pipelines import audit, cli, run_record
from lmc_audit.pipelines.run_record import SummarizeVerification
from lmc_audit.transforms.coding.decoding import PayloadDecoder, chunk_name


def test_verification_summary_counts_and_names_failures_in_order():
    results = [(f"chunk {i}", i % 7 != 3) for i in range(50)]
    failed = sorted(name for name, ok in results if not ok)
    with TestPipeline() as p:
        summary = (p | beam.Create(results, reshuffle=True)
                   | beam.CombineGlobally(SummarizeVerification()))
        assert_that(summary, equal_to([{"verified": 50 - len(failed), "verification_failed": len(failed),
                                        "failed_chunks": failed}]))


def test_verification_summary_keeps_the_first_names_only(monkeypatch):
    monkeypatch.setattr(run_record, "MAX_FAILED_NAMES", 3)
    fn = SummarizeVerification()
    accs = [fn.create_accumulator(), fn.create_accumulator()]
    for i, name in enumerate(["e", "a", "d", "b", "c"]):
        accs[i % 2] = fn.add_input(accs[i % 2], (name, False))
    out = fn.extract_output(fn.merge_accumulators(accs))
    assert out == {"verified": 0, "verification_failed": 5, "failed_chunks": ["a", "b", "c"]}


def test_a_payload_that_does_not_decode_fails_the_job_after_the_record_is_written(
        tmp_path, tiny_byte_model, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("a text that is coded and then decoded wrongly. " * 4)
    # A decoder that gets every chunk wrong (the real one is tested bit-exact elsewhere).
    real = PayloadDecoder._to_bytes
    monkeypatch.setattr(PayloadDecoder, "_to_bytes", lambda self, ids: real(self, ids)[::-1] + b"!")
    job_failed = []
    read_after_failure = audit._record_if_written
    monkeypatch.setattr(audit, "_record_if_written", lambda out: job_failed.append(out) or read_after_failure(out))
    out = tmp_path / "out"
    code = cli.main(["run", "--input", str(corpus), "--output", str(out), "--model", tiny_byte_model, "--quiet",
                     "--chunk-bytes", "64", "--coding-rows", "8", "--verify-fraction", "1"])
    assert code == 1 and job_failed == [str(out)]  # the job itself failed, and the command exits 1
    record = json.loads((out / "run.json").read_text())
    chunks = ds.dataset(out / "chunks", format="parquet").to_table().to_pylist()
    assert record["coding"]["verified"] == 0
    assert record["coding"]["verification_failed"] == record["counts"]["chunks"] == len(chunks) > 1
    assert record["coding"]["failed_chunks"] == sorted(chunk_name(c["doc_id"], c["chunk_index"]) for c in chunks)
    assert (out / "report.html").exists()
    assert "payloads did not decode to their chunk" in capsys.readouterr().err


def test_any_other_job_failure_is_raised(tmp_path, tiny_byte_model, monkeypatch):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("text " * 40)

    def broken(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(run_record, "write_record", broken)
    with pytest.raises(Exception, match="disk full"):
        audit.run(["--input", str(corpus), "--output", str(tmp_path / "out"), "--model", tiny_byte_model,
                   "--quiet", "--no-coding"])
