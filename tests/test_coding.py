"""Arithmetic coding in the pipeline, and decoding back to the exact bytes."""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch

from lmc_audit.pipelines.audit import bundled_sample_dir, run
from lmc_audit.pipelines.decode import run as decode, safe_name, selected_bytes
from lmc_audit.transforms.coding.block_coding import MIN_TOKENS, BlockCoder, ReplayDecoder
from lmc_audit.transforms.coding.decoding import PayloadDecoder, selected_for_verification
from lmc_audit.transforms.scoring.model_handler import CausalLMHandler, CodingOptions, load_causal_lm
from lmc_audit.transforms.scoring.model_loading import model_fingerprint, resolve_model_dir
from lmc_audit.transforms.coding.payloads import HEADER_BYTES, PayloadError, Recipe, pack, unpack
from lmc_audit.transforms.coding.replay_check import check_replay, compare_replay
from lmc_audit.transforms.progress import Progress
from lmc_audit.transforms.records import Chunk, TokenizedChunk
from lmc_audit.transforms.scoring.tokenization import ChunkTokenizer, padded_length


def code_and_decode(model_dir: str, datas: list[bytes], rows: int = 4, block: int = 16, batch=None,
                    scheme: str = "auto", max_batch_tokens: int = 16384):
    """Encodes chunks through the model handler (as the pipeline does) and decodes the payloads."""
    fp = model_fingerprint(model_dir)
    handler = CausalLMHandler(model_dir, device="cpu", dtype="float32", max_batch_tokens=max_batch_tokens,
                              coding=CodingOptions(fp, 24, rows, block, scheme))
    lm = handler.load_model()
    tok = ChunkTokenizer.from_model_dir(model_dir)
    items = []
    for i, d in enumerate(datas):
        targets, flags = tok.encode(d)
        assert not flags
        chunk = Chunk(f"d{i}", "s", 0, i, 0, 0, d, b"", 0, 0, 0)
        items.append(TokenizedChunk(chunk, targets, tok.start_id, padded_length(len(targets), 64, tok.max_positions)))
    scored = handler.run_inference(batch(items) if batch else items, lm)
    decoder = PayloadDecoder(model_dir, "cpu")
    return scored, decoder.decode([s.payload for s in scored], recipes=[s.recipe for s in scored])


def test_edge_chunks_round_trip(tiny_byte_model):
    rng = np.random.default_rng(0)
    datas = [b"x", rng.integers(0, 256, 300, dtype=np.uint8).tobytes(), b"\xff\xfe\x80 invalid utf-8 \xc3",
             b"hello, world " * 9, bytes(range(256))]
    scored, decoded = code_and_decode(tiny_byte_model, datas)
    assert decoded == datas
    for s, d in zip(scored, datas):
        header, body = unpack(s.payload)
        assert header.n_bytes == len(d) and header.n_tokens == len(d) and header.length == s.padded_length
        assert s.coded_bits == 8 * len(body) == 8 * (len(s.payload) - HEADER_BYTES)
        # Overhead target: ideal + 0.1% + 32 bits per chunk.
        assert s.coded_bits <= s.bits * 1.001 + 32


def test_bf16_autocast_is_refused_with_coding_with_what_to_do(tiny_byte_model, tmp_path):
    with pytest.raises(ValueError, match="--no-coding"):
        CausalLMHandler(tiny_byte_model, dtype="bf16-autocast", coding=CodingOptions("00" * 32))
    with pytest.raises(SystemExit, match="bf16-autocast"):
        run(["--sample", "--output", str(tmp_path / "o"), "--model", tiny_byte_model, "--dtype", "bf16-autocast"])


def test_payload_does_not_depend_on_batch_mates(tiny_byte_model):
    datas = [f"chunk number {i} ".encode() * (3 + i) for i in range(6)]
    alone, _ = code_and_decode(tiny_byte_model, datas[:1])
    mixed, decoded = code_and_decode(tiny_byte_model, datas, batch=lambda items: items[::-1])
    assert decoded == datas[::-1]
    assert unpack(alone[0].payload)[0].scheme == "forward"
    assert mixed[-1].payload == alone[0].payload and mixed[-1].bits == alone[0].bits
    # Another batch size: one chunk per forward instead of all six.
    one_by_one, decoded = code_and_decode(tiny_byte_model, datas, max_batch_tokens=64)
    assert decoded == datas
    assert [s.payload for s in one_by_one] == [s.payload for s in mixed[::-1]]


