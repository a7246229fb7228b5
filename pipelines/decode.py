"""``lmc-audit decode``: payloads back to the original bytes.

    lmc-audit decode --payloads OUT/payloads --output DIR [--doc-id ID ...] [--shard S ...]
                     [--chunk DOC_ID:INDEX ...] [--format files|jsonl] [--model ...]

Documents are rebuilt from all their chunks, in order, each chunk checked
against the CRC32 in its header. With ``--format files`` (default) each
document goes to its own file whose name is the id, percent-encoded (so any
id maps to one safe, distinct name; very long ids are cut and suffixed with
a hash); ``--chunk`` writes single chunks as ``<name>.chunk-<index>``. With
``--format jsonl`` everything goes to ``DIR/decoded.jsonl``. The progress line
shows the decoding stage's rate and, where the chunks manifest sits beside the
payloads, its time left.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from lmc_audit.transforms.coding.decoding import PayloadDecoder, chunk_name
from lmc_audit.transforms.scoring.model_loading import BUNDLED
from lmc_audit.transforms.coding.payloads import PayloadError
from lmc_audit.transforms.progress import Progress


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


def _beside(payloads: str, name: str):
    """(filesystem, path) of ``name`` in the audit output that holds the payloads folder."""
    fs, root = fsspec.core.url_to_fs(payloads)
    return fs, root.rstrip("/").rsplit("/", 1)[0] + "/" + name


def _default_model(payloads: str) -> str:
    fs, run_json = _beside(payloads, "run.json")
    if fs.exists(run_json):
        with fs.open(run_json) as f:
            return json.load(f)["model"]["spec"]
    return BUNDLED


DECODE_BATCH = 1024  # chunks decoded in one call: what the decoder holds, and how full its groups are


def _selection(args) -> tuple[set[str], set[str], set[tuple[str, int]]]:
    chunks = set()
    for item in args.chunk:
        doc_id, sep, index = item.rpartition(":")
        if not sep or not index.isdigit():
            raise SystemExit(f"lmc-audit decode: --chunk takes DOC_ID:INDEX, got {item!r}")
        chunks.add((doc_id, int(index)))
    return set(args.doc_id), set(args.shard), chunks


def _filter(docs: set[str], shards: set[str], chunks: set[tuple[str, int]]) -> pc.Expression | None:
    """The selection as a Parquet filter (a superset where ``--chunk`` names single chunks: rows of
    their documents, narrowed by ``_wanted``); None selects everything."""
    expr = None
    for column, values in (("doc_id", docs | {d for d, _ in chunks}), ("shard", shards)):
        if values:
            term = pc.field(column).isin(sorted(values))
            expr = term if expr is None else expr | term
    return expr


def _wanted(row: dict, docs: set[str], shards: set[str], chunks: set[tuple[str, int]]) -> bool:
    return not chunks or row["doc_id"] in docs or row["shard"] in shards \
        or (row["doc_id"], row["chunk_index"]) in chunks


def selected_rows(dataset: ds.Dataset, docs: set[str], shards: set[str],
                  chunks: set[tuple[str, int]]) -> Iterator[dict]:
    """The selected payload rows, shard file by shard file (files sorted by name; rows in each in
    (position, doc_id, chunk_index) order, as written), in record batches: the selection is pushed
    down to the Parquet reader and the payloads are never loaded whole."""
    expr = _filter(docs, shards, chunks)
    for fragment in sorted(dataset.get_fragments(filter=expr), key=lambda f: f.path):
        for batch in fragment.to_batches(filter=expr, batch_size=DECODE_BATCH):
            for row in batch.to_pylist():
                if _wanted(row, docs, shards, chunks):
                    yield row


def selected_bytes(payloads: str, docs: set[str], shards: set[str], chunks: set[tuple[str, int]]) -> int:
    """The bytes the selection decodes to, from the chunks manifest beside the payloads (``../chunks``:
    four small columns, read batch by batch), so that the decoding stage shows its time left; 0 when
    that manifest is not there (payloads copied on their own): the stage then shows its rate only."""
    fs, manifest = _beside(payloads, "chunks")
    try:
        if not fs.isdir(manifest):
            return 0
        dataset = ds.dataset(manifest, filesystem=fs, format="parquet")
        total = 0
        for batch in dataset.to_batches(columns=["doc_id", "shard", "chunk_index", "bytes"],
                                        filter=_filter(docs, shards, chunks), batch_size=65_536):
            if chunks:
                total += sum(r["bytes"] for r in batch.to_pylist() if _wanted(r, docs, shards, chunks))
            else:
                total += pc.sum(batch.column("bytes")).as_py() or 0
        return total
    except (OSError, pa.ArrowException) as exc:  # an estimate only: decoding goes on without it
        print(f"lmc-audit decode: no time left shown ({manifest} unreadable: {exc})", file=sys.stderr)
        return 0


class DocumentWriter:
    """Writes decoded chunks as they come, document by document, in chunk order.

    ``files``: each document streams into a hidden temporary renamed to its name once whole (a
    document that lacks a chunk or fails to decode leaves no file). ``jsonl``: one line per document
    (the document is held until its last chunk). ``chunks``: one file per chunk. The first document
    with an id gets the id's name; a later document with the same id is named
    ``<id>@<shard>#<position>``, so no file is written twice."""

    def __init__(self, out: Path, fmt: str, whole_documents: bool):
        self.out, self.fmt, self.whole = out, fmt, whole_documents
        self.written, self.errors, self.shared_ids = 0, [], 0
        self._names: set[str] = set()
        self._doc = None  # (shard, position, doc_id)
        self._next_index = 0
        self._failed = False
        self._file = None
        self._parts: list[bytes] = []
        self._jsonl = open(out / "decoded.jsonl", "w", encoding="utf-8") if fmt == "jsonl" else None

    def add(self, row: dict, got: bytes | PayloadError) -> None:
        key = (row["shard"], row["position"], row["doc_id"])
        if key != self._doc:
            self._end_document()
            self._doc, self._next_index, self._failed, self._parts = key, 0, False, []
        if isinstance(got, PayloadError):
            self._failed = True
            return
        if not self.whole:
            self._emit(got, row["chunk_index"])
            return
        if row["chunk_index"] != self._next_index:
            if not self._failed:
                print(f"lmc-audit decode: document {row['doc_id']!r} lacks chunk {self._next_index}",
                      file=sys.stderr)
                self.errors.append(row["doc_id"])
            self._failed = True
            return
        self._next_index += 1
        if self._failed:
            return
        if self.fmt == "jsonl":
            self._parts.append(got)
            return
        if self._file is None:
            self._file = open(self.out / f".{self._name()}.partial", "wb")
        self._file.write(got)

    def close(self) -> None:
        self._end_document()
        if self._jsonl is not None:
            self._jsonl.close()

    def _name(self) -> str:
        shard, position, doc_id = self._doc
        name = safe_name(doc_id)
        if name in self._names:
            name = safe_name(f"{doc_id}@{shard}#{position}")
        return name

    def _end_document(self) -> None:
        if self._doc is None or not self.whole:
            return
        partial = self._file.name if self._file is not None else None
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._failed:
            if partial:
                os.remove(partial)
            return
        if self.fmt == "jsonl":
            self._emit(b"".join(self._parts), None)
            return
        name = self._name()
        if partial is None:
            open(self.out / name, "wb").close()
        else:
            os.replace(partial, self.out / name)
        self._count(name)

    def _count(self, name: str) -> None:
        doc_id = self._doc[2]
        if safe_name(doc_id) in self._names and name != safe_name(doc_id):
            self.shared_ids += 1
        self._names.add(name)
        self.written += 1

    def _emit(self, data: bytes, index: int | None) -> None:
        shard, position, doc_id = self._doc
        if self.fmt == "jsonl":
            line = {"doc_id": doc_id, "shard": shard, "position": position}
            if index is not None:
                line["chunk_index"] = index
            try:
                line["text"] = data.decode("utf-8")
            except UnicodeDecodeError:
                line["bytes_base64"] = base64.b64encode(data).decode()
            self._jsonl.write(json.dumps(line, ensure_ascii=False) + "\n")
            self.written += 1
            return
        name = self._name()
        (self.out / f"{name}.chunk-{index}").write_bytes(data)
        self._names.add(name)
        self.written += 1


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fs, root = fsspec.core.url_to_fs(args.payloads)
    if not fs.exists(root):
        raise SystemExit(f"lmc-audit decode: {args.payloads} does not exist: pass the payloads/ folder of an "
                         "audit run made with coding on")
    docs, shards, chunks = _selection(args)
    rows = selected_rows(ds.dataset(root, filesystem=fs, format="parquet"), docs, shards, chunks)
    first = next(rows, None)
    if first is None:
        raise SystemExit("lmc-audit decode: nothing matches the selection")
    decoder = PayloadDecoder(args.model or _default_model(args.payloads), args.device, args.trust_remote_code)
    Progress.reset()
    Progress.expect(selected_bytes(args.payloads, docs, shards, chunks), stages=("decoding",))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    writer = DocumentWriter(out, args.format, whole_documents=not args.chunk)
    errors = 0
    pending = [first]
    for row in [*rows, None]:
        if row is not None:
            pending.append(row)
        if pending and (row is None or len(pending) == DECODE_BATCH):
            results = decoder.decode([r["payload"] for r in pending],
                                     [chunk_name(r["doc_id"], r["chunk_index"]) for r in pending],
                                     [r["recipe"] for r in pending])
            for r, got in zip(pending, results):
                if isinstance(got, PayloadError):
                    print(f"lmc-audit decode: {got}", file=sys.stderr)
                    errors += 1
                writer.add(r, got)
            pending = []
    writer.close()
    errors += len(writer.errors)
    if writer.shared_ids:
        print(f"lmc-audit decode: {writer.shared_ids} documents share an id with an earlier one: their files are "
              "named <id>@<shard>#<position>", file=sys.stderr)
    kind = "documents" if writer.whole else "chunks"
    print(f"lmc-audit decode: {writer.written} {kind} written to {out}"
          f"{f', {errors} errors' if errors else ''} ({decoder.forwards} model forwards)", file=sys.stderr)
    return 1 if errors else 0
