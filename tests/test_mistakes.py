"""Nothing lost, nothing counted twice, every mistake caught before the work: one test per case a new user hit."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from lmc_audit.pipelines.audit import fail_in_one_line, run
from lmc_audit.pipelines.decode import run as decode
from lmc_audit.transforms.manifests.files import OutputWriteError, write_bytes

from conftest import write_jsonl

FAST = ["--no-dedup", "--no-report", "--quiet", "--no-coding", "--chunk-bytes", "256"]


def _rows(out: Path, manifest: str) -> list[dict]:
    return ds.dataset(out / manifest, format="parquet").to_table().to_pylist()


def _corpus(root: Path, n: int = 3) -> Path:
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(n):
        write_jsonl(corpus / f"s{i}.jsonl", [{"text": f"document {i} line {j} " * 4} for j in range(2)])
    return corpus


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("change", ["renamed", "glob_typo"])
def test_incremental_deletes_nothing_without_proof(tmp_path, tiny_byte_model, change):
    corpus = _corpus(tmp_path)
    out = tmp_path / "out"
    run(["--input", str(corpus), "--output", str(out), "--model", tiny_byte_model, "--incremental", *FAST])
    before = _files(out)
    if change == "renamed":
        corpus.rename(tmp_path / "corpus-renamed")
        argv = ["--input", str(corpus)]
    else:
        argv = ["--input", str(corpus / "*.jsnl")]
    with pytest.raises(SystemExit, match="nothing was deleted"):
        run([*argv, "--output", str(out), "--model", tiny_byte_model, "--incremental", *FAST])
    assert _files(out) == before


def test_incremental_removes_a_few_shards_and_more_only_when_allowed(tmp_path, tiny_byte_model):
    corpus = _corpus(tmp_path, n=3)
    out = tmp_path / "out"
    base = ["--output", str(out), "--model", tiny_byte_model, "--incremental", *FAST]
    run(["--input", str(corpus), *base])
    (corpus / "s2.jsonl").unlink()
    (corpus / "s1.jsonl").unlink()  # two of three: over the default half
    with pytest.raises(SystemExit, match="--allow-removal"):
        run(["--input", str(corpus), *base])
    assert len(_rows(out, "shards")) == 3  # nothing deleted
    record = run(["--input", str(corpus), *base, "--allow-removal"])
    assert record["counts"]["shards"] == 1
    assert {Path(r["shard"]).name for r in _rows(out, "shards")} == {"s0.jsonl"}


def test_options_fingerprint_holds_versions_and_resolved_device(tmp_path):
    from lmc_audit.pipelines.audit import build_parser, options_fingerprint

    args = build_parser().parse_args(["--output", str(tmp_path), "--device", "auto"])
    cpu = build_parser().parse_args(["--output", str(tmp_path), "--device", "cpu"])
    assert options_fingerprint(args, "m") == options_fingerprint(cpu, "m")  # auto is cpu on this machine
    bf16 = build_parser().parse_args(["--output", str(tmp_path), "--dtype", "bfloat16"])
    assert options_fingerprint(bf16, "m") != options_fingerprint(args, "m")


def test_same_id_in_several_documents_stays_distinct(tmp_path, tiny_byte_model):
    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"id": "dup", "text": "first copy of the id " * 5},
                                     {"id": "dup", "text": "second, other text " * 5}])
    write_jsonl(corpus / "b.jsonl", [{"id": "dup", "text": "third, in another shard " * 5}])
    out = tmp_path / "out"
    run(["--input", str(corpus), "--output", str(out), "--model", tiny_byte_model, "--id-field", "id",
         "--chunk-bytes", "64", "--verify-fraction", "0", "--no-dedup", "--no-report", "--quiet"])
    chunks = _rows(out, "chunks")
    keys = [(c["shard"], c["position"], c["chunk_index"]) for c in chunks]
    assert len(keys) == len(set(keys))
    docs = _rows(out, "documents")
    assert len({(d["shard"], d["position"]) for d in docs}) == 3
    target = tmp_path / "decoded"
    assert decode(["--payloads", str(out / "payloads"), "--output", str(target)]) == 0
    written = sorted(p.read_bytes() for p in target.iterdir())
    assert len(written) == 3
    assert written == sorted([b"first copy of the id " * 5, b"second, other text " * 5,
                              b"third, in another shard " * 5])


def test_misspelled_flag_fails_with_the_nearest_option(tmp_path):
    with pytest.raises(SystemExit, match=r"--no-codng.*did you mean --no-coding\?"):
        run(["--sample", "--output", str(tmp_path / "o"), "--no-codng"])
    assert not (tmp_path / "o").exists()


def test_beam_flags_still_pass(tmp_path):
    from lmc_audit.pipelines.audit import build_parser, check_beam_flags

    check_beam_flags(build_parser(), ["--runner", "DirectRunner", "--direct_num_workers", "2",
                                      "--experiments=no_use_multiple_sdk_containers"])


def test_wrong_format_and_text_field_fail_before_the_work(tmp_path, tiny_byte_model):
    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"body": "some text"}])
    with pytest.raises(SystemExit, match=r"--text-field 'text'.*fields body"):
        run(["--input", str(corpus), "--output", str(tmp_path / "o1"), "--model", tiny_byte_model, *FAST])
    with pytest.raises(SystemExit, match="--format parquet"):
        run(["--input", str(corpus), "--output", str(tmp_path / "o2"), "--model", tiny_byte_model,
             "--format", "parquet", "--text-field", "body", *FAST])
    assert not (tmp_path / "o1" / "chunks").exists()


def test_missing_id_field_fails_with_what_records_hold(tmp_path, tiny_byte_model):
    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": "some text", "key": 1}])
    with pytest.raises(SystemExit, match=r"--id-field 'doc'.*fields text, key"):
        run(["--input", str(corpus), "--output", str(tmp_path / "o"), "--model", tiny_byte_model,
             "--id-field", "doc", *FAST])


def test_job_with_no_document_exits_non_zero(tmp_path, tiny_byte_model):
    from lmc_audit.pipelines.cli import main

    corpus = tmp_path / "c"
    corpus.mkdir()
    write_jsonl(corpus / "a.jsonl", [{"text": ""}])  # readable, but an empty document: a dead letter
    code = main(["run", "--input", str(corpus), "--output", str(tmp_path / "o"), "--model", tiny_byte_model,
                 *FAST])
    assert code == 1


@pytest.mark.parametrize("output", ["/proc/lmc-audit-cannot-write", "file-instead-of-folder"])
def test_unwritable_output_fails_before_the_work(tmp_path, output):
    if output == "file-instead-of-folder":
        (tmp_path / "f").write_text("x")
        output = str(tmp_path / "f" / "out")
    with pytest.raises(SystemExit, match="cannot write to --output"):
        run(["--sample", "--output", output, "--no-coding"])


def _full_disk_tmp(folder: Path, name: str) -> Path:
    """A file that behaves as on a full disk: its temporary is a link to /dev/full (ENOSPC on write)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.tmp"
    os.symlink("/dev/full", tmp)
    return tmp


