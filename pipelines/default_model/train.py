"""Train a byte-level model on the training side of the split: the base of the bundled model.

    python -m lmc_audit.pipelines.default_model.train --out pipelines/assets/base_model --minutes 45

The bundled model (``pipelines/assets/model``) is that base with a copying circuit built in
(``induction.py``), fine-tuned here with the circuit frozen (``--init-from DIR --freeze-circuit``)
and recalibrated (``induction.py --recalibrate``); its card has the commands.

The model is a small Llama (RMSNorm, RoPE, SwiGLU) over bytes: ids 0-255 are
bytes and id 256 is BOS, which also serves as padding (padded positions are
masked). Training is bounded by wall-clock time so that it fits a CPU budget
(the learning rate follows a cosine over elapsed time), or by ``--steps``
(the cosine over steps), which gives the same number of steps on any
hardware where a time budget does not. The run writes the
weights (safetensors), config and ``training.json`` (tokens, time, hardware),
which the model-card script reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from lmc_audit.pipelines.default_model.split import DOCS_ROOT, list_source_files

BOS_ID = 256
VOCAB_SIZE = 257


def build_model(hidden: int, layers: int, heads: int, ffn: int, max_positions: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=BOS_ID,
        pad_token_id=BOS_ID,
        attn_implementation="sdpa",
    )
    # Read by lmc_audit.transforms.scoring.tokenization: this model sees raw bytes.
    config.lmc_byte_level = True
    return LlamaForCausalLM(config)


def load_stream(files) -> tuple[np.ndarray, np.ndarray]:
    parts, starts, offset = [], [], 0
    for f in files:
        data = f.path.read_bytes()
        parts.append(np.frombuffer(data, dtype=np.uint8))
        starts.append(offset)
        offset += len(data)
    return np.concatenate(parts), np.asarray(starts, dtype=np.int64)


def perturbed(span: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``span``: exact half the time, else with 1-10% of its bytes replaced by bytes drawn from
    the span itself, so that the model learns to copy through small edits."""
    out = span.copy()
    if rng.random() < 0.5:
        return out
    n = max(1, int(len(span) * rng.uniform(0.01, 0.1)))
    out[rng.integers(0, len(span), n)] = span[rng.integers(0, len(span), n)]
    return out


