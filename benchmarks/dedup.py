"""Dedup quality and cost: recall per kind of planted copy, false merges, against datasketch's MinHash LSH.

    python benchmarks/dedup.py [--copies 200] [--seeds 0 1 2] [--json benchmarks/results/dedup.json]

Needs Debian's ``python3.11-doc`` (the bundled model's training text) and the
``bench`` extra (datasketch).

Corpus, per seed: ``--bases`` distinct documents (the first 3,000 bytes of
Python documentation sources), ``--copies`` copies of random bases of each
kind, and ``--licensed`` distinct documents (other files) that all start
with the same licence header, which must not merge with anything:

- ``exact``: the base itself;
- ``whitespace``: runs of spaces and line breaks changed, lines re-wrapped;
- ``edits_5`` / ``edits_15``: 5% / 15% of the words replaced by other words of
  the corpus;
- ``shuffled``: paragraphs (blank-line separated) in a random order;
- ``prefix_60`` / ``prefix_30``: the first 60% / 30% of the base.

Truth: documents of one origin (a base and its copies) are one cluster;
every licensed document is its own origin. A copy is found when a method
puts it in its base's cluster. Recall per kind is pooled over the seeds with
a 95% Wilson interval (scipy's ``binomtest``). A false merge is a pair of
documents of different origins in one cluster; the number of such pairs a
method could have merged is reported as ``distinct_pairs``.

Methods:

- ``lmc_audit``: ``FindDuplicates`` (the job's own transform, on Beam's
  DirectRunner, from sketches made by the job's ``DocumentDescriber``) with
  its default options; no model is given (scoring every candidate pair's NCD
  at this size would take hours on a CPU; ``--ncd`` measures it on a smaller
  corpus), so only the n-gram and line rules decide;
- ``lmc_audit_14x8``: the same with datatrove's banding, 14 bands x 8 rows;
- ``lmc_audit_no_lines``: the same without line-hash candidates;
- ``lmc_audit_datatrove_norm``: the default with ``normalize=("punctuation", "numbers")``;
- ``datasketch_14x8`` and ``datasketch_25x4``: datasketch ``MinHashLSH`` over
  the same shingles (word 5-grams of the normalized text), connected
  components over every pair it returns, no verification (as datatrove).

Cost: candidate pairs per 1,000 documents (the ``dedup_candidate_pairs``
counter) and the transform's wall time, against ``lmc_audit_14x8``.

``--ncd MODEL`` (for example ``bundled``) measures the model's normalized
compression distance instead, on one smaller corpus (``--ncd-copies`` per
kind): NCD of every copy with its base and of random distinct pairs, on the
NCD samples of each as the job computes them; then ``FindDuplicates``
with the model scoring NCD (``ScoreChunks``, as in the job), whose recall per
kind shows what NCD adds to the n-gram and line rules.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import random
import re
import tempfile
import time
from pathlib import Path

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from scipy.stats import binomtest

from lmc_audit.pipelines.default_model.split import list_source_files
from lmc_audit.transforms.dedup import sketches as dedup
from lmc_audit.transforms.dedup.sketches import DedupOptions
from lmc_audit.transforms.documents.document_facts import DocumentDescriber
from lmc_audit.transforms.dedup.find_duplicates import FindDuplicates
from lmc_audit.transforms.options import ModelOptions

KINDS = ("exact", "whitespace", "edits_5", "edits_15", "shuffled", "prefix_60", "prefix_30")
TARGET_KINDS = ("exact", "whitespace", "edits_5", "shuffled", "prefix_60")
BASE_BYTES = 3000
LICENCE = """Copyright (c) 2001-2023 Python Software Foundation; All Rights Reserved.

Licensed under the PSF License Agreement: permission is granted to use, copy, modify and distribute
this documentation for any purpose, provided that the above copyright notice and this permission notice
appear in all copies, and that the name of the Python Software Foundation is not used in advertising.

This documentation is provided "as is" without warranty of any kind, express or implied, including but
not limited to the warranties of merchantability and fitness for a particular purpose.

