"""Arithmetic-coding benchmarks.

    python benchmarks/coding.py [--json OUT]

1. Host coder: encode and decode symbols/s of lmc-audit's range coder at
   vocabulary 256 and 50,257, beside constriction's RangeEncoder/Decoder
   (Categorical, perfect=False) on the same symbols and distributions, and
   each one's overhead over the ideal bits of the quantized distributions.
   lmc-audit's coder sees only (start, freq) pairs; its decode timing is the
   host side (slot, check, renormalize), the symbol search runs on the model's
   device. constriction sees whole distributions.
2. The coding stage with the bundled model: encode and decode tokens/s of
   16 sample chunks of 2048 bytes (one group), and the plain scoring forward
   on the same chunks for reference.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from lmc_audit.pipelines.audit import bundled_sample_dir
from lmc_audit.transforms import range_coder as rc
from lmc_audit.transforms.block_coding import BlockCoder
from lmc_audit.transforms.model_handler import CausalLMHandler, token_logprobs
from lmc_audit.transforms.quantize import pick, quantize

PRECISION = 24


def make_symbols(vocab: int, n: int, seed: int = 0):
    """n symbols, each drawn from its own random distribution, quantized as the pipeline does."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for s in range(0, n, 1000):  # slices keep the float64 temporaries small at large vocabularies
        freqs = quantize(torch.randn(min(1000, n - s), vocab, generator=g) * 3.0, PRECISION)
        symbols = torch.multinomial(freqs.double(), 1, generator=g)[:, 0]
        parts.append((freqs, symbols, *pick(freqs, symbols)))
    freqs, symbols, start, freq = (torch.cat(x) for x in zip(*parts))
    return freqs, symbols.numpy(), start.numpy(), freq.numpy()


def bench_host(vocab: int, n: int) -> dict:
    freqs, symbols, starts, fr = make_symbols(vocab, n)
    ideal = float(np.sum(PRECISION - np.log2(fr)))
    rc.encode(starts[:10], fr[:10], PRECISION)  # compile
    t0 = time.perf_counter()
    payload = rc.encode(starts, fr, PRECISION)
    enc_s = time.perf_counter() - t0
    data = np.frombuffer(payload, np.uint8)
    rc.decode_known(data, starts[:10], fr[:10], PRECISION)
    t0 = time.perf_counter()
    matched = rc.decode_known(data, starts, fr, PRECISION)
    dec_s = time.perf_counter() - t0
    assert matched == n
    out = {"vocab": vocab, "symbols": n, "ideal_bits": round(ideal),
           "ours_encode_symbols_per_s": round(n / enc_s), "ours_decode_symbols_per_s": round(n / dec_s),
           "ours_overhead": (8 * len(payload) - ideal) / ideal}
    try:
        import constriction
    except ImportError:
        out["constriction"] = "not installed: pip install constriction"
        return out
    probs = (freqs.double() / float(1 << PRECISION)).numpy()
    del freqs
    model = constriction.stream.model.Categorical(perfect=False)
    sym32 = symbols.astype(np.int32)
    enc = constriction.stream.queue.RangeEncoder()
    t0 = time.perf_counter()
    enc.encode(sym32, model, probs)
    c_enc_s = time.perf_counter() - t0
    compressed = enc.get_compressed()
    dec = constriction.stream.queue.RangeDecoder(compressed)
    t0 = time.perf_counter()
    back = dec.decode(model, probs)
    c_dec_s = time.perf_counter() - t0
    assert np.array_equal(back, sym32)
    out.update({"constriction_encode_symbols_per_s": round(n / c_enc_s),
                "constriction_decode_symbols_per_s": round(n / c_dec_s),
                "constriction_overhead": (32 * len(compressed) - ideal) / ideal})
    return out


def bench_stage(rows: int = 16, block: int = 16) -> dict:
    lm = CausalLMHandler("bundled", device="cpu", dtype="float32").load_model()
    sample = b"".join(p.read_bytes() for p in sorted(Path(bundled_sample_dir()).glob("*.txt")))
    chunks = [np.frombuffer(sample[i * 2048:(i + 1) * 2048], np.uint8).astype(np.int64) for i in range(rows)]
    coder = BlockCoder(lm.model, lm.device, PRECISION, rows, block, 256, 256)
    tokens = rows * 2048
    t0 = time.perf_counter()
    enc = coder.encode(chunks, 2048)
    enc_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids, forwards = coder.decode([e.stream for e in enc], [2048] * rows, 2048)
    dec_s = time.perf_counter() - t0
    assert all(np.array_equal(a, b) for a, b in zip(ids, chunks)), "round trip failed"
    inputs = torch.full((rows, 2048), 256)
    inputs[:, 1:] = torch.from_numpy(np.stack(chunks)[:, :-1])
    with torch.inference_mode():
        t0 = time.perf_counter()
        token_logprobs(lm.model, inputs, torch.from_numpy(np.stack(chunks)))
        fwd_s = time.perf_counter() - t0
    ideal = sum(e.bits for e in enc)
    coded = sum(8 * len(e.stream) for e in enc)
    return {"rows": rows, "block": block, "tokens": tokens,
            "encode_tokens_per_s": round(tokens / enc_s), "decode_tokens_per_s": round(tokens / dec_s),
            "decode_over_encode": round(enc_s / dec_s, 4), "decode_forwards": forwards,
            "plain_forward_tokens_per_s": round(tokens / fwd_s),
            "coded_overhead": (coded - ideal) / ideal, "bpb": ideal / tokens}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--shapes", nargs="+", default=["32x8", "16x16"], help="ROWSxBLOCK coding shapes to measure")
    args = p.parse_args(argv)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "host_coder": [bench_host(256, 200_000), bench_host(50257, 5_000)],
              "coding_stage": [bench_stage(*map(int, shape.split("x"))) for shape in args.shapes]}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
