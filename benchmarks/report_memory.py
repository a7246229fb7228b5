"""The report's peak memory and time against the size of the run it renders.

    python benchmarks/report_memory.py [--documents 100000 1000000] [--shards 10000] [--json FILE]

For each size, synthetic manifests as a large run writes them (``schemas.py``;
documents spread over ``--shards`` shards in 16 Parquet files, 2% of them in
duplicate clusters of 50), then ``lmc-audit report`` in a fresh process,
whose peak RSS (``ru_maxrss``) and wall time are recorded. Memory that does
not grow with the documents is the point; the HTML grows with the shards.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmc_audit.transforms.manifests import schemas

PARTS = 16
CLUSTER = 50


def _filled(schema: pa.Schema, columns: dict[str, pa.Array], n: int) -> pa.Table:
    out = []
    for f in schema:
        if f.name in columns:
            out.append(columns[f.name].cast(f.type))
        elif pa.types.is_list(f.type):
            out.append(pa.array([[]] * n, f.type))
        elif pa.types.is_string(f.type):
            out.append(pa.array([""] * n, f.type))
        elif pa.types.is_boolean(f.type):
            out.append(pa.array(np.zeros(n, bool)))
        else:
            out.append(pa.array(np.zeros(n), f.type) if pa.types.is_floating(f.type)
                       else pa.array(np.zeros(n, np.int64), f.type))
    return pa.Table.from_arrays(out, schema=schema)


def make_manifests(root: Path, documents: int, shards: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    (root / "documents").mkdir(parents=True)
    step = -(-documents // PARTS)
    for p in range(PARTS):
        idx = np.arange(p * step, min(documents, (p + 1) * step))
        n = len(idx)
        model, zlib = rng.uniform(0.5, 3.0, n), rng.uniform(2.0, 4.0, n)
        cols = {"doc_id": pa.array([f"d{i}" for i in idx]), "shard": pa.array([f"s{i % shards:06d}.jsonl" for i in idx]),
                "position": pa.array(idx // shards), "bpb": pa.array(model), "zlib_bpb": pa.array(zlib),
                "zlib_ratio": pa.array(model / zlib), "min_k": pa.array(rng.random(n)),
                "min_k_pp": pa.array(rng.random(n)), "snippet": pa.array([f"snippet of document {i}" for i in idx])}
        pq.write_table(_filled(schemas.DOCUMENTS, cols, n), root / "documents" / f"part-{p:05d}.parquet")
    (root / "shards").mkdir()
    names = pa.array([f"s{i:06d}.jsonl" for i in range(shards)])
    pq.write_table(_filled(schemas.SHARDS, {"shard": names, "documents": pa.array(np.full(shards, documents // shards))},
                           shards), root / "shards" / "part-00000.parquet")
    members = documents // 50 // CLUSTER * CLUSTER
    idx = np.arange(members)
    root_of = idx // CLUSTER * CLUSTER
    (root / "duplicates").mkdir()
    cols = {"doc_id": pa.array([f"d{i}" for i in idx]), "shard": pa.array([f"s{i % shards:06d}.jsonl" for i in idx]),
            "position": pa.array(idx // shards), "cluster_id": pa.array(idx // CLUSTER),
            "cluster_size": pa.array(np.full(members, CLUSTER)), "keep": pa.array(idx == root_of),
            "kept_doc_id": pa.array([f"d{i}" for i in root_of]), "reason": pa.array(["exact"] * members),
            "matched_doc_id": pa.array([f"d{i}" for i in root_of]), "jaccard": pa.array(np.ones(members)),
            "rule": pa.array(["exact"] * members)}
    pq.write_table(_filled(schemas.DUPLICATES, cols, members), root / "duplicates" / "part-00000.parquet")


def render_in_child(root: Path) -> dict:
    code = ("import resource, sys, time; from lmc_audit.pipelines.report import write_report; t = time.perf_counter(); "
            "write_report(sys.argv[1], sys.argv[2], {}); "
            "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, str(root), str(root / "report.html")], check=True,
                         capture_output=True, text=True).stdout.split()
    return {"render_seconds": round(float(out[0]), 1), "peak_rss_mib": round(int(out[1]) / 1024, 1),
            "html_mib": round((root / "report.html").stat().st_size / 2**20, 2)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--documents", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--shards", type=int, default=10_000)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for n in args.documents:
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            make_manifests(Path(tmp), n, args.shards)
            made = time.perf_counter() - start
            parquet = sum(f.stat().st_size for f in Path(tmp).rglob("*.parquet"))
            rows.append({"documents": n, "shards": args.shards, "parquet_mib": round(parquet / 2**20, 1),
                         "make_seconds": round(made, 1), **render_in_child(Path(tmp))})
            print(json.dumps(rows[-1]), flush=True)
    result = {"rows": rows, "note": "peak RSS of a fresh process rendering the report (ru_maxrss)",
              "launcher_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
