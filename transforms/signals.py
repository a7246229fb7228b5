"""Memorization signals from per-token scores (definitions: README, "Signals").

- ``token_stats`` runs on the model's device next to the forward: from the
  [rows, L, V] logits it keeps, per position, log p(target) and the Min-K%++
  z-score ``(log p(target) - mu) / sigma`` with ``mu = sum_v p log p`` and
  ``sigma^2 = sum_v p (log p)^2 - mu^2`` over the whole vocabulary. Only
  [rows, L] floats leave the device.
- ``min_k_mean`` is Min-K% Prob (Shi et al. 2023) over log p, and Min-K%++
  (Zhang et al. 2024) over z: the mean of the lowest k% of the values.

The per-token arrays travel with a chunk as float32 bytes, so a document's
signal is taken over all its tokens, not averaged from its chunks.
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


def pack(values: np.ndarray) -> bytes:
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def unpack(data: bytes | None) -> np.ndarray:
    return np.frombuffer(data or b"", dtype="<f4")


def min_k_mean(values: np.ndarray, k: float) -> float | None:
    """Mean of the lowest ceil(k * n) values (at least one); None for no values."""
    n = len(values)
    if n == 0:
        return None
    m = max(1, math.ceil(k * n))
    lowest = np.sort(values.astype(np.float64))[:m]
    return float(np.sum(lowest) / m)


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
