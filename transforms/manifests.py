"""``WriteManifests``: chunk, document, shard and dead-letter Parquet datasets.

Everything about one input shard is grouped on the shard's index and written
by one worker as ``<manifest>/part-<hash of shard path>.parquet``, rows sorted, with an
explicit schema. That makes the files byte-identical whatever the batch
size, bundle boundaries or number of workers, which Beam's ``WriteToParquet``
does not promise (its sharding follows bundles). The group carries no text:
chunks lose their bytes before it, per-token scores are bounded summaries,
and each document's hashes and sketch were made while it was read. Rows
stream through ``pq.ParquetWriter`` in row groups into a temporary file
renamed into place (local) or a multipart upload committed at close (object
stores), so a reader never sees half a file; a retried write produces the
same bytes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

import numpy as np

from lmc_audit.transforms.progress import Progress
from lmc_audit.transforms import dedup, payloads, schemas, signals
from lmc_audit.transforms.document_facts import DocumentDescriber, DocumentFacts
from lmc_audit.transforms.document_stats import DocKey, DocumentStatsFn
from lmc_audit.transforms.records import DeadLetter, ScoredChunk
from lmc_audit.transforms.signals import SignalOptions

STATE_SKETCHES = "_state/sketches"
STATE_COMMITS = "_state/commits"
QUANTILES = (("p05", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p95", 0.95))


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_part_name(shard: str) -> str:
    """A shard's file name in every manifest: stable when other shards come or go (incremental runs)."""
    return f"part-{hashlib.sha1(shard.encode()).hexdigest()[:16]}.parquet"


EMPTY = "empty.parquet"


ROW_GROUP_ROWS = 1 << 16  # rows per Parquet row group: what the writer holds as Arrow at once


def write_rows(output: str, manifest: str, name: str, rows: Iterable[dict], schema: pa.Schema) -> None:
    """Streams rows into ``<manifest>/<name>`` through ``pq.ParquetWriter``, one row group per
    ``ROW_GROUP_ROWS`` rows, so that no whole table is built. The file appears whole or not at all:
    written under a temporary name and renamed (local), or uploaded in parts that are committed at
    close and discarded on error (object stores)."""
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root.rstrip('/')}/{manifest}" if manifest else root.rstrip("/")
    target = f"{folder}/{name}"
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    path = f"{folder}/.{name}.tmp" if local else target
    f = None
    count = 0
    try:
        fs.makedirs(folder, exist_ok=True)
        f = fs.open(path, "wb")
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            batch: list[dict] = []
            for row in rows:
                batch.append(row)
                if len(batch) == ROW_GROUP_ROWS:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    count, batch = count + len(batch), []
            if batch or count == 0:
                writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                count += len(batch)
        f.close()
        if local:
            fs.mv(path, target)
    except Exception as exc:
        _discard(fs, f, path if local else None)
        raise OutputWriteError(f"{WRITE_ERROR} {target}: {type(exc).__name__}: {exc}") from exc
    Progress.add("writing", items=count)


def _discard(fs, f, tmp: str | None) -> None:
    """Leaves nothing that looks like a manifest file after a failed write."""
    try:
        if f is not None and not f.closed:
            discard = getattr(f, "discard", None)
            if discard is not None and tmp is None:
                discard()  # object stores: abort the upload
                f.closed = True  # nothing left to flush
            else:
                f.close()
        if tmp and fs.exists(tmp):
            fs.rm(tmp)
    except Exception:
        pass


WRITE_ERROR = "lmc-audit cannot write"  # marks the one-line message `lmc-audit run` prints for it


class OutputWriteError(OSError):
    """A manifest file could not be written; the message names the path and the cause."""


def write_bytes(output: str, manifest: str, name: str, data: bytes) -> None:
    """Whole-file write: renamed into place locally, one PUT on object stores. ``manifest`` "" is the root.

    A failed write leaves no partial file behind (the temporary is removed) and raises
    ``OutputWriteError`` naming the path and the cause."""
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root.rstrip('/')}/{manifest}" if manifest else root.rstrip("/")
    target = f"{folder}/{name}"
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    tmp = f"{folder}/.{name}.tmp" if protocol in ("file", "local") else None
    try:
        fs.makedirs(folder, exist_ok=True)
        if tmp:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, target)
        else:
            fs.pipe_file(target, data)
    except Exception as exc:
        if tmp:
            try:
                if fs.exists(tmp):
                    fs.rm(tmp)
            except Exception:
                pass
        raise OutputWriteError(f"{WRITE_ERROR} {target}: {type(exc).__name__}: {exc}") from exc


