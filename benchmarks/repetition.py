"""Membership against repetition: a small model trained with some documents seen k = 1, 2, 4, 8, 16 times.

    python benchmarks/repetition.py [--files-per-group 50] [--json benchmarks/results/repetition.json]

How it is made (one run, seeded):

1. Documents: ``--docs-per-file`` pieces of ``--doc-bytes``, evenly spaced,
   from each of ``6 x --files-per-group`` files of the documentation sources
   (``pipelines/default_model/split.py``), the files shuffled and dealt to six
   groups (all pieces of a file in one group): k = 0 (never seen: the
   reference) and k = 1, 2, 4, 8, 16.
2. Training: a small byte-level Llama built fresh (``train.build_model``) is
   trained for exactly one pass over a stream of windows: ``--base-bytes`` of
   other files (cut into ``--doc-bytes`` windows, so that the model learns the
   language) plus each document of group k as its own window k times, all
   windows shuffled together. A window starts with BOS, as a chunk the audit
   scores does.
3. The audit: ``lmc-audit run --model <the trained model>`` over the six
   groups, each its own shard (``k00.jsonl`` ... ``k16.jsonl``), without
   coding or dedup.
4. For each k, the shard-level test (``lmc-audit membership``) of ``k{k}``
   against ``k00``: per signal the AUC with its 95% interval, the test's
   p-value, and the blind (model-free) classifier's AUC, which should stay
   near 0.5 since the groups are random files.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch

from lmc_audit.pipelines.audit import run
from lmc_audit.pipelines.default_model.split import list_source_files
from lmc_audit.pipelines.default_model.train import BOS_ID, build_model
from lmc_audit.pipelines.membership import dataset_inference, load_groups

REPEATS = (0, 1, 2, 4, 8, 16)


def documents(doc_bytes: int, per_file: int, files_per_group: int,
              seed: int) -> tuple[dict[int, list[tuple[str, str]]], list[Path]]:
    """Groups of (id, text) by k, and the files left for the base stream."""
    files = [f for f in list_source_files() if f.path.stat().st_size >= (per_file + 1) * doc_bytes]
    random.Random(seed).shuffle(files)
    if len(files) < len(REPEATS) * files_per_group:
        raise SystemExit(f"{len(files)} files of at least {(per_file + 1) * doc_bytes} bytes; "
                         f"{len(REPEATS)} x {files_per_group} needed: lower --files-per-group")
    groups: dict[int, list[tuple[str, str]]] = {k: [] for k in REPEATS}
    for i, f in enumerate(files[:len(REPEATS) * files_per_group]):
        data = f.path.read_bytes()
        for j in range(per_file):
            start = (j + 1) * len(data) // (per_file + 1) - doc_bytes // 2
            # "ignore" drops the characters cut at the ends: the text trained on is the text audited.
            text = data[start:start + doc_bytes].decode("utf-8", "ignore")
            groups[REPEATS[i % len(REPEATS)]].append((f"{f.relpath}#{j}", text))
    used = {f.path for f in files[:len(REPEATS) * files_per_group]}
    return groups, sorted(f.path for f in list_source_files() if f.path not in used)


def windows(groups: dict[int, list[tuple[str, str]]], base_files: list[Path], base_bytes: int, doc_bytes: int,
            seed: int) -> list[bytes]:
    stream = b"".join(p.read_bytes() for p in base_files)[:base_bytes]
    out = [stream[i:i + doc_bytes] for i in range(0, len(stream) - doc_bytes + 1, doc_bytes)]
    for k, docs in groups.items():
        out += [text.encode() for _, text in docs for _ in range(k)]
    random.Random(seed).shuffle(out)
    return out


def batch_tensors(batch: list[bytes], seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[rows, seq] ids (BOS, then the bytes, padded with BOS) and labels with padding masked (-100)."""
    ids = torch.full((len(batch), seq), BOS_ID, dtype=torch.long)
    labels = torch.full((len(batch), seq), -100, dtype=torch.long)
    for i, window in enumerate(batch):
        row = torch.tensor([BOS_ID, *window], dtype=torch.long)
        ids[i, :len(row)] = row
        labels[i, :len(row)] = row
    return ids, labels


def train(model_dir: Path, stream: list[bytes], args: argparse.Namespace) -> dict:
    """One pass over ``stream``, ``args.batch`` windows a step, cosine learning rate over the steps."""
    torch.manual_seed(args.seed)
    model = build_model(args.hidden, args.layers, args.heads, args.hidden * 8 // 3, max_positions=4096)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    steps = math.ceil(len(stream) / args.batch)
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        lr = args.lr * min(1.0, (step + 1) / 30) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr
        ids, labels = batch_tensors(stream[step * args.batch:(step + 1) * args.batch], args.doc_bytes + 1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0 or step + 1 == steps:
            print(f"step {step + 1}/{steps} train bpb {loss.item() / math.log(2):.3f} "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    return {"parameters": sum(p.numel() for p in model.parameters()), "steps": steps, "windows": len(stream),
            "training_bytes": sum(len(w) for w in stream), "seconds": round(time.perf_counter() - start, 1),
            "layers": args.layers, "hidden": args.hidden, "lr": args.lr, "batch_windows": args.batch}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files-per-group", type=int, default=50)
    p.add_argument("--docs-per-file", type=int, default=2)
    p.add_argument("--doc-bytes", type=int, default=1024)
    p.add_argument("--base-bytes", type=int, default=1_500_000)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    groups, base_files = documents(args.doc_bytes, args.docs_per_file, args.files_per_group, args.seed)
    stream = windows(groups, base_files, args.base_bytes, args.doc_bytes, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, corpus, out = Path(tmp) / "model", Path(tmp) / "corpus", Path(tmp) / "out"
        training = train(model_dir, stream, args)
        corpus.mkdir()
        for k, docs in groups.items():
            (corpus / f"k{k:02d}.jsonl").write_text(
                "".join(json.dumps({"id": doc_id, "text": text}) + "\n" for doc_id, text in docs))
        start = time.perf_counter()
        run(["--input", str(corpus), "--output", str(out), "--model", str(model_dir), "--id-field", "id",
             "--no-coding", "--no-dedup", "--no-report", "--quiet"])
        job_seconds = time.perf_counter() - start
        sweep = []
        for k in REPEATS[1:]:
            test = dataset_inference(load_groups(str(out), [f"k{k:02d}*"], ["k00*"]))
            sweep.append({"k": k, "p_value": test["p_value"], "auc": test["auc"], "best_signal": test["best_signal"],
                          "signals": {name: {"auc": s["auc"], "auc_95ci": s["auc_95ci"]}
                                      for name, s in test["signals"].items()},
                          "combined_auc": (test["combined"] or {}).get("auc"),
                          "blind_auc": (test["blind"] or {}).get("auc"),
                          "blind_p_value": (test["blind"] or {}).get("p_value"), "documents": test["documents"]})
    result = {"training": training, "files_per_group": args.files_per_group,
              "documents_per_group": args.files_per_group * args.docs_per_file, "doc_bytes": args.doc_bytes,
              "base_bytes": args.base_bytes, "job_seconds": round(job_seconds, 1), "sweep": sweep}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
