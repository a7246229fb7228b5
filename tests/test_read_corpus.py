"""ReadCorpus: every format and compression, splitting, and bad input."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
from pathlib import Path

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that

from lmc_audit.transforms.reading.listing import detect, list_shards
from lmc_audit.transforms.options import ReadOptions
from lmc_audit.transforms.reading.read_corpus import DEAD_LETTER, ReadCorpus
from lmc_audit.transforms.reading.readers import JsonlReader
from lmc_audit.transforms.records import ShardSpec

COMPRESSORS = {
    "": lambda b: b,
    ".gz": lambda b: gzip.compress(b, mtime=0),
    ".zst": lambda b: zstandard.ZstdCompressor().compress(b),
    ".bz2": bz2.compress,
    ".xz": lzma.compress,
}
DOCS = [{"id": f"d{i}", "text": f"document {i} " + "héllo wörld " * i} for i in range(5)]


def read(patterns, check, **kwargs):
    """Runs ReadCorpus in a TestPipeline; ``check(docs, dead)`` asserts inside ``assert_that``.

    docs are sorted (doc_id, data, position) and dead letters sorted (position, reason).
    """
    shards, errors = list_shards([str(p) for p in patterns], kwargs.pop("fmt", "auto"))
    assert not errors, errors
    with TestPipeline() as p:
        read = p | ReadCorpus(shards, ReadOptions(**kwargs))
        docs = read.main | "Docs" >> beam.Map(lambda d: ("doc", (d.doc_id, d.data, d.position)))
        dead = read[DEAD_LETTER] | "Dead" >> beam.Map(lambda d: ("dead", (d.position, d.reason)))
        both = (docs, dead) | beam.Flatten() | beam.combiners.ToList()

        def matcher(lists):
            (items,) = lists
            check(sorted(v for k, v in items if k == "doc"), sorted(v for k, v in items if k == "dead"))

        assert_that(both, matcher)


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_jsonl_every_compression(tmp_path, suffix):
    raw = b"".join(json.dumps(d).encode() + b"\n" for d in DOCS)
    path = tmp_path / f"docs.jsonl{suffix}"
    path.write_bytes(COMPRESSORS[suffix](raw))
    def check(docs, dead):
        assert dead == []
        assert [(i, data) for i, data, _ in docs] == [(d["id"], d["text"].encode()) for d in DOCS]
        # Line numbers in a compressed file, byte offsets of the lines in an uncompressed one.
        offsets = [sum(len(json.dumps(d).encode()) + 1 for d in DOCS[:i]) for i in range(5)]
        assert [pos for *_, pos in docs] == (offsets if suffix == "" else list(range(5)))

    read([path], check, id_field="id")


@pytest.mark.parametrize("suffix", list(COMPRESSORS))
def test_text_every_compression(tmp_path, suffix):
    data = "plain text, one document per file\n".encode() * 50 + b"\xff\xfe not utf-8 \x80"
    path = tmp_path / f"notes.txt{suffix}"
    path.write_bytes(COMPRESSORS[suffix](data))
    def check(docs, dead):
        assert dead == [] and docs == [(f"{path}#0", data, 0)]

    read([path], check)


def test_parquet_row_groups_and_columns(tmp_path):
    path = tmp_path / "docs.parquet"
    table = pa.table({"content": [f"row {i} text" for i in range(25)], "key": [f"k{i}" for i in range(25)]})
    pq.write_table(table, path, row_group_size=10)  # three row groups, three read tasks
    tasks = __import__("lmc_audit.transforms.reading.readers", fromlist=["ParquetReader"]).ParquetReader(
        text_field="content").plan(list_shards([str(path)])[0][0], 1 << 20)
    assert [(t.row_group, t.first_row) for t in tasks] == [(0, 0), (1, 10), (2, 20)]
    def check_keyed(docs, dead):
        assert dead == []
        assert sorted((i, d) for i, d, _ in docs) == sorted((f"k{i}", f"row {i} text".encode()) for i in range(25))

    def check_default_ids(docs, dead):
        assert {i for i, _, _ in docs} == {f"{path}#{r}" for r in range(25)}

    read([path], check_keyed, text_field="content", id_field="key")
    read([path], check_default_ids, text_field="content")


def test_parquet_missing_text_column_is_dead_letter(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["a", "b"]}), path)
    def check(docs, dead):
        assert docs == []
        assert len(dead) == 1 and "no column 'text'" in dead[0][1] and "--text-field" in dead[0][1]

    read([path], check)


def test_jsonl_byte_ranges_match_whole_file(tmp_path):
    lines = [{"text": f"line {i} " + "x" * (i % 97)} for i in range(4000)]
    path = tmp_path / "big.jsonl"
    path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in lines))
    shard = list_shards([str(path)])[0][0]
    tasks = JsonlReader().plan(shard, 65536)
    assert len(tasks) > 3
    reader = JsonlReader()
    split_docs = [d for t in tasks for d in reader.read(t)]
    whole_docs = list(reader.read(JsonlReader().plan(shard, 1 << 30)[0]))
    assert [(d.doc_id, d.data) for d in split_docs] == [(d.doc_id, d.data) for d in whole_docs]
    # Positions are byte offsets of the lines: the same whatever the split, known without a pre-pass.
    offsets = [0]
    for r in lines[:-1]:
        offsets.append(offsets[-1] + len(json.dumps(r).encode()) + 1)
    assert [d.doc_id for d in split_docs] == [f"{path}#{o}" for o in offsets]
    assert all(t.first_row == 0 for t in tasks)  # planned from the size alone

    def check(docs, dead):  # the same through the pipeline
        assert len(docs) == 4000 and dead == []
        assert sorted(d[2] for d in docs) == offsets

    read([path], check, split_bytes=65536)


def test_bad_jsonl_records_become_dead_letters(tmp_path):
    path = tmp_path / "bad.jsonl"
    lines = [
        b'{"text": "good one"}',
        b'{"text": "broken',                        # malformed JSON
        b'{"body": "no text field"}',               # missing text field
        b'{"text": ""}',                            # empty document
        b'{"text": "bad \xff\xfe utf-8"}',          # invalid UTF-8 inside a JSON line
        b'["not", "an", "object"]',
        b'{"text": 42}',
        b'',                                        # blank line: no document
        b'{"text": "good two"}',
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    at = [sum(len(line) + 1 for line in lines[:i]) for i in range(len(lines))]  # byte offsets: the positions

    def check(docs, dead):
        assert [(d, pos) for _, d, pos in docs] == [(b"good one", 0), (b"good two", at[8])]
        reasons = dict(dead)
        assert sorted(reasons) == at[1:7]
        assert reasons[at[1]].startswith("malformed JSON")
        assert "missing text field 'text'" in reasons[at[2]]
        assert reasons[at[3]] == "empty document"
        assert "invalid UTF-8" in reasons[at[4]]
        assert "not an object" in reasons[at[5]]
        assert "int, not a string" in reasons[at[6]]

    read([path], check)


def test_truncated_gzip_keeps_documents_before_the_break(tmp_path):
    raw = b"".join(json.dumps({"text": f"doc {i} " + "z" * 300}).encode() + b"\n" for i in range(400))
    blob = gzip.compress(raw, mtime=0)
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    def check(docs, dead):
        assert 0 < len(docs) < 400
        assert sorted(pos for *_, pos in docs) == list(range(len(docs)))
        assert len(dead) == 1
        position, reason = dead[0]
        assert position >= len(docs) and "unreadable" in reason and "EOFError" in reason

    read([path], check)


def test_listing_sorted_dirs_globs_and_unreadable_paths(tmp_path):
    for name in ["b.jsonl", "a.txt", "sub/c.txt", ".hidden.txt", "_SUCCESS"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text('{"text": "x"}\n' if name.endswith(".jsonl") else "x")
    shards, errors = list_shards([str(tmp_path), str(tmp_path / "*.txt"), str(tmp_path / "missing.jsonl")])
    assert [Path(s.path).name for s in shards] == ["a.txt", "b.jsonl", "c.txt"]
    assert [s.index for s in shards] == [0, 1, 2]
    assert len(errors) == 1 and "missing.jsonl" in errors[0].reason and errors[0].shard_index == 3


def test_unknown_extension_is_dead_letter_unless_format_given(tmp_path):
    (tmp_path / "data.bin").write_text("hello")
    shards, errors = list_shards([str(tmp_path / "data.bin")])
    assert shards == [] and "--format" in errors[0].reason
    shards, errors = list_shards([str(tmp_path / "data.bin")], "text")
    assert len(shards) == 1 and errors == []


def test_detect_format_and_compression():
    assert detect("s3://b/x/part-1.jsonl.zst") == ("jsonl", "zstd")
    assert detect("/a/b.ndjson.gz") == ("jsonl", "gzip")
    assert detect("/a/b.parquet") == ("parquet", None)
    assert detect("/a/b.txt.xz") == ("text", "xz")
    assert detect("/a/b.weird") == (None, None)


def test_fsspec_memory_url():
    fs = fsspec.filesystem("memory")
    fs.pipe("/corpus/one.jsonl", b'{"text": "in memory"}\n')
    shards, _ = list_shards(["memory://corpus/*.jsonl"])
    docs = list(JsonlReader().read(JsonlReader().plan(shards[0], 1 << 20)[0]))
    assert [(d.doc_id, d.data) for d in docs] == [("memory:///corpus/one.jsonl#0", b"in memory")]


def test_large_text_file_is_read_in_segments_on_chunk_boundaries(tmp_path):
    data = bytes(range(256)) * 1000  # 256,000 bytes
    path = tmp_path / "big.txt"
    path.write_bytes(data)
    shard = ShardSpec(0, str(path), "text", None, len(data))
    from lmc_audit.transforms.reading.readers import TextReader

    segments = list(TextReader(chunk_bytes=2048, segment_bytes=100_000).read(
        __import__("lmc_audit.transforms.records", fromlist=["ReadTask"]).ReadTask(shard)))
    assert [s.offset for s in segments] == [0, 98304, 196608]
    assert b"".join(s.data for s in segments) == data
    assert {s.doc_id for s in segments} == {f"{path}#0"}


def test_read_corpus_validates_arguments():
    with pytest.raises(ValueError, match="text_field"):
        ReadOptions(text_field="")
    with pytest.raises(ValueError, match="split_bytes"):
        ReadOptions(split_bytes=10)
