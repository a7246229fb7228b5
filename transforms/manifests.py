"""``WriteManifests``: chunk, document, shard and dead-letter Parquet datasets.

Everything about one input shard is grouped on the shard's index and written
by one worker as ``<manifest>/part-<index>.parquet``, rows sorted, with an
explicit schema. That makes the files byte-identical whatever the batch
size, bundle boundaries or number of workers, which Beam's ``WriteToParquet``
does not promise (its sharding follows bundles). Files are written whole
and then renamed into place (local) or put in one request (object stores),
so a reader never sees half a file; a retried write produces the same bytes.
"""

from __future__ import annotations

import hashlib
import statistics
from collections.abc import Iterable, Iterator

import apache_beam as beam
import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from lmc_audit.transforms import payloads, schemas
from lmc_audit.transforms.records import DeadLetter, ScoredChunk


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def write_table(output: str, manifest: str, name: str, rows: list[dict], schema: pa.Schema) -> None:
    table = pa.Table.from_pylist(rows, schema=schema)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue().to_pybytes()
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root.rstrip('/')}/{manifest}"
    fs.makedirs(folder, exist_ok=True)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        tmp = f"{folder}/.{name}.tmp"
        fs.pipe_file(tmp, data)
        fs.mv(tmp, f"{folder}/{name}")
    else:
        fs.pipe_file(f"{folder}/{name}", data)


def _ratio(numerator: float | None, denominator: float) -> float | None:
    if numerator is None or denominator <= 0:
        return None
    return numerator / denominator


def chunk_row(s: ScoredChunk) -> dict:
    c = s.chunk
    n = len(c.data)
    return {
        "doc_id": c.doc_id, "shard": c.shard, "chunk_index": c.chunk_index, "offset": c.offset,
        "bytes": n, "tokens": s.tokens, "bits": s.bits, "bpb": _ratio(s.bits, n), "coded_bits": s.coded_bits,
        "zlib_bits": 8 * c.zlib_bytes, "zstd_bits": 8 * c.zstd_bytes, "xz_bits": 8 * c.xz_bytes,
        "padded_length": s.padded_length, "sha256": c.sha256, "flags": list(s.flags),
    }


def document_row(chunks: list[ScoredChunk]) -> dict:
    """One document from its chunks, given in chunk order."""
    first = chunks[0].chunk
    n_bytes = sum(len(s.chunk.data) for s in chunks)
    scored = [s for s in chunks if s.bits is not None]
    bits = None
    if scored:
        bits = 0.0
        for s in scored:  # fixed order: the same float on every run
            bits += s.bits
    scored_bytes = sum(len(s.chunk.data) for s in scored)
    content = hashlib.sha256(b"".join(s.chunk.sha256 for s in chunks)).hexdigest()
    coded = None if any(s.coded_bits is None for s in chunks) else sum(s.coded_bits for s in chunks)
    return {
        "doc_id": first.doc_id, "shard": first.shard, "position": first.position,
        "bytes": n_bytes, "chunks": len(chunks), "tokens": sum(s.tokens for s in chunks),
        "scored_bytes": scored_bytes, "flagged_chunks": len(chunks) - len(scored),
        "bits": bits, "bpb": _ratio(bits, scored_bytes),
        "coded_bits": coded, "coded_bpb": _ratio(coded, n_bytes),
        "zlib_bpb": 8 * sum(s.chunk.zlib_bytes for s in chunks) / n_bytes,
        "zstd_bpb": 8 * sum(s.chunk.zstd_bytes for s in chunks) / n_bytes,
        "xz_bpb": 8 * sum(s.chunk.xz_bytes for s in chunks) / n_bytes,
        "content_hash": content,
    }


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
        "median_doc_bpb": statistics.median(doc_bpb) if doc_bpb else None,
        "max_doc_bpb": doc_bpb[-1] if doc_bpb else None,
    }