def test_write_on_a_full_disk_raises_one_clear_error_and_leaves_no_part(tmp_path):
    tmp = _full_disk_tmp(tmp_path / "chunks", "part-x.parquet")
    with pytest.raises(OutputWriteError, match=r"part-x\.parquet: OSError: .*No space left on device"):
        write_bytes(str(tmp_path), "chunks", "part-x.parquet", b"data" * 1000)
    assert not os.path.lexists(tmp) and not (tmp_path / "chunks" / "part-x.parquet").exists()


def test_late_write_failure_ends_in_one_line(tmp_path, tiny_byte_model, capsys):
    corpus = _corpus(tmp_path, n=1)
    out = tmp_path / "out"
    tmp = _full_disk_tmp(out, "run.json")
    with pytest.raises(SystemExit) as raised:
        run(["--input", str(corpus), "--output", str(out), "--model", tiny_byte_model, *FAST])
    assert raised.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lmc-audit: lmc-audit cannot write ") and "run.json" in err[-1]
    assert "No space left on device" in err[-1] and "traceback:" in err[-1]
    assert not os.path.lexists(tmp) and not (out / "run.json").exists()


def test_fail_in_one_line_leaves_other_errors_alone():
    fail_in_one_line(ValueError("something else"), verbose=False)  # returns: the caller re-raises


def test_output_inside_the_input_is_left_out(tmp_path, tiny_byte_model):
    corpus = _corpus(tmp_path, n=2)
    out = corpus / "audit"
    base = ["--input", str(corpus), "--output", str(out), "--model", tiny_byte_model, "--incremental", *FAST]
    first = run(base)
    second = run(base)
    assert second["counts"]["dead_letters"] == first["counts"]["dead_letters"] == 0
    assert second["counts"]["shards"] == 2


def test_one_file_named_two_ways_is_read_once(tmp_path, tiny_byte_model):
    corpus = _corpus(tmp_path, n=1)
    record = run(["--input", str(corpus / "s0.jsonl"), f"{corpus}//s0.jsonl", f"{corpus}/./s0.jsonl",
                  "--output", str(tmp_path / "o"), "--model", tiny_byte_model, *FAST])
    assert record["counts"]["shards"] == 1 and record["counts"]["documents"] == 2


