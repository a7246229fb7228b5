"""The short table printed at the end of a run."""

from __future__ import annotations

import json

import fsspec


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def print_summary(output: str) -> None:
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    with fs.open(f"{root}/run.json") as f:
        record = json.load(f)
    c, bpb = record["counts"], record["bpb"]
    rows = [
        ("shards", f"{c['shards']:,}" + (f"  ({c['shards_with_documents']:,} with documents)"
                                          if c.get("shards_with_documents", c["shards"]) != c["shards"] else "")),
        ("documents", f"{c['documents']:,}  (+{c['dead_letters']:,} dead-lettered"
                      f"{', reconciled' if c['reconciled'] else ', NOT reconciled'})"),
        ("chunks", f"{c['chunks']:,}  ({c['flagged_chunks']:,} flagged)"),
        ("bytes", f"{c['bytes']:,}"),
        ("bpb model", f"{_fmt(bpb['model'])}  ({record['model']['name']})"),
        ("bpb zlib -9", _fmt(bpb["zlib"])),
        ("bpb zstd -19", _fmt(bpb["zstd"])),
        ("bpb xz -9", _fmt(bpb["xz"])),
    ]
    coding = record.get("coding")
    if coding:
        rows.append(("bpb coded", f"{_fmt(coding['coded_bpb'])}  (+{100 * (coding['overhead_vs_ideal'] or 0):.3f}% "
                                  "over the model's ideal bits)"))
        rows.append(("verified", f"{coding['verified']:,} payloads decoded exactly, "
                                 f"{coding['verification_failed']:,} failed"))
    sig = record.get("signals")
    if sig:
        rows.append(("flagged docs", f"{sig['flagged_documents']:,}  (bpb {sig['flagged_bpb']}, zlib ratio "
                                     f"{sig['flagged_zlib_ratio']}, Min-K% {sig['flagged_min_k']}, "
                                     f"Min-K%++ {sig['flagged_min_k_pp']}, reference {sig['flagged_reference_diff']})"))
    dup = record.get("duplicates")
    if dup:
        jm = record.get("job_metrics", {})
        pairs = (f" ({jm['dedup_verified_pairs']:,} of {jm['dedup_candidate_pairs']:,} candidate pairs verified)"
                 if "dedup_candidate_pairs" in jm and "dedup_verified_pairs" in jm else "")
        rows.append(("duplicates", f"{dup['dropped_exact']:,} exact + {dup['dropped_near']:,} near dropped{pairs}"))
    rows.append(("wall time", f"{record['wall_seconds']:.1f} s"))
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    folders = "chunks,documents,shards,dead_letter" + (",payloads" if coding else "") + (",duplicates" if dup else "")
    print(f"\n  manifests: {output.rstrip('/')}/{{{folders}}}/\n  run record: {output.rstrip('/')}/run.json")
    if fs.exists(f"{root}/report.html"):
        print(f"  report:     {output.rstrip('/')}/report.html")