def payload_row(s: ScoredChunk) -> dict:
    c = s.chunk
    method = "stored" if s.payload[4 + 1] == payloads.METHOD_STORED else "model"
    return {"doc_id": c.doc_id, "shard": c.shard, "position": c.position, "chunk_index": c.chunk_index,
            "method": method, "recipe": s.recipe or "stored", "payload": s.payload}


def dead_letter_row(d: DeadLetter) -> dict:
    return {"shard": d.shard, "position": d.position, "doc_id": d.doc_id, "reason": d.reason}


class WriteShardManifests(beam.DoFn):
    """Writes the chunk, document and dead-letter files of one shard; yields its shard row."""

    def __init__(self, output: str):
        self._output = output

    def process(self, element) -> Iterator[dict]:
        index, grouped = element
        chunks: list[ScoredChunk] = sorted(
            grouped["chunks"], key=lambda s: (s.chunk.position, s.chunk.doc_id, s.chunk.chunk_index))
        dead = sorted(grouped["dead_letter"], key=lambda d: (d.position, d.doc_id or "", d.reason))
        docs: list[dict] = []
        start = 0
        for i in range(1, len(chunks) + 1):
            if i == len(chunks) or (chunks[i].chunk.position, chunks[i].chunk.doc_id) != (
                    chunks[start].chunk.position, chunks[start].chunk.doc_id):
                docs.append(document_row(chunks[start:i]))
                start = i
        name = part_name(index)
        if chunks:
            write_table(self._output, "chunks", name, [chunk_row(s) for s in chunks], schemas.CHUNKS)
            write_table(self._output, "documents", name, docs, schemas.DOCUMENTS)
            coded = [s for s in chunks if s.payload is not None]
            if coded:
                write_table(self._output, "payloads", name, [payload_row(s) for s in coded],
                            schemas.PAYLOADS)
        if dead:
            write_table(self._output, "dead_letter", name, [dead_letter_row(d) for d in dead], schemas.DEAD_LETTER)
        shard = chunks[0].chunk.shard if chunks else dead[0].shard
        yield shard_row(shard, docs, len(dead))


class WriteShardsTable(beam.DoFn):
    """Writes the one-file shards manifest, and empty files where a manifest has none."""

    def __init__(self, output: str):
        self._output = output

    def process(self, rows: Iterable[dict]) -> Iterator[dict]:
        rows = sorted(rows, key=lambda r: r["shard"])
        write_table(self._output, "shards", part_name(0), rows, schemas.SHARDS)
        # Every manifest folder holds at least one file, so readers never fail on it.
        if not any(r["documents"] for r in rows):
            write_table(self._output, "chunks", "empty.parquet", [], schemas.CHUNKS)
            write_table(self._output, "documents", "empty.parquet", [], schemas.DOCUMENTS)
        if not any(r["dead_letters"] for r in rows):
            write_table(self._output, "dead_letter", "empty.parquet", [], schemas.DEAD_LETTER)
        yield {"shards": len(rows)}


def _by_shard_index(item):
    if isinstance(item, ScoredChunk):
        return item.chunk.shard_index, item
    return item.shard_index, item


class WriteManifests(beam.PTransform):
    """Scored chunks and dead letters in; manifests under ``output``."""

    def __init__(self, output: str):
        super().__init__()
        if not output:
            raise ValueError("output must be a directory path or fsspec URL")
        self._output = output

    def expand(self, inputs):
        chunks, dead_letters = inputs
        keyed_chunks = chunks | "KeyChunks" >> beam.Map(_by_shard_index)
        keyed_dead = dead_letters | "KeyDeadLetters" >> beam.Map(_by_shard_index)
        return (
            {"chunks": keyed_chunks, "dead_letter": keyed_dead}
            | "GroupByShard" >> beam.CoGroupByKey()
            | "WriteShardFiles" >> beam.ParDo(WriteShardManifests(self._output))
            | "CollectShardRows" >> beam.combiners.ToList()
            | "WriteShardsTable" >> beam.ParDo(WriteShardsTable(self._output))
        )
