"""The attention every lmc-audit forward runs, registered with transformers as ``lmc_exact``.

Why our own: a payload decodes only when the decoder reproduces the
encoder's logits bit for bit, so the kernels that produce them must not
change under us. transformers' ``sdpa`` entry point slices keys, packs GQA
heads and picks ``is_causal`` by rules that move between releases; the
replay decoder also needs a key/value cache whose writes it controls. This
module owns both, through the public ``AttentionInterface``: models load
with ``attn_implementation="lmc_exact"`` and every attention call of every
layer comes here.

Two modes, chosen by the ``replay`` context:

- **scoring** (no context): the whole padded chunk at once, causal SDPA
  over all keys, exactly what the scoring forward has always run.
- **replay**: each row gives a window of K positions starting at its own
  offset; the window's keys and values are written into this context's
  cache at those positions, and the window attends, with an explicit mask,
  over the cache's keys cut to a multiple of ``KEY_TILE``. PyTorch's CPU
  flash kernel walks keys in fixed 512-key tiles at absolute offsets and a
  fully masked tile adds exact zeros, so a window's logits equal those of
  the scoring forward at the same positions (measured; the model handler
  checks it again at load on the device in use).

GQA key/value heads are repeated with ``expand``/``reshape`` in both modes,
so both run the same SDPA call shapes per head.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F

NAME = "lmc_exact"
VERSION = "lmc_exact/v1"  # part of every payload's recipe: a change here must bump it
KEY_TILE = 512


class ReplayCache:
    """Keys and values of ``rows`` sequences of ``length`` positions, one buffer pair per attention module."""

    def __init__(self, rows: int, length: int, device: torch.device):
        self.rows, self.length, self.device = rows, length, device
        self._kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._index: torch.Tensor | None = None  # [rows, K] absolute positions of the window
        self._mask: torch.Tensor | None = None  # [rows, 1, K, keys]
        self._keys = 0

    def window(self, starts: torch.Tensor, width: int) -> torch.Tensor:
        """Sets each row's window ``starts[r] .. starts[r] + width - 1``; returns the [rows, width] positions."""
        if int(starts.min()) < 0 or int(starts.max()) + width > self.length:
            raise ValueError(f"window of {width} from {starts.tolist()} leaves the cache of {self.length}")
        index = starts.to(self.device)[:, None] + torch.arange(width, device=self.device)[None, :]
        end = int(starts.max()) + width
        keys = min(self.length, -(-end // KEY_TILE) * KEY_TILE)
        self._index = index
        self._keys = keys
        self._mask = (torch.arange(keys, device=self.device)[None, None, :] <= index[:, :, None]).unsqueeze(1)
        return index

    def attend(self, module: torch.nn.Module, query, key, value, scaling) -> torch.Tensor:
        if self._index is None:
            raise RuntimeError("ReplayCache.window() must be called before a replay forward")
        pair = self._kv.get(id(module))
        if pair is None:
            shape = (self.rows, key.shape[1], self.length, key.shape[3])
            pair = (key.new_zeros(shape), value.new_zeros(value.shape[:2] + (self.length, value.shape[3])))
            self._kv[id(module)] = pair
        keys, values = pair
        rows = torch.arange(self.rows, device=self.device)[:, None]
        # [R, H, K, D] block -> cache [R, H, L, D] at each row's own positions.
        keys.transpose(1, 2)[rows, self._index] = key.transpose(1, 2)
        values.transpose(1, 2)[rows, self._index] = value.transpose(1, 2)
        k, v = _repeat_kv(module, keys[:, :, :self._keys]), _repeat_kv(module, values[:, :, :self._keys])
        return F.scaled_dot_product_attention(query, k, v, attn_mask=self._mask, scale=scaling)


_ACTIVE: contextvars.ContextVar[ReplayCache | None] = contextvars.ContextVar("lmc_replay", default=None)


@contextlib.contextmanager
def replay(cache: ReplayCache) -> Iterator[ReplayCache]:
    """Forwards inside this block run in replay mode against ``cache``."""
    token = _ACTIVE.set(cache)
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)


def _repeat_kv(module: torch.nn.Module, states: torch.Tensor) -> torch.Tensor:
    groups = int(getattr(module, "num_key_value_groups", 1) or 1)
    if groups == 1:
        return states
    b, h, n, d = states.shape
    return states[:, :, None].expand(b, h, groups, n, d).reshape(b, h * groups, n, d)


CALLS = {"scoring": 0, "replay": 0}  # per process; lets load-time checks see the model really calls us


def exact_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention signature: [B, H, Q, D] query, [B, Hkv, K, D] key/value -> ([B, Q, H, D], None)."""
    if kwargs.get("softcap") is not None or kwargs.get("sliding_window") is not None:
        raise ValueError("lmc_exact attention supports full causal attention only (no softcap, no sliding window)")
    if dropout:
        raise ValueError("lmc_exact attention runs in eval mode only (dropout must be 0)")
    cache = _ACTIVE.get()
    if cache is None:
        CALLS["scoring"] += 1
        out = F.scaled_dot_product_attention(query, _repeat_kv(module, key), _repeat_kv(module, value),
                                             is_causal=query.shape[2] > 1, scale=scaling)
    else:
        CALLS["replay"] += 1
        out = cache.attend(module, query, key, value, scaling)
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Registers ``lmc_exact`` with transformers (idempotent); returns the name to load models with."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, exact_attention)
    return NAME
