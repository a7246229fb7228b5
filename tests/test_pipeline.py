"""The audit job end to end on DirectRunner: manifests, totals, bad input, options."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.dataset as ds
import pytest

from lmc_audit.pipelines.audit import bundled_sample_dir, run
from lmc_audit.pipelines.cli import main as cli_main
from lmc_audit.transforms.manifests import schemas


def manifest(out: Path, name: str) -> list[dict]:
    return ds.dataset(out / name, format="parquet").to_table().to_pylist()


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, tiny_byte_model):
    out = tmp_path_factory.mktemp("sample_run")
    record = run(["--sample", "--output", str(out), "--model", tiny_byte_model, "--quiet",
                  "--max-batch-rows", "8", "--no-coding"])
    return out, record


def test_sample_corpus_end_to_end(sample_run):
    out, record = sample_run
    chunks, docs, shards = manifest(out, "chunks"), manifest(out, "documents"), manifest(out, "shards")
    assert record["counts"]["reconciled"] and record["counts"]["dead_letters"] == 0
    assert record["counts"]["documents"] == len(docs) == 27  # 9 text files + 18 JSONL lines
    assert len(shards) == 10
    # Every byte of the sample is in exactly one chunk.
    sample_bytes = sum(p.stat().st_size for p in Path(bundled_sample_dir()).glob("*.txt"))
    with gzip.open(Path(bundled_sample_dir()) / "docs.jsonl.gz") as f:
        sample_bytes += sum(len(json.loads(line)["text"].encode()) for line in f)
    assert sum(c["bytes"] for c in chunks) == sum(d["bytes"] for d in docs) == record["counts"]["bytes"] == sample_bytes
    assert all(c["bits"] > 0 and not c["flags"] for c in chunks)
    # Totals agree across levels: chunks -> documents -> shards.
    by_doc: dict[str, list[dict]] = {}
    for c in chunks:
        by_doc.setdefault(c["doc_id"], []).append(c)
    for d in docs:
        mine = sorted(by_doc[d["doc_id"]], key=lambda c: c["chunk_index"])
        assert [c["chunk_index"] for c in mine] == list(range(d["chunks"]))
        assert d["bits"] == pytest.approx(sum(c["bits"] for c in mine), rel=1e-12)
        assert d["bpb"] == pytest.approx(d["bits"] / d["bytes"], rel=1e-12)
        assert d["zlib_bpb"] == pytest.approx(sum(c["zlib_bits"] for c in mine) / d["bytes"])
    for s in shards:
        mine = [d for d in docs if d["shard"] == s["shard"]]
        assert s["documents"] == len(mine) and s["bytes"] == sum(d["bytes"] for d in mine)
        assert s["bits"] == pytest.approx(sum(d["bits"] for d in mine), rel=1e-12)
        assert s["min_doc_bpb"] <= s["median_doc_bpb"] <= s["max_doc_bpb"]
    total_bits = sum(c["bits"] for c in chunks)
    assert record["bpb"]["model"] == pytest.approx(total_bits / sample_bytes, rel=1e-9)
    assert 0 <= record["job_metrics"]["padding_fraction"] < 0.05
    # Time inside the model's steps, from RunInference's latency metric (and verification's own).
    jm = record["job_metrics"]
    assert 0 < jm["model_scoring_seconds"] <= jm["model_seconds"] < record["wall_seconds"] * 4
    assert record["model"]["fingerprint"] and len(record["model"]["fingerprint"]) == 64


def test_manifests_read_by_duckdb_and_polars(sample_run):
    out, record = sample_run
    n_chunks = duckdb.sql(f"select count(*) from '{out}/chunks/*.parquet'").fetchall()[0][0]
    assert n_chunks == record["counts"]["chunks"]
    joined = duckdb.sql(f"""
        select d.doc_id, d.bits, sum(c.bits) as chunk_bits
        from '{out}/documents/*.parquet' d join '{out}/chunks/*.parquet' c using (doc_id, shard)
        group by d.doc_id, d.bits""").fetchall()
    assert len(joined) == record["counts"]["documents"]
    assert all(math.isclose(bits, chunk_bits, rel_tol=1e-9) for _, bits, chunk_bits in joined)
    docs = pl.read_parquet(f"{out}/documents/*.parquet")
    assert docs.height == record["counts"]["documents"]
    assert docs.schema["bpb"] == pl.Float64 and docs["content_hash"].str.len_chars().min() == 64
    for name, schema in schemas.MANIFESTS.items():
        if name != "payloads":  # this run has coding off
            assert ds.dataset(out / name, format="parquet").schema.equals(schema), name
    assert not (out / "payloads").exists() and record["coding"] is None


def test_manifests_are_byte_identical_whatever_the_batching(sample_run, tmp_path, tiny_byte_model):
    out, _ = sample_run
    other = tmp_path / "other"
    run(["--sample", "--output", str(other), "--model", tiny_byte_model, "--quiet",
         "--max-batch-rows", "64", "--max-batch-tokens", "65536", "--no-coding"])
    files = sorted(p.relative_to(out) for p in out.rglob("*.parquet"))
    assert files == sorted(p.relative_to(other) for p in other.rglob("*.parquet"))
    for f in files:
        assert (out / f).read_bytes() == (other / f).read_bytes(), f


def test_bad_input_is_dead_lettered_and_counts_reconcile(tmp_path, tiny_byte_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "ok.txt").write_bytes(b"plain text with invalid utf-8 \xff\xfe is still scored")
    (corpus / "empty.txt").write_bytes(b"")
    (corpus / "mixed.jsonl").write_bytes(b"\n".join([
        b'{"text": "fine"}', b'{"text": "broken', b'{"body": "no text"}', b'{"text": ""}',
        b'{"text": "bad \xff utf-8"}', b'{"text": "also fine"}']) + b"\n")
    blob = gzip.compress(b"".join(json.dumps({"text": f"doc {i} " + "q" * 400}).encode() + b"\n"
                                  for i in range(200)), mtime=0)
    (corpus / "cut.jsonl.gz").write_bytes(blob[: len(blob) // 2])
    (corpus / "data.weird").write_text("unknown format")
    out = tmp_path / "out"
    record = run(["--input", str(corpus), str(tmp_path / "does-not-exist"), "--output", str(out),
                  "--model", tiny_byte_model, "--quiet", "--no-coding"])
    counts = record["counts"]
    dead = manifest(out, "dead_letter")
    docs = manifest(out, "documents")
    assert counts["reconciled"]
    assert counts["input_records"] == counts["documents"] + counts["dead_letters"] == len(docs) + len(dead)
    reasons = sorted(d["reason"].split(":")[0] for d in dead)
    assert "malformed JSON" in reasons and "empty document" in reasons and "invalid UTF-8 in JSON line" in reasons
    assert "missing text field 'text'" in reasons and "cannot list input" in reasons
    assert any(r.startswith("cannot tell the format") for r in reasons)
    assert any(r.startswith("shard unreadable from line") for r in reasons)  # the truncated .gz
    kept = [d for d in docs if d["shard"].endswith("cut.jsonl.gz")]
    assert 0 < len(kept) < 200
    ok = [d for d in docs if d["shard"].endswith("ok.txt")]
    assert len(ok) == 1 and ok[0]["bits"] > 0 and ok[0]["flagged_chunks"] == 0


def test_tokenizer_model_through_the_whole_pipeline(tmp_path, tiny_bpe_model):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text("\n".join(json.dumps({"text": t, "id": f"id-{i}"}) for i, t in enumerate([
        "def add(a, b):\n    return a + b\n" * 40, "The quick brown fox. " * 200, "ünïcödé text ✓"])) + "\n")
    (corpus / "bytes.txt").write_bytes(b"valid start \xff\xfe then invalid")
    out = tmp_path / "out"
    record = run(["--input", str(corpus), "--output", str(out), "--model", tiny_bpe_model, "--id-field", "id",
                  "--chunk-bytes", "512", "--quiet", "--no-coding"])
    chunks, docs = manifest(out, "chunks"), manifest(out, "documents")
    assert record["counts"]["reconciled"] and record["counts"]["documents"] == 4
    assert {d["doc_id"] for d in docs} >= {"id-0", "id-1", "id-2"}
    scored = [c for c in chunks if c["bits"] is not None]
    assert scored and all(c["tokens"] < c["bytes"] for c in scored if c["bytes"] > 100)
    flagged = [c for c in chunks if c["flags"]]
    assert len(flagged) == 1 and flagged[0]["flags"][0].startswith("invalid_utf8") and flagged[0]["bits"] is None
    bad_doc = next(d for d in docs if d["doc_id"].endswith("bytes.txt#0"))
    assert bad_doc["flagged_chunks"] == 1 and bad_doc["bits"] is None and bad_doc["bpb"] is None
    assert record["counts"]["flagged_chunks"] == 1


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/model"], "does not exist"),
    (["--chunk-bytes", "0"], "--chunk-bytes must be at least 1"),
    (["--max-batch-rows", "0"], "--max-batch-rows must be at least 1"),
    (["--part-bytes", "1000"], "part_bytes must be at least 64 KiB"),
    (["--dedup-rounds", "-1"], "component_rounds must be at least 0"),
])
def test_wrong_options_fail_at_once(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        run(["--sample", "--output", str(tmp_path / "o"), *argv])
    assert not (tmp_path / "o" / "run.json").exists()


def test_unknown_format_and_existing_output(tmp_path, capsys, sample_run, tiny_byte_model):
    with pytest.raises(SystemExit) as exc:
        run(["--sample", "--output", str(tmp_path / "o"), "--format", "csv"])
    assert exc.value.code == 2 and "invalid choice: 'csv'" in capsys.readouterr().err
    out, _ = sample_run
    with pytest.raises(SystemExit, match="--overwrite"):
        run(["--sample", "--output", str(out), "--model", tiny_byte_model])


def test_cli_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        cli_main(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ["--input", "--output", "--model", "--chunk-bytes", "--format", "--text-field", "--id-field",
                 "--device", "--dtype", "--trust-remote-code", "--max-batch-tokens", "--sample", "--overwrite"]:
        assert flag in text
    assert cli_main([]) == 2 and cli_main(["bogus"]) == 2


def test_two_worker_processes_write_identical_manifests(tmp_path, tiny_byte_model):
    """DirectRunner multi-processing: the same manifests, payloads included, as one worker."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"part-{i}.jsonl").write_text("\n".join(
            json.dumps({"text": f"shard {i} line {j} " * (5 + j % 7)}) for j in range(12)) + "\n")
    outs = []
    for extra in ([], ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]):
        out = tmp_path / f"out{len(outs)}"
        run(["--input", str(corpus), "--output", str(out), "--model", tiny_byte_model, "--quiet",
             "--chunk-bytes", "128", "--coding-rows", "8", "--verify-fraction", "0", *extra])
        outs.append(out)
    files = sorted(p.relative_to(outs[0]) for p in outs[0].rglob("*.parquet"))
    assert any(f.parts[0] == "payloads" for f in files)
    assert files == sorted(p.relative_to(outs[1]) for p in outs[1].rglob("*.parquet"))
    for f in files:
        assert (outs[0] / f).read_bytes() == (outs[1] / f).read_bytes(), f


