"""``CausalLMHandler``: the Beam ``ModelHandler`` that scores chunks.

Beam's own Hugging Face handler imports TensorFlow at import time and fails
with transformers 5, so the project has its own around
``AutoModelForCausalLM``.

Shapes. A chunk with n target tokens is scored as the input
``[start, t0, ..., t(n-2)]`` right-padded to ``padded_length`` L, a length
that depends on the chunk alone. Rows of one batch are independent, and the
logits of a row at positions < n do not depend on what is padded after it, so
a chunk's bits are the same whatever it is batched with. The batch that Beam
hands over is split into sub-batches of one padded length, each one forward.

Masking. Padding is always on the right and attention is causal, so no real
position can attend to padding; the padded positions are masked out of every
sum. No attention-mask tensor is passed: with one, the attention kernel would
change with whether a batch happens to hold padding, and bits would then
depend on the batch.

Only per-token log-probabilities leave the device ([rows, L] floats), never
[rows, L, vocabulary] logits.

With coding on (``CodingOptions``), the scores come from the block coder
instead of one forward per batch: the same logits give the bits and the
payload (see ``block_coding``), in groups of exactly ``rows`` rows.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from lmc_audit.transforms.block_coding import BlockCoder
from lmc_audit.transforms.model_loading import resolve_model_dir
from lmc_audit.transforms.payloads import METHOD_MODEL, Header, Recipe, crc32, pack
from lmc_audit.transforms.records import ScoredChunk, TokenizedChunk
from lmc_audit.transforms import signals
from lmc_audit.transforms.tokenization import teacher_forcing

NAMESPACE = "lmc_audit"
LN2 = math.log(2.0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# float32 weights, matmuls under torch.autocast in bfloat16 (a payload records it as its own dtype).
AUTOCAST_BF16 = "bf16-autocast"


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")
    return torch.device(device)


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype of the weights (float32 under bf16 autocast)."""
    if dtype == AUTOCAST_BF16:
        return torch.float32
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[dtype]


@dataclass(frozen=True)
class CodingOptions:
    """How chunks are arithmetic-coded; the decoder must use the same values."""

    fingerprint: str
    precision: int = 24
    rows: int = 32
    block: int = 8

    def __post_init__(self):
        if not 16 <= self.precision <= 32:
            raise ValueError(f"precision must be 16..32 bits, got {self.precision}")
        if self.rows < 1 or self.block < 1:
            raise ValueError("coding rows and block must be at least 1")


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class LoadedModel:
    """What ``load_model`` returns: a weak-referenceable holder (Beam needs that)."""

    model: Any
    device: torch.device
    dtype: torch.dtype
    pad_id: int
    autocast: bool = False  # forwards under torch.autocast(bfloat16)

    @property
    def dtype_name(self) -> str:
        return AUTOCAST_BF16 if self.autocast else DTYPE_NAMES[self.dtype]

    def precision(self):
        """The context every forward of this model runs in."""
        if self.autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()


def token_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[rows, L] log p(target) in float32, computed on the model's device."""
    logits = model(input_ids=inputs, use_cache=False).logits  # [rows, L, V]
    logits = logits.float()
    picked = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [rows, L]
    return picked - torch.logsumexp(logits, dim=-1)


def token_scores(model, inputs: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, L] log p(target) and [rows, L] Min-K%++ z, both computed on the model's device."""
    logits = model(input_ids=inputs, use_cache=False).logits  # [rows, L, V]
    return signals.token_stats(logits, targets)


