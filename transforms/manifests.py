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

import dataclasses
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
from lmc_audit.transforms.dedup import DedupOptions
from lmc_audit.transforms.document_facts import DocumentFacts, snippet
from lmc_audit.transforms.records import DeadLetter, ScoredChunk
from lmc_audit.transforms.signals import SignalOptions

SKETCHES = "sketches"
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


def write_table(output: str, manifest: str, name: str, rows: list[dict], schema: pa.Schema) -> None:
    write_rows(output, manifest, name, rows, schema)


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


def _signal_columns(chunks: list[ScoredChunk], scored: list[ScoredChunk], bits: float | None,
                    scored_bytes: int, references: list[float | None] | None, options: SignalOptions) -> dict:
    zlib_scored = 8 * sum(s.chunk.zlib_bytes for s in scored)
    logp, z = signals.SummaryMerger("logp"), signals.SummaryMerger("z")
    for s in scored:
        logp.add(s.logp)
        z.add(s.zscores)
    ref_bits = ref_bpb = diff = None
    if references is not None and scored and all(r is not None for r in references):
        ref_bits = 0.0
        for r in references:
            ref_bits += r
        ref_bpb = _ratio(ref_bits, sum(s.chunk.size for s in chunks))
        # Both over all of the document's bytes: only when every chunk was scored by both models.
        if len(scored) == len(chunks):
            diff = _ratio(bits, scored_bytes) - ref_bpb
    return {
        "zlib_ratio": _ratio(bits, zlib_scored),
        "min_k": logp.min_k(options.k)[0],
        "min_k_pp": z.min_k(options.k)[0],
        "reference_bits": ref_bits, "reference_bpb": ref_bpb, "reference_diff_bpb": diff,
    }


def document_row(chunks: list[ScoredChunk], options: SignalOptions = SignalOptions(),
                 references: list[float | None] | None = None, facts: DocumentFacts | None = None) -> dict:
    """One document from its chunks, given in chunk order (their bytes may be dropped already), and its
    ``facts`` (hashes and snippet, made while it was read; from the chunks' bytes when not given).
    ``references``: the reference model's bits per chunk."""
    first = chunks[0].chunk
    n_bytes = sum(s.chunk.size for s in chunks)
    scored = [s for s in chunks if s.bits is not None]
    bits = None
    if scored:
        bits = 0.0
        for s in scored:  # fixed order: the same float on every run
            bits += s.bits
    scored_bytes = sum(s.chunk.size for s in scored)
    if facts is None:
        data = b"".join(s.chunk.data for s in chunks)
        facts = DocumentFacts((first.shard_index, first.position, first.doc_id), first.shard, len(data),
                              hashlib.sha256(b"".join(s.chunk.sha256 for s in chunks)).hexdigest(),
                              dedup.normalized_hash(data), snippet(data))
    coded = None if any(s.coded_bits is None for s in chunks) else sum(s.coded_bits for s in chunks)
    row = {
        "doc_id": first.doc_id, "shard": first.shard, "position": first.position,
        "bytes": n_bytes, "chunks": len(chunks), "tokens": sum(s.tokens for s in chunks),
        "scored_bytes": scored_bytes, "flagged_chunks": len(chunks) - len(scored),
        "bits": bits, "bpb": _ratio(bits, scored_bytes),
        "coded_bits": coded, "coded_bpb": _ratio(coded, n_bytes),
        "zlib_bpb": 8 * sum(s.chunk.zlib_bytes for s in chunks) / n_bytes,
        "zstd_bpb": 8 * sum(s.chunk.zstd_bytes for s in chunks) / n_bytes,
        "xz_bpb": 8 * sum(s.chunk.xz_bytes for s in chunks) / n_bytes,
        **_signal_columns(chunks, scored, bits, scored_bytes, references, options),
        "content_hash": facts.content_hash,
        "normalized_hash": facts.normalized_hash,
        "snippet": facts.snippet,
    }
    row["memorization_flags"] = options.flags(row)
    return row


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
            "normalized_hash": k.normalized_hash, "shingles": k.shingles, "signature": k.signature, "prefix": k.prefix}