@pytest.fixture(scope="module")
def bundled_lm():
    return load_causal_lm("bundled", "cpu", "float32")


_CHECKED: dict[tuple[int, int], bool] = {}


def _replays_exactly_here(lm) -> bool:
    """The job's own load-time check on this CPU (run once per model and thread count). Where it passes,
    the shape rule must hold beyond the check's sample (the grid below); where it fails, the job must code
    in blocks (a 2-core Intel Xeon with AMX failed it for every model by ~1e-5 until MKL ran in strict
    reproducibility mode: ``tests/test_kernels.py``)."""
    key = (id(lm.model), torch.get_num_threads())
    if key not in _CHECKED:
        vocab = int(lm.model.get_output_embeddings().weight.shape[0])
        _CHECKED[key] = check_replay(lm.model, lm.device, vocab, MIN_TOKENS,
                                     lm.model.config.max_position_embeddings).exact
    return _CHECKED[key]


@pytest.mark.parametrize("threads", [1, 2])
def test_replay_windows_equal_the_scoring_forward_bit_for_bit(bundled_lm, threads):
    """The shape rule of the forward scheme, on the bundled model's real kernels: rows, padded lengths
    (one key tile, across a tile's end), window widths, and the thread count. On a CPU where the job's
    load-time check passes, every replay of the grid is exact; where it fails, the grid finds a
    difference too (the check raised no false alarm) and the job codes in blocks."""
    from lmc_audit.transforms.coding.payloads import SCHEME_BLOCKS
    from lmc_audit.transforms.scoring.model_handler import choose_scheme

    rng = np.random.default_rng(threads)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        here = _replays_exactly_here(bundled_lm)
        checks = []
        for rows, length, window in [(1, 64, 4), (2, 576, 4), (4, 640, 4), (5, 1024, 8), (3, 192, 16),
                                     (1, 2048, 32), (2, 1088, 36)]:
            ids = torch.from_numpy(rng.integers(0, 257, (rows, length), dtype=np.int64))
            check = compare_replay(bundled_lm.model, bundled_lm.device, ids, MIN_TOKENS, window, replayed=600)
            checks.append((rows, length, window, check))
            assert check.exact or not here, (rows, length, window, check.detail)
        if not here:
            assert any(not c.exact for *_, c in checks), "the load-time check failed where the grid found no difference"
            assert choose_scheme(bundled_lm, "auto", MIN_TOKENS)[0] == SCHEME_BLOCKS
    finally:
        torch.set_num_threads(before)


def test_scoring_forward_does_not_depend_on_threads(bundled_lm):
    ids = torch.from_numpy(np.random.default_rng(5).integers(0, 257, (2, 640), dtype=np.int64))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bundled_lm.model(input_ids=ids, use_cache=False).logits
        torch.set_num_threads(2)
        two = bundled_lm.model(input_ids=ids, use_cache=False).logits
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


