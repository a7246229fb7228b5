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

With coding on (``CodingOptions``), the same forward codes the chunk: its
logits are quantized on the device and only (start, freq) of each real token
goes to the host range coder (scheme **forward**, see ``block_coding``). At
load the handler checks on its device that the decoder's replay windows
reproduce those logits bit for bit (``replay_check``); where they do not,
chunks are coded in fixed ``rows`` x ``block`` windows instead (scheme
**blocks**), which the decoder can run with the very same shapes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from apache_beam.metrics import Metrics
from apache_beam.utils import shared
from apache_beam.ml.inference.base import ModelHandler

from lmc_audit.transforms import MKL_CBWR
from lmc_audit.transforms.mkl_mode import mkl_mode
from lmc_audit.transforms.scoring import exact_attention
from lmc_audit.transforms.coding.block_coding import MIN_TOKENS, BlockCoder, code_symbols, encode_streams, scoring_logits
from lmc_audit.transforms.scoring.model_loading import resolve_model_dir
from lmc_audit.transforms.coding.payloads import (METHOD_MODEL, SCHEME_BLOCKS, SCHEME_FORWARD, Header, Recipe, crc32,
                                           pack)
from lmc_audit.transforms.options import BATCH_TOKENS
from lmc_audit.transforms.progress import NAMESPACE, Progress
from lmc_audit.transforms.records import ScoredChunk, TokenizedChunk
from lmc_audit.transforms.scoring import signals
from lmc_audit.transforms.scoring.tokenization import teacher_forcing

log = logging.getLogger(__name__)
SCHEMES = ("auto", SCHEME_FORWARD, SCHEME_BLOCKS)
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
    rows: int = 32  # blocks scheme: rows of every coding forward
    block: int = 8  # blocks scheme: positions of every coding forward
    scheme: str = "auto"  # auto: forward where the load-time check passes, else blocks
    min_tokens: int = MIN_TOKENS  # forward scheme: least token rows of every forward

    def __post_init__(self):
        if not 16 <= self.precision <= 32:
            raise ValueError(f"precision must be 16..32 bits, got {self.precision}")
        if self.rows < 1 or self.block < 1:
            raise ValueError("coding rows and block must be at least 1")
        if self.scheme not in SCHEMES:
            raise ValueError(f"coding scheme {self.scheme!r} is not one of {', '.join(SCHEMES)}")
        if self.min_tokens < 1:
            raise ValueError("min_tokens must be at least 1")


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass
class LoadedModel:
    """What ``load_model`` returns: a weak-referenceable holder (Beam needs that)."""

    model: Any
    device: torch.device
    dtype: torch.dtype
    pad_id: int
    autocast: bool = False  # forwards under torch.autocast(bfloat16)
    scheme: str = SCHEME_FORWARD  # how this process codes (decided at load by the replay check)
    check: str = ""  # what the replay check found
    checks: dict = dataclasses.field(default_factory=dict)  # min_tokens -> ReplayCheck, run once per model

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


def token_scores(model, inputs: torch.Tensor, targets: torch.Tensor,
                 min_tokens: int = MIN_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, L] log p(target) and [rows, L] Min-K%++ z, both computed on the model's device."""
    logits = scoring_logits(model, inputs, min_tokens)  # [rows, L, V]
    return signals.token_stats(logits, targets)


def failed_rows(batch: Sequence[TokenizedChunk], exc: BaseException) -> list[ScoredChunk]:
    """A failed batch's chunks, flagged with the error: nothing is dropped."""
    reason = f"inference_error: {type(exc).__name__}: {exc}"[:500]
    logging.getLogger(__name__).warning("a batch of %d chunks failed and is flagged: %s", len(batch), reason)
    return [ScoredChunk(item.chunk, len(item.targets), None, item.padded_length, (reason,)) for item in batch]


