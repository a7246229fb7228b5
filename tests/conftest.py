"""Shared fixtures: tiny models built on the spot (nothing is downloaded)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n"
    "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n    y: int = 0\n"
    "Language models are compressors; arithmetic coding turns probabilities into bits.\n"
)


@pytest.fixture(scope="session")
def tiny_byte_model(tmp_path_factory) -> str:
    """A random-init byte-level Llama in Hugging Face format (config + safetensors)."""
    import torch

    from lmc_audit.pipelines.default_model.train import build_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_byte_model")
    build_model(hidden=64, layers=2, heads=2, ffn=128, max_positions=4096).save_pretrained(path)
    return str(path)


def _bpe_tokenizer(lowercase: bool = False):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([SAMPLE_TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _gpt2_with(tokenizer, path: Path) -> str:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=64, n_layer=2, n_head=2,
                        bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_bpe_model(tmp_path_factory) -> str:
    """A random-init GPT-2 with a byte-level BPE tokenizer trained here with `tokenizers`."""
    return _gpt2_with(_bpe_tokenizer(), tmp_path_factory.mktemp("tiny_bpe_model"))


@pytest.fixture(scope="session")
def lowercasing_bpe_model(tmp_path_factory) -> str:
    """A tokenizer that lowercases: uppercase text cannot round-trip through it."""
    return _gpt2_with(_bpe_tokenizer(lowercase=True), tmp_path_factory.mktemp("lower_bpe_model"))


def write_jsonl(path: Path, records: list, opener=open) -> Path:
    with opener(path, "wb") as f:
        for r in records:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return path


@pytest.fixture
def gz_writer():
    return gzip.open


MEMORIZED = (
    "Article 7. The keeper of the lighthouse shall log every passing vessel, its flag, its heading and the "
    "hour, in ink, in the bound register kept for that purpose, and shall sign each page at midnight.\n"
).encode() * 3
UNSEEN = (
    "Quarterly figures for the cooperative bakery: rye loaves up nine percent, croissants flat, and the new "
    "sourdough starter still refuses to rise on cold mornings, so the night shift keeps it by the oven.\n"
).encode() * 3


@pytest.fixture(scope="session")
def memorizing_model(tmp_path_factory) -> str:
    """A tiny byte model trained on MEMORIZED only, many times over: it has memorized that text."""
    import torch

    from lmc_audit.pipelines.default_model.train import BOS_ID, build_model

    torch.manual_seed(0)
    model = build_model(hidden=64, layers=2, heads=2, ffn=128, max_positions=1024)
    # The text as the audit sees it at --chunk-bytes 256: each chunk scored from BOS.
    pieces = [[BOS_ID] + list(MEMORIZED[i:i + 256]) for i in range(0, len(MEMORIZED), 256)]
    width = max(map(len, pieces))
    data = torch.tensor([p + [BOS_ID] * (width - len(p)) for p in pieces], dtype=torch.long)
    labels = torch.tensor([p + [-100] * (width - len(p)) for p in pieces], dtype=torch.long)
    # lr 3e-3 with clipped gradients: at 1e-2 the loss spiked back up near the end (transformers 5.24).
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(300):
        loss = model(input_ids=data, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    assert loss.item() < 0.1, f"the memorizing model did not memorize (loss {loss.item():.3f})"
    model.eval()
    path = tmp_path_factory.mktemp("memorizing_model")
    model.save_pretrained(path)
    return str(path)