class LoadCommittedSketches(beam.DoFn):
    """Sketches of shards an incremental run skips, read back from ``_state/sketches``."""

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
                                  r["shingles"], r["signature"], r["prefix"])


def dead_letter_row(d: DeadLetter) -> dict:
    return {"shard": d.shard, "position": d.position, "doc_id": d.doc_id, "reason": d.reason}


class WriteShardManifests(beam.DoFn):
    """Writes the chunk, document, payload and dead-letter files of one shard; yields its shard row.

    The group holds what the rows need and no text: chunks come without their bytes, and each
    document's hashes, snippet and sketch come as ``DocumentFacts`` made while it was read.
    """

    def __init__(self, output: str, signal_options: SignalOptions, dedup_options: DedupOptions | None,
                 commit: dict[str, dict] | None = None):
        self._output = output
        self._signals = signal_options
        self._dedup = dedup_options
        self._commit = commit or {}  # shard -> {"key", "fingerprint"}: what its commit marker records

    def process(self, element) -> Iterator[dict]:
        index, grouped = element
        chunks: list[ScoredChunk] = sorted(
            grouped["chunks"], key=lambda s: (s.chunk.position, s.chunk.doc_id, s.chunk.chunk_index))
        dead = sorted(grouped["dead_letter"], key=lambda d: (d.position, d.doc_id or "", d.reason))
        facts = {(f.key[1], f.key[2]): f for f in grouped["facts"]}
        has_reference = "reference" in grouped
        references = {(r[0], r[1], r[2]): r[3] for r in grouped.get("reference", ())}
        ref_of = [references.get((s.chunk.position, s.chunk.doc_id, s.chunk.chunk_index)) for s in chunks]
        docs: list[dict] = []
        sketches: list[dedup.DocSketch] = []
        start = 0
        for i in range(1, len(chunks) + 1):
            if i == len(chunks) or (chunks[i].chunk.position, chunks[i].chunk.doc_id) != (
                    chunks[start].chunk.position, chunks[start].chunk.doc_id):
                first = chunks[start].chunk
                fact = facts.get((first.position, first.doc_id))
                if fact is not None and fact.sketch is not None:
                    sketches.append(fact.sketch)
                docs.append(document_row(chunks[start:i], self._signals,
                                         ref_of[start:i] if has_reference else None, fact))
                start = i
        shard = chunks[0].chunk.shard if chunks else dead[0].shard
        name = shard_part_name(shard)
        if chunks:
            write_rows(self._output, "chunks", name, (chunk_row(s, self._signals.k, r) for s, r in zip(chunks, ref_of)),
                       schemas.CHUNKS)
            write_rows(self._output, "documents", name, docs, schemas.DOCUMENTS)
            if any(s.payload is not None for s in chunks):
                write_rows(self._output, "payloads", name, (payload_row(s) for s in chunks if s.payload is not None),
                           schemas.PAYLOADS)
        if dead:
            write_rows(self._output, "dead_letter", name, [dead_letter_row(d) for d in dead], schemas.DEAD_LETTER)
        row = shard_row(shard, docs, len(dead))
        if sketches:
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
        write_table(self._output, "shards", part_name(0), rows, schemas.SHARDS)
        # Every manifest folder holds at least one file, so readers never fail on it; a placeholder
        # left by an earlier incremental run goes once the folder has rows.
        has_documents, has_dead = any(r["documents"] for r in rows), any(r["dead_letters"] for r in rows)
        for manifest, schema, empty in (("chunks", schemas.CHUNKS, not has_documents),
                                        ("documents", schemas.DOCUMENTS, not has_documents),
                                        ("dead_letter", schemas.DEAD_LETTER, not has_dead)):
            if empty:
                write_table(self._output, manifest, EMPTY, [], schema)
            else:
                remove_file(self._output, manifest, EMPTY)
        yield {"shards": len(rows)}


