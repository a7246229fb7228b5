"""Memorization signals: definitions checked against a direct computation, and their order on a memorized text."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
import torch

from conftest import MEMORIZED, UNSEEN
from lmc_audit.pipelines.audit import run
from lmc_audit.transforms.scoring import signals
from lmc_audit.transforms.manifests.write import chunk_row, document_row_of_chunks
from lmc_audit.transforms.records import Chunk, ScoredChunk
from lmc_audit.transforms.scoring.signals import SignalOptions


def manifest(out: Path, name: str) -> list[dict]:
    return ds.dataset(out / name, format="parquet").to_table().to_pylist()


def test_token_stats_match_the_definitions():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11) * 3
    targets = torch.randint(0, 11, (3, 5))
    logp, z = signals.token_stats(logits, targets)
    for r in range(3):
        for t in range(5):
            p = np.exp(logits[r, t].double().numpy() - np.logaddexp.reduce(logits[r, t].double().numpy()))
            lp = np.log(p)
            mu = float(np.sum(p * lp))
            sigma = math.sqrt(float(np.sum(p * lp * lp)) - mu * mu)
            assert logp[r, t].item() == pytest.approx(lp[targets[r, t]], abs=1e-5)
            assert z[r, t].item() == pytest.approx((lp[targets[r, t]] - mu) / sigma, abs=1e-4)


def test_token_stats_slices_large_inputs_the_same(monkeypatch):
    torch.manual_seed(2)
    logits, targets = torch.randn(6, 4, 9), torch.randint(0, 9, (6, 4))
    whole = signals.token_stats(logits, targets)
    monkeypatch.setattr(signals, "MAX_ENTRIES", 4 * 9)  # one row per slice
    sliced = signals.token_stats(logits, targets)
    assert all(torch.equal(a, b) for a, b in zip(whole, sliced))


def test_min_k_mean():
    values = np.array([-5.0, -1.0, -3.0, -0.5, -2.0, -4.0, -0.1, -0.2, -0.3, -0.4])
    assert signals.min_k_mean(values, 0.2) == pytest.approx(-4.5)  # lowest 2 of 10
    assert signals.min_k_mean(values, 1.0) == pytest.approx(values.mean())
    assert signals.min_k_mean(values[:3], 0.2) == -5.0  # at least one value
    assert signals.min_k_mean(np.zeros(0), 0.2) is None
    with pytest.raises(ValueError, match="k must be"):
        SignalOptions(k=0)


def _scored(doc: str, index: int, data: bytes, bits: float, logp: list[float], z: list[float]) -> ScoredChunk:
    chunk = Chunk(doc, "s", 0, 0, index, 4 * index, data, b"\0" * 32, len(data), len(data), len(data))
    return ScoredChunk(chunk, len(logp), bits, 8, logp=signals.summarize(np.array(logp), "logp"),
                       zscores=signals.summarize(np.array(z), "z"))


def _merged(parts: list[np.ndarray], signal: str = "logp") -> signals.SummaryMerger:
    merger = signals.SummaryMerger()
    for p in parts:
        merger.add(signals.summarize(p, signal))
    return merger


def test_summary_min_k_is_exact_where_it_says_so_and_within_one_bin_elsewhere():
    """A document's Min-K% from its chunks' bounded summaries against the value from all its tokens."""
    rng = np.random.default_rng(0)
    cases = [
        [rng.gamma(2.0, 1.0, 2048).astype(np.float32) * -1 for _ in range(3)],  # a typical document
        [-rng.gamma(2.0, 1.0, 500).astype(np.float32)],  # one chunk
        # One chunk much harder than the rest: more than half of its tokens are among the lowest 20%.
        [np.full(2048, -0.05, np.float32)] * 4 + [-rng.uniform(8, 12, 2048).astype(np.float32)],
        # A long document: far more values than DOC_LOWEST in its lowest 20%.
        [-rng.gamma(2.0, 1.0, 2048).astype(np.float32) for _ in range(40)],
    ]
    exactness = []
    for parts in cases:
        for k in (0.05, 0.2, 0.5):
            exact = signals.min_k_mean(np.concatenate(parts), k)
            got, is_exact = _merged(parts).min_k(k)
            exactness.append(is_exact)
            if is_exact:
                assert got == pytest.approx(exact, abs=1e-9)
            else:
                assert abs(got - exact) <= 1 / signals.BINS_PER_NAT
    assert exactness[:2] == [True] * 2 and exactness[3:6] == [True] * 3  # typical document at k <= 0.2; one chunk
    assert not exactness[7] and not exactness[10]  # the hard chunk and the long document at k = 0.2
    # A chunk's own Min-K% is exact up to k = 0.5.
    one = -rng.gamma(2.0, 1.0, 2048).astype(np.float32)
    for k in (0.01, 0.2, 0.5):
        assert signals.summary_min_k(signals.summarize(one, "logp"), k) == pytest.approx(
            signals.min_k_mean(one, k), abs=1e-9)


def test_summary_min_k_of_a_long_document_in_one_bin_does_not_overflow():
    """A random model gives a 4 MB text's 4M tokens nearly one log p: one bin holds them all, and its
    fixed-point sum times the values taken from it is past int64."""
    rng = np.random.default_rng(2)
    values = rng.normal(-5.545, 0.005, 4_000_000).astype(np.float32)
    merger = signals.SummaryMerger()
    merger.add(signals.summarize(values, "logp", keep=signals.DOC_LOWEST))
    for k in (0.2, 0.5):
        got, is_exact = merger.min_k(k)
        assert not is_exact
        assert abs(got - signals.min_k_mean(values, k)) <= 1 / signals.BINS_PER_NAT


def test_summaries_are_bounded_and_merge_in_any_order_to_the_same_bits():
    rng = np.random.default_rng(1)
    parts = [-rng.gamma(2.0, 1.0, 2048).astype(np.float32) for _ in range(30)]
    s = signals.summarize(parts[0], "logp")
    assert len(s.lowest) == 4 * 1024 and len(s.bins) // 4 <= 64 * signals.BINS_PER_NAT
    forward, backward = _merged(parts), _merged(parts[::-1])
    assert len(forward.lowest) == signals.DOC_LOWEST
    for k in (0.01, 0.2, 0.9):
        assert forward.min_k(k) == backward.min_k(k)


def test_document_signals_are_over_all_tokens_not_chunk_averages():
    chunks = [_scored("d", 0, b"abcd", 4.0, [-0.1, -0.1, -0.1, -0.1], [1, 1, 1, 1]),
              _scored("d", 1, b"efgh", 8.0, [-6.0, -0.1, -0.1, -0.1], [-3, 1, 1, 1])]
    row = document_row_of_chunks(chunks, SignalOptions(k=0.25), references=[2.0, 2.0])
    assert row["min_k"] == pytest.approx((-6.0 - 0.1) / 2)  # lowest 2 of 8 tokens
    assert row["min_k_pp"] == pytest.approx((-3 + 1) / 2)
    assert row["zlib_ratio"] == pytest.approx(12.0 / 64)  # model bits / zlib bits of the same bytes
    assert row["reference_bpb"] == pytest.approx(4.0 / 8) and row["reference_diff_bpb"] == pytest.approx(1.5 - 0.5)
    assert chunk_row(chunks[1], 0.25)["min_k"] == pytest.approx(-6.0)
    flagged = document_row_of_chunks(chunks, SignalOptions(k=0.25, zlib_ratio_below=0.5, bpb_below=0.1))
    assert flagged["memorization_flags"] == ["zlib_ratio"]


@pytest.fixture(scope="module")
def memorization_run(tmp_path_factory, memorizing_model, tiny_byte_model):
    corpus = tmp_path_factory.mktemp("mem_corpus")
    (corpus / "memorized.txt").write_bytes(MEMORIZED)
    (corpus / "unseen.txt").write_bytes(UNSEEN)
    out = tmp_path_factory.mktemp("mem_out")
    record = run(["--input", str(corpus), "--output", str(out), "--model", memorizing_model,
                  "--reference-model", tiny_byte_model, "--quiet", "--no-coding", "--chunk-bytes", "256"])
    docs = {Path(d["doc_id"].split("#")[0]).stem: d for d in manifest(out, "documents")}
    return out, record, docs


def test_signals_rank_a_memorized_document_as_more_suspicious(memorization_run):
    _, _, docs = memorization_run
    mem, unseen = docs["memorized"], docs["unseen"]
    assert mem["bpb"] < 0.5 * unseen["bpb"]
    assert mem["zlib_ratio"] < unseen["zlib_ratio"]
    assert mem["min_k"] > unseen["min_k"]  # even its hardest tokens are likely
    assert mem["min_k_pp"] > unseen["min_k_pp"]
    assert mem["reference_diff_bpb"] < unseen["reference_diff_bpb"]
    assert mem["memorization_flags"] and not unseen["memorization_flags"]


def test_reference_model_columns_and_shard_rollups(memorization_run):
    out, record, docs = memorization_run
    chunks = manifest(out, "chunks")
    for d in docs.values():
        mine = [c for c in chunks if c["doc_id"] == d["doc_id"]]
        assert all(c["reference_bits"] > 0 and c["min_k"] is not None for c in mine)
        assert d["reference_bits"] == pytest.approx(sum(c["reference_bits"] for c in mine), rel=1e-12)
        assert d["reference_diff_bpb"] == pytest.approx(d["bpb"] - d["reference_bpb"], rel=1e-9)
    shards = {Path(s["shard"]).stem: s for s in manifest(out, "shards")}
    for name, d in docs.items():
        s = shards[name]
        assert s["flagged_documents"] == int(bool(d["memorization_flags"]))
        for signal in signals.SIGNALS:
            assert s[f"flagged_{signal}"] == int(signal in d["memorization_flags"])
        assert s["p05_doc_bpb"] == s["median_doc_bpb"] == s["p95_doc_bpb"] == pytest.approx(d["bpb"])