def remove_file(output: str, manifest: str, name: str) -> None:
    fs, root = fsspec.core.url_to_fs(output)
    path = f"{root.rstrip('/')}/{manifest}/{name}"
    if fs.exists(path):
        fs.rm(path)


def _ratio(numerator: float | None, denominator: float) -> float | None:
    if numerator is None or denominator <= 0:
        return None
    return numerator / denominator


def chunk_row(s: ScoredChunk, k: float = 0.2, reference_bits: float | None = None) -> dict:
    c = s.chunk
    n = c.size
    return {
        "doc_id": c.doc_id, "shard": c.shard, "position": c.position, "chunk_index": c.chunk_index,
        "offset": c.offset,
        "bytes": n, "tokens": s.tokens, "bits": s.bits, "bpb": _ratio(s.bits, n), "coded_bits": s.coded_bits,
        "zlib_bits": 8 * c.zlib_bytes, "zstd_bits": 8 * c.zstd_bytes, "xz_bits": 8 * c.xz_bytes,
        "min_k": signals.summary_min_k(s.logp, k),
        "min_k_pp": signals.summary_min_k(s.zscores, k),
        "reference_bits": reference_bits,
        "padded_length": s.padded_length, "sha256": c.sha256, "flags": list(s.flags),
    }


def document_row(key: DocKey, shard: str, stats: dict, facts: DocumentFacts,
                 options: SignalOptions = SignalOptions(), references: list[float | None] | None = None) -> dict:
    """One document's row from its ``DocumentStatsFn`` output, its ``facts`` (hashes, snippet) and, with a
    reference model, that model's bits of each of its chunks in order."""
    _, position, doc_id = key
    n_bytes, bits, scored_bytes, coded = stats["bytes"], stats["bits"], stats["scored_bytes"], stats["coded_bits"]
    ref_bits = ref_bpb = diff = None
    if references is not None and bits is not None and all(r is not None for r in references):
        ref_bits = 0.0
        for r in references:  # chunk order: the same float on every run
            ref_bits += r
        ref_bpb = _ratio(ref_bits, n_bytes)
        # Both over all of the document's bytes: only when every chunk was scored by both models.
        if stats["flagged_chunks"] == 0:
            diff = _ratio(bits, scored_bytes) - ref_bpb
    row = {
        "doc_id": doc_id, "shard": shard, "position": position,
        "bytes": n_bytes, "chunks": stats["chunks"], "tokens": stats["tokens"],
        "scored_bytes": scored_bytes, "flagged_chunks": stats["flagged_chunks"],
        "bits": bits, "bpb": _ratio(bits, scored_bytes),
        "coded_bits": coded, "coded_bpb": _ratio(coded, n_bytes),
        "zlib_bpb": 8 * stats["zlib_bytes"] / n_bytes,
        "zstd_bpb": 8 * stats["zstd_bytes"] / n_bytes,
        "xz_bpb": 8 * stats["xz_bytes"] / n_bytes,
        "zlib_ratio": _ratio(bits, 8 * stats["scored_zlib_bytes"]),
        "min_k": stats["min_k"], "min_k_pp": stats["min_k_pp"],
        "reference_bits": ref_bits, "reference_bpb": ref_bpb, "reference_diff_bpb": diff,
        "content_hash": facts.content_hash,
        "normalized_hash": facts.normalized_hash,
        "snippet": facts.snippet,
    }
    row["memorization_flags"] = options.flags(row)
    return row


def document_row_of_chunks(chunks: list[ScoredChunk], options: SignalOptions = SignalOptions(),
                           references: list[float | None] | None = None) -> dict:
    """A document's row straight from its chunks (with their bytes): what the pipeline computes in
    steps, for tests and small tools."""
    fn = DocumentStatsFn(options.k)
    acc = fn.create_accumulator()
    for s in chunks:
        fn.add_input(acc, s)
    first = chunks[0].chunk
    key = (first.shard_index, first.position, first.doc_id)
    describer = DocumentDescriber(key, first.shard, max(s.chunk.size for s in chunks))
    for s in chunks:
        describer.update(s.chunk.data)
    return document_row(key, first.shard, fn.extract_output(acc), describer.finish(), options, references)


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    return float(np.quantile(np.asarray(values, np.float64), q))