class WriteDuplicates(beam.DoFn):
    def __init__(self, output: str):
        self._output = output

    def process(self, rows: list[dict]) -> Iterator[list[dict]]:
        write_table(self._output, "duplicates", part_name(0), rows, schemas.DUPLICATES)
        yield rows


def _by_shard_index(item):
    if isinstance(item, ScoredChunk):
        return item.chunk.shard_index, item
    return item.shard_index, item


def _compact_by_shard_index(s: ScoredChunk):
    """A scored chunk keyed for its shard's group, without its bytes: its rows do not need them."""
    return s.chunk.shard_index, dataclasses.replace(s, chunk=s.chunk.without_data())


def _reference_by_shard(s: ScoredChunk):
    c = s.chunk
    return c.shard_index, (c.position, c.doc_id, c.chunk_index, s.bits)


class WriteManifests(beam.PTransform):
    """(scored chunks, dead letters, ``DocumentFacts``[, the reference model's scored chunks]) in; manifests
    under ``output``.

    ``find_duplicates`` (a ``FindDuplicates``) turns the documents' sketches
    into the ``duplicates/`` manifest; without it no dedup runs.
    """

    def __init__(self, output: str, signal_options: SignalOptions = SignalOptions(),
                 find_duplicates: beam.PTransform | None = None, dedup_options: DedupOptions | None = None,
                 commit: dict[str, dict] | None = None, committed: list[tuple[str, int, dict]] = ()):
        """``commit``: per shard, the key and fingerprint its marker records; ``committed``:
        (shard, index, shard row) of shards already complete, which this run does not read."""
        super().__init__()
        self._commit = commit
        self._committed = list(committed)
        if not output:
            raise ValueError("output must be a directory path or fsspec URL")
        if (find_duplicates is None) != (dedup_options is None):
            raise ValueError("pass find_duplicates and dedup_options together")
        self._output = output
        self._signals = signal_options
        self._find_duplicates = find_duplicates
        self._dedup = dedup_options

    def expand(self, inputs):
        chunks, dead_letters, facts, *reference = inputs
        grouped = {"chunks": chunks | "KeyChunks" >> beam.Map(_compact_by_shard_index),
                   "dead_letter": dead_letters | "KeyDeadLetters" >> beam.Map(_by_shard_index),
                   "facts": facts | "KeyFacts" >> beam.Map(lambda f: (f.key[0], f))}
        if reference:
            grouped["reference"] = reference[0] | "KeyReference" >> beam.Map(_reference_by_shard)
        written = (
            grouped
            | "GroupByShard" >> beam.CoGroupByKey()
            | "WriteShardFiles" >> beam.ParDo(WriteShardManifests(self._output, self._signals, self._dedup,
                                                                  self._commit))
        )
        pipeline = written.pipeline
        committed = pipeline | "CommittedShards" >> beam.Create(self._committed, reshuffle=False)
        shard_rows = ((written, committed | "CommittedRows" >> beam.Map(lambda c: c[2]))
                      | "AllShardRows" >> beam.Flatten())
        sketches = facts | "Sketches" >> beam.Map(lambda f: f.sketch)
        if self._committed and self._find_duplicates is not None:
            loaded = (committed | "CommittedShardNames" >> beam.Map(lambda c: (c[0], c[1]))
                      | "LoadCommittedSketches" >> beam.ParDo(LoadCommittedSketches(self._output)))
            sketches = (sketches, loaded) | "AllSketches" >> beam.Flatten()
        if self._find_duplicates is not None:
            duplicates = (sketches
                          | "FindDuplicates" >> self._find_duplicates
                          | "WriteDuplicates" >> beam.ParDo(WriteDuplicates(self._output)))
        else:
            duplicates = pipeline | "NoDuplicates" >> beam.Create([])
        return (
            shard_rows
            | "CollectShardRows" >> beam.combiners.ToList()
            | "WriteShardsTable" >> beam.ParDo(WriteShardsTable(self._output), beam.pvalue.AsList(duplicates))
        )
