"""Where manifest rows go: file names, a shard's parts, and writes that stream and appear whole.

A shard's files are ``part-<hash of its path>-<part>.parquet``; how many parts, and which part a row goes
to, depend on the shard's listed size and the row alone (see ``write``'s docstring).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from lmc_audit.transforms.arrow_memory import arrow_memory_to_os
from lmc_audit.transforms.options import PART_BYTES
from lmc_audit.transforms.progress import Progress


def part_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


def shard_part_name(shard: str) -> str:
    """A shard's commit marker name (``.json``): stable when other shards come or go (incremental runs)."""
    return f"part-{hashlib.sha1(shard.encode()).hexdigest()[:16]}.parquet"


def shard_file_prefix(shard: str) -> str:
    """What every manifest file of a shard's parts starts with."""
    return shard_part_name(shard)[:-len(".parquet")]


def part_file_name(shard: str, part: int) -> str:
    return f"{shard_file_prefix(shard)}-{part:05d}.parquet"


COMPRESSED_EXPANSION = 4  # a compressed file (or Parquet) is counted at this many times its size
SLICE_CHUNKS = 1024  # a document's chunks go to parts in slices of this many


def shard_parts(size: int, compressed: bool, part_bytes: int = PART_BYTES) -> int:
    """How many part files a shard of ``size`` listed bytes is written as: from the listing alone."""
    return max(1, -(-size * (COMPRESSED_EXPANSION if compressed else 1) // part_bytes))


def part_of(parts: int, position: int, doc_id: str | None, chunk_index: int = 0) -> int:
    """The part a document's row (and its chunks' rows, by slice) goes to: a hash, so that parts fill
    evenly whatever the order or the sizes of the documents."""
    if parts <= 1:
        return 0
    key = f"{position}\0{doc_id}\0{chunk_index // SLICE_CHUNKS}".encode()
    return int.from_bytes(hashlib.sha1(key).digest()[:8], "big") % parts


EMPTY = "empty.parquet"

SHARD_ROWS_PER_PART = 10_000  # shards-manifest rows per part file (about 15 MB of rows held by one writer)


def shards_table_parts(shards: int, rows_per_part: int = SHARD_ROWS_PER_PART) -> int:
    """How many part files the shards manifest is written as, for this many listed shards."""
    return max(1, -(-shards // rows_per_part))


def shards_table_part(shard: str, parts: int) -> int:
    """The shards-manifest part a shard's row goes to: a hash of its path, so parts fill evenly."""
    return int.from_bytes(hashlib.sha1(shard.encode()).digest()[:8], "big") % parts


ROW_GROUP_ROWS = 1 << 16  # rows per Parquet row group: what the writer holds as Arrow at once
ROW_GROUP_BYTES = 8 << 20  # and at most about this many bytes of a row group's large values (payloads)


def write_rows(output: str, manifest: str, name: str, rows: Iterable[dict] | Iterable[tuple], schema: pa.Schema,
               *, as_tuples: bool = False, row_bytes: Callable[[tuple | dict], int] | None = None) -> None:
    """Streams rows into ``<manifest>/<name>`` through ``pq.ParquetWriter``, one row group per
    ``ROW_GROUP_ROWS`` rows, or sooner once ``row_bytes`` of its rows reach ``ROW_GROUP_BYTES`` (a part's
    payloads: 2 KB a row with an untrained model, so 65,536 of them would be 128 MiB of Arrow at once), so
    that no whole table is built. ``as_tuples``: rows are tuples in the schema's column order, made into
    columns without a dict per row (the writer holds a row group's rows). The file appears whole or not at
    all: written under a temporary name and renamed (local), or uploaded in parts that are committed at
    close and discarded on error (object stores)."""
    arrow_memory_to_os()
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root.rstrip('/')}/{manifest}" if manifest else root.rstrip("/")
    target = f"{folder}/{name}"
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    local = protocol in ("file", "local")
    path = f"{folder}/.{name}.tmp" if local else target
    f = None
    count = 0

    def table(batch: list) -> pa.Table:
        if not as_tuples:
            return pa.Table.from_pylist(batch, schema=schema)
        columns = list(zip(*batch)) if batch else [()] * len(schema)
        return pa.Table.from_arrays([pa.array(c, type=field.type) for c, field in zip(columns, schema)],
                                    schema=schema)

    try:
        fs.makedirs(folder, exist_ok=True)
        f = fs.open(path, "wb")
        with pq.ParquetWriter(f, schema, compression="zstd") as writer:
            batch: list = []
            size = 0
            for row in rows:
                batch.append(row)
                if row_bytes is not None:
                    size += row_bytes(row)
                if len(batch) == ROW_GROUP_ROWS or size >= ROW_GROUP_BYTES:
                    writer.write_table(table(batch))
                    count, batch, size = count + len(batch), [], 0
            if batch or count == 0:
                writer.write_table(table(batch))
                count += len(batch)
        f.close()
        if local:
            fs.mv(path, target)
    except Exception as exc:
        _discard(fs, f, path if local else None)
        raise OutputWriteError(f"{WRITE_ERROR} {target}: {type(exc).__name__}: {exc}") from exc
    Progress.add("writing", items=count)


def _discard(fs, f, tmp: str | None) -> None:
    """Leaves nothing that looks like a manifest file after a failed write."""
    try:
        if f is not None and not f.closed:
            discard = getattr(f, "discard", None)
            if discard is not None and tmp is None:
                discard()  # object stores: abort the upload
                f.closed = True  # nothing left to flush
            else:
                f.close()
        if tmp and fs.exists(tmp):
            fs.rm(tmp)
    except Exception:
        pass


WRITE_ERROR = "lmc-audit cannot write"  # marks the one-line message `lmc-audit run` prints for it


class OutputWriteError(OSError):
    """A manifest file could not be written; the message names the path and the cause."""


def write_bytes(output: str, manifest: str, name: str, data: bytes) -> None:
    """Whole-file write: renamed into place locally, one PUT on object stores. ``manifest`` "" is the root.

    A failed write leaves no partial file behind (the temporary is removed) and raises
    ``OutputWriteError`` naming the path and the cause."""
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root.rstrip('/')}/{manifest}" if manifest else root.rstrip("/")
    target = f"{folder}/{name}"
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    tmp = f"{folder}/.{name}.tmp" if protocol in ("file", "local") else None
    try:
        fs.makedirs(folder, exist_ok=True)
        if tmp:
            fs.pipe_file(tmp, data)
            fs.mv(tmp, target)
        else:
            fs.pipe_file(target, data)
    except Exception as exc:
        if tmp:
            try:
                if fs.exists(tmp):
                    fs.rm(tmp)
            except Exception:
                pass
        raise OutputWriteError(f"{WRITE_ERROR} {target}: {type(exc).__name__}: {exc}") from exc


def list_files(output: str, manifest: str) -> list[str]:
    """Names of the files in ``<output>/<manifest>`` (none when the folder does not exist)."""
    fs, root = fsspec.core.url_to_fs(output)
    folder = f"{root.rstrip('/')}/{manifest}"
    if not fs.exists(folder):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(folder, detail=False))


def remove_file(output: str, manifest: str, name: str) -> None:
    fs, root = fsspec.core.url_to_fs(output)
    path = f"{root.rstrip('/')}/{manifest}/{name}"
    if fs.exists(path):
        fs.rm(path)
