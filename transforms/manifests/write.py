"""``WriteManifests``: chunk, document, shard and dead-letter Parquet datasets.

A shard is written in parts: ``<manifest>/part-<hash of shard path>-<part>.parquet``.
The number of parts follows the shard's size in the listing (one per
``part_bytes`` of text, 64 MiB by default; compressed files and Parquet
counted at 4x their size), and every row goes to the part a hash of its
document (and, for chunks, of its slice of 1,024 chunks) picks. So a worker
holds one part, whatever the size of the shard or of one document (a 500 MB
book spreads its chunks over all its shard's parts), and parts are written
in parallel. Within a file rows are sorted, with an explicit schema: the
files are byte-identical whatever the batch size, bundle boundaries or
number of workers, which Beam's ``WriteToParquet`` does not promise (its
sharding follows bundles). A part's chunks and its documents are two
groups, each written by its own step (``WriteChunkFiles``,
``WriteDocumentFiles``). The groups carry no text and no payloads: chunks
lose their bytes before them, payloads (the bulk of what is written) wait in
staging files and travel as references (``staging``), as do the documents'
dedup sketches (copied into ``_state/sketches``), per-token scores are
bounded summaries, and each document's hashes and sketch were made while it
was read. A shard's
row is the merge of its parts' totals (``ShardTotals``); its commit marker is
written after every part's files. Rows stream through ``pq.ParquetWriter`` in row groups into a
temporary file renamed into place (local) or a multipart upload committed
at close (object stores), so a reader never sees half a file; a retried
write produces the same bytes.
"""

from __future__ import annotations

from fractions import Fraction
from array import array
from collections.abc import Iterable, Iterator

import apache_beam as beam

import numpy as np

from lmc_audit.transforms.coding import payloads
from lmc_audit.transforms.manifests import schemas
from lmc_audit.transforms.manifests.files import (EMPTY, ROW_GROUP_BYTES, SHARD_ROWS_PER_PART, list_files,
                                                  part_file_name, part_name, part_of, remove_file, shards_table_part,
                                                  shards_table_parts, write_rows)
from lmc_audit.transforms.manifests.staging import (StagePayloads, StageSketches, new_staging_folder, read_staged,
                                                    read_staged_ranges, remove_staging, staging_folder)
from lmc_audit.transforms.manifests.state import STATE_SKETCHES, staged_sketch_row, write_commit_marker
from lmc_audit.transforms.scoring import signals
from lmc_audit.transforms.documents.document_facts import DocumentDescriber, DocumentFacts
from lmc_audit.transforms.documents.document_stats import DocKey, DocumentStats, DocumentStatsFn, merge_into_first
from lmc_audit.transforms.records import DeadLetter, ScoredChunk
from lmc_audit.transforms.scoring.signals import SignalOptions

QUANTILES = (("p05", 0.05), ("p25", 0.25), ("median", 0.5), ("p75", 0.75), ("p95", 0.95))


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
                 options: SignalOptions = SignalOptions(), reference: ReferenceBits | None = None) -> dict:
    """One document's row from its ``DocumentStatsFn`` output, its ``facts`` (hashes, snippet) and, with a
    reference model, that model's bits of its chunks (``ReferenceBitsFn``)."""
    _, position, doc_id = key
    n_bytes, bits, scored_bytes, coded = stats["bytes"], stats["bits"], stats["scored_bytes"], stats["coded_bits"]
    ref_bits = ref_bpb = diff = None
    if reference is not None and bits is not None and reference.complete(stats["chunks"]):
        ref_bits = float(reference.bits)
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
    reference = None
    if references is not None:
        reference = ReferenceBits()
        for r in references:
            reference.add(r)
    return document_row(key, first.shard, fn.extract_output(acc), describer.finish(), options, reference)


