"""``DocumentStatsFn``: a document's numbers from its scored chunks, as a Beam ``CombineFn``.

A document's row needs sums over its chunks (bytes, tokens, bits, coded bits, baseline sizes) and its
Min-K% and Min-K%++ over all its tokens. Combining per document keeps a worker's memory at one
accumulator per document in flight, whatever the document's length: a 500 MB book is a stream of
chunks merged into one bounded ``SummaryMerger`` per signal, never a list of its chunks.

Bits are summed exactly (``fractions.Fraction`` of each float64: exact dyadic rationals) and rounded
once, so the result is the same float in whatever order Beam merges the accumulators.
"""

from __future__ import annotations

from fractions import Fraction

import apache_beam as beam

from lmc_audit.transforms.records import ScoredChunk
from lmc_audit.transforms.scoring.signals import SummaryMerger

DocKey = tuple[int, int, str]  # (shard index, position, doc_id)


class DocumentStats:
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

    def merge(self, o: "DocumentStats") -> None:
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

    def create_accumulator(self) -> DocumentStats:
        return DocumentStats()

    def add_input(self, acc: DocumentStats, s: ScoredChunk) -> DocumentStats:
        acc.add_chunk(s)
        return acc

    def merge_accumulators(self, accs) -> DocumentStats:
        return merge_into_first(accs)

    def extract_output(self, acc: DocumentStats) -> dict:
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