def shard_row(shard: str, docs: list[dict], dead_letters: int) -> dict:
    n_bytes = sum(d["bytes"] for d in docs)
    scored_bytes = sum(d["scored_bytes"] for d in docs)
    bits = 0.0
    for d in docs:
        if d["bits"] is not None:
            bits += d["bits"]
    doc_bpb = sorted(d["bpb"] for d in docs if d["bpb"] is not None)
    coded = None if not docs or any(d["coded_bits"] is None for d in docs) else sum(d["coded_bits"] for d in docs)

    def weighted(col: str) -> float | None:
        return _ratio(sum(d[col] * d["bytes"] for d in docs), n_bytes)

    return {
        "shard": shard, "documents": len(docs), "dead_letters": dead_letters,
        "chunks": sum(d["chunks"] for d in docs), "flagged_chunks": sum(d["flagged_chunks"] for d in docs),
        "bytes": n_bytes, "scored_bytes": scored_bytes, "bits": bits, "bpb": _ratio(bits, scored_bytes),
        "coded_bits": coded, "coded_bpb": _ratio(coded, n_bytes),
        "zlib_bpb": weighted("zlib_bpb"), "zstd_bpb": weighted("zstd_bpb"), "xz_bpb": weighted("xz_bpb"),
        "min_doc_bpb": doc_bpb[0] if doc_bpb else None,
        **{f"{name}_doc_bpb": quantile(doc_bpb, q) if doc_bpb else None for name, q in QUANTILES},
        "max_doc_bpb": doc_bpb[-1] if doc_bpb else None,
        **{f"flagged_{name}": sum(name in d["memorization_flags"] for d in docs) for name in signals.SIGNALS},
        "flagged_documents": sum(bool(d["memorization_flags"]) for d in docs),
        # Filled in once duplicates are known (WriteShardsTable).
        "exact_duplicates": 0, "near_duplicates": 0, "exact_duplicate_rate": None, "near_duplicate_rate": None,
    }


def payload_row(s: ScoredChunk) -> dict:
    c = s.chunk
    method = "stored" if s.payload[payloads.METHOD_OFFSET] == payloads.METHOD_STORED else "model"
    return {"doc_id": c.doc_id, "shard": c.shard, "position": c.position, "chunk_index": c.chunk_index,
            "method": method, "recipe": s.recipe or "stored", "payload": s.payload}


def sketch_row(k: dedup.DocSketch) -> dict:
    return {"doc_id": k.key[2], "position": k.key[1], "shard": k.shard, "bytes": k.bytes,
            "normalized_hash": k.normalized_hash, "shingles": k.shingles, "signature": k.signature, "ncd_text": k.ncd_text,
            "lines": k.lines}


class _ReadSketches(beam.DoFn):
    def __init__(self, output: str):
        self._output = output

    def process(self, element: tuple[str, int]) -> Iterator[dedup.DocSketch]:
        shard, index = element
        fs, root = fsspec.core.url_to_fs(self._output)
        path = f"{root.rstrip('/')}/{STATE_SKETCHES}/{shard_part_name(shard)}"
        if not fs.exists(path):
            return
        with fs.open(path, "rb") as f:
            rows = pq.read_table(f, schema=schemas.SKETCHES).to_pylist()
        for r in rows:
            yield dedup.DocSketch((index, r["position"], r["doc_id"]), r["shard"], r["bytes"], r["normalized_hash"],
                                  r["shingles"], r["signature"], r["ncd_text"], r["lines"])


class LoadCommittedSketches(beam.PTransform):
    """Sketches of the shards an incremental run skips, read back from ``_state/sketches``."""

    def __init__(self, output: str, committed: list[tuple[str, int, dict]]):
        super().__init__()
        self._output = output
        self._shards = [(shard, index) for shard, index, _ in committed]

    def expand(self, pbegin):
        return (pbegin
                | "CommittedShards" >> beam.Create(self._shards, reshuffle=False)
                | "ReadSketches" >> beam.ParDo(_ReadSketches(self._output)))


def dead_letter_row(d: DeadLetter) -> dict:
    return {"shard": d.shard, "position": d.position, "doc_id": d.doc_id, "reason": d.reason}