class _RoundsSmallForwardsElsewhere(torch.nn.Module):
    """The bundled model as a CPU whose kernels round forwards of fewer than 16 token rows differently
    (one ulp on every logit): the kind of difference measured on the AVX-512 machine of reference.md
    §2b. Some CPUs show none for this model, so the rule and the check are tested against this one."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def forward(self, input_ids, **kwargs):
        out = self.inner(input_ids=input_ids, **kwargs)
        if input_ids.numel() < 16:
            out.logits = torch.nextafter(out.logits, torch.full_like(out.logits, float("inf")))
        return out


def test_the_min_tokens_rule_is_what_makes_replay_exact(bundled_lm):
    """Without the rule (replay forwards of 4 token rows), kernels that round small forwards differently
    make the replay inexact, and the check sees it; with the rule every replay forward has at least
    MIN_TOKENS token rows and the replay is exact. This is what the load-time self-check guards."""
    ids = torch.from_numpy(np.random.default_rng(1).integers(0, 257, (1, 64), dtype=np.int64))
    model = _RoundsSmallForwardsElsewhere(bundled_lm.model)
    found = compare_replay(model, bundled_lm.device, ids, 1, 4)
    assert not found.exact and "differ" in found.detail
    if _replays_exactly_here(bundled_lm):  # else the CPU's own kernels differ beyond what the rule covers
        assert compare_replay(model, bundled_lm.device, ids, MIN_TOKENS, 4).exact
        assert compare_replay(bundled_lm.model, bundled_lm.device, ids, MIN_TOKENS, 4).exact


def test_blocks_fallback_forced_round_trips(tiny_byte_model):
    datas = [b"the fallback runs the same shapes on both sides " * 3, b"short", bytes(range(200))]
    scored, decoded = code_and_decode(tiny_byte_model, datas, rows=4, block=8, scheme="blocks")
    assert decoded == datas
    assert {unpack(s.payload)[0].scheme for s in scored} == {"blocks"}
    assert all(s.coded_bits <= s.bits * 1.001 + 32 for s in scored)


@pytest.mark.parametrize("scheme", ["forward", "blocks"])
def test_decoding_progress_moves_forward_by_forward_and_adds_up(tiny_byte_model, scheme, monkeypatch):
    """A decode group reports the bytes it decoded after each forward (a blocks group of a few chunks
    takes minutes on a slow CPU), and the group's reports add up to its chunks and bytes exactly."""
    from lmc_audit.transforms.progress import Progress

    datas = [b"progress is shown while a group decodes, " * 4, b"a second chunk of the same group " * 3]
    scored, _ = code_and_decode(tiny_byte_model, datas, rows=2, block=8, scheme=scheme)
    seen: list[tuple[int, int]] = []
    add = Progress.add
    monkeypatch.setattr(Progress, "add", lambda stage="scoring", items=0, bytes=0: (
        seen.append((items, bytes)) if stage == "decoding" else None, add(stage, items, bytes)))
    decoder = PayloadDecoder(tiny_byte_model, "cpu")
    assert decoder.decode([s.payload for s in scored]) == datas
    assert sum(i for i, _ in seen) == len(datas) and sum(b for _, b in seen) == sum(map(len, datas))
    assert sum(1 for i, b in seen if b > 0 and i == 0) >= 5  # bytes reported before the group ended
    assert decoder.stats.forwards >= 5


def test_each_recipe_field_mismatch_is_refused_with_its_name(tiny_byte_model):
    scored, _ = code_and_decode(tiny_byte_model, [b"a chunk whose recipe is checked " * 2])
    header, body = unpack(scored[0].payload)
    recipe = Recipe.from_json(scored[0].recipe)
    decoder = PayloadDecoder(tiny_byte_model, "cpu")
    # device_name: the CPU kernels' instruction set here (AVX512 on one machine, AVX2 on another): another one.
    assert recipe.blas_mode == "AUTO,STRICT"  # what MKL runs in, recorded on CPU
    for name, value in [("device_name", f"not-{recipe.device_name}"), ("torch", "9.9.9"), ("transformers", "4.0.0"),
                        ("attention", "lmc_exact/v0"), ("compute_capability", "9.0"), ("cuda", "12.8"),
                        ("blas_mode", "DEFAULT")]:
        other = Recipe(**{**recipe.__dict__, name: value})
        payload = pack(header.__class__(**{**header.__dict__, "environment": other.environment_hash()}), body)
        (got,) = decoder.decode([payload], ["chunk 0 of 'd0'"], [other.to_json()])
        assert isinstance(got, PayloadError), name
        assert f"{name} {value!r}" in str(got) and "chunk 0 of 'd0'" in str(got)
        # a payload coded in another MKL mode says how to start a decode in that mode
        assert ("start the decode with MKL_CBWR= (empty)" in str(got)) == (name == "blas_mode")
    # Payloads coded before recipes recorded MKL's mode (their header hashes the recipe without it) still
    # decode, with or without their recipe text, and their CRC still checks the bytes.
    legacy = Recipe(**{**recipe.__dict__, "blas_mode": ""})
    legacy_json = json.dumps({k: v for k, v in json.loads(legacy.to_json()).items() if k != "blas_mode"})
    assert Recipe.from_json(legacy_json) == legacy and legacy.environment_hash() != recipe.environment_hash()
    old = pack(header.__class__(**{**header.__dict__, "environment": legacy.environment_hash()}), body)
    assert decoder.decode([old, old], recipes=[legacy_json, None]) == [b"a chunk whose recipe is checked " * 2] * 2
    # Without the recipe text the decoder still refuses, and says what it runs with.
    (got,) = decoder.decode([pack(header.__class__(**{**header.__dict__, "environment": 1}), body)])
    assert isinstance(got, PayloadError) and "another environment" in str(got) and recipe.torch in str(got)


