"""Turn input paths, directories, globs and fsspec URLs into a sorted list of shards.

Listing happens once, when the pipeline is built (as datatrove does), so that
every shard gets a stable index that names its manifest files, and so that a
path matching nothing is reported before any worker starts.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable

import fsspec

from lmc_audit.transforms.records import DeadLetter, ShardSpec

COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2", ".xz": "xz"}
FORMATS_BY_SUFFIX = {
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl",
    ".parquet": "parquet", ".pq": "parquet",
    ".txt": "text", ".text": "text", ".md": "text", ".rst": "text",
}
FORMATS = ("auto", "text", "jsonl", "parquet")
_GLOB_CHARS = set("*?[")


def detect(path: str, fmt: str = "auto") -> tuple[str | None, str | None]:
    """(format, compression) of a file from its name; format None if unknown."""
    name = posixpath.basename(path).lower()
    stem, ext = posixpath.splitext(name)
    compression = COMPRESSIONS.get(ext)
    if compression:
        name = stem
    if fmt != "auto":
        return fmt, compression
    return FORMATS_BY_SUFFIX.get(posixpath.splitext(name)[1]), compression


def _is_hidden(path: str) -> bool:
    base = posixpath.basename(path.rstrip("/"))
    return base.startswith(".") or base.startswith("_")


def _expand(pattern: str) -> dict[str, int]:
    """Files a pattern names, with their sizes, from the listing call itself: one request per directory
    page on an object store, never one per file (100,000 shards would otherwise cost 100,000 requests
    before any work)."""
    fs, root = fsspec.core.url_to_fs(pattern)
    if any(c in root for c in _GLOB_CHARS):
        infos = {p: i for p, i in fs.glob(root, detail=True).items() if not _is_hidden(p) and i["type"] == "file"}
    elif fs.isdir(root):
        infos = {p: i for p, i in fs.find(root, detail=True).items()
                 if not any(_is_hidden(part) for part in p[len(root):].split("/"))}
    elif fs.exists(root):
        infos = {root: fs.info(root)}
    else:
        raise FileNotFoundError(f"no file or directory matches {pattern!r}")
    if not infos:
        raise FileNotFoundError(f"{pattern!r} matches no files")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        # One name per file: 'dir//a', 'dir/./a' and a symlink to it are the same shard.
        return {os.path.realpath(p): int(i.get("size") or 0) for p, i in infos.items()}
    return {fs.unstrip_protocol(p): int(i.get("size") or 0) for p, i in infos.items()}


def normalize_location(url: str) -> str:
    """A local path resolved (symlinks, '..', '//'), or the URL as it is: for comparing locations."""
    fs, root = fsspec.core.url_to_fs(url)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return os.path.realpath(root)
    return fs.unstrip_protocol(root).rstrip("/")


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path`` lies in ``folder`` (both normalized by ``normalize_location``)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def list_shards(patterns: Iterable[str], fmt: str = "auto") -> tuple[list[ShardSpec], list[DeadLetter]]:
    """Sorted, de-duplicated shards, and one dead letter per pattern or file that cannot be read."""
    found: dict[str, int] = {}
    errors: list[DeadLetter] = []
    for pattern in patterns:
        try:
            found.update(_expand(pattern))
        except Exception as exc:  # a bad path must not hide the good ones
            errors.append(DeadLetter(pattern, -1, -1, None, f"cannot list input: {type(exc).__name__}: {exc}"))
    shards: list[ShardSpec] = []
    for path in sorted(found):
        shard_format, compression = detect(path, fmt)
        if shard_format is None:
            errors.append(DeadLetter(path, -1, -1, None,
                                     "cannot tell the format from the file name; pass --format text|jsonl|parquet"))
            continue
        shards.append(ShardSpec(len(shards), path, shard_format, compression, found[path]))
    # Dead letters that belong to no readable shard get indices after the shards.
    errors = [DeadLetter(e.shard, len(shards) + i, e.position, e.doc_id, e.reason) for i, e in enumerate(errors)]
    return shards, errors