class ReferenceBits:
    """The reference model's bits of a document's chunks, summed exactly (any order, the same float)."""

    def __init__(self):
        self.bits, self.chunks, self.missing = Fraction(0), 0, False

    def add(self, bits: float | None) -> None:
        self.chunks += 1
        if bits is None:
            self.missing = True
        else:
            self.bits += Fraction(bits)

    def merge(self, other: "ReferenceBits") -> "ReferenceBits":
        self.bits, self.chunks, self.missing = self.bits + other.bits, self.chunks + other.chunks, \
            self.missing or other.missing
        return self

    def complete(self, chunks: int) -> bool:
        return not self.missing and self.chunks == chunks


class ReferenceBitsFn(beam.CombineFn):
    """A document's reference bits from its chunks scored by the reference model: one small accumulator."""

    def create_accumulator(self) -> ReferenceBits:
        return ReferenceBits()

    def add_input(self, acc: ReferenceBits, s: ScoredChunk) -> ReferenceBits:
        acc.add(s.bits)
        return acc

    def merge_accumulators(self, accs) -> ReferenceBits:
        return merge_into_first(accs)

    def extract_output(self, acc: ReferenceBits) -> ReferenceBits:
        return acc


def quantile(values: list[float], q: float) -> float:
    """Linear interpolation between order statistics (numpy's default)."""
    return float(np.quantile(np.asarray(values, np.float64), q))