class CausalLMHandler(ModelHandler[TokenizedChunk, ScoredChunk, LoadedModel]):
    def __init__(self, model_spec: str, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, max_batch_tokens: int = 16384,
                 coding: CodingOptions | None = None):
        super().__init__()
        if dtype not in ("auto", AUTOCAST_BF16) and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}, {AUTOCAST_BF16}")
        if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
            raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
        if max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        if coding is not None and dtype == AUTOCAST_BF16:
            # transformers 5's StaticCache sizes its value cache from the keys' dtype, which RoPE
            # promotes to float32 under autocast while values stay bfloat16: the coder cannot run.
            raise ValueError("--dtype bf16-autocast scores only: with arithmetic coding use --dtype bfloat16 "
                             "(bf16 weights) or float32, or pass --no-coding")
        self._model_spec = model_spec
        self._device = device
        self._dtype = dtype
        self._trust_remote_code = trust_remote_code
        self._max_batch_tokens = max_batch_tokens
        self._coding = coding
        self._padded = Metrics.counter(NAMESPACE, "padded_positions")
        self._real = Metrics.counter(NAMESPACE, "scored_positions")
        self._rows = Metrics.distribution(NAMESPACE, "rows_per_forward")

    def load_model(self) -> LoadedModel:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        device = pick_device(self._device)
        dtype = pick_dtype(self._dtype, device)
        model = AutoModelForCausalLM.from_pretrained(
            resolve_model_dir(self._model_spec), dtype=dtype, use_safetensors=True,
            trust_remote_code=self._trust_remote_code)
        model.eval().to(device)
        config = model.config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        if isinstance(pad, (list, tuple)):
            pad = pad[0]
        return LoadedModel(model, device, dtype, int(pad or 0), autocast=self._dtype == AUTOCAST_BF16)

    def run_inference(self, batch: Sequence[TokenizedChunk], model: LoadedModel,
                      inference_args: dict[str, Any] | None = None) -> Iterable[ScoredChunk]:
        by_length: dict[int, list[int]] = {}
        for i, item in enumerate(batch):
            by_length.setdefault(item.padded_length, []).append(i)
        groups: list[tuple[list[int], int]] = []
        for length, members in sorted(by_length.items()):
            rows_per_forward = self._coding.rows if self._coding else max(1, self._max_batch_tokens // length)
            groups += [(members[s:s + rows_per_forward], length) for s in range(0, len(members), rows_per_forward)]
        results: list[ScoredChunk | None] = [None] * len(batch)
        if self._coding:
            for members, length in groups:
                for i, scored in zip(members, self._encode([batch[i] for i in members], length, model)):
                    results[i] = scored
            return results
        # Host work of one group (building rows) overlaps the device work of the next: a group's
        # forward is queued before the previous group's results are waited for.
        pending = None
        for members, length in groups:
            launched = members, self._launch([batch[i] for i in members], length, model)
            if pending is not None:
                for i, scored in zip(pending[0], self._finish(pending[1])):
                    results[i] = scored
            pending = launched
        if pending is not None:
            for i, scored in zip(pending[0], self._finish(pending[1])):
                results[i] = scored
        return results

    def recipe(self, lm: LoadedModel) -> Recipe:
        c = self._coding
        return Recipe.current(c.precision, lm.dtype_name, lm.device.type, c.rows, c.block)

    def _encode(self, group: list[TokenizedChunk], length: int, lm: LoadedModel) -> list[ScoredChunk]:
        c = self._coding
        coder = BlockCoder(lm.model, lm.device, c.precision, c.rows, c.block, group[0].start_id, lm.pad_id)
        with lm.precision():
            encoded = coder.encode([np.asarray(item.targets, np.int64) for item in group], length)
        recipe = self.recipe(lm)
        recipe_text = recipe.to_json()
        fingerprint = bytes.fromhex(c.fingerprint)
        out = []
        for item, e in zip(group, encoded):
            data = item.chunk.data
            header = Header(METHOD_MODEL, c.precision, recipe.dtype, recipe.device, c.rows, length, c.block,
                            len(data), len(item.targets), crc32(data), fingerprint, recipe.environment_hash())
            out.append(ScoredChunk(item.chunk, len(item.targets), e.bits, length, (),
                                   pack(header, e.stream), 8 * len(e.stream), recipe_text,
                                   signals.pack(e.logp), signals.pack(e.zscores)))
        real = sum(len(item.targets) for item in group)
        self._real.inc(real)
        self._padded.inc(c.rows * length - real)
        self._rows.update(len(group))
        return out

    @torch.inference_mode()
    def _launch(self, group: list[TokenizedChunk], length: int, lm: LoadedModel):
        """Queues a group's forward; on CUDA the inputs come from pinned memory and the two
        [rows, L] results go back into pinned buffers without waiting."""
        inputs, targets = teacher_forcing([item.targets for item in group], len(group), length,
                                          group[0].start_id, lm.pad_id)
        cuda = lm.device.type == "cuda"
        tensors = [torch.from_numpy(a) for a in (inputs, targets)]
        if cuda:
            tensors = [t.pin_memory() for t in tensors]
        inputs_d, targets_d = (t.to(lm.device, non_blocking=cuda) for t in tensors)
        with lm.precision():
            logp_d, z_d = token_scores(lm.model, inputs_d, targets_d)
        if not cuda:
            return group, length, logp_d.numpy(), z_d.numpy(), None
        logp_h = torch.empty(logp_d.shape, dtype=logp_d.dtype, pin_memory=True)
        z_h = torch.empty(z_d.shape, dtype=z_d.dtype, pin_memory=True)
        logp_h.copy_(logp_d, non_blocking=True)
        z_h.copy_(z_d, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return group, length, logp_h, z_h, done

    def _finish(self, launched) -> list[ScoredChunk]:
        group, length, logp, z, done = launched
        if done is not None:
            done.synchronize()
            logp, z = logp.numpy(), z.numpy()
        out = []
        real = 0
        for r, item in enumerate(group):
            n = len(item.targets)
            real += n
            # float64 sum in a fixed order: the same bits on every run.
            bits = float(-np.sum(logp[r, :n], dtype=np.float64) / LN2)
            out.append(ScoredChunk(item.chunk, n, bits, length, logp=signals.pack(logp[r, :n]),
                                   zscores=signals.pack(z[r, :n])))
        self._real.inc(real)
        self._padded.inc(len(group) * length - real)
        self._rows.update(len(group))
        return out

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def share_model_across_processes(self) -> bool:
        return False
