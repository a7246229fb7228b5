"""``DocumentStats``: a document's numbers from its scored chunks.

A document's row needs sums over its chunks (bytes, tokens, bits, coded bits, baseline sizes) and its
Min-K% and Min-K%++ over all its tokens. A document's accumulator (``DocumentStatsFn``) is bounded
whatever its length: a 500 MB book is a stream of chunks merged into one bounded ``SummaryMerger`` per
signal, never a list of its chunks.

Why not ``beam.CombinePerKey``: its lifted pre-combine keeps up to 100,000 keys' accumulators per
bundle (``PGBKCVOperation.max_keys``), and a bundle is a whole read task, so a worker would hold the
summaries of every document of a 64 MiB split (each up to ``2 * DOC_LOWEST`` float32 and two
histograms), then shuffle them all. ``AccumulateDocuments`` instead finishes a document where its last
chunk is scored, when its chunk count is known (a JSONL or Parquet record), and shuffles a few numbers;
it holds the documents whose chunks are still in flight (bounded by the scoring batches) and at most
``max_open`` of them. Only the rest (plain-text files read in segments, documents evicted from the
table) travel as accumulators and are merged after a ``GroupByKey``.

Bits are summed exactly (``fractions.Fraction`` of each float64: exact dyadic rationals) and rounded
once, so the result is the same float in whatever order Beam merges the accumulators.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction

import apache_beam as beam
from apache_beam.utils.windowed_value import WindowedValue

from lmc_audit.transforms.records import ScoredChunk
from lmc_audit.transforms.scoring.signals import SummaryMerger

DocKey = tuple[int, int, str]  # (shard index, position, doc_id)


class DocumentAccumulator:
    """Accumulator: sums over a document's chunks and the merged signal summaries."""

    def __init__(self):
        self.chunks = self.bytes = self.tokens = self.scored_bytes = self.scored_chunks = 0
        self.bits = Fraction(0)
        self.coded_bits = 0
        self.coded_missing = False
        self.zlib = self.zstd = self.xz = self.scored_zlib = 0
        self.logp, self.z = SummaryMerger(), SummaryMerger()

    def add_chunk(self, s: ScoredChunk) -> None:
        c = s.chunk
        self.chunks += 1
        self.bytes += c.size
        self.tokens += s.tokens
        self.zlib, self.zstd, self.xz = self.zlib + c.zlib_bytes, self.zstd + c.zstd_bytes, self.xz + c.xz_bytes
        if s.coded_bits is None:
            self.coded_missing = True
        else:
            self.coded_bits += s.coded_bits
        if s.bits is not None:
            self.scored_chunks += 1
            self.scored_bytes += c.size
            self.scored_zlib += c.zlib_bytes
            self.bits += Fraction(s.bits)
            self.logp.add(s.logp)
            self.z.add(s.zscores)

    def merge(self, o: "DocumentAccumulator") -> None:
        for name in ("chunks", "bytes", "tokens", "scored_bytes", "scored_chunks", "bits", "coded_bits",
                     "zlib", "zstd", "xz", "scored_zlib"):
            setattr(self, name, getattr(self, name) + getattr(o, name))
        self.coded_missing |= o.coded_missing
        self.logp.add(o.logp)
        self.z.add(o.z)


def merge_into_first(accumulators):
    """Beam's ``merge_accumulators`` for accumulators with ``merge(other)``: merged into the first."""
    it = iter(accumulators)
    first = next(it)
    for a in it:
        first.merge(a)
    return first


