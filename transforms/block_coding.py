"""Encode and decode chunks with logits that are bit-identical on both sides.

The decoder must see the encoder's logits bit for bit (a 1e-6 difference in
one entry of a 50k-entry table breaks decoding). Measured facts this design
rests on (``shared/reference.md`` §2, checked again in the tests): rows of a
batch equal the row run alone; the logits at positions <= t do not depend on
what stands after t; a shorter input or a different step shape does not give
the same bits.

So both sides run the *same function on the same shapes*: a Hugging Face
``StaticCache`` of fixed length L (the chunk's padded length) for a fixed
number of rows R, filled block by block, K positions per forward.

- Encode: L/K forwards; every position's logits are quantized on the device
  and only the (start, freq) of the actual token leaves it.
- Decode: block by block. A forward over the block gives exact logits at
  every position whose inputs are all known; the range decoder then decodes
  position after position while the *guessed* next input (the model's own
  argmax from the previous forward of this block) turns out right, and stops
  at the first wrong guess, which it replaces with the decoded token. Each
  forward decodes at least one token per row, usually several (Jacobi
  decoding verified by the range decoder). Inputs after a position never
  change its logits, so a wrong guess costs a forward, never a wrong bit.

Rows padded into a group are dummies; a chunk's bits do not depend on its
batch-mates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lmc_audit.transforms import range_coder
from lmc_audit.transforms.quantize import lookup, pick, quantize
from lmc_audit.transforms.signals import token_stats
from lmc_audit.transforms.tokenization import teacher_forcing

LN2 = math.log(2.0)


@dataclass
class Encoded:
    bits: float  # ideal: -sum log2 p under the coding logits
    stream: bytes
    logp: np.ndarray  # [n] log p(target), nats
    zscores: np.ndarray  # [n] Min-K%++ z


def _new_cache(model, length: int):
    from transformers import StaticCache

    return StaticCache(config=model.config, max_cache_len=length)


def _block_logits(model, cache, inputs: torch.Tensor, start: int) -> torch.Tensor:
    """[R, K] inputs at positions start..start+K-1 -> [R, K, V] logits; writes the block into the cache.

    transformers 5 static layers write at their own running length, so the
    cache is rewound to ``start`` first: a block forward can then be replayed.
    """
    for layer in getattr(cache, "layers", ()):
        if getattr(layer, "is_initialized", False):
            layer.cumulative_length.fill_(start)
    positions = torch.arange(start, start + inputs.shape[1], device=inputs.device).expand(inputs.shape[0], -1)
    return model(input_ids=inputs, past_key_values=cache, position_ids=positions, use_cache=True).logits


class BlockCoder:
    def __init__(self, model, device: torch.device, precision: int, rows: int, block: int,
                 start_id: int, pad_id: int):
        self.model = model
        self.device = device
        self.precision = precision
        self.rows = rows
        self.block = block
        self.start_id = start_id
        self.pad_id = pad_id

    def _inputs(self, group_targets: list[np.ndarray], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = teacher_forcing(group_targets, self.rows, length, self.start_id, self.pad_id)
        return torch.from_numpy(inputs).to(self.device), torch.from_numpy(targets).to(self.device)

    @torch.inference_mode()
    def encode(self, group_targets: list[np.ndarray], length: int) -> list[Encoded]:
        """Codes up to ``rows`` chunks that share the padded ``length``."""
        if not 0 < len(group_targets) <= self.rows:
            raise ValueError(f"a group holds 1..{self.rows} chunks, got {len(group_targets)}")
        if length % self.block:
            raise ValueError(f"padded length {length} is not a multiple of the block {self.block}")
        inputs, targets = self._inputs(group_targets, length)
        cache = _new_cache(self.model, length)
        starts = torch.empty((self.rows, length), dtype=torch.int64, device=self.device)
        freqs = torch.empty_like(starts)
        logp = torch.empty((self.rows, length), dtype=torch.float32, device=self.device)
        zscores = torch.empty_like(logp)
        for s in range(0, length, self.block):
            logits = _block_logits(self.model, cache, inputs[:, s:s + self.block], s).float()
            tgt = targets[:, s:s + self.block]
            logp[:, s:s + self.block], zscores[:, s:s + self.block] = token_stats(logits, tgt)
            # Slices of 16 positions bound the [R, 16, V] int64 table for large vocabularies.
            for q in range(0, self.block, 16):
                e = min(q + 16, self.block)
                st, fr = pick(quantize(logits[:, q:e], self.precision), tgt[:, q:e])
                starts[:, s + q:s + e] = st
                freqs[:, s + q:s + e] = fr
        counts = np.array([len(t) for t in group_targets] + [0] * (self.rows - len(group_targets)), np.int64)
        starts_h, freqs_h, logp_h = starts.cpu().numpy(), freqs.cpu().numpy(), logp.cpu().numpy()
        z_h = zscores.cpu().numpy()
        streams = range_coder.encode_rows(starts_h, freqs_h, counts, self.precision)
        return [Encoded(float(-np.sum(logp_h[r, :counts[r]], dtype=np.float64) / LN2), streams[r],
                        logp_h[r, :counts[r]].copy(), z_h[r, :counts[r]].copy())
                for r in range(len(group_targets))]

    @torch.inference_mode()
    def decode(self, streams: list[bytes], n_tokens: list[int], length: int) -> tuple[list[np.ndarray], int]:
        """Token ids of up to ``rows`` chunks coded with ``length``; also returns the forwards it took."""
        if not 0 < len(streams) <= self.rows:
            raise ValueError(f"a group holds 1..{self.rows} chunks, got {len(streams)}")
        n = np.zeros(self.rows, np.int64)
        n[:len(streams)] = n_tokens
        if n.max() > length:
            raise ValueError(f"a payload says {n.max()} tokens but was coded in {length} positions")
        decoders = range_coder.RangeDecoders(list(streams) + [b""] * (self.rows - len(streams)), self.precision)
        inputs = np.full((self.rows, length), self.pad_id, np.int64)
        inputs[:, 0] = self.start_id
        out = np.zeros((self.rows, length), np.int64)
        known = np.zeros(self.rows, np.int64)  # targets decoded so far, per row
        cache = _new_cache(self.model, length)
        forwards = 0
        K = self.block
        for s in range(0, length, K):
            end = np.minimum(n, s + K)  # each row needs targets up to end[r] in this block
            if np.all(known >= n):
                break
            while np.any(known < end):
                block_in = torch.from_numpy(inputs[:, s:s + K].copy()).to(self.device)
                logits = _block_logits(self.model, cache, block_in, s)
                forwards += 1
                live = known < end  # inputs up to known[r] are right for these rows
                for j in range(int(known[live].min()), s + K):
                    act = live & (known == j)
                    if not act.any():
                        if not (live & (known > j)).any():
                            break
                        continue
                    freqs = quantize(logits[:, j - s], self.precision)
                    slots = torch.from_numpy(decoders.slots()).to(self.device)
                    symbols, st, fr = (x.cpu().numpy() for x in lookup(freqs, slots))
                    decoders.advance(st, fr, act)
                    for r in np.flatnonzero(act):
                        y = symbols[r]
                        out[r, j] = y
                        known[r] = j + 1
                        if j + 1 < length:
                            if j + 1 < s + K and inputs[r, j + 1] != y:
                                live[r] = False  # a wrong guess: the next positions need a new forward
                            inputs[r, j + 1] = y
                        if known[r] >= end[r]:
                            live[r] = False
                    if not live.any():
                        break
                # Guess each row's unknown inputs of this block from this forward's argmax.
                guesses = logits.argmax(-1).cpu().numpy()  # [R, K]
                for r in np.flatnonzero(known < end):
                    first = int(known[r]) + 1
                    if first < s + K:
                        inputs[r, first:s + K] = guesses[r, first - 1 - s:K - 1]
        return [out[r, :n[r]].copy() for r in range(len(streams))], forwards