class WriteShardManifests(beam.DoFn):
    """Writes the chunk, document, payload and dead-letter files of one shard; yields its shard row.

    The group carries no text and no per-token scores: a chunk comes as its row (and its payload row),
    a document as its ``DocumentStatsFn`` numbers and its ``DocumentFacts`` (hashes, snippet, sketch,
    made while it was read). Rows are sorted, then streamed into the files.
    """

    def __init__(self, output: str, signal_options: SignalOptions, commit: dict[str, dict] | None = None):
        self._output = output
        self._signals = signal_options
        self._commit = commit or {}  # shard -> {"key", "fingerprint"}: what its commit marker records

    def process(self, element) -> Iterator[dict]:
        index, grouped = element
        chunks = sorted(grouped["chunks"], key=lambda c: (c[0]["position"], c[0]["doc_id"], c[0]["chunk_index"]))
        stats = sorted(grouped["documents"], key=lambda d: (d[0][1], d[0][2]))
        dead = sorted(grouped["dead_letter"], key=lambda d: (d.position, d.doc_id or "", d.reason))
        facts = {(f.key[1], f.key[2]): f for f in grouped["facts"]}
        has_reference = "reference" in grouped
        references = {(r[0], r[1], r[2]): r[3] for r in grouped.get("reference", ())}
        shard = chunks[0][0]["shard"] if chunks else dead[0].shard
        docs = []
        for key, numbers in stats:
            refs = ([references.get((key[1], key[2], i)) for i in range(numbers["chunks"])]
                    if has_reference else None)
            docs.append(document_row(key, shard, numbers, facts[(key[1], key[2])], self._signals, refs))
        name = shard_part_name(shard)
        if chunks:
            if has_reference:
                for row, _ in chunks:
                    row["reference_bits"] = references.get((row["position"], row["doc_id"], row["chunk_index"]))
            write_rows(self._output, "chunks", name, (row for row, _ in chunks), schemas.CHUNKS)
            write_rows(self._output, "documents", name, docs, schemas.DOCUMENTS)
            if any(p is not None for _, p in chunks):
                write_rows(self._output, "payloads", name, (p for _, p in chunks if p is not None),
                           schemas.PAYLOADS)
        if dead:
            write_rows(self._output, "dead_letter", name, [dead_letter_row(d) for d in dead], schemas.DEAD_LETTER)
        row = shard_row(shard, docs, len(dead))
        sketches = [facts[(d["position"], d["doc_id"])].sketch for d in docs]
        if sketches and sketches[0] is not None:
            write_rows(self._output, STATE_SKETCHES, name, [sketch_row(k) for k in sketches], schemas.SKETCHES)
        # The commit marker comes last: a shard is complete once it exists (incremental runs skip it).
        marker = {"shard": shard, **self._commit.get(shard, {}), "row": row}
        write_bytes(self._output, STATE_COMMITS, name.replace(".parquet", ".json"),
                    json.dumps(marker, sort_keys=True).encode())
        yield row


class WriteShardsTable(beam.DoFn):
    """Writes the one-file shards manifest, and empty files where a manifest has none."""

    def __init__(self, output: str):
        self._output = output

    def process(self, rows: Iterable[dict], duplicate_rows: list[list[dict]]) -> Iterator[dict]:
        rows = sorted(rows, key=lambda r: r["shard"])
        counts: dict[str, list[int]] = {}
        for d in (duplicate_rows[0] if duplicate_rows else []):
            c = counts.setdefault(d["shard"], [0, 0])
            c[0] += d["reason"] == "exact"
            c[1] += d["reason"] == "near"
        for r in rows:
            exact, near = counts.get(r["shard"], (0, 0))
            r.update(exact_duplicates=exact, near_duplicates=near,
                     exact_duplicate_rate=_ratio(exact, r["documents"]), near_duplicate_rate=_ratio(near, r["documents"]))
        write_rows(self._output, "shards", part_name(0), rows, schemas.SHARDS)
        # Every manifest folder holds at least one file, so readers never fail on it; a placeholder
        # left by an earlier incremental run goes once the folder has rows.
        has_documents, has_dead = any(r["documents"] for r in rows), any(r["dead_letters"] for r in rows)
        for manifest, schema, empty in (("chunks", schemas.CHUNKS, not has_documents),
                                        ("documents", schemas.DOCUMENTS, not has_documents),
                                        ("dead_letter", schemas.DEAD_LETTER, not has_dead)):
            if empty:
                write_rows(self._output, manifest, EMPTY, [], schema)
            else:
                remove_file(self._output, manifest, EMPTY)
        yield {"shards": len(rows)}


