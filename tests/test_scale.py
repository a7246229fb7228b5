"""Bounded memory where the data is large: a document's facts from its pieces, manifests streamed in
row groups, bounded signal summaries, and dedup sketches of documents above the shingle cap."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
import tracemalloc
import unicodedata

import numpy as np
import pyarrow.parquet as pq
import pytest

from lmc_audit.transforms.dedup import sketches as dedup
from lmc_audit.transforms.manifests import schemas
from lmc_audit.transforms.documents.document_facts import DocumentDescriber
from lmc_audit.transforms.manifests.files import ROW_GROUP_ROWS, write_rows

TEXTS = ["Héllo Wörld  ﬁne\n\tTEXT " * 300 + "end", "a", "two words", "ＨＥＬＬＯ café  x" * 1000, "  ",
         "é" * 5000, "no-space-at-all-" * 200,
         "".join(f"Line {i}: the quick brown fox, version 3.{i}, jumps over {i * 7} lazy dogs!\n" + "\n \n" * (i % 3)
                 for i in range(400)) + "last line without a break but with enough words to count"]


@pytest.mark.parametrize("normalize", [(), ("numbers", "punctuation")])
@pytest.mark.parametrize("text", TEXTS)
def test_facts_from_pieces_equal_facts_of_the_whole_text(text, normalize):
    """However the reader cuts a document (even inside a UTF-8 character, a word or a line break), its
    hashes and sketch (n-grams, signature, line hashes) are those of the whole text."""
    opts = dedup.DedupOptions(normalize=normalize)
    hasher = dedup.MinHasher(opts.num_perm, opts.seed)
    data = text.encode()
    whole = dedup.make_sketch((0, 0, "d"), "s", data, opts, hasher)
    content = hashlib.sha256(b"".join(hashlib.sha256(data[i:i + 16]).digest()
                                      for i in range(0, len(data), 16))).hexdigest()
    rng = random.Random(len(data))
    for trial in range(5):
        describer = DocumentDescriber((0, 0, "d"), "s", 16, opts, hasher)
        cuts = sorted(rng.sample(range(len(data) + 1), min(4 + 40 * trial, len(data) + 1)))
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            describer.update(data[a:b])
        facts = describer.finish()
        assert facts.normalized_hash == whole.normalized_hash == dedup.normalized_hash(data)
        assert facts.sketch.shingles == whole.shingles and facts.sketch.signature == whole.signature
        assert facts.sketch.lines == whole.lines
        assert facts.content_hash == content and facts.bytes == len(data)
        assert facts.sketch.ncd_text == whole.ncd_text
        assert facts.sketch.ncd_head == whole.ncd_head == dedup.head_text(
            unicodedata.normalize("NFKC", text).casefold(), opts)
    if len(whole.lines) // 4 > 100:  # sampled lines, each a line of the text, smallest keys first
        lines = [" ".join(dedup.simplify(line, normalize).split())
                 for line in whole.ncd_text.decode("utf-8", "ignore").split("\n")]
        assert len(whole.ncd_text) > opts.ncd_bytes // 2 and whole.ncd_text != data[:opts.ncd_bytes]
        assert all(line in " ".join(dedup.simplify(text.casefold(), normalize).split()) for line in lines)
        keys = [dedup.line_key(line.split()) for line in lines[:-1]]  # the last one may be cut
        assert keys == sorted(keys)
    else:  # too few lines of min_line_words: the head sample
        assert whole.ncd_text == whole.ncd_head


def test_lines_of_one_word_are_sampled_alike_streamed_or_whole():
    """With ``min_line_words`` 1, lines of one word (no bigram) count too, keyed by the word: the streamed
    sample equals the whole text's, however the text is cut."""
    opts = dedup.DedupOptions(min_line_words=1)
    hasher = dedup.MinHasher(opts.num_perm, opts.seed)
    text = "\n".join(f"word{i}" if i % 3 else f"a line of several words number {i}" for i in range(300))
    data = text.encode()
    whole = dedup.make_sketch((0, 0, "d"), "s", data, opts, hasher)
    assert b"\nword" in whole.ncd_text or whole.ncd_text.startswith(b"word")  # one-word lines were sampled
    rng = random.Random(3)
    for _ in range(3):
        describer = DocumentDescriber((0, 0, "d"), "s", 16, opts, hasher)
        cuts = sorted(rng.sample(range(len(data) + 1), 60))
        for a, b in zip([0, *cuts], [*cuts, len(data)]):
            describer.update(data[a:b])
        assert describer.finish().sketch.ncd_text == whole.ncd_text


