"""Raw batched forward vs. the whole audit pipeline, on the same chunks.

    python benchmarks/throughput.py [--model bundled] [--input PATH...] [--json OUT]

1. Raw forward: the chunks, tokenized and sorted by padded length, go through
   the model in batches of the pipeline's token budget; only the forward and
   the per-token log-probabilities are timed (tokens/s).
2. Pipeline: ``lmc-audit run`` on DirectRunner over the same input, whole
   (listing, reading, chunking, baselines, scoring, manifests), timed from
   start to end (bytes/s), with ``--no-coding`` (scores only) and with
   arithmetic coding and its in-job verification (the default).
The ratio of the two shows what the pipeline costs beyond the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from lmc_audit.pipelines.audit import bundled_sample_dir, run
from lmc_audit.transforms.documents.chunking import split_document
from lmc_audit.transforms.reading.listing import list_shards
from lmc_audit.transforms.scoring.model_handler import CausalLMHandler, token_logprobs
from lmc_audit.transforms.scoring.model_loading import resolve_model_dir
from lmc_audit.transforms.reading.readers import READERS
from lmc_audit.transforms.records import Document
from lmc_audit.transforms.scoring.tokenization import ChunkTokenizer, padded_length


def read_chunks(inputs: list[str], chunk_bytes: int) -> list[bytes]:
    shards, _ = list_shards(inputs)
    chunks = []
    for shard in shards:
        reader = READERS[shard.format](chunk_bytes=chunk_bytes)
        for task in reader.plan(shard, 1 << 30):
            for rec in reader.read(task):
                if isinstance(rec, Document):
                    chunks.extend(data for _, _, data in split_document(rec, chunk_bytes))
    return chunks


def raw_forward(model_spec: str, chunks: list[bytes], max_batch_tokens: int, granularity: int) -> dict:
    model_dir = resolve_model_dir(model_spec)
    tok = ChunkTokenizer.from_model_dir(model_dir)
    lm = CausalLMHandler(model_spec, device="cpu", dtype="float32").load_model()
    rows = []
    for data in chunks:
        targets, flags = tok.encode(data)
        if not flags:
            rows.append((padded_length(len(targets), granularity, tok.max_positions), targets))
    rows.sort(key=lambda r: r[0])
    batches, current = [], []
    for length, targets in rows:
        if current and (current[0][0] != length or (len(current) + 1) * length > max_batch_tokens):
            batches.append(current)
            current = []
        current.append((length, targets))
    batches.append(current)
    tensors = []
    for batch in batches:
        length = batch[0][0]
        inputs = torch.full((len(batch), length), lm.pad_id)
        targets = torch.full((len(batch), length), lm.pad_id)
        for r, (_, t) in enumerate(batch):
            inputs[r, 0] = tok.start_id
            inputs[r, 1:len(t)] = torch.tensor(t[:-1])
            targets[r, :len(t)] = torch.tensor(t)
        tensors.append((inputs, targets))
    with torch.inference_mode():
        token_logprobs(lm.model, *tensors[0])  # warm-up
        t0 = time.perf_counter()
        for inputs, targets in tensors:
            token_logprobs(lm.model, inputs, targets)
        seconds = time.perf_counter() - t0
    real = sum(len(t) for _, t in rows)
    padded = sum(i.numel() for i, _ in tensors)
    return {"tokens": real, "seconds": seconds, "tokens_per_s": real / seconds,
            "padding_fraction": 1 - real / padded, "forwards": len(tensors)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled")
    p.add_argument("--input", nargs="+", default=None, help="default: the bundled sample corpus")
    p.add_argument("--chunk-bytes", type=int, default=2048)
    p.add_argument("--max-batch-tokens", type=int, default=16384)
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    inputs = args.input or [bundled_sample_dir()]

    chunks = read_chunks(inputs, args.chunk_bytes)
    raw = raw_forward(args.model, chunks, args.max_batch_tokens, 64)
    timings = {}
    for mode in ("--no-coding", "--coding"):
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            record = run(["--input", *inputs, "--output", out, "--model", args.model, "--device", "cpu",
                          "--chunk-bytes", str(args.chunk_bytes), "--max-batch-tokens", str(args.max_batch_tokens),
                          "--quiet"] + (["--no-coding"] if mode == "--no-coding" else []))
            timings[mode] = (time.perf_counter() - t0, record)
    pipe_seconds, record = timings["--no-coding"]
    coded_seconds, coded_record = timings["--coding"]
    n_bytes = record["counts"]["bytes"]
    result = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "chunks": len(chunks), "bytes": n_bytes,
        "raw_forward_tokens_per_s": round(raw["tokens_per_s"]),
        "raw_forward_padding_fraction": round(raw["padding_fraction"], 4),
        "pipeline_bytes_per_s": round(n_bytes / pipe_seconds),
        "pipeline_seconds": round(pipe_seconds, 1),
        "pipeline_padding_fraction": round(record["job_metrics"]["padding_fraction"], 4),
        "pipeline_over_raw": round((n_bytes / pipe_seconds) / raw["tokens_per_s"], 3),
        "model_bpb": round(record["bpb"]["model"], 4),
        "pipeline_with_coding_bytes_per_s": round(n_bytes / coded_seconds),
        "pipeline_with_coding_seconds": round(coded_seconds, 1),
        "coded_bpb": round(coded_record["coding"]["coded_bpb"], 4),
        "coded_overhead_vs_ideal": coded_record["coding"]["overhead_vs_ideal"],
        "verified_payloads": coded_record["coding"]["verified"],
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
