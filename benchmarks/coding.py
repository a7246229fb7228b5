"""Arithmetic-coding benchmarks.

    python benchmarks/coding.py [--json OUT]

1. Host coder: encode and decode symbols/s of lmc-audit's range coder at
   vocabulary 256 and 50,257, beside constriction's RangeEncoder/Decoder
   (Categorical, perfect=False) on the same symbols and distributions, and
   each one's overhead over the ideal bits of the quantized distributions.
   lmc-audit's coder sees only (start, freq) pairs; its decode timing is the
   host side (slot, check, renormalize), the symbol search runs on the model's
   device. constriction sees whole distributions.
2. The coding stage with the bundled model on 16 sample chunks of 2048
   bytes: the scoring forward with coding (schemes forward and blocks)
   against the same forward without, and decoding the payloads (replay
   windows of 4 and 8 positions; tokens decoded per row and forward).
3. Whole jobs (one run each): the default job (coding, 1% verification)
   against ``--no-coding`` on the sample and on a 2 MB corpus (Python's
   standard library sources), and ``lmc-audit decode`` of every payload of
   the sample job against the ``--no-coding`` job.
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
from lmc_audit.transforms.coding import range_coder as rc
from lmc_audit.transforms.scoring.model_handler import CausalLMHandler
from lmc_audit.transforms.coding.quantize import pick, quantize

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


def _sample_items(rows: int):
    from lmc_audit.transforms.records import Chunk, TokenizedChunk

    sample = b"".join(p.read_bytes() for p in sorted(Path(bundled_sample_dir()).glob("*.txt")))
    datas = [sample[i * 2048:(i + 1) * 2048] for i in range(rows)]
    return datas, [TokenizedChunk(Chunk(f"d{i}", "s", 0, i, 0, 0, d, b"", 0, 0, 0), tuple(d), 256, 2048)
                   for i, d in enumerate(datas)]


def bench_stage(rows: int = 16, windows=(4, 8)) -> dict:
    """The scoring forward with and without coding on the same chunks, and decoding their payloads."""
    from lmc_audit.transforms.coding.decoding import PayloadDecoder
    from lmc_audit.transforms.scoring.model_handler import CodingOptions
    from lmc_audit.transforms.scoring.model_loading import model_fingerprint, resolve_model_dir

    datas, items = _sample_items(rows)
    tokens = rows * 2048
    fp = model_fingerprint(resolve_model_dir("bundled"))
    plain = CausalLMHandler("bundled", device="cpu", dtype="float32", max_batch_tokens=tokens)
    out = {"rows": rows, "tokens": tokens}
    lm = plain.load_model()
    plain.run_inference(items[:1], lm)  # warm up
    timings = {}
    for name, scheme in (("forward", "forward"), ("blocks", "blocks")):
        coder = CausalLMHandler("bundled", device="cpu", dtype="float32", max_batch_tokens=tokens,
                                coding=CodingOptions(fp, PRECISION, 32, 8, scheme))
        coded_lm = coder.load_model()
        best_plain = best_coded = float("inf")
        for _ in range(2):  # interleaved, best of two: the machine is shared
            t0 = time.perf_counter()
            plain.run_inference(items, lm)
            best_plain = min(best_plain, time.perf_counter() - t0)
            t0 = time.perf_counter()
            scored = coder.run_inference(items, coded_lm)
            best_coded = min(best_coded, time.perf_counter() - t0)
        ideal = sum(s.bits for s in scored)
        coded = sum(s.coded_bits for s in scored)
        timings[name] = scored
        out[f"{name}_encode_tokens_per_s"] = round(tokens / best_coded)
        out[f"{name}_scoring_tokens_per_s"] = round(tokens / best_plain)
        out[f"{name}_encode_over_scoring"] = round(best_plain / best_coded, 3)
        out[f"{name}_coded_overhead"] = (coded - ideal) / ideal
        out[f"{name}_max_excess_bits_per_chunk"] = max(s.coded_bits - s.bits * 1.001 for s in scored)
    for name, scored in timings.items():
        for window in (windows if name == "forward" else (None,)):
            decoder = PayloadDecoder("bundled", "cpu", window=window or 4)
            decoder.decode([scored[0].payload])  # load and warm up
            decoder.stats = type(decoder.stats)()
            t0 = time.perf_counter()
            got = decoder.decode([s.payload for s in scored])
            dec_s = time.perf_counter() - t0
            assert got == datas, "round trip failed"
            key = f"{name}_decode" + (f"_window{window}" if window else "")
            out[f"{key}_tokens_per_s"] = round(tokens / dec_s)
            out[f"{key}_forwards"] = decoder.stats.forwards
            out[f"{key}_tokens_per_row_forward"] = round(decoder.stats.tokens_per_row_forward, 3)
    return out


def _corpus_2mb(root: Path) -> Path:
    """At least 2 MB of real text available offline: the Python standard library's sources, as JSONL."""
    import sysconfig

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    folder = root / "stdlib2mb"
    folder.mkdir(parents=True, exist_ok=True)
    total, shard, lines = 0, 0, []
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text("utf-8", errors="replace")
        lines.append(json.dumps({"id": path.name, "text": text}))
        total += len(text.encode())
        if len(lines) == 20:
            (folder / f"part-{shard:03d}.jsonl").write_text("\n".join(lines) + "\n")
            shard, lines = shard + 1, []
        if total >= 2_100_000:
            break
    if lines:
        (folder / f"part-{shard:03d}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def _job(args: list[str]) -> float:
    import subprocess
    import sys

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "lmc_audit.pipelines.cli", "run", *args, "--overwrite", "--quiet"],
                   check=True, capture_output=True)
    return time.perf_counter() - t0