def test_a_large_document_is_described_in_memory_bounded_by_its_pieces():
    """32 MiB of text in 1 MiB pieces: the describer's own memory stays near one piece, and its sketch
    keeps SHINGLE_CAP hashes."""
    words = [f"w{i}" for i in range(50_000)]
    rng = random.Random(0)
    piece = " ".join(rng.choice(words) for _ in range(170_000)).encode()[: 1 << 20]
    opts = dedup.DedupOptions()
    describer = DocumentDescriber((0, 0, "book"), "s", 2048, opts, dedup.MinHasher(opts.num_perm, opts.seed))
    tracemalloc.start()
    for _ in range(32):
        describer.update(piece)
    facts = describer.finish()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert facts.bytes == 32 * len(piece)
    assert len(facts.sketch.shingles) == 4 * dedup.SHINGLE_CAP
    assert peak < 48 << 20, f"peak {peak / 2**20:.0f} MiB for 1 MiB pieces"


def test_bottom_k_jaccard_estimates_large_documents():
    rng = np.random.default_rng(0)
    common = rng.choice(2**32 - 1, 300_000, replace=False).astype(np.uint32)
    a_set = np.unique(common[:200_000])
    b_set = np.unique(common[100_000:])  # true Jaccard 100k / 300k

    def sketch(s):
        return dedup.DocSketch((0, 0, "x"), "s", 0, "h", s[:dedup.SHINGLE_CAP].tobytes(), b"", b"")

    assert dedup.jaccard(sketch(a_set), sketch(b_set)) == pytest.approx(1 / 3, abs=0.02)
    small = dedup.DocSketch((0, 0, "y"), "s", 0, "h", np.arange(10, dtype=np.uint32).tobytes(), b"", b"")
    half = dedup.DocSketch((0, 0, "z"), "s", 0, "h", np.arange(5, 15, dtype=np.uint32).tobytes(), b"", b"")
    assert dedup.jaccard(small, half) == pytest.approx(5 / 15)  # exact below the cap
    # Containment of a subset is about 1 from the sketches, and the sizes are k-minimum-values estimates.
    prefix = np.unique(common[:150_000])
    grams = dedup.shingle_overlap(sketch(prefix), sketch(a_set))
    assert grams.containment == pytest.approx(1.0, abs=0.03) and grams.jaccard == pytest.approx(0.75, abs=0.02)
    assert grams.a == pytest.approx(150_000, rel=0.03) and grams.b == pytest.approx(200_000, rel=0.03)


def test_manifest_rows_stream_in_row_groups(tmp_path):
    """Rows from a generator become row groups of ROW_GROUP_ROWS: the writer holds one row group, not the
    whole table (its peak is set against building the whole table from a list, as before)."""
    import pyarrow as pa

    n = ROW_GROUP_ROWS * 4 + 10

    def rows():
        for i in range(n):
            yield {"shard": "s", "position": i, "doc_id": f"d{i}", "reason": "r"}

    tracemalloc.start()
    whole = pa.Table.from_pylist(list(rows()), schema=schemas.DEAD_LETTER)
    whole_peak = tracemalloc.get_traced_memory()[1]
    del whole
    tracemalloc.reset_peak()
    write_rows(str(tmp_path), "dead_letter", "part.parquet", rows(), schemas.DEAD_LETTER)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    f = pq.ParquetFile(tmp_path / "dead_letter" / "part.parquet")
    assert f.metadata.num_rows == n and f.metadata.num_row_groups == 5
    assert f.read().column("position").to_pylist() == list(range(n))
    assert peak < 0.5 * whole_peak, f"streaming peak {peak} against {whole_peak} for the whole table"
    assert not list((tmp_path / "dead_letter").glob(".*"))  # no temporary left


