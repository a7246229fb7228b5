"""``lmc-audit decode``: payloads back to the original bytes.

    lmc-audit decode --payloads OUT/payloads --output DIR [--doc-id ID ...] [--shard S ...]
                     [--chunk DOC_ID:INDEX ...] [--format files|jsonl] [--model ...]

Documents are rebuilt from all their chunks, in order, each chunk checked
against the CRC32 in its header. With ``--format files`` (default) each
document goes to its own file whose name is the id, percent-encoded (so any
id maps to one safe, distinct name; very long ids are cut and suffixed with
a hash); ``--chunk`` writes single chunks as ``<name>.chunk-<index>``. With
``--format jsonl`` everything goes to ``DIR/decoded.jsonl``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path
from urllib.parse import quote

import fsspec
import pyarrow.dataset as ds

from lmc_audit.transforms.decoding import PayloadDecoder, chunk_name
from lmc_audit.transforms.model_loading import BUNDLED
from lmc_audit.transforms.payloads import PayloadError


def safe_name(doc_id: str, limit: int = 200) -> str:
    """A file name for any id: percent-encoded (injective), never '.', '..' or hidden, at most ``limit`` chars."""
    name = quote(doc_id, safe="")
    if name.startswith("."):
        name = "%2E" + name[1:]
    if len(name) > limit:
        name = name[: limit - 18] + "~" + hashlib.sha256(doc_id.encode()).hexdigest()[:16]
    return name or "%00empty"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmc-audit decode", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--payloads", required=True, help="the payloads/ folder of an audit output (path or fsspec URL)")
    p.add_argument("--output", required=True, help="directory for the decoded documents")
    p.add_argument("--model", default=None,
                   help="the model that coded the payloads (default: the one named in ../run.json, else bundled)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda: must be the device type that coded them")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("--doc-id", nargs="+", default=[], help="decode only these documents")
    p.add_argument("--shard", nargs="+", default=[], help="decode only the documents of these shards")
    p.add_argument("--chunk", nargs="+", default=[], metavar="DOC_ID:INDEX", help="decode only these chunks")
    p.add_argument("--format", choices=("files", "jsonl"), default="files")
    return p


def _default_model(payloads: str) -> str:
    fs, root = fsspec.core.url_to_fs(payloads)
    run_json = root.rstrip("/").rsplit("/", 1)[0] + "/run.json"
    if fs.exists(run_json):
        with fs.open(run_json) as f:
            return json.load(f)["model"]["spec"]
    return BUNDLED


def _select(rows: list[dict], args) -> list[dict]:
    chunks = set()
    for item in args.chunk:
        doc_id, sep, index = item.rpartition(":")
        if not sep or not index.isdigit():
            raise SystemExit(f"lmc-audit decode: --chunk takes DOC_ID:INDEX, got {item!r}")
        chunks.add((doc_id, int(index)))
    if not (args.doc_id or args.shard or chunks):
        return rows
    docs, shards = set(args.doc_id), set(args.shard)
    return [r for r in rows if r["doc_id"] in docs or r["shard"] in shards
            or (r["doc_id"], r["chunk_index"]) in chunks]


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fs, root = fsspec.core.url_to_fs(args.payloads)
    if not fs.exists(root):
        raise SystemExit(f"lmc-audit decode: {args.payloads} does not exist: pass the payloads/ folder of an "
                         "audit run made with coding on")
    rows = ds.dataset(root, filesystem=fs, format="parquet").to_table().to_pylist()
    rows = sorted(_select(rows, args), key=lambda r: (r["shard"], r["position"], r["doc_id"], r["chunk_index"]))
    if not rows:
        raise SystemExit("lmc-audit decode: nothing matches the selection")
    decoder = PayloadDecoder(args.model or _default_model(args.payloads), args.device, args.trust_remote_code)
    names = [chunk_name(r["doc_id"], r["chunk_index"]) for r in rows]
    results = decoder.decode([r["payload"] for r in rows], names, [r["recipe"] for r in rows])
    errors = [str(r) for r in results if isinstance(r, PayloadError)]
    for e in errors:
        print(f"lmc-audit decode: {e}", file=sys.stderr)

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    by_doc: dict[tuple[str, str, int], list[tuple[int, bytes | PayloadError]]] = {}
    for r, got in zip(rows, results):
        by_doc.setdefault((r["shard"], r["doc_id"], r["position"]), []).append((r["chunk_index"], got))
    whole_documents = not args.chunk
    # (shard, position) is a document's key; an id held by several documents names each file by it too.
    id_count: dict[str, int] = {}
    for _, doc_id, _ in by_doc:
        id_count[doc_id] = id_count.get(doc_id, 0) + 1
    shared_ids = sum(1 for c in id_count.values() if c > 1)
    written = 0
    lines = []
    for (shard, doc_id, position), parts in by_doc.items():
        if any(isinstance(g, PayloadError) for _, g in parts):
            continue
        if whole_documents:
            indices = [i for i, _ in parts]
            if indices != list(range(len(parts))):
                print(f"lmc-audit decode: document {doc_id!r} lacks chunks: has {indices}", file=sys.stderr)
                errors.append(doc_id)
                continue
            pieces = [(None, b"".join(g for _, g in parts))]
        else:
            pieces = parts
        for index, data in pieces:
            if args.format == "jsonl":
                line = {"doc_id": doc_id, "shard": shard, "position": position}
                if index is not None:
                    line["chunk_index"] = index
                try:
                    line["text"] = data.decode("utf-8")
                except UnicodeDecodeError:
                    line["bytes_base64"] = base64.b64encode(data).decode()
                lines.append(json.dumps(line, ensure_ascii=False))
            else:
                stem = doc_id if id_count[doc_id] == 1 else f"{doc_id}@{shard}#{position}"
                name = safe_name(stem) + ("" if index is None else f".chunk-{index}")
                (out / name).write_bytes(data)
            written += 1
    if args.format == "jsonl":
        (out / "decoded.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    if shared_ids:
        print(f"lmc-audit decode: {shared_ids} ids are held by several documents: their files are named "
              "<id>@<shard>#<position>", file=sys.stderr)
    print(f"lmc-audit decode: {written} {'documents' if whole_documents else 'chunks'} written to {out}"
          f"{f', {len(errors)} errors' if errors else ''} ({decoder.forwards} model forwards)", file=sys.stderr)
    return 1 if errors else 0
