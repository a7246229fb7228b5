"""Memorization signals from per-token scores (definitions: README, "Signals").

- ``token_stats`` runs on the model's device next to the forward: from the
  [rows, L, V] logits it keeps, per position, log p(target) and the Min-K%++
  z-score ``(log p(target) - mu) / sigma`` with ``mu = sum_v p log p`` and
  ``sigma^2 = sum_v p (log p)^2 - mu^2`` over the whole vocabulary. Only
  [rows, L] floats leave the device.
- ``min_k_mean`` is Min-K% Prob (Shi et al. 2023) over log p, and Min-K%++
  (Zhang et al. 2024) over z: the mean of the lowest k% of the values.

Per-token arrays never travel: where a chunk is scored, each signal's values
become a ``SignalSummary`` whose size is bounded by the chunk (its lowest half,
sorted) and by a fixed histogram, and a document's summary is the merge of its
chunks' (bounded by ``DOC_LOWEST`` values and the histogram, whatever the
document's length). A document's Min-K% is then:

- exact (the same value as from all of its tokens) when its ``ceil(k * n)``
  lowest values are all stored, which the summary can tell: every value it does
  not store is at least ``floor``; this holds for a chunk at k <= 0.5 and for
  nearly every document below ``DOC_LOWEST / k`` tokens;
- otherwise estimated from the histogram: whole bins add their exact sums, the
  bin where the lowest k% ends adds its mean; the error is at most one bin
  width, ``1 / BINS_PER_NAT`` (tested against the exact value).

Sums are fixed-point integers, so merging in any order gives the same bits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# sigma below this (a near one-hot distribution) would blow z up; it is held here.
MIN_SIGMA = 1e-4
# Bound on the [slice, L, V] float32 temporaries: 2^28 entries (1 GiB).
MAX_ENTRIES = 1 << 28


def _stats_slice(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits = logits.float()
    # log p = logits - logsumexp (not log_softmax): log p(target) is then exactly what the bits always were.
    logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)  # [r, L, V]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [r, L]
    # Two [r, L, V] temporaries in all and dot products over V: these passes cost about as much
    # as a small model's forward, so none is spent on a product that is summed at once.
    probs = logprobs.exp()
    mu = torch.linalg.vecdot(probs, logprobs)  # sum_v p log p
    second = torch.linalg.vecdot(probs.mul_(logprobs), logprobs)  # sum_v p (log p)^2
    sigma = (second - mu.square()).clamp_min(0).sqrt().clamp_min(MIN_SIGMA)
    return picked, (picked - mu) / sigma


def token_stats(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, L, V] logits, [R, L] targets -> ([R, L] log p(target), [R, L] Min-K%++ z), float32, on device."""
    rows, length, vocab = logits.shape
    step = max(1, MAX_ENTRIES // max(1, length * vocab))
    parts = [_stats_slice(logits[r:r + step], targets[r:r + step]) for r in range(0, rows, step)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def min_k_mean(values: np.ndarray, k: float) -> float | None:
    """Mean of the lowest ceil(k * n) values (at least one); None for no values."""
    n = len(values)
    if n == 0:
        return None
    m = max(1, math.ceil(k * n))
    lowest = np.sort(values.astype(np.float64))[:m]
    return float(np.sum(lowest) / m)


# Histogram of a signal's values: bins of 1/BINS_PER_NAT over [low, high); values outside count in the
# first or last bin (their sums stay exact). Sums are integers in units of 2^-FIXED_BITS.
BINS_PER_NAT = 16
FIXED_BITS = 24
RANGES = {"logp": (-64.0, 0.0), "z": (-48.0, 16.0)}
DOC_LOWEST = 4096  # lowest values a document's summary keeps exactly


@dataclass(frozen=True)
class SignalSummary:
    """What Min-K% needs of one signal's values, in bounded size.

    ``lowest``: float32, ascending, the lowest values stored exactly; every value not stored is at least
    ``floor`` (inf when all are stored). ``bins``/``counts``/``sums``: the sparse histogram of all values.
    """

    count: int
    lowest: bytes
    floor: float
    bins: bytes  # int32 bin indices, ascending
    counts: bytes  # int64
    sums: bytes  # int64 fixed-point


def _fixed(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * (1 << FIXED_BITS)).astype(np.int64)


def summarize(values: np.ndarray, signal: str, keep: int | None = None) -> SignalSummary:
    """The summary of one chunk's values (``keep``: how many lowest to store; half of them by default)."""
    values = np.asarray(values, np.float32)
    n = len(values)
    keep = (n + 1) // 2 if keep is None else min(n, keep)
    ordered = np.sort(values)
    low, _ = RANGES[signal]
    nbins = int((RANGES[signal][1] - low) * BINS_PER_NAT)
    # Bin indices of the sorted values ascend, so each bin is a run: its count and exact integer sum
    # come from the run starts, with no second sort and no scatter-add.
    idx = np.clip(np.floor((ordered.astype(np.float64) - low) * BINS_PER_NAT), 0, nbins - 1).astype(np.int32)
    if n and np.isnan(ordered[-1]):  # NaN sorts last but bins anywhere: the general way
        bins, inverse = np.unique(idx, return_inverse=True)
        counts = np.bincount(inverse, minlength=len(bins)).astype(np.int64)
        sums = np.zeros(len(bins), np.int64)
        np.add.at(sums, inverse, _fixed(ordered))
    elif n:
        starts = np.concatenate(([0], np.flatnonzero(idx[1:] != idx[:-1]) + 1))
        bins = idx[starts]
        counts = np.diff(np.append(starts, n)).astype(np.int64)
        sums = np.add.reduceat(_fixed(ordered), starts).astype(np.int64)
    else:
        bins, counts, sums = np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0, np.int64)
    floor = float(ordered[keep]) if keep < n else math.inf
    return SignalSummary(n, ordered[:keep].astype("<f4").tobytes(), floor, bins.tobytes(), counts.tobytes(),
                         sums.tobytes())


class SummaryMerger:
    """Merges summaries (a document's chunks, or other mergers) in bounded memory: at most ``DOC_LOWEST``
    values and the sparse histogram (at most the fixed number of bins). The result does not depend on the
    order of the merges; a merger is small to pickle (a Beam combiner's accumulator)."""

    def __init__(self):
        self.count = 0
        self.lowest = np.zeros(0, np.float32)
        self.floor = math.inf
        self.bins = np.zeros(0, np.int32)
        self.counts = np.zeros(0, np.int64)
        self.sums = np.zeros(0, np.int64)

    def add(self, s: "SignalSummary | SummaryMerger") -> None:
        if isinstance(s, SignalSummary):
            lowest, bins = np.frombuffer(s.lowest, "<f4"), np.frombuffer(s.bins, np.int32)
            counts, sums = np.frombuffer(s.counts, np.int64), np.frombuffer(s.sums, np.int64)
        else:
            lowest, bins, counts, sums = s.lowest, s.bins, s.counts, s.sums
        self.count += s.count
        self.floor = min(self.floor, s.floor)
        merged = np.sort(np.concatenate([self.lowest, lowest]))
        if len(merged) > DOC_LOWEST:
            self.floor = min(self.floor, float(merged[DOC_LOWEST]))
            merged = merged[:DOC_LOWEST]
        self.lowest = merged
        union = np.union1d(self.bins, bins).astype(np.int32)
        new_counts, new_sums = np.zeros(len(union), np.int64), np.zeros(len(union), np.int64)
        for b, c, t in ((self.bins, self.counts, self.sums), (bins, counts, sums)):
            at = np.searchsorted(union, b)
            new_counts[at] += c
            new_sums[at] += t
        self.bins, self.counts, self.sums = union, new_counts, new_sums

    def min_k(self, k: float) -> tuple[float | None, bool]:
        """(Min-K% of all merged values, exact?)."""
        return min_k_of(self.count, self.lowest, self.floor, self.counts, self.sums, k)


def min_k_of(count: int, lowest: np.ndarray, floor: float, counts: np.ndarray, sums: np.ndarray,
             k: float) -> tuple[float | None, bool]:
    if count == 0:
        return None, True
    m = max(1, math.ceil(k * count))
    if m <= len(lowest) and float(lowest[m - 1]) <= floor:
        return float(np.sum(lowest[:m].astype(np.float64)) / m), True
    # From the histogram: whole bins, then the mean of the bin where the lowest m end.
    before = np.cumsum(counts) - counts
    last = int(np.searchsorted(np.cumsum(counts), m))
    total = int(np.sum(sums[:last]))  # exact integers
    taken = int(before[last])
    rest = m - taken
    # Python integers: at millions of values a bin's sum times ``rest`` overflows int64.
    value = (total + int(sums[last]) * rest / int(counts[last])) / (1 << FIXED_BITS)
    return float(value / m), False


def summary_min_k(s: SignalSummary | None, k: float) -> float | None:
    """Min-K% of one chunk from its summary (its sparse histogram is in bin order, as a dense one)."""
    if s is None:
        return None
    return min_k_of(s.count, np.frombuffer(s.lowest, "<f4"), s.floor, np.frombuffer(s.counts, np.int64),
                    np.frombuffer(s.sums, np.int64), k)[0]


@dataclass(frozen=True)
class SignalOptions:
    """k for Min-K% and Min-K%++, and the thresholds that flag a document.

    Thresholds are on the model's own scale: the defaults suit the bundled
    byte-level model (README, "Signals", shows how they were chosen); set
    them for another model from its held-out figures.
    """

    k: float = 0.2
    bpb_below: float = 0.5
    zlib_ratio_below: float = 0.2
    min_k_above: float = -1.0
    min_k_pp_above: float = 0.0
    reference_diff_below: float = -0.5

    def __post_init__(self):
        if not 0.0 < self.k <= 1.0:
            raise ValueError(f"k must be in (0, 1], got {self.k}")

    def flags(self, doc: dict) -> list[str]:
        """Names of the signals that flag a document row (those columns must be present)."""
        tests = (
            ("bpb", doc.get("bpb"), lambda v: v < self.bpb_below),
            ("zlib_ratio", doc.get("zlib_ratio"), lambda v: v < self.zlib_ratio_below),
            ("min_k", doc.get("min_k"), lambda v: v > self.min_k_above),
            ("min_k_pp", doc.get("min_k_pp"), lambda v: v > self.min_k_pp_above),
            ("reference_diff", doc.get("reference_diff_bpb"), lambda v: v < self.reference_diff_below),
        )
        return [name for name, value, flagged in tests if value is not None and flagged(value)]


SIGNALS = ("bpb", "zlib_ratio", "min_k", "min_k_pp", "reference_diff")