class ShardTotals:
    """What a shard's row needs of its documents, gathered part by part: counts, exact sums
    (``Fraction``) and each document's bpb (8 bytes a document, for exact quantiles). Merging parts'
    totals in any order gives the same row."""

    def __init__(self):
        self.documents = self.dead_letters = self.chunks = self.flagged_chunks = 0
        self.bytes = self.scored_bytes = self.coded_bits = self.flagged_documents = 0
        self.coded_missing = False
        self.bits = Fraction(0)
        self.weighted = {col: Fraction(0) for col in ("zlib_bpb", "zstd_bpb", "xz_bpb")}
        self.doc_bpb = array("d")
        self.flagged = {name: 0 for name in signals.SIGNALS}

    def add_document(self, d: dict) -> None:
        self.documents += 1
        self.chunks += d["chunks"]
        self.flagged_chunks += d["flagged_chunks"]
        self.bytes += d["bytes"]
        self.scored_bytes += d["scored_bytes"]
        if d["bits"] is not None:
            self.bits += Fraction(d["bits"])
        if d["coded_bits"] is None:
            self.coded_missing = True
        else:
            self.coded_bits += d["coded_bits"]
        for col in self.weighted:
            self.weighted[col] += Fraction(d[col]) * d["bytes"]
        if d["bpb"] is not None:
            self.doc_bpb.append(d["bpb"])
        for name in self.flagged:
            self.flagged[name] += name in d["memorization_flags"]
        self.flagged_documents += bool(d["memorization_flags"])

    def merge(self, o: "ShardTotals") -> "ShardTotals":
        for name in ("documents", "dead_letters", "chunks", "flagged_chunks", "bytes", "scored_bytes", "coded_bits",
                     "flagged_documents", "bits"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        self.coded_missing |= o.coded_missing
        for col in self.weighted:
            self.weighted[col] += o.weighted[col]
        self.doc_bpb.extend(o.doc_bpb)
        for name in self.flagged:
            self.flagged[name] += o.flagged[name]
        return self

    def row(self, shard: str) -> dict:
        doc_bpb = sorted(self.doc_bpb)
        coded = None if not self.documents or self.coded_missing else self.coded_bits
        return {
            "shard": shard, "documents": self.documents, "dead_letters": self.dead_letters,
            "chunks": self.chunks, "flagged_chunks": self.flagged_chunks,
            "bytes": self.bytes, "scored_bytes": self.scored_bytes, "bits": float(self.bits),
            "bpb": _ratio(float(self.bits), self.scored_bytes),
            "coded_bits": coded, "coded_bpb": _ratio(coded, self.bytes),
            **{col: _ratio(float(total), self.bytes) for col, total in self.weighted.items()},
            "min_doc_bpb": doc_bpb[0] if doc_bpb else None,
            **{f"{name}_doc_bpb": quantile(doc_bpb, q) if doc_bpb else None for name, q in QUANTILES},
            "max_doc_bpb": doc_bpb[-1] if doc_bpb else None,
            **{f"flagged_{name}": count for name, count in self.flagged.items()},
            "flagged_documents": self.flagged_documents,
            # Filled in once duplicates are known (WriteShardsTable).
            "exact_duplicates": 0, "near_duplicates": 0, "exact_duplicate_rate": None, "near_duplicate_rate": None,
        }


def shard_row(shard: str, docs: list[dict], dead_letters: int) -> dict:
    totals = ShardTotals()
    for d in docs:
        totals.add_document(d)
    totals.dead_letters = dead_letters
    return totals.row(shard)


def payload_fields(s: ScoredChunk) -> tuple[str, str, bytes]:
    """(method, recipe, payload) of a coded chunk: its payload row besides the chunk's own columns."""
    method = "stored" if s.payload[payloads.METHOD_OFFSET] == payloads.METHOD_STORED else "model"
    return method, s.recipe or "stored", s.payload


CHUNK_COLUMNS = tuple(schemas.CHUNKS.names)
_DOC_ID, _SHARD, _POSITION, _CHUNK_INDEX, _REFERENCE_BITS = (
    CHUNK_COLUMNS.index(n) for n in ("doc_id", "shard", "position", "chunk_index", "reference_bits"))
assert tuple(schemas.PAYLOADS.names) == ("doc_id", "shard", "position", "chunk_index", "method", "recipe", "payload")


def payload_row_of(chunk: tuple, payload: tuple) -> tuple:
    """A payload row, as a tuple in the payloads schema's order, from a chunk row tuple and its
    ``payload_fields``."""
    return (chunk[_DOC_ID], chunk[_SHARD], chunk[_POSITION], chunk[_CHUNK_INDEX], *payload)


def _payload_bytes(row: tuple) -> int:
    return len(row[-1])


def _sketch_row_bytes(row: dict) -> int:
    return len(row["shingles"]) + len(row["lines"])


def dead_letter_row(d: DeadLetter) -> dict:
    return {"shard": d.shard, "position": d.position, "doc_id": d.doc_id, "reason": d.reason}


class WriteChunkFiles(beam.DoFn):
    """Writes the chunk and payload files of one part of a shard; yields (shard index, (part, shard, None)),
    which tells ``CommitShard`` the part's chunks are written.

    A chunk comes as its row (and a reference to its staged payload), without its text or per-token scores,
    with the reference model's bits where the job has one. Rows are sorted, then streamed into the files;
    payloads are read back from staging a row group at a time.
    """

    def __init__(self, output: str, staging: str):
        self._output, self._staging = output, staging

    def setup(self) -> None:
        self._staged = staging_folder(self._output, self._staging)

    def process(self, element) -> Iterator[tuple[int, tuple[int, str, None]]]:
        (index, part), grouped = element
        chunks = sorted(grouped["chunks"], key=lambda c: (c[0][_POSITION], c[0][_DOC_ID], c[0][_CHUNK_INDEX]))
        if not chunks:  # a part that has only the reference model's bits of a chunk it does not hold
            return
        has_reference = "reference" in grouped
        references = {(r[0], r[1], r[2]): r[3] for r in grouped.get("reference", ())}
        shard = chunks[0][0][_SHARD]
        name = part_file_name(shard, part)

        def rows() -> Iterator[tuple]:
            for packed, _ in chunks:
                if has_reference:
                    bits = references.get((packed[_POSITION], packed[_DOC_ID], packed[_CHUNK_INDEX]))
                    packed = (*packed[:_REFERENCE_BITS], bits, *packed[_REFERENCE_BITS + 1:])
                yield packed

        write_rows(self._output, "chunks", name, rows(), schemas.CHUNKS, as_tuples=True)
        if any(p is not None for _, p in chunks):
            staged = read_staged(*self._staged, ((c, p) for c, p in chunks if p is not None), ROW_GROUP_BYTES)
            write_rows(self._output, "payloads", name, (payload_row_of(c, p) for c, p in staged),
                       schemas.PAYLOADS, as_tuples=True, row_bytes=_payload_bytes)
        yield index, (part, shard, None)


class WriteDocumentFiles(beam.DoFn):
    """Writes the document, dead-letter and sketch files of one part of a shard; yields (shard index,
    (part, shard, ``ShardTotals``)).

    A document comes as its ``DocumentStatsFn`` numbers, its ``DocumentFacts`` (hashes, snippet, made while
    it was read) with a reference to its staged sketch (``StageSketches``) and, with a reference model, its
    ``ReferenceBits``: a few hundred bytes each. The sketches are read back a row group at a time.
    """

    def __init__(self, output: str, signal_options: SignalOptions, staging: str):
        self._output = output
        self._signals = signal_options
        self._staging = staging

    def setup(self) -> None:
        self._staged = staging_folder(self._output, self._staging)

    def process(self, element) -> Iterator[tuple[int, tuple[int, str, ShardTotals]]]:
        (index, part), grouped = element
        stats = sorted(grouped["documents"], key=lambda d: (d[0][1], d[0][2]))
        dead = sorted(grouped["dead_letter"], key=lambda d: (d.position, d.doc_id or "", d.reason))
        facts = {(f.key[1], f.key[2]): (f, ref) for f, ref in grouped["facts"]}
        has_reference = "document_reference" in grouped
        document_references = {(k[1], k[2]): bits for k, bits in grouped.get("document_reference", ())}
        if not stats and not dead:
            return
        shard = next(iter(facts.values()))[0].shard if facts else dead[0].shard
        totals = ShardTotals()
        docs = []
        for key, numbers in stats:
            reference = document_references.get((key[1], key[2]), ReferenceBits()) if has_reference else None
            doc = document_row(key, shard, numbers, facts[(key[1], key[2])][0], self._signals, reference)
            totals.add_document(doc)
            docs.append(doc)
        totals.dead_letters = len(dead)
        name = part_file_name(shard, part)
        if docs:
            write_rows(self._output, "documents", name, docs, schemas.DOCUMENTS)
        if dead:
            write_rows(self._output, "dead_letter", name, [dead_letter_row(d) for d in dead], schemas.DEAD_LETTER)
        staged = [facts[(d["position"], d["doc_id"])] for d in docs]
        if staged and staged[0][1] is not None:
            sketches = read_staged_ranges(*self._staged, staged, ROW_GROUP_BYTES)
            write_rows(self._output, STATE_SKETCHES, name, (staged_sketch_row(f, data) for f, data in sketches),
                       schemas.SKETCHES, row_bytes=_sketch_row_bytes)
        yield index, (part, shard, totals)


class CommitShard(beam.DoFn):
    """A shard's parts in (``WriteDocumentFiles``' totals, ``WriteChunkFiles``' markers); its row out, once
    its commit marker is written (after every part's files)."""

    def __init__(self, output: str, commit: dict[str, dict] | None = None):
        self._output = output
        self._commit = commit or {}  # shard -> {"key", "fingerprint"}: what its commit marker records

    def process(self, element) -> Iterator[dict]:
        _, parts = element
        totals = ShardTotals()
        for _, shard, part in sorted(parts, key=lambda p: (p[0], p[2] is None)):
            if part is not None:
                totals.merge(part)
        row = totals.row(shard)
        # The commit marker comes last: a shard is complete once it exists (incremental runs skip it).
        write_commit_marker(self._output, shard, self._commit.get(shard, {}), row)
        yield row


def _with_duplicate_counts(element) -> Iterator[dict]:
    _, grouped = element
    counts = list(grouped["duplicates"])
    exact, near = sum(e for e, _ in counts), sum(n for _, n in counts)
    for r in grouped["row"]:
        yield dict(r, exact_duplicates=exact, near_duplicates=near, exact_duplicate_rate=_ratio(exact, r["documents"]),
                   near_duplicate_rate=_ratio(near, r["documents"]))


class _WriteShardsPart(beam.DoFn):
    """Writes one part of the shards manifest, its rows sorted by shard; yields (rows, any with documents,
    any with dead letters)."""

    def __init__(self, output: str):
        self._output = output

    def process(self, element) -> Iterator[tuple[int, bool, bool]]:
        part, rows = element
        rows = sorted(rows, key=lambda r: r["shard"])
        write_rows(self._output, "shards", part_name(part), rows, schemas.SHARDS)
        yield len(rows), any(r["documents"] for r in rows), any(r["dead_letters"] for r in rows)


def _add_part_totals(totals: Iterable[tuple[int, bool, bool]]) -> tuple[int, bool, bool]:
    rows, documents, dead = 0, False, False
    for n, d, x in totals:
        rows, documents, dead = rows + n, documents or d, dead or x
    return rows, documents, dead


class _FinishManifests(beam.DoFn):
    """After every shards part: placeholders where a manifest has no file, stale shards parts removed;
    yields ``{"shards": rows}``."""

    def __init__(self, output: str, parts: int, dedup: bool):
        self._output, self._parts, self._dedup = output, parts, dedup

    def process(self, totals: tuple[int, bool, bool], duplicate_shards: int) -> Iterator[dict]:
        rows, has_documents, has_dead = totals
        # An earlier incremental run over more shards may have left parts past this run's count.
        for name in list_files(self._output, "shards"):
            if name.startswith("part-") and name.endswith(".parquet") and name[5:-8].isdigit() \
                    and int(name[5:-8]) >= self._parts:
                remove_file(self._output, "shards", name)
        # Every manifest folder holds at least one file, so readers never fail on it; a placeholder
        # left by an earlier incremental run goes once the folder has rows.
        placeholders = [("chunks", schemas.CHUNKS, not has_documents),
                        ("documents", schemas.DOCUMENTS, not has_documents),
                        ("dead_letter", schemas.DEAD_LETTER, not has_dead)]
        if self._dedup and not duplicate_shards:  # no cluster: no part file was written
            write_rows(self._output, "duplicates", part_name(0), [], schemas.DUPLICATES)
        for manifest, schema, empty in placeholders:
            if empty:
                write_rows(self._output, manifest, EMPTY, [], schema)
            else:
                remove_file(self._output, manifest, EMPTY)
        yield {"shards": rows}


class WriteShardsTable(beam.PTransform):
    """(shard rows, (shard, (exact, near)) duplicate counts) in; the shards manifest out, in
    ``shards_table_parts(shards)`` part files of at most about ``SHARD_ROWS_PER_PART`` rows (a hash of the
    shard path picks the part; rows sorted by shard within it), so no worker holds every shard's row; then
    ``{"shards": rows}`` once every part is written."""

    def __init__(self, output: str, shards: int, dedup: bool = False, rows_per_part: int = SHARD_ROWS_PER_PART):
        super().__init__()
        if shards < 0 or rows_per_part < 1:
            raise ValueError("shards must be at least 0 and rows_per_part at least 1")
        self._output, self._parts, self._dedup = output, shards_table_parts(shards, rows_per_part), dedup

    def expand(self, inputs):
        rows, duplicates = inputs
        parts = self._parts
        totals = (
            {"row": rows | "KeyRowsByShard" >> beam.Map(lambda r: (r["shard"], r)), "duplicates": duplicates}
            | "JoinDuplicateCounts" >> beam.CoGroupByKey()
            | "AddDuplicateCounts" >> beam.FlatMap(_with_duplicate_counts)
            | "KeyRowsByPart" >> beam.Map(lambda r: (shards_table_part(r["shard"], parts), r))
            | "GroupRowsByPart" >> beam.GroupByKey()
            | "WriteShardsParts" >> beam.ParDo(_WriteShardsPart(self._output))
            | "AddPartTotals" >> beam.CombineGlobally(_add_part_totals)
        )
        duplicate_shards = duplicates | "CountDuplicateShards" >> beam.combiners.Count.Globally()
        return totals | "FinishManifests" >> beam.ParDo(_FinishManifests(self._output, parts, self._dedup),
                                                        beam.pvalue.AsSingleton(duplicate_shards))


class _WriteDuplicatesPart(beam.DoFn):
    """Writes one part of the duplicates manifest; yields its (shard, (exact, near)) counts once written."""

    def __init__(self, output: str):
        self._output = output

    def process(self, element) -> Iterator[tuple[str, tuple[int, int]]]:
        part, rows = element
        ordered = sorted(rows, key=lambda r: (r[0], r[1]))  # by kept document, then member
        write_rows(self._output, "duplicates", part_name(part), (row for _, _, row in ordered), schemas.DUPLICATES)
        counts: dict[str, tuple[int, int]] = {}
        for _, _, row in ordered:
            if row["reason"] != "kept":
                exact, near = counts.get(row["shard"], (0, 0))
                counts[row["shard"]] = (exact + (row["reason"] == "exact"), near + (row["reason"] == "near"))
        yield from sorted(counts.items())


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    exact = near = 0
    for e, n in pairs:
        exact, near = exact + e, near + n
    return exact, near


class WriteDuplicates(beam.PTransform):
    """``FindDuplicates``' rows in; the ``duplicates/`` manifest written as ``parts`` files (a cluster's
    rows in the file a hash of its kept document picks, sorted; none for a part without rows); out, once
    written, per shard, (exact, near) counts of its dropped documents, for the shards manifest
    (``WriteShardsTable`` writes an empty file when there are none)."""

    def __init__(self, output: str, parts: int = 1):
        super().__init__()
        if parts < 1:
            raise ValueError(f"parts must be at least 1, got {parts}")
        self._output = output
        self._parts = parts

    def _part(self, element):
        return element[2]["cluster_id"] % self._parts, element  # the id is already a hash of the kept document

    def expand(self, rows):
        return (rows
                | "KeyByPart" >> beam.Map(self._part)
                | "GroupByPart" >> beam.GroupByKey()
                | "WriteParts" >> beam.ParDo(_WriteDuplicatesPart(self._output))
                | "CountByShard" >> beam.CombinePerKey(_sum_pairs))


class PartKeys:
    """Keys rows by (shard index, part): the part from the shard's part count and a hash of the document."""

    def __init__(self, parts: dict[int, int]):
        self._parts = parts  # shard index -> parts; 1 where absent (listing errors)

    def part(self, index: int, position: int, doc_id: str | None, chunk_index: int = 0) -> tuple[int, int]:
        return index, part_of(self._parts.get(index, 1), position, doc_id, chunk_index)

    def chunk_rows(self, s: ScoredChunk, k: float):
        """A scored chunk as what its part's group needs: its chunk row as a tuple in ``CHUNK_COLUMNS``
        order and its payload's (method, recipe, payload). Tuples, not dicts: a dict repeats its 19 column
        names in every element, and a runner that holds a group decoded (DirectRunner) holds them all."""
        c = s.chunk
        row = chunk_row(s, k)
        return (self.part(c.shard_index, c.position, c.doc_id, c.chunk_index),
                (tuple(row[name] for name in CHUNK_COLUMNS), payload_fields(s) if s.payload is not None else None))

    def document(self, element):
        key, value = element
        return self.part(*key), (key, value)

    def dead_letter(self, d: DeadLetter):
        return self.part(d.shard_index, d.position, d.doc_id), d

    def facts(self, f: DocumentFacts):
        return self.part(*f.key)

    def reference(self, s: ScoredChunk):
        c = s.chunk
        return self.part(c.shard_index, c.position, c.doc_id, c.chunk_index), (c.position, c.doc_id, c.chunk_index,
                                                                               s.bits)


def _staging_removed(element: dict, output: str, staging: str) -> dict:
    """Every shard's files are committed by now: the run's staged payloads are read."""
    remove_staging(output, staging)
    return element


def _by_document(s: ScoredChunk):
    c = s.chunk
    return (c.shard_index, c.position, c.doc_id), s


class WriteManifests(beam.PTransform):
    """(scored chunks, dead letters, ``DocumentFacts``[, the reference model's scored chunks]) in; the chunk,
    document, payload, dead-letter and shard manifests under ``output``; one element out once the shards
    manifest is written.

    ``parts``: per shard index, how many part files its manifests are written as (``shard_parts``; 1 where
    absent). ``duplicates``: (shard, (exact, near)) from ``WriteDuplicates``, for the shards' duplicate
    counts (none without dedup). ``commit``: per shard, the key and fingerprint its marker records; ``committed``:
    (shard, index, shard row) of shards already complete, which this run does not read.
    """

    def __init__(self, output: str, signal_options: SignalOptions = SignalOptions(),
                 commit: dict[str, dict] | None = None, committed: list[tuple[str, int, dict]] = (),
                 duplicates: beam.PCollection | None = None, parts: dict[int, int] | None = None):
        super().__init__()
        if not output:
            raise ValueError("output must be a directory path or fsspec URL")
        if parts and min(parts.values()) < 1:
            raise ValueError("every shard is written as at least one part")
        self._output = output
        self._signals = signal_options
        self._commit = commit
        self._committed = list(committed)
        self._duplicates = duplicates
        self._keys = PartKeys(dict(parts or {}))
        self._staging = new_staging_folder()  # this run's: a retried or concurrent job never shares it
        # Every listed shard (``parts`` covers the whole listing, committed shards too): sizes the shards table.
        self._shards = max(len(parts or {}), len(self._committed))

    def expand(self, inputs):
        chunks, dead_letters, facts, *reference = inputs
        keys = self._keys
        # Chunks and documents are grouped apart. A CoGroupByKey flattens its inputs first, and a runner
        # that holds a group in memory (DirectRunner) then holds that Flatten and the group at once; a plain
        # GroupByKey of the chunks has no Flatten. Payloads (the bulk of what is written) are staged in
        # files and the chunks' group carries references to them.
        chunk_rows = chunks | "ChunkRows" >> beam.ParDo(
            StagePayloads(self._output, self._staging, keys.chunk_rows, self._signals.k))
        if reference:
            chunk_groups = ({"chunks": chunk_rows,
                             "reference": reference[0] | "KeyReference" >> beam.Map(keys.reference)}
                            | "GroupChunksByPart" >> beam.CoGroupByKey())
        else:
            chunk_groups = (chunk_rows
                            | "GroupChunksByPart" >> beam.GroupByKey()
                            | "AsChunkGroups" >> beam.MapTuple(lambda part, rows: (part, {"chunks": rows})))
        document_groups = {
            "documents": (chunks
                          | "DocumentStats" >> DocumentStats(self._signals.k)
                          | "KeyDocumentsByPart" >> beam.Map(keys.document)),
            "dead_letter": dead_letters | "KeyDeadLetters" >> beam.Map(keys.dead_letter),
            "facts": facts | "StageSketches" >> beam.ParDo(
                StageSketches(self._output, self._staging, keys.facts))}
        if reference:
            document_groups["document_reference"] = (reference[0]
                                                     | "KeyReferenceByDocument" >> beam.Map(_by_document)
                                                     | "DocumentReferenceBits" >> beam.CombinePerKey(ReferenceBitsFn())
                                                     | "KeyReferenceByPart" >> beam.Map(keys.document))
        chunk_parts = chunk_groups | "WriteChunkFiles" >> beam.ParDo(WriteChunkFiles(self._output, self._staging))
        document_parts = (document_groups
                          | "GroupDocumentsByPart" >> beam.CoGroupByKey()
                          | "WriteDocumentFiles" >> beam.ParDo(
                              WriteDocumentFiles(self._output, self._signals, self._staging)))
        written = (
            (chunk_parts, document_parts)
            | "AllParts" >> beam.Flatten()
            | "GroupPartsByShard" >> beam.GroupByKey()
            | "CommitShards" >> beam.ParDo(CommitShard(self._output, self._commit))
        )
        pipeline = written.pipeline
        committed = (pipeline | "CommittedShards" >> beam.Create([c[2] for c in self._committed], reshuffle=False))
        duplicates = self._duplicates
        if duplicates is None:
            duplicates = pipeline | "NoDuplicates" >> beam.Create([])
        shard_rows = (written, committed) | "AllShardRows" >> beam.Flatten()
        return ((shard_rows, duplicates)
                | "WriteShardsTable" >> WriteShardsTable(self._output, self._shards, self._duplicates is not None)
                | "RemoveStaging" >> beam.Map(_staging_removed, self._output, self._staging))