class _WriteDuplicatesFn(beam.DoFn):
    def __init__(self, output: str):
        self._output = output

    def process(self, rows: list[dict]) -> Iterator[list[dict]]:
        write_rows(self._output, "duplicates", part_name(0), rows, schemas.DUPLICATES)
        yield rows


class WriteDuplicates(beam.PTransform):
    """``FindDuplicates``' rows in; the ``duplicates/`` manifest written; the rows out (for shard counts)."""

    def __init__(self, output: str):
        super().__init__()
        self._output = output

    def expand(self, rows):
        return rows | "Write" >> beam.ParDo(_WriteDuplicatesFn(self._output))


def _by_shard_index(item):
    if isinstance(item, ScoredChunk):
        return item.chunk.shard_index, item
    return item.shard_index, item


def _chunk_rows(s: ScoredChunk, k: float):
    """A scored chunk as what its shard's group needs: its chunk row and payload row, keyed by shard."""
    return s.chunk.shard_index, (chunk_row(s, k), payload_row(s) if s.payload is not None else None)


def _by_document(s: ScoredChunk):
    c = s.chunk
    return (c.shard_index, c.position, c.doc_id), s


def _document_by_shard(element):
    key, numbers = element
    return key[0], (key, numbers)


def _reference_by_shard(s: ScoredChunk):
    c = s.chunk
    return c.shard_index, (c.position, c.doc_id, c.chunk_index, s.bits)


class WriteManifests(beam.PTransform):
    """(scored chunks, dead letters, ``DocumentFacts``[, the reference model's scored chunks]) in; the chunk,
    document, payload, dead-letter and shard manifests under ``output``; one element out once the shards
    manifest is written.

    ``duplicates``: the rows ``WriteDuplicates`` wrote, for the shards' duplicate counts (none without
    dedup). ``commit``: per shard, the key and fingerprint its marker records; ``committed``: (shard,
    index, shard row) of shards already complete, which this run does not read.
    """

    def __init__(self, output: str, signal_options: SignalOptions = SignalOptions(),
                 commit: dict[str, dict] | None = None, committed: list[tuple[str, int, dict]] = (),
                 duplicates: beam.PCollection | None = None):
        super().__init__()
        if not output:
            raise ValueError("output must be a directory path or fsspec URL")
        self._output = output
        self._signals = signal_options
        self._commit = commit
        self._committed = list(committed)
        self._duplicates = duplicates

    def expand(self, inputs):
        chunks, dead_letters, facts, *reference = inputs
        documents = (chunks
                     | "KeyByDocument" >> beam.Map(_by_document)
                     | "DocumentStats" >> beam.CombinePerKey(DocumentStatsFn(self._signals.k))
                     | "KeyDocumentsByShard" >> beam.Map(_document_by_shard))
        grouped = {"chunks": chunks | "ChunkRows" >> beam.Map(_chunk_rows, self._signals.k),
                   "documents": documents,
                   "dead_letter": dead_letters | "KeyDeadLetters" >> beam.Map(_by_shard_index),
                   "facts": facts | "KeyFacts" >> beam.Map(lambda f: (f.key[0], f))}
        if reference:
            grouped["reference"] = reference[0] | "KeyReference" >> beam.Map(_reference_by_shard)
        written = (
            grouped
            | "GroupByShard" >> beam.CoGroupByKey()
            | "WriteShardFiles" >> beam.ParDo(WriteShardManifests(self._output, self._signals, self._commit))
        )
        pipeline = written.pipeline
        committed = (pipeline | "CommittedShards" >> beam.Create([c[2] for c in self._committed], reshuffle=False))
        duplicates = self._duplicates
        if duplicates is None:
            duplicates = pipeline | "NoDuplicates" >> beam.Create([])
        return (
            (written, committed)
            | "AllShardRows" >> beam.Flatten()
            | "CollectShardRows" >> beam.combiners.ToList()
            | "WriteShardsTable" >> beam.ParDo(WriteShardsTable(self._output), beam.pvalue.AsList(duplicates))
        )