class CausalLMHandler(ModelHandler[TokenizedChunk, ScoredChunk, LoadedModel]):
    def __init__(self, model_spec: str, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, max_batch_tokens: int | None = None,
                 coding: CodingOptions | None = None):
        super().__init__()
        if dtype not in ("auto", AUTOCAST_BF16) and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}, {AUTOCAST_BF16}")
        if device != "auto" and not (device == "cpu" or device.startswith("cuda")):
            raise ValueError(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
        if max_batch_tokens is not None and max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be at least 1")
        if coding is not None and dtype == AUTOCAST_BF16:
            # Not offered with coding: replay exactness under autocast (keys promoted to float32 by RoPE,
            # values in bfloat16) has not been established on any device.
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
        # Time in the model's own work (forward, per-token statistics, the coder's symbol tables; on
        # CUDA the wait for them), apart from the host's (rows, summaries, range coding), which
        # RunInference's batch latency counts together.
        self._model_time = Metrics.distribution(NAMESPACE, "model_micro_secs")

    def load_model(self) -> LoadedModel:
        lm = load_causal_lm(self._model_spec, self._device, self._dtype, self._trust_remote_code)
        c = self._coding
        if c is not None:
            lm.scheme, lm.check = choose_scheme(lm, c.scheme, c.min_tokens)
        return lm

    def run_inference(self, batch: Sequence[TokenizedChunk], model: LoadedModel,
                      inference_args: dict[str, Any] | None = None) -> Iterable[ScoredChunk]:
        """Scored chunks in ``batch`` order. Flagged chunks pass through unscored; a batch the model fails
        on comes out flagged with the error (what ``RunInference.with_exception_handling`` would route to
        a separate output, kept in line so the scored chunks need no Flatten)."""
        results: list[ScoredChunk | None] = [None] * len(batch)
        todo = []
        for i, item in enumerate(batch):
            if item.flags:
                results[i] = ScoredChunk(item.chunk, len(item.targets), None, 0, item.flags)
            else:
                todo.append(i)
        if not todo:
            return results
        try:
            scored = self._score([batch[i] for i in todo], model)
        except Exception as exc:  # noqa: BLE001 - any failure of a batch is reported on its chunks
            scored = failed_rows([batch[i] for i in todo], exc)
        for i, s in zip(todo, scored):
            results[i] = s
        return results

    def _score(self, batch: Sequence[TokenizedChunk], model: LoadedModel) -> list[ScoredChunk]:
        blocks = self._coding is not None and model.scheme == SCHEME_BLOCKS
        by_length: dict[int, list[int]] = {}
        for i, item in enumerate(batch):
            by_length.setdefault(item.padded_length, []).append(i)
        groups: list[tuple[list[int], int]] = []
        for length, members in sorted(by_length.items()):
            rows_per_forward = self._coding.rows if blocks else max(1, self.tokens_per_forward(model) // length)
            groups += [(members[s:s + rows_per_forward], length) for s in range(0, len(members), rows_per_forward)]
        results: list[ScoredChunk | None] = [None] * len(batch)
        if blocks:
            for members, length in groups:
                for i, scored in zip(members, self._encode_blocks([batch[i] for i in members], length, model)):
                    results[i] = scored
            return results
        # Host work of one group (building rows, range coding) overlaps the device work of the next:
        # a group's forward is queued before the previous group's results are waited for.
        pending = None
        for members, length in groups:
            launched = members, self._launch([batch[i] for i in members], length, model)
            if pending is not None:
                for i, scored in zip(pending[0], self._finish(pending[1], model)):
                    results[i] = scored
            pending = launched
        if pending is not None:
            for i, scored in zip(pending[0], self._finish(pending[1], model)):
                results[i] = scored
        return results

    def tokens_per_forward(self, lm: LoadedModel) -> int:
        """Padded positions per forward: as asked, else the default for the device the model is on."""
        if self._max_batch_tokens is not None:
            return self._max_batch_tokens
        return BATCH_TOKENS.get(lm.device.type, BATCH_TOKENS["cuda"])

    def recipe(self, lm: LoadedModel) -> Recipe:
        c = self._coding
        if lm.scheme == SCHEME_BLOCKS:
            return Recipe.here(SCHEME_BLOCKS, c.precision, lm.dtype_name, lm.device, 0, c.rows, c.block)
        return Recipe.here(SCHEME_FORWARD, c.precision, lm.dtype_name, lm.device, c.min_tokens)

    def _payload(self, item: TokenizedChunk, stream: bytes, length: int, recipe: Recipe) -> bytes:
        c = self._coding
        data = item.chunk.data
        header = Header(METHOD_MODEL, recipe.scheme, c.precision, recipe.dtype, recipe.device, recipe.rows, length,
                        recipe.block, recipe.min_tokens, len(data), len(item.targets), crc32(data),
                        bytes.fromhex(c.fingerprint), recipe.environment_hash())
        return pack(header, stream)

    def _encode_blocks(self, group: list[TokenizedChunk], length: int, lm: LoadedModel) -> list[ScoredChunk]:
        """The blocks scheme: the coder's own fixed-shape forwards give bits and payloads; the scores
        (log p, Min-K%++ z) come from one plain forward, as without coding."""
        c = self._coding
        coder = BlockCoder(lm.model, lm.device, c.precision, c.rows, c.block, group[0].start_id, lm.pad_id)
        t0 = time.perf_counter()
        with lm.precision():
            # The blocks scheme interleaves its forwards with range coding: all of it counts as the model's.
            streams, logp = coder.encode([np.asarray(item.targets, np.int64) for item in group], length)
        self._model_time.update(int((time.perf_counter() - t0) * 1e6))
        scores = self._finish(self._launch(group, length, lm, code=False), lm)
        recipe = self.recipe(lm)
        recipe_text = recipe.to_json()
        out = []
        for r, (item, stream, scored) in enumerate(zip(group, streams, scores)):
            n = len(item.targets)
            bits = float(-np.sum(logp[r, :n], dtype=np.float64) / LN2)
            out.append(dataclasses.replace(scored, bits=bits, payload=self._payload(item, stream, length, recipe),
                                           coded_bits=8 * len(stream), recipe=recipe_text))
        return out

    @torch.inference_mode()
    def _launch(self, group: list[TokenizedChunk], length: int, lm: LoadedModel, code: bool = True):
        """Queues a group's forward; on CUDA the inputs come from pinned memory and the [rows, L]
        results go back into pinned buffers without waiting."""
        inputs, targets = teacher_forcing([item.targets for item in group], len(group), length,
                                          group[0].start_id, lm.pad_id)
        cuda = lm.device.type == "cuda"
        tensors = [torch.from_numpy(a) for a in (inputs, targets)]
        if cuda:
            tensors = [t.pin_memory() for t in tensors]
        t0 = time.perf_counter()
        inputs_d, targets_d = (t.to(lm.device, non_blocking=cuda) for t in tensors)
        min_tokens = self._coding.min_tokens if self._coding else MIN_TOKENS
        with lm.precision():
            logits = scoring_logits(lm.model, inputs_d, min_tokens)  # [rows, L, V]
        results = list(signals.token_stats(logits, targets_d))
        if code and self._coding is not None:
            results += list(code_symbols(logits, targets_d, self._coding.precision))
        del logits
        if not cuda:
            self._model_time.update(int((time.perf_counter() - t0) * 1e6))
            return group, length, [t.numpy() for t in results], None
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in results]
        for h, t in zip(host, results):
            h.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._model_time.update(int((time.perf_counter() - t0) * 1e6))
        return group, length, host, done

    def _finish(self, launched, lm: LoadedModel) -> list[ScoredChunk]:
        group, length, arrays, done = launched
        if done is not None:
            t0 = time.perf_counter()
            done.synchronize()
            self._model_time.update(int((time.perf_counter() - t0) * 1e6))
            arrays = [a.numpy() for a in arrays]
        logp, z = arrays[:2]
        coded = len(arrays) == 4
        if coded:
            counts = [len(item.targets) for item in group]
            streams = encode_streams(arrays[2], arrays[3], counts, self._coding.precision)
            recipe = self.recipe(lm)
            recipe_text = recipe.to_json()
        out = []
        real = 0
        for r, item in enumerate(group):
            n = len(item.targets)
            real += n
            # float64 sum in a fixed order: the same bits on every run.
            bits = float(-np.sum(logp[r, :n], dtype=np.float64) / LN2)
            # The per-token arrays end here: only their bounded summaries travel with the chunk.
            scored = ScoredChunk(item.chunk, n, bits, length, logp=signals.summarize(logp[r, :n], "logp"),
                                 zscores=signals.summarize(z[r, :n], "z"))
            if coded:
                scored = dataclasses.replace(scored, payload=self._payload(item, streams[r], length, recipe),
                                             coded_bits=8 * len(streams[r]), recipe=recipe_text)
            out.append(scored)
        self._real.inc(real)
        self._padded.inc(len(group) * length - real)
        self._rows.update(len(group))
        Progress.add("scoring", items=len(group), bytes=sum(len(item.chunk.data) for item in group))
        return out

    def get_num_bytes(self, batch: Sequence[TokenizedChunk]) -> int:
        """Bytes of text in a batch (RunInference's ``num_bytes`` metric): what the audit counts in."""
        return sum(item.chunk.size for item in batch)

    def get_metrics_namespace(self) -> str:
        return NAMESPACE

    def share_model_across_processes(self) -> bool:
        return False


_MODELS = shared.Shared()  # one model per process for scoring, NCD and verification, as RunInference shares


def load_causal_lm(model_spec: str, device: str = "auto", dtype: str = "auto",
                   trust_remote_code: bool = False) -> LoadedModel:
    """The model in eval mode on its device, loaded once per process (``shared.Shared``) and shared by
    every step that asks for the same spec, device and dtype."""
    resolved = pick_device(device)
    dtype_name = dtype if dtype == AUTOCAST_BF16 else DTYPE_NAMES[pick_dtype(dtype, resolved)]
    tag = json.dumps([model_spec, str(resolved), dtype_name, trust_remote_code])
    return _MODELS.acquire(lambda: _load_causal_lm(model_spec, device, dtype, trust_remote_code), tag=tag)


def _load_causal_lm(model_spec: str, device: str, dtype: str, trust_remote_code: bool) -> LoadedModel:
    """The model in eval mode on its device, every attention call through ``exact_attention``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(model_spec), dtype=torch_dtype, use_safetensors=True,
        trust_remote_code=trust_remote_code, attn_implementation=exact_attention.register())
    model.eval().to(torch_device)
    config = model.config
    pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
    if isinstance(pad, (list, tuple)):
        pad = pad[0]
    lm = LoadedModel(model, torch_device, torch_dtype, int(pad or 0), autocast=dtype == AUTOCAST_BF16)
    before = exact_attention.CALLS["scoring"]
    with torch.inference_mode(), lm.precision():
        model(input_ids=torch.zeros((1, 8), dtype=torch.int64, device=torch_device), use_cache=False)
    if exact_attention.CALLS["scoring"] == before:
        raise ValueError(f"model {model_spec!r} ({type(model).__name__}) does not dispatch attention through "
                         "transformers' AttentionInterface, so lmc-audit cannot own its kernels; use an "
                         "architecture that does (Llama, GPT-2, Mistral, Qwen2, ...)")
    return lm


def choose_scheme(lm: LoadedModel, wanted: str, min_tokens: int) -> tuple[str, str]:
    """(scheme, what the check found): forward where replay reproduces the scoring forward here."""
    from lmc_audit.transforms.coding.replay_check import check_replay

    if wanted == SCHEME_BLOCKS:
        return SCHEME_BLOCKS, "blocks scheme asked for (--coding-scheme blocks)"
    config = lm.model.config
    vocab = int(lm.model.get_output_embeddings().weight.shape[0])
    max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None
    if min_tokens not in lm.checks:
        with lm.precision():
            lm.checks[min_tokens] = check_replay(lm.model, lm.device, vocab, min_tokens, max_positions)
    check = lm.checks[min_tokens]
    where = f"{lm.device.type} {lm.dtype_name}"
    if check.exact:
        log.info("coding scheme forward on %s: %s", where, check.detail)
        return SCHEME_FORWARD, check.detail
    if wanted == SCHEME_FORWARD:
        raise RuntimeError(f"--coding-scheme forward was asked for, but on this {where} device replay does not "
                           f"reproduce the scoring forward ({check.detail}); use --coding-scheme auto or blocks")
    hint = ""
    mode = mkl_mode() if lm.device.type == "cpu" else ""
    if mode and mode != MKL_CBWR:
        hint = (f" MKL runs in mode {mode!r} in this process, not {MKL_CBWR!r} (MKL_CBWR is "
                f"{os.environ.get('MKL_CBWR')!r}; MKL reads it at the process's first matrix product): it may then "
                "round a matrix product's rows by the call's row count. Unset MKL_CBWR or set it to that value, "
                "and import lmc_audit before anything computes with torch.")
    log.warning("coding scheme blocks on %s: replay does not reproduce the scoring forward here (%s); "
                "coding runs fixed rows x block forwards instead, at a higher cost.%s", where, check.detail, hint)
    return SCHEME_BLOCKS, check.detail
