"""``lmc-audit report``: one self-contained HTML file from the manifests.

    lmc-audit report --manifests OUT --output OUT/report.html

Plots are matplotlib SVG embedded inline and the only script is a few inline
lines that filter the shard table (no external files), so the file opens
anywhere and is the same bytes for the same manifests.

Memory is bounded by the options below, not by the run: the documents and
duplicates manifests are streamed in record batches of ``BATCH_ROWS`` and
reduced as they pass (histogram counts on a fixed fine grid, the top
``TOP_DOCUMENTS`` by a total order, the ``TOP_CLUSTERS`` largest clusters, a
bottom-k sample of ``SCATTER_POINTS`` documents by a hash of their key for
the scatter plot); only the shards manifest (one row per shard) is read whole.
Every reduction is independent of the order batches arrive in.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import html
import io
import json
import re
from collections.abc import Iterator, Sequence

import fsspec
import numpy as np
import pyarrow.dataset as ds

TOP_DOCUMENTS = 20
TOP_CLUSTERS = 10
CLUSTER_MEMBERS = 20  # dropped members listed per cluster; the rest are counted
SCATTER_POINTS = 5_000
BATCH_ROWS = 8_192  # rows turned into Python dicts at once: the report's memory is about this many rows
BIN_WIDTH = 0.01  # the fine histogram grid (bits per byte) that plots re-bin to about 50 bars
MAX_BPB = 64.0
DOC_COLUMNS = ["doc_id", "shard", "position", "bpb", "zlib_bpb", "zlib_ratio", "min_k", "min_k_pp",
               "memorization_flags", "snippet"]
FLAG_COLOR = "#d62728"
DOC_COLOR = "#1f77b4"



_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _esc(value: str) -> str:
    """HTML-escaped text with control characters (NUL and the like) shown as \\xNN, never written raw."""
    return html.escape(_CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(value)))

def read_manifest(root: str, name: str) -> list[dict]:
    """A whole manifest as rows: for small ones (shards: one row per shard)."""
    return [row for batch in manifest_batches(root, name) for row in batch]


def manifest_batches(root: str, name: str, columns: list[str] | None = None, filter=None) -> Iterator[list[dict]]:
    fs, path = fsspec.core.url_to_fs(root)
    folder = f"{path.rstrip('/')}/{name}"
    if not fs.exists(folder):
        return
    dataset = ds.dataset(folder, filesystem=fs, format="parquet")
    names = set(dataset.schema.names)
    # One file and a few batches read ahead: memory stays near a row group, whatever the number of files.
    for batch in dataset.to_batches(columns=[c for c in columns if c in names] if columns else None,
                                    filter=filter, batch_size=BATCH_ROWS, batch_readahead=2,
                                    fragment_readahead=1):
        yield batch.to_pylist()


def _key_hash(d: dict) -> bytes:
    return hashlib.sha1(repr((d["shard"], d["position"], d["doc_id"])).encode()).digest()[:8]


class DocumentSummary:
    """What the report shows of the documents manifest, reduced batch by batch (module docstring)."""

    def __init__(self):
        self.documents = 0
        self.flagged = 0
        self.model_counts = np.zeros(int(MAX_BPB / BIN_WIDTH) + 1, np.int64)
        self.zlib_counts = np.zeros_like(self.model_counts)
        self.top: list[dict] = []
        self._sample: list[tuple[bytes, float, float, bool]] = []  # (-hash as bytes complement, zlib, model, flagged)

    def add(self, rows: list[dict]) -> None:
        self.documents += len(rows)
        self.flagged += sum(bool(d["memorization_flags"]) for d in rows)
        scored = [d for d in rows if d["bpb"] is not None and d["zlib_bpb"] is not None]
        for counts, column in ((self.model_counts, "bpb"), (self.zlib_counts, "zlib_bpb")):
            values = np.array([d[column] for d in scored], np.float64)
            np.add.at(counts, np.clip((values / BIN_WIDTH).astype(np.int64), 0, len(counts) - 1), 1)
        self.top = heapq.nsmallest(TOP_DOCUMENTS, self.top + [d for d in rows if d["bpb"] is not None],
                                   key=_suspicion_order)
        for d in scored:
            # A max-heap of the smallest key hashes (bytes complemented so that heapq's min is the largest).
            item = (bytes(255 - b for b in _key_hash(d)), d["zlib_bpb"], d["bpb"], bool(d["memorization_flags"]))
            if len(self._sample) < SCATTER_POINTS:
                heapq.heappush(self._sample, item)
            elif item[0] > self._sample[0][0]:
                heapq.heapreplace(self._sample, item)

    def sample(self) -> list[tuple[float, float, bool]]:
        """The scatter plot's documents: those with the smallest key hashes, in hash order."""
        return [(z, m, f) for _, z, m, f in sorted(self._sample, reverse=True)]

    def histograms(self, bars: int = 50) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(edges, model counts, zlib counts) re-binned from the fine grid to about ``bars`` bars."""
        used = np.nonzero(self.model_counts + self.zlib_counts)[0]
        last = int(used[-1]) + 1 if len(used) else 1
        group = max(1, -(-last // bars))
        n = -(-last // group)
        pad = n * group - last

        def rebin(counts: np.ndarray) -> np.ndarray:
            return np.concatenate([counts[:last], np.zeros(pad, np.int64)]).reshape(n, group).sum(axis=1)

        return np.arange(n + 1) * group * BIN_WIDTH, rebin(self.model_counts), rebin(self.zlib_counts)


def _member_order(m: dict) -> tuple:
    return m["doc_id"], m["shard"], m["position"]


class ClusterSummary:
    """The largest duplicate clusters and the number of dropped documents, from two streamed passes."""

    def __init__(self, manifests: str):
        self.dropped = 0
        largest: list[tuple[int, int]] = []  # (-size, cluster_id)
        for rows in manifest_batches(manifests, "duplicates", ["cluster_id", "cluster_size", "keep"]):
            self.dropped += sum(not r["keep"] for r in rows)
            seen = {(-r["cluster_size"], r["cluster_id"]) for r in rows}
            largest = heapq.nsmallest(TOP_CLUSTERS, set(largest) | seen)
        self.order = [cid for _, cid in largest]
        self.sizes = {cid: -neg for neg, cid in largest}
        self.kept: dict[int, str] = {}
        self.members: dict[int, list[dict]] = {cid: [] for cid in self.order}
        if not self.order:
            return
        import pyarrow.compute as pc

        for rows in manifest_batches(manifests, "duplicates", None, pc.field("cluster_id").isin(self.order)):
            for r in rows:
                self.kept[r["cluster_id"]] = r["kept_doc_id"]
                if not r["keep"]:
                    members = self.members[r["cluster_id"]]
                    members.append(r)
                    if len(members) > 2 * CLUSTER_MEMBERS:
                        members[:] = heapq.nsmallest(CLUSTER_MEMBERS, members, key=_member_order)
        for cid, members in self.members.items():
            members[:] = heapq.nsmallest(CLUSTER_MEMBERS, members, key=_member_order)


def summarize_documents(manifests: str) -> DocumentSummary:
    summary = DocumentSummary()
    for rows in manifest_batches(manifests, "documents", DOC_COLUMNS):
        summary.add(rows)
    return summary


def snippets_of(manifests: str, doc_ids: set[str]) -> dict[str, str]:
    if not doc_ids:
        return {}
    import pyarrow.compute as pc

    first: dict[str, tuple] = {}  # doc_id -> (shard, position, snippet) of its first occurrence
    for rows in manifest_batches(manifests, "documents", ["shard", "position", "doc_id", "snippet"],
                                 pc.field("doc_id").isin(sorted(doc_ids))):
        for r in rows:
            candidate = (r["shard"], r["position"], r["snippet"])
            if r["doc_id"] not in first or candidate < first[r["doc_id"]]:
                first[r["doc_id"]] = candidate
    return {doc_id: snippet for doc_id, (_, _, snippet) in first.items()}


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]


def _plots(summary: DocumentSummary) -> tuple[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.hashsalt"] = "lmc-audit"  # stable element ids: same bytes every run
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    edges, model, zlib = summary.histograms()
    if model.sum():
        ax.stairs(model, edges, fill=True, color=DOC_COLOR, alpha=0.8, label="model")
        ax.stairs(zlib, edges, fill=True, color="#7f7f7f", alpha=0.5, label="zlib -9")
        ax.legend()
    ax.set_xlabel("bits per byte (per document)")
    ax.set_ylabel("documents")
    hist = _svg(fig)

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    points = summary.sample()
    plain = [(z, m) for z, m, flagged in points if not flagged]
    flagged = [(z, m) for z, m, f in points if f]
    ax.scatter([z for z, _ in plain], [m for _, m in plain], s=10, color=DOC_COLOR, label="document")
    ax.scatter([z for z, _ in flagged], [m for _, m in flagged], s=28, marker="x", color=FLAG_COLOR,
               label="flagged by a signal")
    if points:
        top = max(max(z for z, _, _ in points), max(m for _, m, _ in points))
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


def _table(headers: Sequence[str], rows: Sequence[Sequence], table_id: str | None = None) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# Hides the shard rows whose name does not contain the filter text: the table stays usable at 10,000 shards.
FILTER_SCRIPT = """
const input = document.getElementById("shard-filter");
const rows = Array.from(document.querySelectorAll("#shards tbody tr"));
input.addEventListener("input", () => {
  const text = input.value.toLowerCase();
  let shown = 0;
  for (const row of rows) {
    const match = row.cells[0].textContent.toLowerCase().includes(text);
    row.hidden = !match;
    shown += match;
  }
  document.getElementById("shard-count").textContent = shown + " of " + rows.length + " shards";
});
"""


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
    summary = summarize_documents(manifests)
    shards = read_manifest(manifests, "shards")
    clusters = ClusterSummary(manifests)
    fs, root = fsspec.core.url_to_fs(manifests)
    run_path = f"{root.rstrip('/')}/run.json"
    if run is None:
        run = json.loads(fs.cat_file(run_path)) if fs.exists(run_path) else {}
    hist, scatter = _plots(summary)

    counts = run.get("counts", {})
    bpb = run.get("bpb", {})
    kpis = _table(["documents", "dead letters", "chunks", "bytes", "model bpb", "zlib bpb", "flagged documents",
                   "dropped as duplicates"],
                  [[_fmt(counts.get("documents", summary.documents)), _fmt(counts.get("dead_letters")),
                    _fmt(counts.get("chunks")), _fmt(counts.get("bytes")), _fmt(bpb.get("model")),
                    _fmt(bpb.get("zlib")), _fmt(summary.flagged), _fmt(clusters.dropped)]])
    shard_rows = [[_esc(s["shard"]), _fmt(s["documents"]), _fmt(s["dead_letters"]), _fmt(s["bytes"]),
                   _fmt(s["bpb"]), _fmt(s["zlib_bpb"]), _fmt(s["p05_doc_bpb"]), _fmt(s["median_doc_bpb"]),
                   _fmt(s["p95_doc_bpb"]), _fmt(s["exact_duplicate_rate"]), _fmt(s["near_duplicate_rate"]),
                   _fmt(s["flagged_documents"])] for s in sorted(shards, key=lambda s: s["shard"])]
    shard_table = _table(["shard", "docs", "dead", "bytes", "bpb", "zlib bpb", "p05 doc bpb", "median", "p95",
                          "exact dup rate", "near dup rate", "flagged docs"], shard_rows, table_id="shards")

    doc_rows = [[_esc(d["doc_id"]), _fmt(d["bpb"]), _fmt(d["zlib_ratio"]), _fmt(d["min_k"]),
                 _fmt(d["min_k_pp"]),
                 f'<span class="flag">{_esc(", ".join(d["memorization_flags"]))}</span>',
                 f'<div class="snippet">{_esc(d["snippet"])}</div>'] for d in summary.top]
    doc_table = _table(["document", "bpb", "zlib ratio", "Min-K%", "Min-K%++", "flags", "snippet"], doc_rows)

    snippets = snippets_of(manifests, set(clusters.kept.values()))
    cluster_rows = []
    for rank, cid in enumerate(clusters.order, 1):  # ranked by size: ids are 63-bit hashes, not for reading
        kept, dropped, size = clusters.kept.get(cid, ""), clusters.members[cid], clusters.sizes[cid]
        more = size - 1 - len(dropped)
        cluster_rows.append([_fmt(rank), _fmt(size), _esc(kept),
                             "<br>".join(f'{_esc(m["doc_id"])} ({_esc(m.get("rule", m["reason"]))}, '
                                         f'J={_fmt(m["jaccard"], 2)}, C={_fmt(m.get("containment"), 2)}, '
                                         f'NCD={_fmt(m["ncd"], 2)})' for m in dropped)
                             + (f"<br>… and {_fmt(more)} more" if more > 0 else ""),
                             f'<div class="snippet">{_esc(snippets.get(kept, ""))}</div>'])
    cluster_table = (_table(["#", "size", "kept", "dropped (rule, Jaccard, containment, NCD)", "kept snippet"],
                            cluster_rows) if cluster_rows else "<p>No duplicates found.</p>")
    sampled = (f" A sample of {_fmt(SCATTER_POINTS)} of {_fmt(summary.documents)} documents, drawn by a hash of "
               "their key." if summary.documents > SCATTER_POINTS else "")
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
<h2>Shards</h2><p><label>Filter shards: <input id="shard-filter" type="search"
placeholder="part of a shard name"></label> <span id="shard-count">{_fmt(len(shard_rows))} shards</span></p>
{shard_table}
<h2>Bits per byte</h2><div class="figs"><figure>{hist}<figcaption>Per-document bits per byte under the model
and under zlib -9.</figcaption></figure><figure>{scatter}<figcaption>Model vs zlib bits per byte; documents
flagged by any memorization signal are marked.{sampled}</figcaption></figure></div>
<h2>Most suspicious documents</h2><p>Ordered by the number of signals that flag them, then by zlib ratio
(model bits / zlib bits).</p>{doc_table}
<h2>Largest duplicate clusters</h2>{cluster_table}
{membership}
<script>{FILTER_SCRIPT}</script>
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