def sample_batch(stream: np.ndarray, starts: np.ndarray, batch: int, seq: int,
                 rng: np.random.Generator, copy_fraction: float = 0.0, random_share: float = 0.0) -> torch.Tensor:
    """[batch, seq] ids: BOS then seq-1 bytes, a tenth of rows from a file start.

    A ``copy_fraction`` of rows hold a span of text, then a (perturbed) copy of it, then text that
    follows: the model's NCD is only meaningful if the model predicts a repeat from its context. A
    ``random_share`` of those spans are random bytes, which only copying can predict: the gradient that
    makes a small model learn to copy (induction heads) at all."""
    rows = np.empty((batch, seq), dtype=np.int64)
    rows[:, 0] = BOS_ID
    for i in range(batch):
        if rng.random() < 0.1:
            begin = int(rng.choice(starts))
        else:
            begin = int(rng.integers(0, len(stream) - seq))
        begin = min(begin, len(stream) - seq)
        window = stream[begin:begin + seq - 1]
        if rng.random() < copy_fraction:
            length = int(rng.integers(32, (seq - 1) // 2 + 1))
            if rng.random() < random_share:
                length = int(rng.integers(16, 257))
                span = rng.integers(0, 256, length).astype(np.uint8)
            else:
                span = window[:length]
            window = np.concatenate([span, perturbed(span, rng), window[length:]])[:seq - 1]
        rows[i, 1:] = window
    return torch.from_numpy(rows)


@torch.no_grad()
def held_out_bpb(model, stream: np.ndarray, seq: int, max_rows: int = 16, bf16: bool = False) -> float:
    """Bits per byte over the first ``max_rows`` rows of ``seq`` bytes: a quick measure for logs. float32 by
    default, as the card measures; ``bf16`` autocasts as a bf16 training step does."""
    model.eval()
    n = min(max_rows, len(stream) // (seq - 1))
    rows = torch.full((n, seq), BOS_ID, dtype=torch.long)
    for i in range(n):
        rows[i, 1:] = torch.from_numpy(stream[i * (seq - 1):(i + 1) * (seq - 1)].astype(np.int64))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=rows).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, rows[:, 1:, None]).mean().item()
    model.train()
    return nll / math.log(2)


@torch.no_grad()
def copy_ratio(model, stream: np.ndarray, length: int = 500, texts: int = 8) -> float:
    """bits(x + x) / bits(x) on ``texts`` held-out spans: 2.0 until the model copies."""
    model.eval()
    spans = [stream[i * length:(i + 1) * length].astype(np.int64) for i in range(texts)]
    totals = []
    for twice in (False, True):
        rows = torch.tensor(np.stack([[BOS_ID, *(np.concatenate([s, s]) if twice else s)] for s in spans]))
        logp = torch.log_softmax(model(input_ids=rows).logits[:, :-1].float(), dim=-1)
        totals.append(-logp.gather(-1, rows[:, 1:, None]).sum().item())
    model.train()
    return totals[1] / totals[0]


def hold_entries(model, masks: dict[str, torch.Tensor]) -> list[tuple]:
    """(parameter, mask, values now) for every parameter with masked entries: what ``restore_entries``
    puts back after each optimizer step (AdamW's decoupled decay would move entries a zero gradient
    leaves, so the values are restored rather than the gradients masked)."""
    return [(p, masks[n], p.detach()[masks[n]].clone()) for n, p in model.named_parameters() if masks[n].any()]


def restore_entries(held: list[tuple]) -> None:
    with torch.no_grad():
        for p, mask, values in held:
            p[mask] = values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs-root", type=Path, default=DOCS_ROOT)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=45.0,
                   help="wall-clock budget; the schedule (warm-up aside) runs over it (ignored with --steps)")
    p.add_argument("--steps", type=int, default=None,
                   help="train exactly this many steps, the schedule over steps: the same model's recipe on any "
                        "hardware (a --minutes budget bought 257 steps on a 2-core AMD EPYC without AVX-512, "
                        "707 on an Intel Xeon)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--tokens-per-step", type=int, default=8192)
    p.add_argument("--long-fraction", type=float, default=0.3,
                   help="last fraction of the time trained at 2048+1 positions (the rest at 1024)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-fraction", type=float, default=0.0,
                   help="share of training windows holding a span and a perturbed copy of it (the shipped model: 0)")
    p.add_argument("--random-share", type=float, default=0.0,
                   help="share of copy windows whose span is random bytes (only copying predicts them)")
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from this model's weights (its training.json is kept as the base)")
    p.add_argument("--freeze-circuit", action="store_true",
                   help="with --init-from a grown model (induction.py): hold the copying circuit's weights, and "
                        "the old weights' entries on its scratch dimensions, at their built values")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: autocast over fp32 master weights (the bundled models' recipe); fp32 throughout. "
                        "On a CPU without native bfloat16 (no avx512_bf16 or amx_bf16) autocast is emulated: "
                        "a step took 10x as long as in fp32 on such a 2-core AMD EPYC (43 s vs 4.2 s, 2 x 1,025 bytes), "
                        "and a wall-clock budget then buys a tenth of the steps")
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.precision == "bf16" and not native_bf16():
        print("warning: this CPU has no native bfloat16 (avx512_bf16 / amx_bf16): bf16 autocast is emulated, about "
              "10x slower per step; the --minutes budget buys that many fewer steps (--precision fp32 avoids it)",
              flush=True)

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    files = list_source_files(args.docs_root)
    train_stream, train_starts = load_stream([f for f in files if not f.held_out])
    held_stream, _ = load_stream([f for f in files if f.held_out])
    print(f"train bytes {len(train_stream):,}  held-out bytes {len(held_stream):,}", flush=True)

    if args.init_from is not None:
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM.from_pretrained(args.init_from, torch_dtype=torch.float32)
    else:
        model = build_model(args.hidden, args.layers, args.heads, args.ffn, max_positions=4096)
    params = sum(p.numel() for p in model.parameters())
    print(f"parameters {params:,}", flush=True)
    held = []  # (parameter, mask, built values): restored after every step
    if args.freeze_circuit:
        from lmc_audit.pipelines.default_model.induction import circuit_entries

        grown = json.loads((args.init_from / "training.json").read_text()).get("grown") if args.init_from else None
        if not grown:
            raise SystemExit("--freeze-circuit needs --init-from a model grown by induction.py")
        held = hold_entries(model, circuit_entries(model, grown))
        print(f"frozen entries {sum(int(m.sum()) for _, m, _ in held):,}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    budget = args.minutes * 60.0
    warmup_steps = args.warmup_steps
    t0 = time.time()
    step, tokens = 0, 0
    model.train()
    while True:
        frac = step / args.steps if args.steps else (time.time() - t0) / budget
        if frac >= 1.0:
            break
        seq = 2049 if frac >= 1.0 - args.long_fraction else 1025
        batch = max(1, args.tokens_per_step // (seq - 1))
        lr = args.lr * min(1.0, (step + 1) / warmup_steps) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        x = sample_batch(train_stream, train_starts, batch, seq, rng, args.copy_fraction, args.random_share)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        restore_entries(held)
        step += 1
        tokens += batch * (seq - 1)
        if step % 50 == 0:
            elapsed = time.time() - t0
            msg = f"step {step} seq {seq} lr {lr:.2e} train bpb {loss.item() / math.log(2):.3f} tokens {tokens:,} {tokens / elapsed:.0f} tok/s"
            if step % 250 == 0:
                msg += f" held-out bpb {held_out_bpb(model, held_stream, 1025, bf16=args.precision == 'bf16'):.3f}"
            if step % 100 == 0:
                msg += f" copy ratio {copy_ratio(model, held_stream):.3f}"
            print(msg, flush=True)
    elapsed = time.time() - t0
    over = f"{args.steps} steps" if args.steps else "wall time"

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    record = {
        "parameters": params,
        "training_tokens": tokens,
        "steps": step,
        "training_seconds": round(elapsed, 1),
        "hardware": f"{platform.processor() or platform.machine()}, {args.threads} CPU threads, {_cpu_name()}",
        "torch": torch.__version__,
        "precision": ("bf16 autocast on CPU, fp32 master weights" if args.precision == "bf16" else "fp32"),
        "optimizer": f"AdamW lr {args.lr} betas (0.9, 0.95) wd 0.1, warmup {warmup_steps} steps, cosine over {over}",
        "schedule": f"{args.tokens_per_step} tokens/step; 1024-byte windows, last {args.long_fraction:.0%} of the "
                    f"{over} 2048-byte windows",
        "bound": f"--steps {args.steps}" if args.steps else f"--minutes {args.minutes:g}",
        "seed": args.seed,
        "train_bytes": int(len(train_stream)),
        "copy_fraction": args.copy_fraction,
        "freeze_circuit": args.freeze_circuit,
        "random_share": args.random_share,
    }
    if args.init_from is not None:
        base = args.init_from / "training.json"
        record["continued_from"] = json.loads(base.read_text()) if base.exists() else str(args.init_from)
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (Linux's cpuinfo flags); elsewhere, assumed so."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