"""


def copy_of(text: str, kind: str, rng: random.Random, vocabulary: list[str]) -> str:
    if kind == "exact":
        return text
    if kind.startswith("edits_"):
        words = text.split(" ")
        share = int(kind.split("_")[1]) / 100
        for i in rng.sample(range(len(words)), max(1, round(len(words) * share))):
            words[i] = rng.choice(vocabulary)
        return " ".join(words)
    if kind == "whitespace":
        out, line = [], []
        for w in re.split(r"\s+", text):
            line.append(w)
            if rng.random() < 0.08:
                out.append(("  " if rng.random() < 0.3 else " ").join(line))
                line = []
        return "\n".join(out + [" ".join(line)])
    if kind == "shuffled":
        paragraphs = text.split("\n\n")
        rng.shuffle(paragraphs)
        return "\n\n".join(paragraphs)
    return text[:int(len(text) * int(kind.split("_")[1]) / 100)]


MAX_DISTINCT_CONTAINMENT = 0.1


def distinct_texts(n: int, rng: random.Random) -> list[str]:
    """``n`` documentation texts, no two of which share more than ``MAX_DISTINCT_CONTAINMENT`` of their
    n-grams, nor with the licence header: some documentation files repeat others (licence and
    changelog pages), and a truth that calls them distinct would count a found duplicate as a false merge."""
    files = [f for f in list_source_files() if f.path.stat().st_size >= BASE_BYTES]
    rng.shuffle(files)
    kept: list[str] = []
    sets = [dedup.shingle_hashes(dedup.normalize_text(LICENCE.encode()), 5)]
    for f in files:
        text = f.path.read_bytes()[:BASE_BYTES].decode("utf-8", "ignore")
        grams = dedup.shingle_hashes(dedup.normalize_text(text.encode()), 5)
        if len(grams) == 0 or any(
                len(dedup.np.intersect1d(grams, other, assume_unique=True)) > MAX_DISTINCT_CONTAINMENT
                * min(len(grams), len(other)) for other in sets):
            continue
        kept.append(text)
        sets.append(grams)
        if len(kept) == n:
            return kept
    raise SystemExit(f"only {len(kept)} distinct documentation files of at least {BASE_BYTES} bytes; ask for fewer")


def build_corpus(n_bases: int, copies: int, seed: int, licensed: int = 100) -> tuple[list[dict], dict[str, str]]:
    """Documents (id, text, kind) in a shuffled order, and each id's origin."""
    rng = random.Random(seed)
    texts = distinct_texts(n_bases + licensed, rng)
    bases = [{"id": f"base{i:04d}", "text": t, "kind": "base"} for i, t in enumerate(texts[:n_bases])]
    vocabulary = sorted({w for d in bases for w in d["text"].split() if w.isalpha()})
    docs, origin = list(bases), {d["id"]: d["id"] for d in bases}
    for kind in KINDS:
        for j in range(copies):
            src = rng.choice(bases)
            cid = f"{kind}{j:04d}"
            docs.append({"id": cid, "text": copy_of(src["text"], kind, rng, vocabulary), "kind": kind})
            origin[cid] = src["id"]
    for j, text in enumerate(texts[n_bases:]):
        lid = f"licensed{j:04d}"
        docs.append({"id": lid, "text": LICENCE + text, "kind": "licensed"})
        origin[lid] = lid
    rng.shuffle(docs)
    return docs, origin


def sketches_of(docs: list[dict], options: DedupOptions) -> list[dedup.DocSketch]:
    hasher = dedup.MinHasher(options.num_perm, options.seed)
    out = []
    for position, d in enumerate(docs):
        describer = DocumentDescriber((0, position, d["id"]), "corpus", 2048, options, hasher)
        describer.update(d["text"].encode())
        out.append(describer.finish().sketch)
    return out


def ours(docs: list[dict], options: DedupOptions, workdir: Path) -> tuple[list[list[str]], float, int]:
    """Clusters from ``FindDuplicates`` on the DirectRunner, its wall time and its candidate pairs."""
    sketches = sketches_of(docs, options)
    rows_path = workdir / "rows.json"
    start = time.perf_counter()
    pipeline = beam.Pipeline(runner="DirectRunner")
    _ = (pipeline
         | beam.Create(sketches)
         | FindDuplicates(options)
         | beam.Map(lambda t: t[2]) | beam.combiners.ToList()
         | beam.Map(lambda rows, path=str(rows_path): Path(path).write_text(json.dumps(rows))))
    result = pipeline.run()
    result.wait_until_finish()
    wall = time.perf_counter() - start
    counters = result.metrics().query(MetricsFilter().with_name("dedup_candidate_pairs"))["counters"]
    candidates = sum(c.committed or 0 for c in counters)
    clusters: dict[int, list[str]] = {}
    for r in json.loads(rows_path.read_text()):
        clusters.setdefault(r["cluster_id"], []).append(r["doc_id"])
    return list(clusters.values()), wall, candidates


