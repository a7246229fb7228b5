"""``lmc-audit report``: one self-contained HTML file from the manifests.

    lmc-audit report --manifests OUT --output OUT/report.html

Plots are matplotlib SVG embedded inline (no scripts, no external files), so
the file opens anywhere and is the same bytes for the same manifests.
"""

from __future__ import annotations

import argparse
import html
import re
import io
import json
from collections.abc import Sequence

import fsspec
import numpy as np
import pyarrow.dataset as ds

TOP_DOCUMENTS = 20
TOP_CLUSTERS = 10
FLAG_COLOR = "#d62728"
DOC_COLOR = "#1f77b4"



_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _esc(value: str) -> str:
    """HTML-escaped text with control characters (NUL and the like) shown as \\xNN, never written raw."""
    return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))

def read_manifest(root: str, name: str) -> list[dict]:
    fs, path = fsspec.core.url_to_fs(root)
    folder = f"{path.rstrip('/')}/{name}"
    if not fs.exists(folder):
        return []
    return ds.dataset(folder, filesystem=fs, format="parquet").to_table().to_pylist()


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plots(docs: list[dict]) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "lmc-audit"  # stable element ids: same bytes every run
    import matplotlib.pyplot as plt

    scored = [d for d in docs if d["bpb"] is not None]
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    if scored:
        values = [d["bpb"] for d in scored] + [d["zlib_bpb"] for d in scored]
        bins = np.linspace(0.0, max(values) * 1.02 + 1e-9, 50)  # shared, so the two are comparable
        ax.hist([d["bpb"] for d in scored], bins=bins, color=DOC_COLOR, alpha=0.8, label="model")
        ax.hist([d["zlib_bpb"] for d in scored], bins=bins, color="#7f7f7f", alpha=0.5, label="zlib -9")
        ax.legend()
    ax.set_xlabel("bits per byte (per document)")
    ax.set_ylabel("documents")
    hist = _svg(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    plain = [d for d in scored if not d["memorization_flags"]]
    flagged = [d for d in scored if d["memorization_flags"]]
    ax.scatter([d["zlib_bpb"] for d in plain], [d["bpb"] for d in plain], s=10, color=DOC_COLOR,
               label="document")
    ax.scatter([d["zlib_bpb"] for d in flagged], [d["bpb"] for d in flagged], s=28, marker="x",
               color=FLAG_COLOR, label="flagged by a signal")
    if scored:
        top = max(max(d["zlib_bpb"] for d in scored), max(d["bpb"] for d in scored))
        ax.plot([0, top], [0, top], color="#999999", linewidth=0.8, linestyle="--", label="model = zlib")
    ax.set_xlabel("zlib bits per byte")
    ax.set_ylabel("model bits per byte")
    ax.legend(loc="upper left")
    return hist, _svg(fig)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return _esc(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _suspicion_order(d: dict):
    # Most flags first, then the lowest share of zlib's bits (Carlini et al.'s ranking).
    ratio = d["zlib_ratio"] if d["zlib_ratio"] is not None else float("inf")
    return (-len(d["memorization_flags"]), ratio, d["shard"], d["position"], d["doc_id"])


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem;color:#222;max-width:1200px}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
td,th{border:1px solid #ddd;padding:.25rem .5rem;text-align:left;vertical-align:top}
th{background:#f4f4f4}.snippet{font-family:ui-monospace,monospace;font-size:.75rem;max-width:40rem;
white-space:pre-wrap;word-break:break-all}.figs{display:flex;flex-wrap:wrap;gap:1rem}
.figs svg{max-width:100%;height:auto}.flag{color:#d62728;font-weight:600}.kpi td{font-size:1rem}
"""


def _membership_section(m: dict | None) -> str:
    """The shard-level membership test of a run given ``--reference-shards`` (``pipelines/membership``)."""
    if not m:
        return ""
    if "error" in m:
        return f"<h2>Membership test</h2><p>Not computed: {_esc(m['error'])}</p>"
    rows = [[_esc(name), _fmt(t["auc"]), f'[{_fmt(t["auc_95ci"][0])}, {_fmt(t["auc_95ci"][1])}]',
             f'{t["p_value"]:.3g}'] for name, t in m["signals"].items()]
    for name in ("combined", "blind"):
        if m.get(name):
            t = m[name]
            rows.append([f"{name} (fitted on half, tested on half)", _fmt(t["auc"]),
                         f'[{_fmt(t["auc_95ci"][0])}, {_fmt(t["auc_95ci"][1])}]', f'{t["p_value"]:.3g}'])
    d = m["documents"]
    return (f"<h2>Membership test</h2><p><strong>{_esc(m['verdict'])}</strong></p>"
            f"<p>Suspect: {_fmt(d['suspect'])} documents; reference ({_esc(', '.join(m.get('reference', [])))}): "
            f"{_fmt(d['reference'])} documents. p = {m['p_value']:.3g}: {_esc(m['statistic'])}, "
            f"{_fmt(m['permutations'])} permutations. AUC: the chance that a suspect document is more "
            "predictable to the model than a reference one.</p>"
            + _table(["signal", "AUC", "95% CI", "p (one-sided)"], rows))


def render(manifests: str, run: dict | None = None) -> str:
    """``run``: the run record; read from ``run.json`` when not given."""
    docs = read_manifest(manifests, "documents")
    shards = read_manifest(manifests, "shards")
    dups = read_manifest(manifests, "duplicates")
    fs, root = fsspec.core.url_to_fs(manifests)
    run_path = f"{root.rstrip('/')}/run.json"
    if run is None:
        run = json.loads(fs.cat_file(run_path)) if fs.exists(run_path) else {}
    docs.sort(key=lambda d: (d["shard"], d["position"], d["doc_id"]))
    hist, scatter = _plots(docs)

    counts = run.get("counts", {})
    bpb = run.get("bpb", {})
    kpis = _table(["documents", "dead letters", "chunks", "bytes", "model bpb", "zlib bpb", "flagged documents",
                   "dropped as duplicates"],
                  [[_fmt(counts.get("documents", len(docs))), _fmt(counts.get("dead_letters")),
                    _fmt(counts.get("chunks")), _fmt(counts.get("bytes")), _fmt(bpb.get("model")),
                    _fmt(bpb.get("zlib")), _fmt(sum(bool(d["memorization_flags"]) for d in docs)),
                    _fmt(sum(not r["keep"] for r in dups))]])
    shard_rows = [[_esc(s["shard"]), _fmt(s["documents"]), _fmt(s["dead_letters"]), _fmt(s["bytes"]),
                   _fmt(s["bpb"]), _fmt(s["zlib_bpb"]), _fmt(s["p05_doc_bpb"]), _fmt(s["median_doc_bpb"]),
                   _fmt(s["p95_doc_bpb"]), _fmt(s["exact_duplicate_rate"]), _fmt(s["near_duplicate_rate"]),
                   _fmt(s["flagged_documents"])] for s in sorted(shards, key=lambda s: s["shard"])]
    shard_table = _table(["shard", "docs", "dead", "bytes", "bpb", "zlib bpb", "p05 doc bpb", "median", "p95",
                          "exact dup rate", "near dup rate", "flagged docs"], shard_rows)

    suspicious = sorted((d for d in docs if d["bpb"] is not None), key=_suspicion_order)[:TOP_DOCUMENTS]
    doc_rows = [[_esc(d["doc_id"]), _fmt(d["bpb"]), _fmt(d["zlib_ratio"]), _fmt(d["min_k"]),
                 _fmt(d["min_k_pp"]),
                 f'<span class="flag">{_esc(", ".join(d["memorization_flags"]))}</span>',
                 f'<div class="snippet">{_esc(d["snippet"])}</div>'] for d in suspicious]
    doc_table = _table(["document", "bpb", "zlib ratio", "Min-K%", "Min-K%++", "flags", "snippet"], doc_rows)

    snippets = {d["doc_id"]: d["snippet"] for d in docs}
    clusters: dict[int, list[dict]] = {}
    for r in dups:
        clusters.setdefault(r["cluster_id"], []).append(r)
    largest = sorted(clusters.values(), key=lambda c: (-len(c), c[0]["cluster_id"]))[:TOP_CLUSTERS]
    cluster_rows = []
    for members in largest:
        kept = members[0]["kept_doc_id"]
        dropped = sorted((m for m in members if not m["keep"]), key=lambda m: m["doc_id"])
        cluster_rows.append([_fmt(members[0]["cluster_id"]), _fmt(len(members)), _esc(kept),
                             "<br>".join(f'{_esc(m["doc_id"])} ({_esc(m.get("rule", m["reason"]))}, '
                                         f'J={_fmt(m["jaccard"], 2)}, C={_fmt(m.get("containment"), 2)}, '
                                         f'NCD={_fmt(m["ncd"], 2)})' for m in dropped),
                             f'<div class="snippet">{_esc(snippets.get(kept, ""))}</div>'])
    cluster_table = (_table(["cluster", "size", "kept", "dropped (rule, Jaccard, containment, NCD)", "kept snippet"],
                            cluster_rows) if cluster_rows else "<p>No duplicates found.</p>")
    membership = _membership_section(run.get("membership"))
    model = run.get("model", {})
    title = "lmc-audit report"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>
<body><h1>{title}</h1>
<p>Model: <code>{_esc(str(model.get("name", "?")))}</code>
(fingerprint <code>{_esc(str(model.get("fingerprint", "?"))[:16])}</code>).
Manifests: <code>{_esc(manifests)}</code>.</p>
<div class="kpi">{kpis}</div>
<h2>Shards</h2>{shard_table}
<h2>Bits per byte</h2><div class="figs"><figure>{hist}<figcaption>Per-document bits per byte under the model
and under zlib -9.</figcaption></figure><figure>{scatter}<figcaption>Model vs zlib bits per byte; documents
flagged by any memorization signal are marked.</figcaption></figure></div>
<h2>Most suspicious documents</h2><p>Ordered by the number of signals that flag them, then by zlib ratio
(model bits / zlib bits).</p>{doc_table}
<h2>Largest duplicate clusters</h2>{cluster_table}
{membership}
</body></html>
"""


def write_report(manifests: str, output: str, run: dict | None = None) -> str:
    text = render(manifests, run)
    with fsspec.open(output, "w", encoding="utf-8") as f:
        f.write(text)
    return output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmc-audit report", description="Render the manifests as one HTML file.")
    p.add_argument("--manifests", required=True, help="the --output directory (or URL) of an audit run")
    p.add_argument("--output", required=True, help="path or fsspec URL of the HTML file to write")
    args = p.parse_args(argv)
    print(write_report(args.manifests, args.output))
    return 0
