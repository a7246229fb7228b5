"""Payloads staged in files on their way to the writer, so that the writer's grouping carries references.

A part's chunk and payload rows are written sorted, after a grouping by part. Carried through that
grouping, every payload (about a fifth of the text under a trained model, as large as the text under an
untrained one) and its recipe would be shuffled on Dataflow and, on a runner that keeps grouped data in
memory (DirectRunner holds a job's grouped PCollections in its one process), held whole: memory that grows
with the corpus. Instead the step that makes a chunk's rows appends its payload (and its recipe, once per
file) to its bundle's staging file under ``<output>/_staging/<run token>/`` and passes on where they lie
(five small values); the writer reads a part's payloads back in row-group batches through fsspec's ``cat_ranges``
(adjacent ranges merged first: one read, or one ranged GET on an object store, per run of them), so it
holds one row group's payloads at a time. Beam's own file sinks stage per bundle the same way: a bundle's
file is closed in ``finish_bundle``, before its elements reach the grouping, and a retried bundle writes a
new file (the old one is never referenced). The run's staging folder is removed once every shard is
committed; a job that fails leaves it, and deleting it is always safe.
"""

from __future__ import annotations

import bisect
import uuid
from collections.abc import Iterable, Iterator

import apache_beam as beam
import fsspec
from fsspec.utils import merge_offset_ranges

from lmc_audit.transforms.records import ScoredChunk

STAGING = "_staging"
MERGE_GAP = 64 << 10  # adjacent staged ranges closer than this are read as one


def new_staging_folder() -> str:
    """A folder of the output's ``_staging/`` that no other run of the job uses."""
    return f"{STAGING}/{uuid.uuid4().hex}"


def staging_folder(output: str, staging: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a run's staging folder (resolve once per DoFn, in ``setup()``)."""
    fs, root = fsspec.core.url_to_fs(output)
    return fs, f"{root.rstrip('/')}/{staging}"


class StagePayloads(beam.DoFn):
    """A scored chunk in; ``(part, (chunk row, (method, ref) | None))`` out, where ``ref`` is (file, recipe
    offset, recipe length, payload offset, payload length) in this bundle's staging file. A recipe is
    written once per file (a bundle's chunks share one or two), a payload per chunk (``PartKeys.chunk_rows``
    makes the rows)."""

    def __init__(self, output: str, staging: str, chunk_rows, k: float):
        self._output, self._staging = output, staging
        self._chunk_rows, self._k = chunk_rows, k

    def setup(self) -> None:
        self._fs, self._folder = staging_folder(self._output, self._staging)
        self._fs.makedirs(self._folder, exist_ok=True)
        self._file = None

    def start_bundle(self) -> None:
        self._file = None
        self._name = ""
        self._offset = 0
        self._recipes: dict[str, tuple[int, int]] = {}

    def _write(self, data: bytes) -> int:
        at = self._offset
        self._file.write(data)
        self._offset += len(data)
        return at

    def process(self, s: ScoredChunk) -> Iterator:
        part, (row, payload) = self._chunk_rows(s, self._k)
        if payload is not None:
            method, recipe, data = payload
            if self._file is None:
                self._name = f"{uuid.uuid4().hex}.bin"
                self._file = self._fs.open(f"{self._folder}/{self._name}", "wb")
            if recipe not in self._recipes:
                encoded = recipe.encode()
                self._recipes[recipe] = (self._write(encoded), len(encoded))
            recipe_at, recipe_len = self._recipes[recipe]
            payload = (method, (self._name, recipe_at, recipe_len, self._write(data), len(data)))
        yield part, (row, payload)

    def finish_bundle(self) -> None:
        if self._file is not None:
            self._file.close()  # before the bundle's elements are committed to the grouping
            self._file = None

    def teardown(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()


def staged_payloads(output: str, staging: str, refs: Iterable[tuple], batch_bytes: int) -> Iterator[tuple]:
    """``(key, (method, ref))`` in order in; ``(key, (method, recipe, payload))`` out in the same order,
    read back in batches of about ``batch_bytes`` of payloads."""
    fs, folder = staging_folder(output, staging)
    return read_staged(fs, folder, refs, batch_bytes)


def read_staged(fs: fsspec.AbstractFileSystem, folder: str, refs: Iterable[tuple],
                batch_bytes: int) -> Iterator[tuple]:
    """``staged_payloads`` with the staging folder already resolved."""
    batch: list[tuple] = []
    size = 0
    for item in refs:
        batch.append(item)
        size += item[1][1][4]
        if size >= batch_bytes:
            yield from _read_batch(fs, folder, batch)
            batch, size = [], 0
    yield from _read_batch(fs, folder, batch)


def _read_batch(fs, folder: str, batch: list[tuple]) -> Iterator[tuple]:
    if not batch:
        return
    spans = set()
    for _, (_, (name, recipe_at, recipe_len, at, length)) in batch:
        path = f"{folder}/{name}"
        spans.add((path, recipe_at, recipe_at + recipe_len))
        spans.add((path, at, at + length))
    spans = sorted(spans)
    paths, starts, ends = merge_offset_ranges([p for p, _, _ in spans], [s for _, s, _ in spans],
                                              [e for _, _, e in spans], max_gap=MERGE_GAP, sort=True)
    blocks = fs.cat_ranges(paths, starts, ends)
    by_path: dict[str, tuple[list[int], list[bytes]]] = {}
    for path, start, end, block in zip(paths, starts, ends, blocks):
        if isinstance(block, Exception):
            raise OSError(f"lmc-audit cannot read staged payloads {path}: {block}") from block
        if len(block) != end - start:
            raise OSError(f"lmc-audit: staged payloads {path} end early ({len(block)} of {end - start} bytes "
                          f"at {start})")
        found = by_path.setdefault(path, ([], []))
        found[0].append(start)  # ascending: merge_offset_ranges sorted them
        found[1].append(block)

    def read(path: str, at: int, length: int) -> bytes:
        block_starts, block_data = by_path[path]
        i = bisect.bisect_right(block_starts, at) - 1  # merged blocks do not overlap
        return block_data[i][at - block_starts[i]:at - block_starts[i] + length]

    for key, (method, (name, recipe_at, recipe_len, at, length)) in batch:
        path = f"{folder}/{name}"
        yield key, (method, read(path, recipe_at, recipe_len).decode(), read(path, at, length))


def remove_staging(output: str, staging: str) -> None:
    """Removes the run's staging folder (every part that read from it is committed)."""
    fs, folder = staging_folder(output, staging)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    parent = folder.rsplit("/", 1)[0]
    try:
        if fs.exists(parent) and not fs.ls(parent, detail=False):
            fs.rmdir(parent)
    except OSError:
        pass  # another run's staging appeared meanwhile
