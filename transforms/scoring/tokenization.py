"""Chunk bytes to token ids, with a round-trip check for tokenizer-based models.

A byte-level model (``config.lmc_byte_level``) sees the chunk's bytes as ids
0-255. Any other model uses its Hugging Face tokenizer on the chunk alone; the
chunk is flagged, not scored, when its bytes are not valid UTF-8, when the
ids do not decode back to exactly its bytes, or when it has more tokens than
the model has positions. The first token is scored from the model's BOS token
(EOS when it has none, as GPT-2 does).
"""

from __future__ import annotations

from collections.abc import Iterator

import apache_beam as beam
import numpy as np

from lmc_audit.transforms.scoring.model_loading import resolve_model_dir
from lmc_audit.transforms.records import Chunk, TokenizedChunk


class ChunkTokenizer:
    """Turns chunk bytes into (targets, flags). Empty flags mean the chunk can be scored."""

    def __init__(self, config, tokenizer=None):
        self.byte_level = bool(getattr(config, "lmc_byte_level", False))
        self.tokenizer = tokenizer
        start = getattr(config, "bos_token_id", None)
        if start is None:
            start = getattr(config, "eos_token_id", None)
        if start is None and tokenizer is not None:
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if isinstance(start, (list, tuple)):
            start = start[0]
        self.start_id = start
        self.max_positions = int(getattr(config, "max_position_embeddings", 0) or 0) or None

    @classmethod
    def from_model_dir(cls, model_dir: str, trust_remote_code: bool = False) -> "ChunkTokenizer":
        from transformers import AutoConfig, AutoTokenizer

        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        if getattr(config, "lmc_byte_level", False):
            return cls(config)
        return cls(config, AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code))

    def encode(self, data: bytes) -> tuple[tuple[int, ...], tuple[str, ...]]:
        if self.start_id is None:
            return (), ("no_start_token: the model has neither BOS nor EOS to score the first token from",)
        if self.byte_level:
            targets = tuple(data)
        else:
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                return (), (f"invalid_utf8: byte {exc.start} cannot be given to the tokenizer",)
            targets = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            back = self.tokenizer.decode(list(targets), skip_special_tokens=False,
                                         clean_up_tokenization_spaces=False).encode("utf-8")
            if back != data:
                return targets, ("roundtrip_mismatch: the tokens do not decode to the chunk's bytes",)
        if self.max_positions is not None and len(targets) > self.max_positions:
            return targets, (f"too_many_tokens: {len(targets)} tokens, the model has {self.max_positions} positions",)
        return targets, ()


def teacher_forcing(targets: list, rows: int, length: int, start_id: int, pad_id: int):
    """[rows, length] int64 inputs ([start] + targets[:-1], then padding) and padded targets, as NumPy."""
    inputs = np.full((rows, length), pad_id, np.int64)
    padded = np.full((rows, length), pad_id, np.int64)
    inputs[:, 0] = start_id
    for r, t in enumerate(targets):
        n = len(t)
        inputs[r, 1:n] = t[:-1]
        padded[r, :n] = t
    return inputs, padded


def padded_length(n_tokens: int, granularity: int, max_positions: int | None) -> int:
    """The shape a chunk is scored in depends on the chunk alone, never on its batch."""
    length = -(-n_tokens // granularity) * granularity
    return min(length, max_positions) if max_positions else length


class TokenizeChunksFn(beam.DoFn):
    def __init__(self, model_spec: str, trust_remote_code: bool, granularity: int):
        self._model_spec = model_spec
        self._trust_remote_code = trust_remote_code
        self._granularity = granularity

    def setup(self) -> None:
        self._tok = ChunkTokenizer.from_model_dir(resolve_model_dir(self._model_spec), self._trust_remote_code)

    def process(self, chunk: Chunk) -> Iterator:
        targets, flags = self._tok.encode(chunk.data)
        if flags:
            yield TokenizedChunk(chunk, targets, self._tok.start_id, 0, flags)
            return
        yield TokenizedChunk(chunk, targets, self._tok.start_id,
                             padded_length(len(targets), self._granularity, self._tok.max_positions))
