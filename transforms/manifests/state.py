"""Incremental state: what lets a later run skip the shards already audited, and resume a killed one.

Per shard, ``_state/commits/part-<hash>.json`` (its key, the options fingerprint, its row; written last)
and ``_state/sketches/part-<hash>-<part>.parquet`` (its documents' dedup sketches, so that duplicates
are found again over every shard without reading the skipped ones). ``plan_incremental`` decides, before
the job is built, which shards to read, which to keep and which files go.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import apache_beam as beam
import fsspec
import pyarrow.parquet as pq

from lmc_audit.transforms.dedup import sketches as dedup
from lmc_audit.transforms.documents.document_facts import DocumentFacts
from lmc_audit.transforms.manifests import schemas
from lmc_audit.transforms.manifests.files import shard_file_prefix, shard_part_name, write_bytes

STATE_SKETCHES = "_state/sketches"
STATE_COMMITS = "_state/commits"
MANIFEST_DIRS = ("chunks", "documents", "shards", "dead_letter", "payloads", "duplicates")
MARKER_BATCH = 1000  # commit markers read at once by --incremental


_BLOBS = struct.Struct("<5I")  # lengths of a staged sketch's shingles, signature, NCD samples and lines


def sketch_bytes(k: dedup.DocSketch) -> bytes:
    """A sketch's variable-length fields as one staged blob (``StageSketches``); its key, shard, size and
    normalized hash travel in the document's facts."""
    blobs = (k.shingles, k.signature, k.ncd_text, k.lines, k.ncd_head)
    return _BLOBS.pack(*map(len, blobs)) + b"".join(blobs)


def staged_sketch_row(facts: DocumentFacts, data: bytes) -> dict:
    """The ``_state/sketches`` row of a document from its facts and its ``sketch_bytes``."""
    lengths = _BLOBS.unpack_from(data)
    if _BLOBS.size + sum(lengths) != len(data):
        raise ValueError(f"lmc-audit: a staged sketch of {facts.key[2]!r} has {len(data)} bytes, its header says "
                         f"{_BLOBS.size + sum(lengths)}")
    blobs, at = [], _BLOBS.size
    for n in lengths:
        blobs.append(data[at:at + n])
        at += n
    shingles, signature, ncd_text, lines, ncd_head = blobs
    return {"doc_id": facts.key[2], "position": facts.key[1], "shard": facts.shard, "bytes": facts.bytes,
            "normalized_hash": facts.normalized_hash, "shingles": shingles, "signature": signature,
            "ncd_text": ncd_text, "lines": lines, "ncd_head": ncd_head}


class _ReadSketches(beam.DoFn):
    def __init__(self, output: str):
        self._output = output

    def process(self, element: tuple[str, int]) -> Iterator[dedup.DocSketch]:
        shard, index = element
        fs, root = fsspec.core.url_to_fs(self._output)
        folder = f"{root.rstrip('/')}/{STATE_SKETCHES}"
        for path in sorted(fs.glob(f"{folder}/{shard_file_prefix(shard)}-*.parquet")):  # one part at a time
            with fs.open(path, "rb") as f:
                rows = pq.read_table(f, schema=schemas.SKETCHES).to_pylist()
            for r in rows:
                yield dedup.DocSketch((index, r["position"], r["doc_id"]), r["shard"], r["bytes"],
                                      r["normalized_hash"], r["shingles"], r["signature"], r["ncd_text"], r["lines"],
                                      r["ncd_head"])


class LoadCommittedSketches(beam.PTransform):
    """Sketches of the shards an incremental run skips, read back from ``_state/sketches``."""

    def __init__(self, output: str, committed: list[tuple[str, int, dict]]):
        super().__init__()
        self._output = output
        self._shards = [(shard, index) for shard, index, _ in committed]

    def expand(self, pbegin):
        return (pbegin
                | "CommittedShards" >> beam.Create(self._shards, reshuffle=False)
                | "ReadSketches" >> beam.ParDo(_ReadSketches(self._output)))