def test_payload_row_groups_are_bounded_by_bytes_and_tuples_write_the_same_file(tmp_path):
    """Payload rows close a row group once ROW_GROUP_BYTES of payloads are in it (not after 65,536 rows of
    up to a chunk's size each), and rows given as tuples in schema order make the same file as dicts."""
    from lmc_audit.transforms.manifests.files import ROW_GROUP_BYTES

    payload = bytes(range(256)) * (ROW_GROUP_BYTES // 256 // 4)  # a quarter of the budget each
    rows = [("d", "s", i, 0, "model", "r", payload) for i in range(10)]
    write_rows(str(tmp_path), "payloads", "t.parquet", iter(rows), schemas.PAYLOADS, as_tuples=True,
               row_bytes=lambda r: len(r[-1]))
    f = pq.ParquetFile(tmp_path / "payloads" / "t.parquet")
    assert [f.metadata.row_group(i).num_rows for i in range(f.metadata.num_row_groups)] == [4, 4, 2]
    assert f.read().column("position").to_pylist() == list(range(10))

    typed = [{**{n: None for n in schemas.CHUNKS.names}, "doc_id": f"d{i}", "shard": "s", "position": i,
              "chunk_index": 0, "offset": 0, "bytes": 5, "tokens": 5, "zlib_bits": 8, "zstd_bits": 8, "xz_bits": 8,
              "padded_length": 8, "sha256": b"x" * 32, "flags": ["a"]} for i in range(3)]
    write_rows(str(tmp_path), "chunks", "dicts.parquet", typed, schemas.CHUNKS)
    write_rows(str(tmp_path), "chunks", "tuples.parquet", (tuple(r[n] for n in schemas.CHUNKS.names) for r in typed),
               schemas.CHUNKS, as_tuples=True)
    assert (tmp_path / "chunks" / "dicts.parquet").read_bytes() == (tmp_path / "chunks" / "tuples.parquet").read_bytes()
    write_rows(str(tmp_path), "chunks", "empty.parquet", [], schemas.CHUNKS, as_tuples=True)
    assert pq.read_table(tmp_path / "chunks" / "empty.parquet").schema.equals(schemas.CHUNKS)


@pytest.mark.parametrize("chosen", [None, "mimalloc"])
def test_manifest_writes_take_arrow_buffers_from_the_system_allocator(tmp_path, chosen):
    """A writer hands its tables' pages back (Arrow's own pool kept them for later stages); a pool the user
    chose with ``ARROW_DEFAULT_MEMORY_POOL`` stays. A process of its own: the pool is per process."""
    script = ("import pyarrow as pa\n"
              "from lmc_audit.transforms.manifests import schemas\n"
              "from lmc_audit.transforms.manifests.files import write_rows\n"
              "before = pa.default_memory_pool().backend_name\n"
              f"write_rows({str(tmp_path)!r}, 'dead_letter', 'p.parquet', [], schemas.DEAD_LETTER)\n"
              "print(before, pa.default_memory_pool().backend_name)\n")
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    if chosen:
        env["ARROW_DEFAULT_MEMORY_POOL"] = chosen
    before, after = subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True,
                                   text=True).stdout.split()
    assert (before, after) == ((chosen, chosen) if chosen else (before, "system"))
    assert chosen or before != "system"  # pyarrow's wheels default to mimalloc or jemalloc
    assert (tmp_path / "dead_letter" / "p.parquet").exists()