def test_decoder_window_is_free_in_the_forward_scheme(bundled_lm):
    """Payloads of the forward scheme decode with any replay window the decoder picks (where the CPU's
    check sends coding to blocks, the payloads are blocks ones and decode exactly there)."""
    text = (Path(bundled_sample_dir()) / "howto__sorting.txt").read_bytes()
    datas = [text[:700], text[700:1500], text[1500:1520]]
    scored, decoded = code_and_decode(resolve_model_dir("bundled"), datas)
    if unpack(scored[0].payload)[0].scheme != "forward":
        assert not _replays_exactly_here(bundled_lm) and decoded == datas
        return
    for window in (4, 12, 64):
        decoder = PayloadDecoder("bundled", "cpu", window=window)
        assert decoder.decode([s.payload for s in scored]) == datas
        assert decoder.stats.tokens == sum(len(d) for d in datas)
        # Guesses that come true decode more than one token per window on this text.
        assert decoder.stats.tokens_per_row_forward > 1.0


@pytest.mark.parametrize("scheme", ["auto", "blocks"])
def test_expected_bytes_speed_decoding_and_never_change_what_decodes(bundled_lm, scheme):
    """A verifier's expected bytes are guesses only: right ones decode a whole wide window (forward scheme)
    or a whole block (blocks scheme) per forward, wrong ones (an edit, another text) still give exactly the
    payload's bytes."""
    text = (Path(bundled_sample_dir()) / "howto__sorting.txt").read_bytes()
    datas = [text[:1500], text[1500:2048]] if scheme == "auto" else [text[:400], text[400:600]]
    scored, _ = code_and_decode(resolve_model_dir("bundled"), datas, scheme=scheme)
    payloads = [s.payload for s in scored]
    forward = unpack(payloads[0])[0].scheme == "forward"
    assert forward == (scheme == "auto" and _replays_exactly_here(bundled_lm))
    blind = PayloadDecoder("bundled", "cpu")
    assert blind.decode(payloads) == datas
    hinted = PayloadDecoder("bundled", "cpu")
    assert hinted.decode(payloads, expected=datas) == datas
    # Every token still comes from the bitstream; right guesses cut the forwards several fold.
    assert hinted.stats.tokens == blind.stats.tokens == sum(map(len, datas))
    assert hinted.forwards * 5 < blind.forwards
    assert hinted.stats.guessed["argmax"] == 0  # no row ever fell back to the window's own guesses
    if forward:
        assert hinted.stats.guessed["expected"] > 0
        # Rows with expected bytes leave the n-gram tables alone (a verifier's sample would fill them for nothing).
        assert blind._guesser.counts and not hinted._guesser.counts and not hinted._guesser.latest
    edited = [datas[0][:300] + b"#" * 20 + datas[0][320:], b"another text altogether"]
    wrong = PayloadDecoder("bundled", "cpu")
    assert wrong.decode(payloads, expected=edited) == datas
    assert hinted.forwards < wrong.forwards and wrong.stats.guessed["argmax"] > 0
    # A payload that does not hold the expected bytes is not made to: the CRC check still fails it.
    corrupt = payloads[0][:-8] + bytes(8)
    got = PayloadDecoder("bundled", "cpu").decode([corrupt], expected=[datas[0]])[0]
    assert isinstance(got, PayloadError)


def test_tokenizer_model_chunk_round_trip(tiny_bpe_model):
    datas = ["def add(a, b):\n    return a + b\n".encode(), "ünïcödé ✓ text".encode()]
    scored, decoded = code_and_decode(tiny_bpe_model, datas)
    assert decoded == datas
    assert all(s.tokens < len(d) for s, d in zip(scored, datas[:1]))