def write_commit_marker(output: str, shard: str, commit: dict, row: dict) -> None:
    """``_state/commits/part-<hash>.json``: the shard's key and options fingerprint (``commit``) and its
    row. Written after every part file of the shard, so a shard is complete once its marker exists."""
    marker = {"shard": shard, **commit, "row": row}
    write_bytes(output, STATE_COMMITS, shard_part_name(shard).replace(".parquet", ".json"),
                json.dumps(marker, sort_keys=True).encode())


def shard_key(path: str) -> str:
    """fsspec's ``ukey``: size and modification time locally, the ETag / checksum on object stores."""
    fs, p = fsspec.core.url_to_fs(path)
    return str(fs.ukey(p))


def plan_incremental(output: str, shards: list, fingerprint: str, listing_errors: list | None = None,
                     max_removed_fraction: float = 0.5) -> tuple[dict, list, list]:
    """(commit info per shard, shards to read, (shard, index, row) of committed shards kept).

    Deleting needs proof: manifests of a shard gone from the input are removed only when the listing
    succeeded for every input and fewer than ``max_removed_fraction`` of the audited shards are gone;
    otherwise this fails with what it found and deletes nothing."""
    fs, root = fsspec.core.url_to_fs(output)
    root = root.rstrip("/")
    commit = {s.path: {"key": shard_key(s.path), "fingerprint": fingerprint} for s in shards}
    markers = {}
    if fs.exists(f"{root}/{STATE_COMMITS}"):
        paths = sorted(p for p in fs.find(f"{root}/{STATE_COMMITS}") if p.endswith(".json"))
        # fsspec's cat of a list fetches concurrently on object stores (s3fs, gcsfs): 100,000 markers are
        # 100 round trips' worth of batches, not 100,000 requests one after another.
        for start in range(0, len(paths), MARKER_BATCH):
            batch = paths[start:start + MARKER_BATCH]
            found = fs.cat(batch, on_error="raise")
            for path in batch:
                marker = json.loads(found[path])
                markers[marker["shard"]] = marker
    to_read, kept = [], []
    for s in shards:
        m = markers.get(s.path)
        if m and m.get("key") == commit[s.path]["key"] and m.get("fingerprint") == fingerprint:
            kept.append((s.path, s.index, m["row"]))
        else:
            to_read.append(s)
    # Shards gone from the input: their files go, once the listing proves they are gone.
    gone = sorted(set(markers) - {s.path for s in shards})
    if gone and listing_errors:
        raise SystemExit(
            f"lmc-audit: --incremental: {len(gone)} audited shards are not in this listing, and part of the input "
            f"could not be listed ({listing_errors[0].shard}: {listing_errors[0].reason}); nothing was deleted. "
            "Fix the input paths (or, to drop those shards, list the input without errors).")
    if gone and len(gone) > max_removed_fraction * len(markers):
        raise SystemExit(
            f"lmc-audit: --incremental: {len(gone)} of {len(markers)} audited shards are gone from the input "
            f"(e.g. {gone[0]}), more than --max-removed-fraction {max_removed_fraction}; nothing was deleted. "
            "Was the input renamed? Pass --allow-removal to drop them.")
    # Files of a shard gone, or about to be audited again (its part count may change): removed first.
    # A shard's commit marker goes with them, so a run killed after this audits it again.
    stale = {shard_file_prefix(path) for path in gone} | {shard_file_prefix(s.path) for s in to_read}
    for d in (*MANIFEST_DIRS, "_state/sketches", STATE_COMMITS):
        folder = f"{root}/{d}"
        if not fs.exists(folder):
            continue
        for path in fs.ls(folder, detail=False):
            name = path.rsplit("/", 1)[-1]
            if name.startswith("part-") and name[:len("part-") + 16] in stale:
                fs.rm(path)
    return commit, to_read, kept