@pytest.mark.parametrize("with_reference", [False, True])
def test_chunk_rows_reach_the_writer_without_a_flatten(tmp_path, with_reference):
    """The writer's bulk (chunk rows with their payloads) is grouped by a GroupByKey of its own: a
    CoGroupByKey flattens its inputs first, and DirectRunner holds that Flatten and the group at once (the
    coding job's peak). Only a job with a reference model joins its bits to the chunks by CoGroupByKey."""
    import apache_beam as beam
    from apache_beam.pipeline import PipelineVisitor

    from lmc_audit.transforms.manifests.write import WriteManifests

    p = beam.Pipeline()
    inputs = [p | f"In{i}" >> beam.Create([]) for i in range(4 if with_reference else 3)]
    _ = tuple(inputs) | "WriteManifests" >> WriteManifests(str(tmp_path), parts={0: 1})
    consumers: dict[object, list] = {}
    producers = {}

    class Graph(PipelineVisitor):
        def visit_transform(self, node):
            for pc in node.inputs:
                consumers.setdefault(pc, []).append(node)
            for pc in node.outputs.values():
                producers[pc] = node

    p.visit(Graph())
    chunk_rows = next(pc for pc, node in producers.items() if node.full_label == "WriteManifests/ChunkRows")
    readers = [n.full_label for n in consumers[chunk_rows]]
    if with_reference:
        assert len(readers) == 1 and readers[0].startswith("WriteManifests/GroupChunksByPart/")
    else:
        assert readers == ["WriteManifests/GroupChunksByPart"]
        assert isinstance(consumers[chunk_rows][0].transform, beam.GroupByKey)
    # The documents' group (numbers, facts, dead letters: small) is the CoGroupByKey, without the chunks.
    assert not any(label.startswith("WriteManifests/GroupDocumentsByPart") for label in readers)


def test_listing_takes_sizes_from_the_listing_call(tmp_path):
    """No per-file request: listing works with the filesystem's per-file calls (size, isfile) broken."""
    import fsspec

    from lmc_audit.transforms.reading.listing import list_shards

    mem = fsspec.filesystem("memory")
    for i in range(50):
        mem.pipe_file(f"/corpus-{tmp_path.name}/part-{i:03d}.jsonl", b'{"text": "x"}\n' * (i + 1))
    cls = type(mem)
    saved = {name: getattr(cls, name) for name in ("size", "isfile", "info")}

    def no_call(self, *args, **kwargs):
        raise AssertionError("a request per file")

    try:
        for name in ("size", "isfile"):
            setattr(cls, name, no_call)
        for pattern in (f"memory://corpus-{tmp_path.name}/*.jsonl", f"memory://corpus-{tmp_path.name}"):
            shards, errors = list_shards([pattern])
            assert not errors and len(shards) == 50
            assert [s.size for s in shards] == [14 * (i + 1) for i in range(50)]
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)


def test_handler_reports_the_bytes_of_text_it_scores():
    from lmc_audit.transforms.scoring.model_handler import CausalLMHandler
    from lmc_audit.transforms.records import Chunk, TokenizedChunk

    items = [TokenizedChunk(Chunk(f"d{i}", "s", 0, i, 0, 0, b"x" * (10 + i), b"", 0, 0, 0), (1,) * 3, 256, 64)
             for i in range(3)]
    assert CausalLMHandler("bundled").get_num_bytes(items) == 10 + 11 + 12