def test_block_coder_decodes_every_block_size(tiny_byte_model):
    lm = CausalLMHandler(tiny_byte_model, device="cpu", dtype="float32").load_model()
    text = np.frombuffer(b"block boundaries must not matter " * 6, np.uint8).astype(np.int64)
    for block in (1, 8, 64):
        coder = BlockCoder(lm.model, lm.device, 24, 2, block, 256, 256)
        streams, _ = coder.encode([text[:190], text[:7]], 192)
        ids, stats = coder.decode(streams, [190, 7], 192)
        assert np.array_equal(ids[0], text[:190]) and np.array_equal(ids[1], text[:7])
        assert stats.forwards <= 190


def test_replay_decoder_shapes_follow_the_rule():
    decoder = ReplayDecoder(None, torch.device("cpu"), 24, MIN_TOKENS, 0, 0, window=4)
    for rows in (1, 2, 3, 7, 8, 64):
        for length in (64, 2048):
            total, width = decoder.shape(rows, length)
            assert total >= rows and total * width >= MIN_TOKENS and width >= 4 and width % 4 == 0
            assert width <= length


def test_corrupt_payload_and_wrong_model_fail_clearly(tiny_byte_model, tiny_bpe_model, tmp_path):
    data = b"some bytes to code " * 5
    scored, _ = code_and_decode(tiny_byte_model, [data])
    payload = scored[0].payload
    decoder = PayloadDecoder(tiny_byte_model, "cpu")
    flipped = bytearray(payload)
    flipped[HEADER_BYTES + 3] ^= 0x40
    (got,) = decoder.decode([bytes(flipped)], ["chunk 0 of 'd0'"])
    assert isinstance(got, PayloadError) and "chunk 0 of 'd0'" in str(got)
    assert "CRC32" in str(got) or "corrupt" in str(got)
    (got,) = decoder.decode([b"garbage"])
    assert isinstance(got, PayloadError) and "not an lmc-audit payload" in str(got)
    (got,) = PayloadDecoder(tiny_bpe_model, "cpu").decode([payload])
    assert isinstance(got, PayloadError) and "fingerprint" in str(got) and "pass the model that wrote it" in str(got)
    old = bytearray(payload)
    old[4] = 1
    (got,) = decoder.decode([bytes(old)])
    assert isinstance(got, PayloadError) and "version 1" in str(got) and "0.1.x" in str(got)


def _chunk(data: bytes, doc_id: str = "/some/checkout/shard.jsonl#3", position: int = 3, index: int = 1) -> Chunk:
    return Chunk(doc_id, "/some/checkout/shard.jsonl", 0, position, index, 0, data, hashlib.sha256(data).digest(),
                 0, 0, 0)


def test_verification_sample_is_fixed_sized_and_independent_of_paths():
    chunks = [_chunk(f"text {i}".encode()) for i in range(5000)]
    picked = [selected_for_verification(c, 0.1) for c in chunks]
    assert 400 < sum(picked) < 600
    # The same bytes under another checkout's path: the same sample.
    moved = [_chunk(c.data, doc_id="/elsewhere/shard.jsonl#3") for c in chunks]
    assert picked == [selected_for_verification(c, 0.1) for c in moved]
    assert all(selected_for_verification(c, 1.0) for c in chunks[:10])
    assert not any(selected_for_verification(c, 0.0) for c in chunks[:10])