def test_one_frozen_options_object_with_a_part_per_stage(tmp_path):
    """The job's graph is built from one AuditOptions, checked when built and frozen; the reference model
    shares the scoring model's settings but its spec."""
    import dataclasses

    from lmc_audit.pipelines.audit import audit_options, build_parser

    args = build_parser().parse_args(["--input", "x", "--output", str(tmp_path / "o"), "--chunk-bytes", "512",
                                      "--reference-model", "ref", "--device", "cpu", "--no-dedup",
                                      "--scoring-accelerator", "type:nvidia-l4;count:1;install-nvidia-driver"])
    o = audit_options(args, "ab" * 32)
    assert o.read.chunk_bytes == 512 and o.model.device == "cpu" and o.dedup is None
    assert o.reference == dataclasses.replace(o.model, spec="ref") and o.coding.fingerprint == "ab" * 32
    assert o.model.accelerator.startswith("type:nvidia-l4") and o.output.part_bytes == 16 << 20
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.model.device = "cuda"
    with pytest.raises(ValueError, match="part_bytes"):
        audit_options(build_parser().parse_args(["--input", "x", "--output", "o", "--part-bytes", "1"]), "0" * 64)


def test_local_jobs_run_on_the_fn_api_runner_never_prism():
    """Beam's DirectRunner would first try (and, online, download) Prism; a local job runs on the
    FnApiRunner the tests run on; other runners are left to Beam."""
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner.fn_runner import FnApiRunner

    from lmc_audit.pipelines.audit import local_runner

    for argv in ([], ["--runner=DirectRunner"], ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]):
        runner = local_runner(PipelineOptions(argv))
        assert isinstance(runner, FnApiRunner), argv  # multi-process workers: see the test above
    for name in ("PrismRunner", "DataflowRunner", "BundleBasedDirectRunner"):
        assert local_runner(PipelineOptions([f"--runner={name}"])) is None