def datasketch_clusters(docs: list[dict], bands: int, rows: int, ngram: int = 5) -> tuple[list[list[str]], float, int]:
    from datasketch import MinHash, MinHashLSH

    start = time.perf_counter()
    lsh = MinHashLSH(num_perm=bands * rows, params=(bands, rows))
    sketches = {}
    for d in docs:
        words = dedup.normalize_text(d["text"].encode()).split()
        m = MinHash(num_perm=bands * rows, seed=1, scheme="legacy")
        for i in range(max(1, len(words) - ngram + 1)):
            m.update(" ".join(words[i:i + ngram]).encode())
        sketches[d["id"]] = m
        lsh.insert(d["id"], m)
    parent = {d["id"]: d["id"] for d in docs}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    candidates = 0
    for key, m in sketches.items():
        for other in lsh.query(m):
            if other != key:
                candidates += 1
                parent[find(other)] = find(key)
    groups: dict[str, list[str]] = {}
    for key in parent:
        groups.setdefault(find(key), []).append(key)
    return [g for g in groups.values() if len(g) > 1], time.perf_counter() - start, candidates // 2


def evaluate(clusters: list[list[str]], docs: list[dict], origin: dict[str, str]) -> dict:
    cluster_of = {doc: i for i, c in enumerate(clusters) for doc in c}
    found = {kind: 0 for kind in KINDS}
    total = {kind: 0 for kind in KINDS}
    for d in docs:
        if d["kind"] in found:
            total[d["kind"]] += 1
            src = origin[d["id"]]
            found[d["kind"]] += int(d["id"] in cluster_of and cluster_of[d["id"]] == cluster_of.get(src))
    false_pairs = sum(1 for c in clusters for x, y in itertools.combinations(c, 2) if origin[x] != origin[y])
    licensed_merged = sum(1 for c in clusters for x in c
                          if x.startswith("licensed") and any(origin[y] != origin[x] for y in c))
    sizes: dict[str, int] = {}
    for o in origin.values():
        sizes[o] = sizes.get(o, 0) + 1
    same = sum(n * (n - 1) // 2 for n in sizes.values())
    n = len(docs)
    return {"found": found, "total": total, "false_merge_pairs": false_pairs,
            "licensed_merged": licensed_merged, "distinct_pairs": n * (n - 1) // 2 - same}


def wilson(k: int, n: int) -> list[float]:
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [round(ci.low, 4), round(ci.high, 4)]


METHODS = {
    "lmc_audit": ("ours", DedupOptions()),
    "lmc_audit_14x8": ("ours", DedupOptions(bands=14, rows=8)),
    "lmc_audit_no_lines": ("ours", DedupOptions(line_keys=0)),
    "lmc_audit_datatrove_norm": ("ours", DedupOptions(normalize=("numbers", "punctuation"))),
    "datasketch_14x8": ("datasketch", (14, 8)),
    "datasketch_25x4": ("datasketch", (25, 4)),
}


def ncd_study(model: str, copies: int, seed: int, workdir: Path) -> dict:
    from lmc_audit.pipelines.default_model.card import chunk_bits
    from lmc_audit.transforms.scoring.model_loading import resolve_model_dir
    from lmc_audit.transforms.scoring.score_chunks import ScoreChunks

    docs, origin = build_corpus(60, copies, seed, licensed=30)
    n = DedupOptions().ncd_bytes
    sketch = {k.key[2]: k for k in sketches_of(docs, DedupOptions())}
    samples = {d: k.ncd_samples for d, k in sketch.items()}  # what FindDuplicates compares
    rng = random.Random(seed)
    pairs = [(origin[d["id"]], d["id"], d["kind"]) for d in docs if d["kind"] in KINDS]
    singles = sorted(origin[d["id"]] for d in docs if origin[d["id"]] == d["id"])
    for _ in range(200):
        a, b = rng.sample(singles, 2)
        pairs.append((a, b, "distinct"))
    # distinct documents that begin with the same licence header: the head sample's hard case
    licensed = [s for s in singles if s.startswith("licensed")]
    for _ in range(40):
        a, b = rng.sample(licensed, 2)
        pairs.append((a, b, "distinct_licensed"))
    ids = sorted({x for a, b, _ in pairs for x in (a, b)})
    model_dir = resolve_model_dir(model)
    start = time.perf_counter()
    bits: dict[tuple, dict[str, float]] = {p: {} for p in pairs}
    for i, name in enumerate(dedup.NCD_SAMPLES):
        pieces = [samples[d][i] for d in ids] + [samples[a][i] + samples[b][i] for a, b, _ in pairs]
        scored = chunk_bits(model_dir, pieces)
        single = dict(zip(ids, scored[:len(ids)]))
        for (a, b, kind), cxy in zip(pairs, scored[len(ids):]):
            bits[(a, b, kind)].update({f"x{i}": single[a], f"y{i}": single[b], f"xy{i}": cxy})
    by_kind: dict[str, dict[str, list[float]]] = {}
    for (a, b, kind), got in bits.items():
        row = by_kind.setdefault(kind, {"pair": [], **{name: [] for name in dedup.NCD_SAMPLES}})
        row["pair"].append(dedup.pair_ncd(got))
        for i, name in enumerate(dedup.NCD_SAMPLES):
            row[name].append(dedup.ncd(got[f"x{i}"], got[f"y{i}"], got[f"xy{i}"]))

    def summary(values: list[float]) -> dict:
        v = sorted(values)
        return {"pairs": len(v), "median": round(v[len(v) // 2], 3),
                "share_at_most_0.3": round(sum(x <= 0.3 for x in v) / len(v), 4),
                "share_at_least_0.8": round(sum(x >= 0.8 for x in v) / len(v), 4)}

    distances = {kind: summary(rows["pair"]) for kind, rows in by_kind.items()}  # the job's NCD: the smaller
    per_sample = {name: {kind: summary(rows[name]) for kind, rows in by_kind.items()} for name in dedup.NCD_SAMPLES}
    # Pair by pair, as VerifyPair decides: verified by a rule, or by NCD alone (the lines samples' NCD, both
    # drawn from lines; guards and the containment floor applied) at a few thresholds; for distinct pairs
    # every one so verified is a false merge. Beside it, what the smaller of both samples' NCDs would verify
    # (the rule up to 0.3.0's second sample, which merged distinct files made from one template:
    # benchmarks/ncd_templated.py).
    thresholds = (0.3, 0.5, 0.6)
    decided: dict[str, dict] = {}
    for (a, b, kind), got in bits.items():
        verdict = dedup.verify(sketch[a], sketch[b], DedupOptions())
        row = decided.setdefault(kind, {"pairs": 0, "rules": 0, **{f"ncd_alone_at_{t}": 0 for t in thresholds},
                                        **{f"smaller_of_both_at_{t}": 0 for t in thresholds}})
        row["pairs"] += 1
        row["rules"] += verdict.rule is not None
        for t in thresholds:
            options = DedupOptions(ncd_threshold=t)
            row[f"ncd_alone_at_{t}"] += dedup.verify(sketch[a], sketch[b], options, dedup.rule_ncd(got)).rule == "ncd"
            row[f"smaller_of_both_at_{t}"] += verdict.rule is None and dedup.ncd_rule(
                dedup.pair_ncd(got), verdict, options) is not None
    ncd_seconds = time.perf_counter() - start
    recall = {}
    for name, scorer in (("rules_only", None), ("with_ncd", ScoreChunks(ModelOptions(model, "cpu", "float32")))):
        sketches = sketches_of(docs, DedupOptions())
        rows_path = workdir / f"{name}.json"
        pipeline = beam.Pipeline(runner="DirectRunner")
        _ = (pipeline | beam.Create(sketches) | FindDuplicates(DedupOptions(), scorer)
             | beam.Map(lambda t: t[2]) | beam.combiners.ToList()
             | beam.Map(lambda rows, path=str(rows_path): Path(path).write_text(json.dumps(rows))))
        pipeline.run().wait_until_finish()
        clusters: dict[int, list[str]] = {}
        for r in json.loads(rows_path.read_text()):
            clusters.setdefault(r["cluster_id"], []).append(r["doc_id"])
        e = evaluate(list(clusters.values()), docs, origin)
        recall[name] = {"recall": {k: round(e["found"][k] / e["total"][k], 4) for k in KINDS},
                        "false_merge_pairs": e["false_merge_pairs"]}
    return {"model": model, "seed": seed, "copies_per_kind": copies, "ncd_bytes": n, "ncd": distances,
            "ncd_per_sample": per_sample, "pairs_verified": decided,
            "ncd_seconds": round(ncd_seconds, 1), "find_duplicates": recall}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bases", type=int, default=150)
    p.add_argument("--copies", type=int, default=200, help="copies per kind")
    p.add_argument("--licensed", type=int, default=100, help="distinct documents under one licence header")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--json", default=None)
    p.add_argument("--ncd", metavar="MODEL", default=None, help="measure the model's NCD instead (see above)")
    p.add_argument("--ncd-copies", type=int, default=40)
    args = p.parse_args(argv)
    if args.ncd:
        with tempfile.TemporaryDirectory() as tmp:
            result = ncd_study(args.ncd, args.ncd_copies, args.seeds[0], Path(tmp))
        print(json.dumps(result, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        return result
    pooled = {m: {"found": {k: 0 for k in KINDS}, "total": {k: 0 for k in KINDS}, "false_merge_pairs": 0,
                  "licensed_merged": 0, "distinct_pairs": 0, "candidates": 0, "documents": 0, "wall": 0.0}
              for m in args.methods}
    per_seed = []
    for seed in args.seeds:
        docs, origin = build_corpus(args.bases, args.copies, seed, args.licensed)
        row = {"seed": seed, "documents": len(docs)}
        for name in args.methods:
            how, config = METHODS[name]
            if how == "ours":
                with tempfile.TemporaryDirectory() as tmp:
                    clusters, wall, candidates = ours(docs, config, Path(tmp))
            else:
                clusters, wall, candidates = datasketch_clusters(docs, *config)
            e = evaluate(clusters, docs, origin)
            acc = pooled[name]
            for k in KINDS:
                acc["found"][k] += e["found"][k]
                acc["total"][k] += e["total"][k]
            for k in ("false_merge_pairs", "licensed_merged", "distinct_pairs"):
                acc[k] += e[k]
            acc["candidates"] += candidates
            acc["documents"] += len(docs)
            acc["wall"] += wall
            row[name] = {"recall": {k: round(e["found"][k] / e["total"][k], 4) for k in KINDS},
                         "false_merge_pairs": e["false_merge_pairs"], "candidates": candidates,
                         "wall_seconds": round(wall, 2)}
            print(f"seed {seed} {name}: " + " ".join(f"{k}={row[name]['recall'][k]:.3f}" for k in KINDS)
                  + f" false_pairs={e['false_merge_pairs']} candidates={candidates} wall={wall:.1f}s", flush=True)
        per_seed.append(row)
    methods = {}
    base_wall = pooled.get("lmc_audit_14x8", {}).get("wall")
    for name, acc in pooled.items():
        methods[name] = {
            "recall": {k: round(acc["found"][k] / acc["total"][k], 4) for k in KINDS},
            "recall_95ci": {k: wilson(acc["found"][k], acc["total"][k]) for k in KINDS},
            "copies_per_kind": acc["total"][KINDS[0]],
            "false_merge_pairs": acc["false_merge_pairs"],
            "licensed_documents_merged": acc["licensed_merged"],
            "distinct_pairs": acc["distinct_pairs"],
            "candidate_pairs_per_1000_docs": round(1000 * acc["candidates"] / acc["documents"], 1),
            "wall_seconds": round(acc["wall"], 1),
            "wall_vs_lmc_audit_14x8": round(acc["wall"] / base_wall, 2) if base_wall else None,
        }
    ours_default = methods.get("lmc_audit")
    result = {
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores, Python {platform.python_version()}",
        "corpus": {"bases": args.bases, "copies_per_kind_per_seed": args.copies, "licensed": args.licensed,
                   "seeds": args.seeds,
                   "base_bytes": BASE_BYTES, "kinds": list(KINDS)},
        "targets_met": None if ours_default is None else {
            "recall_at_least_0.97": {k: ours_default["recall"][k] >= 0.97 for k in TARGET_KINDS},
            "no_false_merge": ours_default["false_merge_pairs"] == 0,
            "distinct_pairs_at_least_10000": ours_default["distinct_pairs"] >= 10_000},
        "methods": methods,
        "per_seed": per_seed,
    }
    print(json.dumps({k: result[k] for k in ("targets_met", "methods")}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
