"""The load-time self-check: does window replay reproduce the scoring forward here, bit for bit?

The **forward** coding scheme rests on a property of the kernels of the
device in use (``block_coding``): logits of a replay window equal those of
the full teacher-forced forward at the same positions. It holds on the CPU
this project was measured on; a GPU whose kernels pick tiles by shape, or
another CPU, may break it. So before a model codes anything, it runs a
calibration batch both ways, with the decoder's own window shapes, and
compares every logit bit for bit. Any difference sends the job to the
**blocks** scheme, where encoder and decoder run the same shapes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from lmc_audit.transforms.coding.block_coding import MIN_WINDOW, ReplayDecoder, scoring_logits
from lmc_audit.transforms.scoring.exact_attention import ReplayCache, replay

log = logging.getLogger(__name__)

# (rows, padded length): 1 row gets the decoder's widest windows, 4 rows the fewest token rows the rule
# allows; the scoring forward's flash kernel splits queries in tiles of 256 from 768 positions, of 64 below.
CALIBRATION = ((1, 1024), (4, 640))
CALIBRATION_REPLAYED = 576  # positions replayed: crosses the first key tile's end
FOCUS = [(0, 48), (480, 560)]  # where windows of the decoder's width start at every alignment


@dataclass(frozen=True)
class ReplayCheck:
    exact: bool
    detail: str


def _strides(width: int):
    """1, 2, ..., width, 1, 2, ...: windows start at every alignment, as accepted guesses move them."""
    while True:
        yield from range(1, width + 1)


WIDE = 64  # window width between the focus ranges: fewer forwards, and a shape the rule covers too


@torch.inference_mode()
def compare_replay(model, device: torch.device, ids: torch.Tensor, min_tokens: int, window: int,
                   replayed: int | None = None, focus: list[tuple[int, int]] | None = None) -> ReplayCheck:
    """Scoring-forward logits of [R, L] ``ids`` against replay windows over the first ``replayed``
    positions, every logit compared. Windows are shaped as the decoder shapes them and started at
    every alignment; with ``focus``, only inside those position ranges, with ``WIDE`` windows between."""
    rows, length = ids.shape
    replayed = length if replayed is None else min(replayed, length)
    full = scoring_logits(model, ids, min_tokens)
    total_rows, width = ReplayDecoder(model, device, 24, min_tokens, 0, 0, window).shape(rows, length)
    ids_all = torch.cat([ids, ids.new_zeros(total_rows - rows, length)])
    cache = ReplayCache(total_rows, length, device)
    position = compared = 0
    strides = _strides(width)
    with replay(cache):
        while position < replayed:
            narrow = focus is None or any(a <= position < b for a, b in focus)
            if not narrow:
                upcoming = [a for a, _ in (focus or []) if a > position]
                step = min([WIDE, length - position] + [a - position for a in upcoming])
                step -= step % MIN_WINDOW  # windows are multiples of 4: a 9-query tail tile rounds otherwise
                if step < MIN_WINDOW:
                    narrow = True
            w = width if narrow else step
            start = min(position, length - w)
            index = cache.window(torch.full((total_rows,), start, dtype=torch.int64), w)
            logits = model(input_ids=ids_all[:, start:start + w], position_ids=index, use_cache=False).logits
            got, want = logits[:rows], full[:, start:start + w]
            if not torch.equal(got, want):
                diff = (got.float() - want.float()).abs().max().item()
                return ReplayCheck(False, f"window of {w} at position {start} ({total_rows} rows, padded "
                                          f"length {length}) differs from the scoring forward by up to {diff:.3g}")
            compared += rows * w
            position = start + (next(strides) if narrow else w)
    return ReplayCheck(True, f"{compared:,} replayed logits rows equal the scoring forward bit for bit")


def check_replay(model, device: torch.device, vocab: int, min_tokens: int, max_positions: int | None,
                 window: int = 4, seed: int = 0) -> ReplayCheck:
    """The load-time check on random tokens (``CALIBRATION``): narrow windows at every alignment at the
    start and across the first key tile's end, wide windows between."""
    rng = np.random.default_rng(seed)
    compared = 0
    for rows, length in CALIBRATION:
        length = length if not max_positions else min(length, max_positions)
        length -= length % MIN_WINDOW
        ids = torch.from_numpy(rng.integers(0, vocab, (rows, length), dtype=np.int64)).to(device)
        check = compare_replay(model, device, ids, min_tokens, window, CALIBRATION_REPLAYED, FOCUS)
        if not check.exact:
            return check
        compared += int(check.detail.split()[0].replace(",", ""))
    return ReplayCheck(True, f"{compared:,} replayed logits rows equal the scoring forward bit for bit")
