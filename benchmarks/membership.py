"""Membership: the shard-level test (``lmc-audit membership``) on the bundled model's own split, and its calibration.

    python benchmarks/membership.py [--bytes 8192] [--null-splits 1000] [--json benchmarks/results/membership.json]

The bundled model's training text is the Python 3.11 documentation sources
(Debian ``python3.11-doc``), split by a hash of each path (see
``pipelines/default_model/split.py``). This script audits the first
``--bytes`` bytes of every held-out file (one document per file) and of as
many training files (a seeded sample) with ``lmc-audit run``, each group in
two shards, then:

1. ``train_*`` against ``heldout_*``: the test should find training (target p < 1e-3);
2. ``heldout_0`` against ``heldout_1``: two halves of unseen files (target p > 0.01);
3. calibration: ``--null-splits`` random halvings of the held-out documents,
   each tested as suspect against reference with ``--null-permutations``
   permutations; the share with p < 0.05 is the false-positive rate (target
   0.03-0.07), with its 95% Wilson interval;
4. the blind (model-free) classifier's AUC on test 1, reported beside.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from lmc_audit.pipelines.audit import run
from lmc_audit.pipelines.default_model.split import list_source_files
from lmc_audit.pipelines.membership import Groups, dataset_inference, load_groups


def corpus(root: Path, n_bytes: int, min_bytes: int) -> dict[str, int]:
    files = [f for f in list_source_files() if f.path.stat().st_size >= min_bytes]
    held = [f for f in files if f.held_out]
    train = random.Random(0).sample([f for f in files if not f.held_out], len(held))
    root.mkdir(parents=True)
    for label, group in (("train", train), ("heldout", held)):
        for half in (0, 1):
            lines = [json.dumps({"id": f.relpath, "text": f.path.read_bytes()[:n_bytes].decode("utf-8", "replace")})
                     for i, f in enumerate(group) if i % 2 == half]
            (root / f"{label}_{half}.jsonl").write_text("\n".join(lines) + "\n")
    return {"train": len(train), "held_out": len(held)}


def null_calibration(groups: Groups, splits: int, permutations: int, alpha: float = 0.05) -> dict:
    """Random halvings of one group of unseen documents: the test's false-positive rate at ``alpha``."""
    cols, ids = groups.reference, groups.reference_ids
    rng = np.random.default_rng(1)
    p_values = []
    for _ in range(splits):
        order = rng.permutation(len(ids))
        a, b = np.sort(order[:len(ids) // 2]), np.sort(order[len(ids) // 2:])
        g = Groups({c: v[a] for c, v in cols.items()}, {c: v[b] for c, v in cols.items()},
                   [ids[i] for i in a], [ids[i] for i in b], 0)
        p_values.append(dataset_inference(g, permutations, seed=len(p_values))["p_value"])
    hits = int(sum(p < alpha for p in p_values))
    ci = binomtest(hits, splits).proportion_ci(method="wilson")
    return {"splits": splits, "permutations": permutations, "alpha": alpha, "false_positive_rate": hits / splits,
            "false_positive_rate_95ci": [round(ci.low, 4), round(ci.high, 4)],
            "documents_per_group": [len(ids) // 2, len(ids) - len(ids) // 2]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bytes", type=int, default=8192, help="bytes audited from the start of each file")
    p.add_argument("--min-bytes", type=int, default=256, help="skip files shorter than this")
    p.add_argument("--null-splits", type=int, default=1000)
    p.add_argument("--null-permutations", type=int, default=1000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root, out = Path(tmp) / "corpus", Path(tmp) / "out"
        files = corpus(root, args.bytes, args.min_bytes)
        start = time.perf_counter()
        run(["--input", str(root), "--output", str(out), "--id-field", "id", "--no-coding", "--no-dedup",
             "--no-report", "--quiet"])
        job_seconds = time.perf_counter() - start
        trained = dataset_inference(load_groups(str(out), ["train_*"], ["heldout_*"]))
        halves = dataset_inference(load_groups(str(out), ["heldout_0*"], ["heldout_1*"]))
        held = load_groups(str(out), ["train_*"], ["heldout_*"])
    start = time.perf_counter()
    calibration = null_calibration(held, args.null_splits, args.null_permutations)
    result = {
        "model": "bundled", "files": files, "bytes_per_document": args.bytes, "job_seconds": round(job_seconds, 1),
        "train_vs_held_out": trained, "held_out_halves": halves,
        "null_calibration": {**calibration, "seconds": round(time.perf_counter() - start, 1)},
        "targets_met": {"train_vs_held_out_p_below_1e-3": trained["p_value"] < 1e-3,
                        "held_out_halves_p_above_0.01": halves["p_value"] > 0.01,
                        "false_positive_rate_within_0.03_0.07": 0.03 <= calibration["false_positive_rate"] <= 0.07,
                        "documents_per_group_at_least_50": min(trained["documents"]["suspect"],
                                                               trained["documents"]["reference"]) >= 50},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
