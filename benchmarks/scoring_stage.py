"""The scoring stage against the raw batched forward, and model FLOP utilization, for two model shapes.

    python benchmarks/scoring_stage.py [--device auto] [--json benchmarks/results/scoring_stage_cpu.json]

Models are random-init (weights do not change speed), built in memory:
``gpt2-124m`` (GPT-2 small: 12 layers, d 768, vocab 50,257) and ``llama-1.1b``
(TinyLlama's shape: 22 layers, d 2048, 32 heads / 4 KV heads, FFN 5632,
vocab 32,000). For each, the same batches (rows of one padded length, token
budget per forward as the pipeline uses) go through:

- raw: ``model(input_ids).logits`` alone, the floor the stage is held to;
- stage: ``CausalLMHandler.run_inference`` on the same rows, i.e. what the
  pipeline's scoring step does per batch: teacher-forcing inputs, transfer,
  forward, log p and the Min-K%++ mean/variance over the vocabulary on the
  device, copies back, per-chunk rows.

Model FLOPs per token: 2 x (matmul parameters, embeddings excluded, LM head
included) + 2 x layers x context x d for attention scores and values
(causal: half of the full context's 4 x layers x L x d). MFU = model FLOP/s
over the device's peak: the datasheet dense bf16 figure on NVIDIA GPUs, and
on a CPU the best fp32 rate of a 4096^2 matmul measured here (stated as such).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import time
from pathlib import Path

import torch

from lmc_audit.transforms.scoring.model_handler import CausalLMHandler, LoadedModel, pick_device
from lmc_audit.transforms.records import Chunk, TokenizedChunk

GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "T4": 65e12}


def build(shape: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if shape == "gpt2-124m":
        cfg = GPT2Config(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)
        return GPT2LMHeadModel(cfg), cfg.n_layer, cfg.n_embd
    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                      intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg), cfg.num_hidden_layers, cfg.hidden_size


def matmul_params(model) -> int:
    embeddings = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    n = sum(p.numel() for p in model.parameters() if p.dim() >= 2 and id(p) not in embeddings)
    head = model.get_output_embeddings().weight
    return n + (head.numel() if id(head) in embeddings else 0)  # a tied LM head still multiplies


def cpu_peak_flops(size: int = 4096, repeats: int = 5) -> float:
    """The best of several timed large fp32 matmuls: what this CPU sustains on GEMM."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * size ** 3 / (time.perf_counter() - t0))
    return best


def make_batches(vocab: int, length: int, rows: int, batches: int) -> list[list[TokenizedChunk]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for b in range(batches):
        items = []
        for r in range(rows):
            targets = tuple(torch.randint(0, vocab, (length,), generator=gen).tolist())
            chunk = Chunk(f"b{b}r{r}", "bench", 0, r, 0, 0, b"", hashlib.sha256(b"").digest(), 0, 0, 0)
            items.append(TokenizedChunk(chunk, targets, 0, length))
        out.append(items)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(shape: str, device: torch.device, dtype: torch.dtype, length: int, budget: int, batches: int) -> dict:
    model, layers, d = build(shape)
    model.eval().to(device=device, dtype=dtype)
    vocab = model.config.vocab_size
    rows = max(1, budget // length)
    data = make_batches(vocab, length, rows, batches + 1)  # the first one warms up
    handler = CausalLMHandler("bundled", device=device.type, max_batch_tokens=budget)
    lm = LoadedModel(model, device, dtype, 0)
    inputs = [torch.tensor([[0, *item.targets[:-1]] for item in batch], device=device) for batch in data]

    def raw(i):
        return model(input_ids=inputs[i], use_cache=False).logits

    timings = {}
    with torch.inference_mode():
        for name, step in (("raw", raw), ("stage", lambda i: handler.run_inference(data[i], lm))):
            step(0)
            sync(device)
            t0 = time.perf_counter()
            for i in range(1, batches + 1):
                step(i)
            sync(device)
            timings[name] = time.perf_counter() - t0
    tokens = batches * rows * length
    flops_per_token = 2 * matmul_params(model) + 2 * layers * length * d
    return {"shape": shape, "parameters": sum(p.numel() for p in model.parameters()), "vocab": vocab,
            "rows": rows, "length": length, "batches": batches, "tokens": tokens,
            "raw_tokens_per_s": round(tokens / timings["raw"], 1),
            "stage_tokens_per_s": round(tokens / timings["stage"], 1),
            "stage_over_raw": round(timings["raw"] / timings["stage"], 3),
            "model_flops_per_token": flops_per_token,
            "raw_flops_per_s": tokens * flops_per_token / timings["raw"],
            "stage_flops_per_s": tokens * flops_per_token / timings["stage"]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--shapes", nargs="+", default=["gpt2-124m", "llama-1.1b"])
    p.add_argument("--length", type=int, default=512, help="padded length of every row")
    p.add_argument("--budget", type=int, default=None, help="tokens per forward (default: 4096 CPU, 16384 GPU)")
    p.add_argument("--batches", type=int, default=None, help="timed batches (default: 2 CPU, 20 GPU)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
        peak_note = f"{name}, datasheet dense bf16"
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        peak = cpu_peak_flops()
        peak_note = "measured: best of 5 fp32 4096^2 matmuls on this CPU"
    result = {"device": name, "dtype": str(dtype).replace("torch.", ""), "peak_flops_per_s": peak,
              "peak": peak_note, "torch": torch.__version__, "models": []}
    for shape in args.shapes:
        r = measure(shape, device, dtype, args.length, args.budget or (16384 if cuda else 4096),
                    args.batches or (20 if cuda else 2))
        if peak:
            r["raw_mfu"] = round(r["raw_flops_per_s"] / peak, 3)
            r["stage_mfu"] = round(r["stage_flops_per_s"] / peak, 3)
        result["models"].append(r)
        print(json.dumps(r, indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
