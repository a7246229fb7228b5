"""Model distributions to integer frequencies, on the model's device.

freq(v) = floor(p(v) * (2^precision - V)) + 1, so every symbol has at least
1, and the rounding remainder (positive or negative) goes to the most
probable symbol, so the total is exactly 2^precision. Integer sums are exact
and order-free, so the same logits give the same table on any run; the
float steps (softmax, one float64 multiply) are elementwise or fixed-shape
reductions, which the determinism contract covers.

Only (start, freq) of one symbol per position leaves the device:
``pick`` for the encoder (the symbol is known), ``lookup`` for the decoder
(the symbol is the one whose interval holds the decoder's slot).
"""

from __future__ import annotations

import torch

# Bound on the int64 [positions, V] tables one quantize call builds (2^26 entries: 512 MiB).
MAX_TABLE_ENTRIES = 1 << 26


def quantize(logits: torch.Tensor, precision: int) -> torch.Tensor:
    """[..., V] logits -> [..., V] int64 frequencies summing to 2**precision."""
    vocab = logits.shape[-1]
    total = 1 << precision
    if vocab >= total // 2:
        raise ValueError(f"precision {precision} is too small for a vocabulary of {vocab}; use at least "
                         f"{(2 * vocab).bit_length() + 8} bits")
    probs = torch.softmax(logits.float(), dim=-1).double()
    freqs = torch.floor(probs * float(total - vocab)).long() + 1
    remainder = total - freqs.sum(dim=-1, keepdim=True)
    top = freqs.argmax(dim=-1, keepdim=True)
    return freqs.scatter_add(-1, top, remainder)


def pick(freqs: torch.Tensor, symbols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(start, freq) of the given symbols: freqs [..., V], symbols [...] -> two [...] tensors."""
    below = torch.cumsum(freqs, dim=-1) - freqs
    index = symbols.unsqueeze(-1)
    return below.gather(-1, index).squeeze(-1), freqs.gather(-1, index).squeeze(-1)


def lookup(freqs: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(symbol, start, freq) whose interval [start, start + freq) holds each slot."""
    upper = torch.cumsum(freqs, dim=-1)
    symbols = torch.searchsorted(upper, slots.unsqueeze(-1), right=True).squeeze(-1)
    start, freq = pick(freqs, symbols)
    return symbols, start, freq
