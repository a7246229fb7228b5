"""Dedup quality: precision and recall on injected near-duplicates, against datasketch's MinHash LSH.

    python benchmarks/dedup.py [--base 200] [--variants 120] [--json benchmarks/results/dedup.json]

Corpus: ``--base`` documents (the first 3,000 bytes of Python documentation
sources, Debian ``python3.11-doc``), plus ``--variants`` modified copies of
randomly chosen base documents, in four kinds (a quarter each):

- ``word_edits``: 5% of the words replaced by other words of the corpus;
- ``whitespace``: runs of spaces and line breaks changed, lines re-wrapped;
- ``shuffled``: paragraphs in a random order;
- ``partial``: the first 60% of the document.

Truth: a variant and its base are the same cluster. A method's predicted
pairs are all pairs of documents in one of its clusters. Precision and
recall are over pairs. The peer is datasketch ``MinHashLSH`` with the same
shingles (word 5-grams of the normalized text), 14 bands x 8 rows, and
connected components over the pairs it returns; it does no verification.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
import tempfile
import time
from pathlib import Path

import pyarrow.dataset as ds

from lmc_audit.pipelines.audit import run
from lmc_audit.pipelines.default_model.split import list_source_files
from lmc_audit.transforms import dedup

KINDS = ("word_edits", "whitespace", "shuffled", "partial")


def variant(text: str, kind: str, rng: random.Random, vocabulary: list[str]) -> str:
    if kind == "word_edits":
        words = text.split(" ")
        for i in rng.sample(range(len(words)), max(1, len(words) // 20)):
            words[i] = rng.choice(vocabulary)
        return " ".join(words)
    if kind == "whitespace":
        words = re.split(r"\s+", text)
        out, line = [], []
        for w in words:
            line.append(w)
            if rng.random() < 0.08:
                out.append(("  " if rng.random() < 0.3 else " ").join(line))
                line = []
        return "\n".join(out + [" ".join(line)])
    if kind == "shuffled":
        paragraphs = text.split("\n\n")
        rng.shuffle(paragraphs)
        return "\n\n".join(paragraphs)
    return text[:int(len(text) * 0.6)]


def build_corpus(n_base: int, n_variants: int, seed: int = 0) -> tuple[list[dict], dict[str, str]]:
    rng = random.Random(seed)
    files = [f for f in list_source_files() if f.path.stat().st_size >= 3000]
    base = [{"id": f"base{i:04d}", "text": f.path.read_bytes()[:3000].decode("utf-8", "replace")}
            for i, f in enumerate(rng.sample(files, n_base))]
    vocabulary = sorted({w for d in base for w in d["text"].split() if w.isalpha()})
    docs, origin = list(base), {}
    for j in range(n_variants):
        src = rng.choice(base)
        kind = KINDS[j % len(KINDS)]
        vid = f"var{j:04d}_{kind}"
        docs.append({"id": vid, "text": variant(src["text"], kind, rng, vocabulary)})
        origin[vid] = src["id"]
    return docs, origin


def pairs_of(clusters: list[list[str]]) -> set[tuple[str, str]]:
    return {tuple(sorted(p)) for c in clusters for p in itertools.combinations(c, 2)}


def truth_pairs(docs: list[dict], origin: dict[str, str]) -> set[tuple[str, str]]:
    groups: dict[str, list[str]] = {}
    for vid, src in origin.items():
        groups.setdefault(src, [src]).append(vid)
    return pairs_of(list(groups.values()))


def score(predicted: set, truth: set, origin: dict[str, str]) -> dict:
    hit = predicted & truth
    out = {"pairs_predicted": len(predicted), "pairs_true": len(truth),
           "precision": round(len(hit) / len(predicted), 4) if predicted else None,
           "recall": round(len(hit) / len(truth), 4) if truth else None, "recall_by_kind": {}}
    for kind in KINDS:
        mine = {tuple(sorted((v, s))) for v, s in origin.items() if v.endswith(kind)}
        out["recall_by_kind"][kind] = round(len(mine & predicted) / len(mine), 4) if mine else None
    return out


def ours(docs: list[dict], workdir: Path, extra: list[str]) -> tuple[list[list[str]], float]:
    corpus, out = workdir / "corpus.jsonl", workdir / f"out{len(list(workdir.iterdir()))}"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    start = time.perf_counter()
    run(["--input", str(corpus), "--output", str(out), "--id-field", "id", "--no-coding", "--no-report",
         "--quiet", *extra])
    wall = time.perf_counter() - start
    rows = ds.dataset(out / "duplicates", format="parquet").to_table().to_pylist()
    clusters: dict[int, list[str]] = {}
    for r in rows:
        clusters.setdefault(r["cluster_id"], []).append(r["doc_id"])
    return list(clusters.values()), wall


def datasketch_clusters(docs: list[dict], bands: int, rows: int, ngram: int) -> tuple[list[list[str]], float]:
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

    for key, m in sketches.items():
        for other in lsh.query(m):
            parent[find(other)] = find(key)
    groups: dict[str, list[str]] = {}
    for key in parent:
        groups.setdefault(find(key), []).append(key)
    return [g for g in groups.values() if len(g) > 1], time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=int, default=200)
    p.add_argument("--variants", type=int, default=120)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    docs, origin = build_corpus(args.base, args.variants)
    truth = truth_pairs(docs, origin)
    result = {"documents": len(docs), "variants": len(origin), "shingles": "word 5-grams", "bands": 14, "rows": 8}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in (("lmc_audit", []), ("lmc_audit_lsh_only", ["--dedup-jaccard", "0.000001"])):
            clusters, wall = ours(docs, Path(tmp), extra)
            result[name] = {**score(pairs_of(clusters), truth, origin), "wall_seconds_whole_job": round(wall, 1)}
    clusters, wall = datasketch_clusters(docs, 14, 8, 5)
    result["datasketch"] = {**score(pairs_of(clusters), truth, origin), "wall_seconds": round(wall, 2)}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