def bench_jobs(workdir: Path) -> dict:
    """Whole jobs, one run each: --no-coding, coding without verification and the default (coding, 1%
    verification), on the sample and
    on a 2 MB corpus; and decoding every payload of the sample job with `lmc-audit decode`."""
    import subprocess
    import sys

    out = {}
    corpora = {"sample": ["--sample"], "stdlib_2mb": ["--input", str(_corpus_2mb(workdir)), "--id-field", "id"]}
    for name, source in corpora.items():
        scoring = _job([*source, "--output", str(workdir / f"{name}-nocoding"), "--no-coding"])
        unverified = _job([*source, "--output", str(workdir / f"{name}-unverified"), "--verify-fraction", "0"])
        default = _job([*source, "--output", str(workdir / f"{name}-default")])
        record = json.loads((workdir / f"{name}-default" / "run.json").read_text())
        out[name] = {"bytes": record["counts"]["bytes"], "no_coding_job_s": round(scoring, 1),
                     "default_job_s": round(default, 1), "default_over_no_coding": round(default / scoring, 3),
                     "unverified_job_s": round(unverified, 1),
                     "verification_share": round((default - unverified) / unverified, 3),
                     "schemes": record["coding"]["schemes"], "verified": record["coding"]["verified"],
                     "coded_overhead": record["coding"]["overhead_vs_ideal"]}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lmc_audit.pipelines.cli", "decode", "--payloads",
                           str(workdir / "sample-default" / "payloads"), "--output", str(workdir / "decoded")],
                          check=True, capture_output=True, text=True)
    decode_s = time.perf_counter() - t0
    out["sample"].update({"decode_all_s": round(decode_s, 1),
                          "decode_all_over_no_coding_job": round(decode_s / out["sample"]["no_coding_job_s"], 3),
                          "decode_message": proc.stderr.strip().splitlines()[-1]})
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None)
    p.add_argument("--workdir", default="/tmp/lmc-audit-bench", help="where the job benchmarks write")
    p.add_argument("--no-jobs", dest="jobs", action="store_false", help="skip the whole-job measurements")
    args = p.parse_args(argv)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
              "host_coder": [bench_host(256, 200_000), bench_host(50257, 5_000)],
              "coding_stage": bench_stage()}
    print(json.dumps(result, indent=2), flush=True)
    if args.jobs:
        result["jobs"] = bench_jobs(Path(args.workdir))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
