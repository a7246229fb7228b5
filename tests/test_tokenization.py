"""Chunk tokenization: bytes for byte-level models, round-trip checked BPE otherwise."""

from __future__ import annotations

from lmc_audit.transforms.scoring.tokenization import ChunkTokenizer, padded_length


def test_byte_level_model_sees_bytes(tiny_byte_model):
    tok = ChunkTokenizer.from_model_dir(tiny_byte_model)
    assert tok.byte_level and tok.start_id == 256
    targets, flags = tok.encode(b"\xffok\x00")
    assert targets == (255, 111, 107, 0) and flags == ()


def test_bpe_round_trip(tiny_bpe_model):
    tok = ChunkTokenizer.from_model_dir(tiny_bpe_model)
    assert not tok.byte_level and tok.start_id is not None
    text = "def add(a, b):\n    return a + b  # ünïcödé 💡\n"
    targets, flags = tok.encode(text.encode())
    assert flags == ()
    assert tok.tokenizer.decode(list(targets)) == text
    assert len(targets) < len(text.encode())  # merges were learned


def test_bpe_flags_invalid_utf8(tiny_bpe_model):
    tok = ChunkTokenizer.from_model_dir(tiny_bpe_model)
    _, flags = tok.encode(b"abc \xff\xfe")
    assert len(flags) == 1 and flags[0].startswith("invalid_utf8")


def test_tokenizer_that_does_not_round_trip_is_flagged(lowercasing_bpe_model):
    tok = ChunkTokenizer.from_model_dir(lowercasing_bpe_model)
    assert tok.encode(b"all lower case")[1] == ()
    assert tok.encode(b"Has Capitals")[1][0].startswith("roundtrip_mismatch")


def test_too_many_tokens_is_flagged(tiny_bpe_model):
    tok = ChunkTokenizer.from_model_dir(tiny_bpe_model)
    _, flags = tok.encode(("\u00e9\u4e2d " * 2000).encode())
    assert flags and flags[0].startswith("too_many_tokens")


def test_padded_length_depends_on_the_chunk_alone():
    assert padded_length(1, 64, None) == 64
    assert padded_length(64, 64, None) == 64
    assert padded_length(65, 64, None) == 128
    assert padded_length(2048, 64, 4096) == 2048
    assert padded_length(1000, 64, 1000) == 1000