def test_zero_byte_files_are_accounted_for(tmp_path, tiny_byte_model):
    corpus = _corpus(tmp_path, n=1)
    (corpus / "empty.jsonl").write_bytes(b"")
    (corpus / "empty.jsonl.gz").write_bytes(b"")
    (corpus / "blank.jsonl").write_bytes(b"\n\n")
    (corpus / "empty_gz_content.jsonl.gz").write_bytes(gzip.compress(b""))
    out = tmp_path / "o"
    record = run(["--input", str(corpus), "--output", str(out), "--model", tiny_byte_model, *FAST])
    dead = {Path(r["shard"]).name: r["reason"] for r in _rows(out, "dead_letter")}
    assert set(dead) == {"empty.jsonl", "empty.jsonl.gz", "blank.jsonl", "empty_gz_content.jsonl.gz"}
    assert all("empty file" in r or "no records" in r or "unreadable" in r for r in dead.values())
    assert record["counts"]["reconciled"]
    # The summary, run.json and shards/ agree on the number of shards: five files.
    assert record["counts"]["shards"] == len(_rows(out, "shards")) == 5
    from lmc_audit.pipelines.summary import print_summary

    print_summary(str(out))


def test_summary_shard_count_matches_run_json_and_shards_manifest(tmp_path, tiny_byte_model, capsys):
    corpus = _corpus(tmp_path, n=2)
    (corpus / "bad.xyz").write_text("format unknown")
    out = tmp_path / "o"
    record = run(["--input", str(corpus), str(tmp_path / "missing" / "*.jsonl"), "--output", str(out),
                  "--model", tiny_byte_model, "--no-dedup", "--no-report", "--no-coding", "--chunk-bytes", "256"])
    rows = _rows(out, "shards")
    assert record["counts"]["shards"] == len(rows) == 4
    shown = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("shards")]
    assert shown and shown[0].split()[1] == "4"


def test_report_escapes_control_characters(tmp_path, tiny_byte_model):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "nul.txt").write_bytes(b"text with a NUL \x00 and a bell \x07 inside " * 4)
    out = tmp_path / "o"
    run(["--input", str(corpus), "--output", str(out), "--model", tiny_byte_model, "--no-coding", "--quiet",
         "--flag-bpb-below", "100"])
    page = (out / "report.html").read_bytes()
    assert b"\x00" not in page and b"\x07" not in page
    assert b"\\x00" in page


def test_null_text_field_says_null(tmp_path, tiny_byte_model):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.jsonl").write_text(json.dumps({"text": "fine text here"}) + "\n" + json.dumps({"text": None})
                                    + "\n" + json.dumps({"other": 1}) + "\n")
    out = tmp_path / "o"
    run(["--input", str(corpus), "--output", str(out), "--model", tiny_byte_model, *FAST])
    reasons = sorted(r["reason"] for r in _rows(out, "dead_letter"))
    assert reasons == ["missing text field 'text'", "text field 'text' is null"]


def test_model_cache_is_atomic(tmp_path, tiny_byte_model):
    """A model given as a URL is fetched into the cache whole or not at all (staging folder renamed)."""
    import fsspec

    from lmc_audit.transforms.scoring.model_loading import resolve_model_dir

    mem = fsspec.filesystem("memory")
    for p in Path(tiny_byte_model).iterdir():
        mem.pipe_file(f"/models/tiny/{p.name}", p.read_bytes())
    cache = tmp_path / "cache"
    local = Path(resolve_model_dir("memory://models/tiny", cache_dir=str(cache)))
    assert (local / ".complete").exists() and (local / "config.json").exists()
    assert resolve_model_dir("memory://models/tiny", cache_dir=str(cache)) == str(local)
    # A fetch that fails midway leaves nothing that looks complete, and no staging folder.
    mem.pipe_file("/models/broken/config.json", b"{}")
    mem.pipe_file("/models/broken/weights.safetensors", b"x")

    class Boom(RuntimeError):
        pass

    original = type(mem).get

    def failing_get(self, *args, **kwargs):
        raise Boom("connection lost")

    type(mem).get = failing_get
    try:
        with pytest.raises(Boom):
            resolve_model_dir("memory://models/broken", cache_dir=str(cache))
    finally:
        type(mem).get = original
    models = cache / "models"
    assert [p.name for p in models.iterdir() if p.is_dir()] == [local.name]


def test_repeated_input_flags_add_up():
    """`--input a --input b` audits both (argparse's default would keep only the last, silently)."""
    from lmc_audit.pipelines.audit import build_parser

    args, _ = build_parser().parse_known_args(["--input", "a", "b", "--input", "c", "--output", "o"])
    assert args.input == ["a", "b", "c"]
