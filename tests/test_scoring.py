"""ScoreChunks: bits match a direct, unbatched computation, whatever the batching.

Bit-exact when the direct computation uses the same padded shape (the
determinism contract: a chunk's shape depends on the chunk alone). Against
an unpadded forward of exactly the chunk's length the bits agree to a
relative 1e-5: float32 kernels differ by about 5e-7 per logit between shapes.
"""

from __future__ import annotations

import hashlib
import math

import apache_beam as beam
import numpy as np
import pytest
import torch
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from transformers import AutoModelForCausalLM

from lmc_audit.transforms.scoring.model_handler import CausalLMHandler
from lmc_audit.transforms.options import BATCH_TOKENS, ModelOptions
from lmc_audit.transforms.records import Chunk, ScoredChunk, TokenizedChunk
from lmc_audit.transforms.scoring.score_chunks import ScoreChunks
from lmc_audit.transforms.scoring.tokenization import ChunkTokenizer, padded_length

SIZES = [1, 10, 63, 64, 65, 300, 700, 1500, 2048, 2048]


def make_chunks() -> list[Chunk]:
    rng = np.random.default_rng(0)
    text = (b"Bits per byte measure how predictable text is. " * 60)
    chunks = []
    for i, n in enumerate(SIZES):
        data = text[i * 7:i * 7 + n] if i % 3 else rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        chunks.append(Chunk(f"doc{i}", "s", 0, i, 0, 0, data, hashlib.sha256(data).digest(), 0, 0, 0))
    return chunks


def direct_bits(model_dir: str, data: bytes, pad_to: int | None) -> float:
    """One chunk alone through the Hugging Face model, no Beam, no handler."""
    tok = ChunkTokenizer.from_model_dir(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    targets = list(tok.encode(data)[0])
    n = len(targets)
    length = pad_to or n
    inputs = torch.full((1, length), model.config.pad_token_id or 0)
    inputs[0, 0] = tok.start_id
    inputs[0, 1:n] = torch.tensor(targets[:-1])
    with torch.no_grad():
        logits = model(input_ids=inputs).logits.float()[0, :n]
    t = torch.tensor(targets)
    if pad_to is None:
        lp = torch.log_softmax(logits, -1).gather(-1, t[:, None])[:, 0]
    else:
        lp = logits.gather(-1, t[:, None])[:, 0] - torch.logsumexp(logits, -1)
    return float(-np.sum(lp.numpy(), dtype=np.float64) / math.log(2))



def test_pipeline_bits_equal_direct_unbatched_computation(tiny_byte_model):
    chunks = make_chunks()
    same_shape = [(c.doc_id, direct_bits(tiny_byte_model, c.data, padded_length(len(c.data), 64, 4096)))
                  for c in chunks]
    for rows in (1, 16):  # batch of one, and mixed-length batches
        with TestPipeline() as p:
            out = (p | beam.Create(chunks)
                   | ScoreChunks(ModelOptions(tiny_byte_model, device="cpu", max_batch_rows=rows, max_batch_tokens=1 << 16))
                   | beam.Map(lambda s: (s.chunk.doc_id, s.bits)))
            assert_that(out, equal_to(same_shape))  # bit-exact
    for c, (_, bits) in zip(chunks, same_shape):
        unpadded = direct_bits(tiny_byte_model, c.data, None)
        assert bits == pytest.approx(unpadded, rel=1e-5)
        assert bits > 0


def test_bf16_autocast_scores_close_to_float32_and_batch_independent(tiny_byte_model):
    tok = ChunkTokenizer.from_model_dir(tiny_byte_model)
    items = []
    for c in make_chunks():
        targets = tok.encode(c.data)[0]
        items.append(TokenizedChunk(c, targets, tok.start_id, padded_length(len(targets), 64, tok.max_positions)))

    def bits(dtype: str, one_by_one: bool) -> dict:
        handler = CausalLMHandler(tiny_byte_model, device="cpu", dtype=dtype, max_batch_tokens=1 << 16)
        lm = handler.load_model()
        batches = [[i] for i in items] if one_by_one else [items]
        return {s.chunk.doc_id: s.bits for b in batches for s in handler.run_inference(b, lm)}

    autocast = bits("bf16-autocast", False)
    assert autocast == bits("bf16-autocast", True)  # bit-exact whatever the batch
    full = bits("float32", False)
    assert autocast != full
    for doc, b in full.items():
        assert autocast[doc] == pytest.approx(b, rel=0.02)


def test_flagged_chunks_come_out_unscored(tiny_bpe_model):
    good = b"def add(a, b):\n    return a + b\n"
    chunks = [Chunk(n, "s", 0, i, 0, 0, d, hashlib.sha256(d).digest(), 0, 0, 0)
              for i, (n, d) in enumerate([("good", good), ("bad", b"\xff\xfe broken")])]
    with TestPipeline() as p:
        out = (p | beam.Create(chunks) | ScoreChunks(ModelOptions(tiny_bpe_model, device="cpu"))
               | beam.Map(lambda s: (s.chunk.doc_id, s.bits is None, s.flags[:1] and s.flags[0].split(":")[0])))
        assert_that(out, equal_to([("good", False, ()), ("bad", True, "invalid_utf8")]))


def test_failed_batches_are_flagged_not_dropped(tiny_byte_model):
    """A batch the model really fails on (a token id past its vocabulary) comes out flagged with the error;
    a chunk the tokenizer flagged passes through with its own flag."""
    good, bad, flagged = make_chunks()[1:4]
    handler = CausalLMHandler(tiny_byte_model, device="cpu")
    model = handler.load_model()
    ok = handler.run_inference([TokenizedChunk(good, tuple(good.data), 256, 64)], model)
    assert ok[0].bits > 0 and not ok[0].flags
    batch = [TokenizedChunk(good, tuple(good.data), 256, 64), TokenizedChunk(bad, (10 ** 6,) * 3, 256, 64),
             TokenizedChunk(flagged, (), 256, 0, ("invalid_utf8: byte 0",))]
    rows = handler.run_inference(batch, model)
    assert [r.chunk for r in rows] == [good, bad, flagged]
    assert all(isinstance(r, ScoredChunk) and r.bits is None for r in rows)
    assert rows[0].flags[0].startswith("inference_error: IndexError") and rows[0].flags == rows[1].flags
    assert rows[2].flags == ("invalid_utf8: byte 0",)


def test_score_chunks_validates_arguments(tmp_path, tiny_byte_model):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ScoreChunks(ModelOptions(str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="dtype"):
        ScoreChunks(ModelOptions(tiny_byte_model, dtype="int8"))
    with pytest.raises(ValueError, match="device"):
        ScoreChunks(ModelOptions(tiny_byte_model, device="tpu"))
    with pytest.raises(ValueError, match="max_batch_rows"):
        ModelOptions(tiny_byte_model, max_batch_rows=0)


def test_forward_size_defaults_to_the_device(tiny_byte_model):
    """Without --max-batch-tokens a CPU forward holds BATCH_TOKENS["cpu"] positions (smaller than a GPU's);
    an explicit value wins on any device."""
    lm = CausalLMHandler(tiny_byte_model, device="cpu").load_model()
    assert CausalLMHandler(tiny_byte_model, device="cpu").tokens_per_forward(lm) == BATCH_TOKENS["cpu"]
    assert BATCH_TOKENS["cpu"] < BATCH_TOKENS["cuda"]
    assert CausalLMHandler(tiny_byte_model, device="cpu", max_batch_tokens=1 << 16).tokens_per_forward(lm) == 1 << 16
    assert ModelOptions().max_batch_tokens is None