class DocumentStatsFn(beam.CombineFn):
    """Scored chunks of one document in; the numbers of its manifest row out (``k``: Min-K%'s k)."""

    def __init__(self, k: float):
        super().__init__()
        self._k = k

    def create_accumulator(self) -> DocumentAccumulator:
        return DocumentAccumulator()

    def add_input(self, acc: DocumentAccumulator, s: ScoredChunk) -> DocumentAccumulator:
        acc.add_chunk(s)
        return acc

    def merge_accumulators(self, accs) -> DocumentAccumulator:
        return merge_into_first(accs)

    def extract_output(self, acc: DocumentAccumulator) -> dict:
        scored = acc.scored_chunks > 0
        min_k, min_k_exact = acc.logp.min_k(self._k)
        min_k_pp, min_k_pp_exact = acc.z.min_k(self._k)
        return {
            "chunks": acc.chunks, "bytes": acc.bytes, "tokens": acc.tokens, "scored_bytes": acc.scored_bytes,
            "flagged_chunks": acc.chunks - acc.scored_chunks,
            "bits": float(acc.bits) if scored else None,
            "coded_bits": None if acc.coded_missing else acc.coded_bits,
            "zlib_bytes": acc.zlib, "zstd_bytes": acc.zstd, "xz_bytes": acc.xz, "scored_zlib_bytes": acc.scored_zlib,
            "min_k": min_k, "min_k_pp": min_k_pp, "min_k_exact": min_k_exact and min_k_pp_exact,
        }


# Documents a worker keeps open at once in ``AccumulateDocuments`` before it ships the oldest as partial
# accumulators (each at most about 2 * DOC_LOWEST * 4 bytes and two histograms).
MAX_OPEN_DOCUMENTS = 2048


class AccumulateDocuments(beam.DoFn):
    """Scored chunks in; (document key, ``("done", numbers)`` or ``("part", DocumentAccumulator)``) out.

    A document whose every chunk it has seen (``Chunk.doc_chunks``) leaves finished: its numbers, a few
    hundred bytes. Others leave as partial accumulators at the bundle's end, or when more than
    ``max_open`` documents are open (oldest first)."""

    def __init__(self, k: float, max_open: int = MAX_OPEN_DOCUMENTS):
        if max_open < 1:
            raise ValueError(f"max_open must be at least 1, got {max_open}")
        self._fn = DocumentStatsFn(k)
        self._max_open = max_open

    def start_bundle(self) -> None:
        self._open: dict[tuple, DocumentAccumulator] = {}  # insertion order: oldest first

    def process(self, s: ScoredChunk, window=beam.DoFn.WindowParam) -> Iterator[tuple]:
        c = s.chunk
        key = (c.shard_index, c.position, c.doc_id)
        slot = (window, key)
        acc = self._open.pop(slot, None)
        if acc is None:
            acc = DocumentAccumulator()
        acc.add_chunk(s)
        if c.doc_chunks and acc.chunks == c.doc_chunks:
            yield key, ("done", self._fn.extract_output(acc))
            return
        self._open[slot] = acc  # re-inserted: the most recently fed document is the last evicted
        if len(self._open) > self._max_open:
            oldest = next(iter(self._open))
            old_window, old_key = oldest
            yield WindowedValue((old_key, ("part", self._open.pop(oldest))), old_window.max_timestamp(),
                                [old_window])

    def finish_bundle(self) -> Iterator[WindowedValue]:
        for (window, key), acc in self._open.items():
            yield WindowedValue((key, ("part", acc)), window.max_timestamp(), [window])
        self._open = {}


class FinishDocument(beam.DoFn):
    """A document's finished numbers, or its partial accumulators merged and finished."""

    def __init__(self, k: float):
        self._fn = DocumentStatsFn(k)

    def process(self, element) -> Iterator[tuple[DocKey, dict]]:
        key, pieces = element
        done, merged, count = None, None, 0
        for kind, value in pieces:
            count += 1
            if kind == "done":
                done = value
            else:
                merged = value if merged is None else merge_into_first([merged, value])
        if done is not None:
            if count > 1:  # every chunk went into the finished one: nothing else can belong to it
                raise ValueError(f"document {key} was finished and also has {count - 1} other pieces")
            yield key, done
        else:
            yield key, self._fn.extract_output(merged)


class DocumentStats(beam.PTransform):
    """Scored chunks in; (document key, the numbers of its manifest row) out, one per document."""

    def __init__(self, k: float, max_open: int = MAX_OPEN_DOCUMENTS):
        super().__init__()
        self._accumulate = AccumulateDocuments(k, max_open)
        self._k = k

    def expand(self, chunks):
        return (chunks
                | "Accumulate" >> beam.ParDo(self._accumulate)
                | "GroupByDocument" >> beam.GroupByKey()
                | "Finish" >> beam.ParDo(FinishDocument(self._k)))
