"""Membership: do the signals tell the bundled model's training files from its held-out files?

    python benchmarks/membership.py [--per-class 60] [--bytes 4096] [--json benchmarks/results/membership.json]

The bundled model's training text is the Python 3.11 documentation sources
(Debian ``python3.11-doc``), split by a hash of each path (see
``pipelines/default_model/split.py``). This script audits the first
``--bytes`` bytes of every held-out file and of as many training files
(a seeded sample), with ``lmc-audit run``, and reports the ROC AUC of each
signal for "was in training": lower bpb, lower zlib ratio, higher Min-K%,
higher Min-K%++.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds

from lmc_audit.pipelines.audit import run
from lmc_audit.pipelines.default_model.split import list_source_files

# signal column -> sign that makes "larger = more likely a member"
SIGNALS = {"bpb": -1.0, "zlib_ratio": -1.0, "min_k": 1.0, "min_k_pp": 1.0}


def roc_auc(members: np.ndarray, others: np.ndarray) -> float:
    """P(score of a member > score of a non-member), ties counted half (Mann-Whitney U / n1 n2)."""
    greater = (members[:, None] > others[None, :]).sum()
    ties = (members[:, None] == others[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(members) * len(others)))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--per-class", type=int, default=60, help="files per class (held-out has about 50)")
    p.add_argument("--bytes", type=int, default=4096, help="bytes audited from the start of each file")
    p.add_argument("--min-bytes", type=int, default=1024, help="skip files shorter than this")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    files = [f for f in list_source_files() if f.path.stat().st_size >= args.min_bytes]
    held = [f for f in files if f.held_out][:args.per_class]
    train = random.Random(0).sample([f for f in files if not f.held_out], len(held))
    with tempfile.TemporaryDirectory() as tmp:
        corpus, out = Path(tmp) / "corpus", Path(tmp) / "out"
        for label, group in (("train", train), ("heldout", held)):
            (corpus / label).mkdir(parents=True)
            for f in group:
                name = f.relpath.replace("/", "__")
                (corpus / label / name).write_bytes(f.path.read_bytes()[:args.bytes])
        record = run(["--input", str(corpus), "--output", str(out), "--no-coding", "--no-dedup", "--no-report",
                      "--quiet"])
        docs = ds.dataset(out / "documents", format="parquet").to_table().to_pylist()
    member = np.array(["/train/" in d["doc_id"] for d in docs])
    result = {"model": "bundled", "documents": {"train": int(member.sum()), "held_out": int((~member).sum())},
              "bytes_per_document": args.bytes, "auc": {}, "mean": {}}
    for col, sign in SIGNALS.items():
        values = np.array([d[col] for d in docs], np.float64)
        result["auc"][col] = round(roc_auc(sign * values[member], sign * values[~member]), 4)
        result["mean"][col] = {"train": round(float(values[member].mean()), 4),
                               "held_out": round(float(values[~member].mean()), 4)}
    result["wall_seconds"] = record["wall_seconds"]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
