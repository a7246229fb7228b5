"""NCD on real documents that begin alike: which of them NCD's rule would merge.

    python benchmarks/ncd_templated.py [--model bundled] [--pairs 80] [--json benchmarks/results/ncd_templated.json]

The pairs NCD's rule alone decides are those no other rule verifies but that pass its guards (both
documents at least ``min_shingles`` n-grams, length ratio at least ``min_length_ratio``, n-gram
containment at least ``ncd_min_containment``). The dedup benchmark's distinct documents share at most
10% of their n-grams, so none of its distinct pairs is there. Real corpora have such pairs: modules
made from one template (the ``encodings`` codecs, generated from one script, share their header, their
code and the ASCII half of their tables), test files, parallel documentation pages. This finds every
such pair among two offline corpora, the Python standard library's ``*.py`` files (over 500 bytes) and
the Python documentation sources (Debian ``python3.11-doc``), without a model (the job's own sketches,
``DocumentDescriber``, and ``verify``); then scores a sample of them (at most ``--per-group`` from one
directory, so that the codecs do not fill it) with the model, each of the job's two NCD samples, and
counts what NCD's rule would verify at a few thresholds, as the job decides (``rule_ncd`` on the lines
samples, both drawn from lines) and as the release before did (the smaller of both samples' NCDs).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sysconfig
import time
from pathlib import Path

import numpy as np

from lmc_audit.pipelines.default_model.card import chunk_bits
from lmc_audit.pipelines.default_model.split import list_source_files
from lmc_audit.transforms.dedup import sketches as dedup
from lmc_audit.transforms.dedup.sketches import DedupOptions
from lmc_audit.transforms.documents.document_facts import DocumentDescriber
from lmc_audit.transforms.scoring.model_loading import resolve_model_dir

THRESHOLDS = (0.3, 0.5, 0.6)


def corpus() -> dict[str, bytes]:
    """name -> bytes: the standard library's modules and the documentation sources."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = {f"stdlib/{p.relative_to(stdlib)}": p.read_bytes() for p in sorted(stdlib.rglob("*.py"))
            if "site-packages" not in p.parts and p.stat().st_size > 500}
    for f in list_source_files():
        docs[f"docs/{f.path.name}"] = f.path.read_bytes()
    return docs


def band_pairs(sketches: list[dedup.DocSketch], options: DedupOptions) -> tuple[list[tuple[int, int, dict]], dict]:
    """Every guarded pair at containment >= ncd_min_containment that no rule verifies, and the count of
    such pairs per rule that did verify (``None``: the band)."""
    grams = [np.frombuffer(s.shingles, np.uint32) for s in sketches]
    order = sorted(range(len(sketches)), key=lambda i: sketches[i].bytes)
    band, rules = [], {}
    for n, a in enumerate(order):
        for b in order[n + 1:]:
            if sketches[a].bytes < options.min_length_ratio * sketches[b].bytes:
                break  # sorted by size: every later document is longer still
            if min(len(grams[a]), len(grams[b])) < options.min_shingles:
                continue
            shared = len(np.intersect1d(grams[a], grams[b], assume_unique=True))
            if shared < options.ncd_min_containment * min(len(grams[a]), len(grams[b])):
                continue
            v = dedup.verify(sketches[a], sketches[b], options)
            rules[str(v.rule)] = rules.get(str(v.rule), 0) + 1
            if v.rule is None:
                band.append((a, b, {"containment": round(v.containment, 3), "jaccard": round(v.jaccard, 3),
                                    "length_ratio": round(v.length_ratio, 3)}))
    return band, rules


def sample(band: list, names: list[str], n: int, per_group: int, seed: int) -> list:
    rng = random.Random(seed)
    shuffled = list(band)
    rng.shuffle(shuffled)
    taken, per = [], {}
    for pair in shuffled:
        group = names[pair[0]].rsplit("/", 1)[0]
        if per.get(group, 0) < per_group:
            per[group] = per.get(group, 0) + 1
            taken.append(pair)
        if len(taken) == n:
            break
    return taken


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bundled")
    p.add_argument("--pairs", type=int, default=80)
    p.add_argument("--per-group", type=int, default=12, help="at most this many sampled pairs from one directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    options = DedupOptions()
    hasher = dedup.MinHasher(options.num_perm, options.seed)
    docs = corpus()
    names = sorted(docs)
    sketches = []
    for i, name in enumerate(names):
        describer = DocumentDescriber((0, i, name), "real", 2048, options, hasher)
        describer.update(docs[name])
        sketches.append(describer.finish().sketch)
    band, rules = band_pairs(sketches, options)
    pairs = sample(band, names, args.pairs, args.per_group, args.seed)
    ids = sorted({i for a, b, _ in pairs for i in (a, b)})
    model_dir = resolve_model_dir(args.model)
    start = time.perf_counter()
    bits: list[dict[str, float]] = [{} for _ in pairs]
    for s, _ in enumerate(dedup.NCD_SAMPLES):
        pieces = [sketches[i].ncd_samples[s] for i in ids]
        pieces += [sketches[a].ncd_samples[s] + sketches[b].ncd_samples[s] for a, b, _ in pairs]
        scored = chunk_bits(model_dir, pieces)
        own = dict(zip(ids, scored[:len(ids)]))
        for k, ((a, b, _), cxy) in enumerate(zip(pairs, scored[len(ids):])):
            bits[k].update({f"x{s}": own[a], f"y{s}": own[b], f"xy{s}": cxy})
    seconds = time.perf_counter() - start
    rows = []
    for (a, b, facts), got in zip(pairs, bits):
        drawn = dedup.ncd_may_decide(sketches[a], sketches[b])
        rows.append({"a": names[a], "b": names[b], **facts, "lines_drawn": drawn,
                     **{f"ncd_{name}": round(dedup.ncd(got[f"x{s}"], got[f"y{s}"], got[f"xy{s}"]), 4)
                        for s, name in enumerate(dedup.NCD_SAMPLES)},
                     "rule_ncd": round(dedup.rule_ncd(got), 4) if drawn else None,
                     "pair_ncd": round(dedup.pair_ncd(got), 4)})
    verified = {}
    for t in THRESHOLDS:
        opts = DedupOptions(ncd_threshold=t)
        verified[str(t)] = {
            "the_job": sum(dedup.verify(sketches[a], sketches[b], opts, dedup.rule_ncd(got)).rule == "ncd"
                           for (a, b, _), got in zip(pairs, bits)),
            "smaller_of_both_samples": sum(r["pair_ncd"] <= t for r in rows)}

    def median(key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 3)

    result = {"machine": f"{platform.machine()}, {platform.python_version()}", "model": args.model,
              "documents": len(names), "pairs_by_rule_at_or_above_the_floor": rules, "band_pairs": len(band),
              "sampled": len(rows), "groups": sorted({r["a"].rsplit("/", 1)[0] for r in rows}),
              "median": {k: median(k) for k in ("containment", "ncd_lines", "ncd_head", "pair_ncd")},
              "lines_drawn": sum(r["lines_drawn"] for r in rows), "verified_by_ncd_alone": verified,
              "ncd_seconds": round(seconds, 1), "pairs": rows}
    print(json.dumps({k: v for k, v in result.items() if k != "pairs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