def test_a_shard_written_in_parts_holds_the_same_rows(tmp_path, tiny_byte_model):
    """A JSONL shard and a one-document text file larger than --part-bytes are written as several part
    files (the document's chunks spread over them, by slices of SLICE_CHUNKS): the same rows as one
    file per shard, each file sorted, and a byte-identical shards manifest (exact sums, exact quantiles)."""
    import json

    import pyarrow.dataset as ds

    from lmc_audit.pipelines.audit import run
    from lmc_audit.transforms.manifests.files import SLICE_CHUNKS, part_file_name, part_of, shard_file_prefix, shard_parts

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = random.Random(3)
    words = [f"w{i}" for i in range(300)]
    with open(corpus / "a.jsonl", "w") as f:
        for i in range(500):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40 + i % 30))}) + "\n")
    (corpus / "book.txt").write_text(" ".join(rng.choice(words) for _ in range(20000)))
    assert (corpus / "a.jsonl").stat().st_size > 2 * 65536 and (corpus / "book.txt").stat().st_size > 65536
    outs = {}
    for name, extra in (("one", []), ("parts", ["--part-bytes", "65536", "--max-batch-rows", "64"])):
        outs[name] = tmp_path / name
        run(["--input", str(corpus), "--output", str(outs[name]), "--model", tiny_byte_model, "--quiet",
             "--chunk-bytes", "64", "--no-coding", *extra])

    def rows(out, manifest, order):
        return sorted(ds.dataset(out / manifest, format="parquet").to_table().to_pylist(),
                      key=lambda r: tuple(r[c] for c in order))

    for manifest, order in (("chunks", ("shard", "position", "doc_id", "chunk_index")),
                            ("documents", ("shard", "position", "doc_id")),
                            ("_state/sketches", ("shard", "position", "doc_id"))):
        assert rows(outs["one"], manifest, order) == rows(outs["parts"], manifest, order), manifest
    assert (outs["one"] / "shards/part-00000.parquet").read_bytes() == \
        (outs["parts"] / "shards/part-00000.parquet").read_bytes()
    assert (outs["one"] / "run.json").exists() and (outs["parts"] / "run.json").exists()

    book = str(corpus / "book.txt")
    book_files = sorted((outs["parts"] / "chunks").glob(f"{shard_file_prefix(book)}-*.parquet"))
    jsonl_files = sorted((outs["parts"] / "chunks").glob(f"{shard_file_prefix(str(corpus / 'a.jsonl'))}-*.parquet"))
    assert len(list((outs["one"] / "chunks").glob("part-*.parquet"))) == 2
    assert len(jsonl_files) == 3
    slices: dict[int, set[str]] = {}
    book_chunks = []
    for f in book_files + jsonl_files:
        t = pq.read_table(f).to_pylist()
        keys = [(r["position"], r["doc_id"], r["chunk_index"]) for r in t]
        assert keys == sorted(keys) and len(t) > 0
        if f in book_files:
            book_chunks += [r["chunk_index"] for r in t]
            for r in t:
                slices.setdefault(r["chunk_index"] // SLICE_CHUNKS, set()).add(f.name)
    assert sorted(book_chunks) == list(range(len(book_chunks))) and len(slices) >= 2
    # Each slice whole in the part its hash picks (the hash depends on the path, so on tmp_path).
    parts = shard_parts((corpus / "book.txt").stat().st_size, False, 65536)
    assert parts >= 2
    assert slices == {i: {part_file_name(book, part_of(parts, 0, f"{book}#0", i * SLICE_CHUNKS))} for i in slices}
    # What one writer holds: a part's rows, about the shard's over its part count (hashing fills them evenly).
    jsonl_rows = [pq.ParquetFile(f).metadata.num_rows for f in jsonl_files]
    assert max(jsonl_rows) < 1.5 * sum(jsonl_rows) / len(jsonl_rows)


def test_a_long_document_spreads_over_its_shards_parts():
    """A 500 MB document's 256,000 chunks of 2 KiB in slices of SLICE_CHUNKS: every part gets some, none
    much more than its share."""
    from collections import Counter

    from lmc_audit.transforms.manifests.files import SLICE_CHUNKS, part_of, shard_parts
    from lmc_audit.transforms.options import PART_BYTES

    assert PART_BYTES == 16 << 20
    parts = shard_parts(500 << 20, False)
    assert parts == 32
    slices = (500 << 20) // 2048 // SLICE_CHUNKS
    counts = Counter(part_of(parts, 0, "books/long.txt#0", i * SLICE_CHUNKS) for i in range(slices))
    assert set(counts) == set(range(parts)) and max(counts.values()) < 2.5 * slices / parts
    assert part_of(1, 0, "x", 10 ** 6) == 0 and shard_parts(1, True) == 1 and shard_parts(4 << 20, True) == 1
    assert shard_parts((4 << 20) + 1, True) == 2  # compressed: counted at 4x its size
    assert shard_parts((16 << 20) + 1, True, 64 << 20) == 2  # --part-bytes 64 MiB


def _shard_row(shard: str, documents: int) -> dict:
    row = {f.name: None for f in schemas.SHARDS}
    ints = [f.name for f in schemas.SHARDS if not f.nullable and f.type == "int64"]
    row.update({name: 0 for name in ints}, shard=shard, documents=documents, bits=0.0)
    return row


def test_the_shards_manifest_is_written_in_parts_with_duplicate_counts_joined(tmp_path):
    """At 100,000 shards no worker holds every shard's row: rows go to parts by a hash of the shard,
    each part sorted by shard; duplicate counts are joined per shard; parts an earlier run left past
    this run's count are removed."""
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from lmc_audit.transforms.manifests.files import shards_table_part
    from lmc_audit.transforms.manifests.write import WriteShardsTable

    shards = [f"s3://bucket/shard-{i:04d}.jsonl" for i in range(250)]
    rows = [_shard_row(s, i % 7) for i, s in enumerate(shards)]
    duplicates = [(shards[i], (i % 3, 1)) for i in range(0, 250, 10)]
    out = tmp_path / "out"
    write_rows(str(out), "shards", "part-00007.parquet", [], schemas.SHARDS)  # left by an earlier run
    with TestPipeline() as p:
        done = ((p | "Rows" >> beam.Create(rows), p | "Dups" >> beam.Create(duplicates))
                | WriteShardsTable(str(out), len(shards), dedup=True, rows_per_part=100))
        counts = done | beam.Map(lambda d: d["shards"])
        assert_that(counts, equal_to([250]))
    files = sorted(p.name for p in (out / "shards").iterdir())
    assert files == ["part-00000.parquet", "part-00001.parquet", "part-00002.parquet"]
    got = {}
    for i, name in enumerate(files):
        part = pq.read_table(out / "shards" / name).to_pylist()
        assert [r["shard"] for r in part] == sorted(r["shard"] for r in part) and part
        assert all(shards_table_part(r["shard"], 3) == i for r in part)
        got.update({r["shard"]: r for r in part})
    assert sorted(got) == shards
    dup = dict(duplicates)
    for i, s in enumerate(shards):
        exact, near = dup.get(s, (0, 0))
        assert (got[s]["exact_duplicates"], got[s]["near_duplicates"]) == (exact, near)
        assert got[s]["exact_duplicate_rate"] == (exact / (i % 7) if i % 7 else None)
    assert not (out / "chunks" / "empty.parquet").exists()  # some shard has documents
    assert (out / "dead_letter" / "empty.parquet").exists()  # none has dead letters
    with pytest.raises(ValueError, match="rows_per_part"):
        WriteShardsTable(str(out), 10, rows_per_part=0)


def _scored_chunks(doc: int, count: int, known: bool, rng: np.random.Generator):
    from lmc_audit.transforms.records import Chunk, ScoredChunk
    from lmc_audit.transforms.scoring import signals

    for i in range(count):
        data = bytes(rng.integers(97, 123, 2048, dtype=np.uint8))
        logp, z = -rng.gamma(2.0, 1.0, 2048), rng.normal(0, 1, 2048)
        chunk = Chunk(f"d{doc}", "s", 0, doc, i, 2048 * i, data, b"\0" * 32, 900, 850, 800,
                      doc_chunks=count if known else 0)
        yield ScoredChunk(chunk, 2048, float(-logp.sum() / np.log(2)), 2048,
                          logp=signals.summarize(logp, "logp"), zscores=signals.summarize(z, "z"))


def test_document_numbers_are_finished_where_chunks_are_scored_in_bounded_memory(tmp_path):
    """Documents whose chunk count is known leave ``AccumulateDocuments`` as a few numbers once their last
    chunk is in; the table holds at most ``max_open`` documents; partial accumulators (plain-text
    segments, evicted documents) merge to the same numbers as one accumulator over all the chunks."""
    import pickle

    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to
    from apache_beam.transforms.window import GlobalWindow

    from lmc_audit.transforms.documents.document_stats import AccumulateDocuments, DocumentStats, DocumentStatsFn

    rng = np.random.default_rng(5)
    docs = {d: list(_scored_chunks(d, 1 + d % 4, known=d != 7, rng=rng)) for d in range(12)}
    # Chunks interleaved as the batching by padded length leaves them: a document's chunks far apart.
    stream = [c for group in zip(*[iter(sum(docs.values(), []))] * 3) for c in reversed(group)]
    stream += sum(docs.values(), [])[len(stream):]
    assert sorted(id(c) for c in stream) == sorted(id(c) for d in docs.values() for c in d)
    fn = DocumentStatsFn(0.2)

    def expected(d: int) -> dict:
        acc = fn.create_accumulator()
        for c in docs[d]:
            fn.add_input(acc, c)
        return fn.extract_output(acc)

    want = [((0, d, f"d{d}"), expected(d)) for d in docs]
    # The DoFn alone: finished documents leave small, the table stays within max_open.
    acc_fn = AccumulateDocuments(0.2, max_open=3)
    acc_fn.start_bundle()
    out = []
    for c in stream:
        out.extend(acc_fn.process(c, window=GlobalWindow()))
        assert len(acc_fn._open) <= 3
    out.extend(v.value for v in acc_fn.finish_bundle())
    done = [v for _, (kind, v) in out if kind == "done"]
    parts = [v for _, (kind, v) in out if kind == "part"]
    assert done and parts and all(len(pickle.dumps(v)) < 1_000 for v in done)
    assert min(len(pickle.dumps(p)) for p in parts) > 8_000  # what no longer travels for finished ones
    assert all(k[2] != "d7" for k, (kind, _) in out if kind == "done")  # chunk count unknown: never "done"
    # Through Beam, with a table of 1 (every document in pieces) and the default: the same numbers.
    for max_open in (1, 2048):
        with beam.Pipeline() as p:
            got = p | f"Chunks{max_open}" >> beam.Create(stream, reshuffle=False) | DocumentStats(0.2, max_open)
            assert_that(got, equal_to(want))
    with pytest.raises(ValueError, match="max_open"):
        AccumulateDocuments(0.2, max_open=0)


def test_sketches_travel_to_the_writer_as_staged_references(tmp_path):
    """A document's sketch goes to its bundle's staging file; the writer's group of documents carries the
    facts without it (hashes, snippet) and a reference of three values, and the state rows read back equal
    the sketch's fields, in the writer's order, whatever the batch. A cut staging file is a clear error."""
    import dataclasses
    import pickle

    from lmc_audit.transforms.documents.document_facts import DocumentFacts
    from lmc_audit.transforms.manifests.staging import StageSketches, read_staged_ranges, staging_folder
    from lmc_audit.transforms.manifests.state import sketch_bytes, staged_sketch_row

    rng = random.Random(1)
    options = dedup.DedupOptions()
    hasher = dedup.MinHasher(options.num_perm, options.seed)
    words = [f"w{i}" for i in range(500)]
    facts = []
    for i in range(12):
        text = "\n".join(" ".join(rng.choice(words) for _ in range(10)) for _ in range(rng.randrange(1, 400)))
        sketch = dedup.make_sketch((0, i, f"d{i}"), "shard", text.encode(), options, hasher)
        facts.append(DocumentFacts(sketch.key, "shard", sketch.bytes, f"c{i}", sketch.normalized_hash, text[:20],
                                   None if i == 5 else sketch))
    staging = "_staging/test-run"
    fn = StageSketches(str(tmp_path), staging, lambda f: (0, f.key[1] % 2))
    fn.setup()
    out = []
    for bundle in (facts[:7], facts[7:]):
        fn.start_bundle()
        for f in bundle:
            out += list(fn.process(f))
        fn.finish_bundle()
    assert len(list((tmp_path / staging).iterdir())) == 2
    for (part, (stripped, ref)), f in zip(out, facts):
        assert part == (0, f.key[1] % 2) and stripped == dataclasses.replace(f, sketch=None)
        assert (ref is None) == (f.sketch is None)
        if f.sketch is not None:
            assert len(pickle.dumps(ref)) < 100 < len(f.sketch.shingles)
    wanted = [(stripped, ref) for _, (stripped, ref) in out if ref is not None]
    rng.shuffle(wanted)
    by_key = {f.key: f.sketch for f in facts}
    for batch_bytes in (1, 20_000, 1 << 30):
        rows = [staged_sketch_row(f, data)
                for f, data in read_staged_ranges(*staging_folder(str(tmp_path), staging), wanted, batch_bytes)]
        assert [(r["position"], r["doc_id"]) for r in rows] == [(f.key[1], f.key[2]) for f, _ in wanted]
        for r in rows:
            k = by_key[(0, r["position"], r["doc_id"])]
            assert r == {"doc_id": k.key[2], "position": k.key[1], "shard": k.shard, "bytes": k.bytes,
                         "normalized_hash": k.normalized_hash, "shingles": k.shingles, "signature": k.signature,
                         "ncd_text": k.ncd_text, "lines": k.lines, "ncd_head": k.ncd_head}
    with pytest.raises(ValueError, match="staged sketch"):
        staged_sketch_row(facts[0], sketch_bytes(facts[0].sketch)[:-1])
    first = sorted((tmp_path / staging).iterdir())[0]
    first.write_bytes(first.read_bytes()[:50])
    with pytest.raises(OSError, match="staged data .* ends early"):
        list(read_staged_ranges(*staging_folder(str(tmp_path), staging), wanted, 1 << 30))


def test_payloads_travel_to_the_writer_as_staged_references(tmp_path):
    """A chunk's payload (its recipe once per file) goes to its bundle's staging file; what reaches the
    writer's group is a reference of five small values, and the writer reads the payloads back, in its own order, in batches
    (adjacent ranges merged), byte for byte. A staging file cut short is a clear error."""
    import pickle

    from lmc_audit.transforms.manifests.staging import StagePayloads, remove_staging, staged_payloads

    rng = random.Random(0)
    payloads = [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 3000))) for _ in range(60)]
    recipes = [f'{{"device": "cpu", "n": {i % 3}}}' for i in range(60)]

    def chunk_rows(i, k):  # stands in for PartKeys.chunk_rows: (part, (row, payload fields or None))
        return (0, i % 2), ((f"doc{i}", i), None if i % 7 == 0 else ("model", recipes[i], payloads[i]))

    staging = "_staging/test-run"
    fn = StagePayloads(str(tmp_path), staging, chunk_rows, 0.2)
    fn.setup()
    out = []
    for bundle in (range(0, 25), range(25, 60)):  # two bundles: two staging files
        fn.start_bundle()
        for i in bundle:
            out += list(fn.process(i))
        fn.finish_bundle()
    assert len(list((tmp_path / staging).iterdir())) == 2
    staged_bytes = sum(len(payloads[i]) for i in range(60) if i % 7) + sum(
        len(r.encode()) for bundle in (range(0, 25), range(25, 60)) for r in {recipes[i] for i in bundle if i % 7})
    assert sum(f.stat().st_size for f in (tmp_path / staging).iterdir()) == staged_bytes  # a recipe once per file
    for (part, (row, ref)), i in zip(out, range(60)):
        assert part == (0, i % 2) and row == (f"doc{i}", i)
        if i % 7 == 0:
            assert ref is None
        else:  # no payload bytes in the element: method and (file, offset, recipe length, payload length)
            method, (name, recipe_at, recipe_len, offset, payload_len) = ref
            assert method == "model" and (recipe_len, payload_len) == (len(recipes[i].encode()), len(payloads[i]))
            assert len(pickle.dumps((part, (row, ref)))) < 200
    wanted = [(row, ref) for _, (row, ref) in out if ref is not None]
    rng.shuffle(wanted)  # the writer's order is its own
    for batch_bytes in (1, 5000, 1 << 30):
        got = list(staged_payloads(str(tmp_path), staging, wanted, batch_bytes))
        assert [row for row, _ in got] == [row for row, _ in wanted]
        assert all(fields == ("model", recipes[row[1]], payloads[row[1]]) for row, fields in got)
    staged = sorted((tmp_path / staging).iterdir())[0]
    staged.write_bytes(staged.read_bytes()[:100])
    with pytest.raises(OSError, match="staged data .* ends early"):
        list(staged_payloads(str(tmp_path), staging, wanted, 1 << 30))
    remove_staging(str(tmp_path), staging)
    assert not (tmp_path / "_staging").exists()