def test_safe_names_are_unique_and_safe():
    ids = ["a/b", "a%2Fb", "..", ".hidden", "x" * 500, "x" * 499 + "y", "ünï cöde", ""]
    names = [safe_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert all("/" not in n and not n.startswith(".") and 0 < len(n) <= 200 for n in names)


def _sample_documents() -> dict[str, bytes]:
    docs = {}
    for p in sorted(Path(bundled_sample_dir()).glob("*.txt")):
        docs[f"{p}#0"] = p.read_bytes()
    with gzip.open(Path(bundled_sample_dir()) / "docs.jsonl.gz") as f:
        for line in f:
            rec = json.loads(line)
            docs[rec["id"]] = rec["text"].encode()
    return docs


@pytest.fixture(scope="module")
def coded_sample(tmp_path_factory):
    """The whole sample corpus through the pipeline with the bundled model, coding on, every chunk verified."""
    out = tmp_path_factory.mktemp("coded_sample")
    # Default coding settings; 256-byte chunks keep the full decode of every chunk short.
    record = run(["--sample", "--id-field", "id", "--output", str(out), "--chunk-bytes", "256",
                  "--verify-fraction", "0.05", "--quiet"])
    return out, record


def test_every_sample_chunk_decodes_exactly(coded_sample, bundled_lm, tmp_path):
    out, record = coded_sample
    chunks = ds.dataset(out / "chunks", format="parquet").to_table().to_pylist()
    payloads = ds.dataset(out / "payloads", format="parquet").to_table().to_pylist()
    assert len(payloads) == len(chunks) == record["counts"]["chunks"]
    assert record["coding"]["verification_failed"] == 0
    assert not (out / "_staging").exists()  # payloads were staged on their way to the writer, then removed
    # The job verified exactly the chunks the sample rule picks (counted in the job, not from metrics).
    position = {d["doc_id"]: d["position"] for d in ds.dataset(out / "documents", format="parquet").to_table()
                .to_pylist()}
    picked = sum(selected_for_verification(Chunk(c["doc_id"], c["shard"], 0, position[c["doc_id"]],
                                                 c["chunk_index"], c["offset"], b"", c["sha256"], 0, 0, 0), 0.05)
                 for c in chunks)
    assert record["coding"]["verified"] == picked > 0
    # the forward scheme wherever the job's load-time check passes on this CPU, else the blocks fallback
    assert record["coding"]["schemes"] == {"forward" if _replays_exactly_here(bundled_lm) else "blocks": len(chunks)}
    # Coded size against the ideal: at most ideal + 0.1% + 32 bits per chunk.
    for c in chunks:
        assert c["coded_bits"] <= c["bits"] * 1.001 + 32
    assert record["coding"]["overhead_vs_ideal"] < 0.01
    # Every chunk's payload decodes to its bytes: in-process, with the expected bytes as the replay's
    # guesses (every token is still decoded from the bitstream and checked by CRC; a test below shows
    # wrong guesses decode exactly too), so the whole sample decodes in a few wide forwards per group.
    docs = _sample_documents()
    rows = {(c["doc_id"], c["chunk_index"]): c for c in chunks}
    pieces = [docs[p["doc_id"]][rows[p["doc_id"], p["chunk_index"]]["offset"]:][
        :rows[p["doc_id"], p["chunk_index"]]["bytes"]] for p in payloads]
    decoder = PayloadDecoder("bundled", "cpu")
    got = decoder.decode([p["payload"] for p in payloads], recipes=[p["recipe"] for p in payloads],
                         expected=pieces)
    assert got == pieces
    # ``lmc-audit decode`` as a user runs it (blind: no expected bytes) on whole documents of both shard
    # kinds: the two smallest text files and the two smallest JSONL documents, each rebuilt from its chunks.
    documents = ds.dataset(out / "documents", format="parquet").to_table().to_pylist()
    text = sorted((d for d in documents if d["shard"].endswith(".txt")), key=lambda d: (d["bytes"], d["doc_id"]))
    jsonl = sorted((d for d in documents if not d["shard"].endswith(".txt")), key=lambda d: (d["bytes"], d["doc_id"]))
    shards, ids = [d["shard"] for d in text[:2]], [d["doc_id"] for d in jsonl[:2]]
    target = tmp_path / "decoded"
    assert decode(["--payloads", str(out / "payloads"), "--output", str(target), "--shard", *shards,
                   "--doc-id", *ids]) == 0
    got = {p.name: p.read_bytes() for p in target.iterdir()}
    assert got == {safe_name(d["doc_id"]): docs[d["doc_id"]] for d in text[:2] + jsonl[:2]}
    assert sum(len(v) for v in got.values()) >= 4_000


def test_decode_selection_jsonl_and_cli(coded_sample, tmp_path):
    out, _ = coded_sample
    docs = _sample_documents()
    doc_id = "library/weakref.rst.txt"
    target = tmp_path / "one"
    assert decode(["--payloads", str(out / "payloads"), "--output", str(target), "--doc-id", doc_id,
                   "--format", "jsonl"]) == 0
    lines = [json.loads(x) for x in (target / "decoded.jsonl").read_text().splitlines()]
    assert [(x["doc_id"], x["text"].encode()) for x in lines] == [(doc_id, docs[doc_id])]
    # The decoding stage's total (its time left) is the selection's bytes, read from the chunks
    # manifest beside the payloads: what the decode then counted, to the byte.
    payloads = str(out / "payloads")
    assert selected_bytes(payloads, {doc_id}, set(), set()) == len(docs[doc_id]) == Progress.counts()["decoding"][1]
    assert selected_bytes(payloads, set(), set(), {(doc_id, 1)}) == 256
    shard = ds.dataset(out / "documents", format="parquet").to_table(columns=["shard", "bytes"]).to_pylist()
    assert selected_bytes(payloads, set(), set(), set()) == sum(d["bytes"] for d in shard) == sum(map(len, docs.values()))
    assert selected_bytes(payloads, set(), {shard[0]["shard"]}, set()) == sum(
        d["bytes"] for d in shard if d["shard"] == shard[0]["shard"])
    alone = tmp_path / "copied" / "payloads"  # payloads copied without their manifests: no total, no error
    alone.mkdir(parents=True)
    assert selected_bytes(str(alone), {doc_id}, set(), set()) == 0
    # The installed command line, as a user runs it: one chunk.
    proc = subprocess.run([sys.executable, "-m", "lmc_audit.pipelines.cli", "decode", "--payloads",
                           str(out / "payloads"), "--output", str(tmp_path / "c"), "--chunk", f"{doc_id}:1"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "c" / f"{safe_name(doc_id)}.chunk-1").read_bytes() == docs[doc_id][256:512]


def test_decode_refuses_a_corrupted_payloads_file(coded_sample, tmp_path):
    out, _ = coded_sample
    table = pq.read_table(next((out / "payloads").glob("part-*.parquet")))
    rows = table.to_pylist()[:2]
    rows[0]["payload"] = rows[0]["payload"][:HEADER_BYTES] + bytes(b ^ 0x5A for b in rows[0]["payload"][HEADER_BYTES:])
    bad = tmp_path / "payloads"
    bad.mkdir()
    pq.write_table(type(table).from_pylist(rows, schema=table.schema), bad / "part-00000.parquet")
    target = tmp_path / "d"
    assert decode(["--payloads", str(bad), "--output", str(target), "--model", "bundled"]) == 1
    assert not any(target.iterdir())  # the document with a bad chunk is not written


def test_flagged_chunks_get_stored_payloads(tmp_path, tiny_bpe_model):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "bytes.txt").write_bytes(b"valid start \xff\xfe then invalid")
    (corpus / "ok.txt").write_bytes("ünïcödé is fine".encode())
    (corpus / "empty.txt").write_bytes(b"")
    out = tmp_path / "out"
    record = run(["--input", str(corpus), "--output", str(out), "--model", tiny_bpe_model,
                  "--verify-fraction", "1.0", "--quiet"])
    assert record["counts"]["reconciled"] and record["counts"]["dead_letters"] == 1  # the empty document
    assert record["coding"]["verified"] == 2 and record["coding"]["verification_failed"] == 0
    methods = {r["doc_id"].rsplit("/", 1)[-1]: r["method"]
               for r in ds.dataset(out / "payloads", format="parquet").to_table().to_pylist()}
    assert methods == {"bytes.txt#0": "stored", "ok.txt#0": "model"}
    target = tmp_path / "dec"
    assert decode(["--payloads", str(out / "payloads"), "--output", str(target)]) == 0
    assert {p.read_bytes() for p in target.iterdir()} == {(corpus / "bytes.txt").read_bytes(),
                                                           (corpus / "ok.txt").read_bytes()}


def test_coding_options_are_validated(tmp_path):
    with pytest.raises(SystemExit, match="--verify-fraction"):
        run(["--sample", "--output", str(tmp_path / "o"), "--verify-fraction", "2"])
    with pytest.raises(SystemExit, match="--precision"):
        run(["--sample", "--output", str(tmp_path / "o"), "--precision", "8"])
    with pytest.raises(SystemExit, match="multiple of --coding-block"):
        run(["--sample", "--output", str(tmp_path / "o"), "--coding-block", "48"])
    with pytest.raises(ValueError, match="precision"):
        CodingOptions("00", precision=40)
    assert torch.get_num_threads() >= 1
