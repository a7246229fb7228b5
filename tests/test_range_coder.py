"""The range coder: exact round trips, near-ideal length, clear errors (hypothesis property tests)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lmc_audit.transforms.coding import range_coder as rc
from lmc_audit.transforms.coding.quantize import lookup, pick, quantize


def tables_and_symbols(freq_rows: list[list[int]], picks: list[int], precision: int):
    """Normalise arbitrary positive counts to a total of 2**precision; returns cdfs, symbols, starts, freqs."""
    total = 1 << precision
    cdfs, symbols, starts, freqs = [], [], [], []
    for row, pick_ in zip(freq_rows, picks):
        counts = np.array(row, np.float64)
        f = np.floor(counts / counts.sum() * (total - len(row))).astype(np.int64) + 1
        f[np.argmax(f)] += total - f.sum()
        cdf = np.concatenate([[0], np.cumsum(f)])
        s = pick_ % len(row)
        cdfs.append(cdf)
        symbols.append(s)
        starts.append(cdf[s])
        freqs.append(f[s])
    return cdfs, np.array(symbols), np.array(starts, np.int64), np.array(freqs, np.int64)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), precision=st.integers(min_value=8, max_value=32), vocab=st.integers(2, 40))
def test_round_trip_random_tables(data, precision, vocab):
    n = data.draw(st.integers(0, 300))
    rows = data.draw(st.lists(st.lists(st.integers(1, 10**6), min_size=vocab, max_size=vocab), min_size=n, max_size=n))
    picks = data.draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n))
    cdfs, symbols, starts, freqs = tables_and_symbols(rows, picks, precision)
    payload = rc.encode(starts, freqs, precision)
    if n == 0:
        assert payload == b""
        return
    decoded = rc.decode(payload, np.stack(cdfs), precision)
    assert np.array_equal(decoded, symbols)
    ideal = float(np.sum(precision - np.log2(freqs)))
    # About one to two bytes of overhead per stream, plus a tiny per-symbol division loss.
    assert 8 * len(payload) <= ideal + 0.001 * ideal + 24


@settings(max_examples=60, deadline=None)
@given(precision=st.integers(16, 32), n=st.integers(1, 400), seed=st.integers(0, 2**32 - 1))
def test_extreme_frequencies_one_out_of_the_total(precision, n, seed):
    """Symbols of frequency 1 next to one that holds nearly all of the total."""
    rng = np.random.default_rng(seed)
    total = 1 << precision
    cdf = np.array([0, 1, 2, total - 1, total], np.int64)  # freqs 1, 1, total-3, 1
    symbols = rng.choice([0, 1, 2, 3], size=n, p=[0.3, 0.2, 0.2, 0.3])
    payload = rc.encode(cdf[symbols], cdf[symbols + 1] - cdf[symbols], precision)
    assert np.array_equal(rc.decode(payload, np.tile(cdf, (n, 1)), precision), symbols)


def test_long_stream_and_large_vocabulary():
    rng = np.random.default_rng(1)
    precision, vocab, n = 30, 50257, 200_000
    freq = rng.integers(1, 2000, vocab).astype(np.int64)
    freq[0] += (1 << precision) - freq.sum()
    cdf = np.concatenate([[0], np.cumsum(freq)])
    symbols = rng.integers(0, vocab, n)
    payload = rc.encode(cdf[symbols], freq[symbols], precision)
    ideal = float(np.sum(precision - np.log2(freq[symbols])))
    assert 8 * len(payload) - ideal < 24 + 1e-5 * ideal
    decoded = np.zeros(n, np.int64)
    data = np.frombuffer(payload, np.uint8)
    # decode_with_cdfs takes one table per symbol; share one table through a broadcast view.
    assert rc.decode_with_cdfs(data, np.broadcast_to(cdf, (n, vocab + 1)), precision, decoded)
    assert np.array_equal(decoded, symbols)


def test_stepped_decoders_match_and_reject_corruption():
    rng = np.random.default_rng(2)
    precision = 24
    cdf = np.concatenate([[0], np.cumsum(np.full(256, 1 << 16))])
    streams, symbol_rows = [], []
    for length in (0, 1, 50, 300):
        s = rng.integers(0, 256, length)
        symbol_rows.append(s)
        streams.append(rc.encode(cdf[s], cdf[s + 1] - cdf[s], precision))
    dec = rc.RangeDecoders(streams, precision)
    got = [[] for _ in streams]
    for t in range(300):
        active = np.array([t < len(s) for s in symbol_rows])
        slots = dec.slots()
        sym = np.searchsorted(cdf, slots, side="right") - 1
        for b in np.flatnonzero(active):
            got[b].append(sym[b])
        dec.advance(cdf[sym], cdf[sym + 1] - cdf[sym], active)
    assert all(np.array_equal(g, s) for g, s in zip(got, symbol_rows))


def test_encoder_object_refuses_bad_use():
    enc = rc.RangeEncoder(16)
    enc.encode(0, 1 << 15)
    with pytest.raises(ValueError, match="not inside"):
        enc.encode(1 << 15, 1 << 15 + 1)
    payload = enc.finish()
    with pytest.raises(RuntimeError, match="finished"):
        enc.encode(0, 1)
    with pytest.raises(RuntimeError, match="already"):
        enc.finish()
    assert isinstance(payload, bytes)
    with pytest.raises(ValueError, match="quantize"):
        rc.encode(np.array([0]), np.array([0]), 16)
    with pytest.raises(ValueError, match="precision"):
        rc.RangeEncoder(40)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31), vocab=st.sampled_from([2, 3, 257, 5000]), scale=st.floats(0.1, 30.0),
       precision=st.sampled_from([16, 24, 30]))
def test_quantize_fixed_total_min_one_and_lookup_inverts_pick(seed, vocab, scale, precision):
    if vocab * 2 >= 1 << precision:
        return
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, vocab, generator=g) * scale
    freqs = quantize(logits, precision)
    assert freqs.dtype == torch.int64 and int(freqs.min()) >= 1
    assert torch.all(freqs.sum(-1) == (1 << precision))
    symbols = torch.randint(0, vocab, (3, 5), generator=g)
    start, freq = pick(freqs, symbols)
    for slot in (start, start + freq - 1, start + freq // 2):
        s2, st2, f2 = lookup(freqs, slot)
        assert torch.equal(s2, symbols) and torch.equal(st2, start) and torch.equal(f2, freq)
    # Coding cost under the quantized table stays close to -log2 p.
    p = torch.softmax(logits.double(), -1).gather(-1, symbols[..., None])[..., 0]
    coded = precision - torch.log2(freq.double())
    assert torch.all(coded - (-torch.log2(p)) < vocab / (1 << precision) / math.log(2) * 4 + 1e-3)


def test_kernels_warm_in_a_helper_process(monkeypatch):
    """The helper a local job starts runs to the end (its output goes nowhere, so only its exit says it
    works), and a process starts it once."""
    monkeypatch.setattr(rc, "_WARMING", False)
    helper = rc.warm_in_background()
    assert helper is not None and helper.wait(timeout=120) == 0
    assert rc.warm_in_background() is None
