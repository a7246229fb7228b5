"""Payloads staged in files on their way to the writer, so that the writer's grouping carries references.

A part's chunk and payload rows are written sorted, after a grouping by part. Carried through that
grouping, every payload (about a fifth of the text under a trained model, as large as the text under an
untrained one) and its recipe would be shuffled on Dataflow and, on a runner that keeps grouped data in
memory (DirectRunner holds a job's grouped PCollections in its one process), held whole: memory that grows
with the corpus. Instead the step that makes a chunk's rows appends its recipe and payload to its bundle's
staging file under ``<output>/_staging/<run token>/`` and passes on ``(file, offset, recipe length, payload
length)``; the writer reads a part's payloads back in row-group batches through fsspec's ``cat_ranges``
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


def _folder(output: str, staging: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(output)
    return fs, f"{root.rstrip('/')}/{staging}"


class StagePayloads(beam.DoFn):
    """A scored chunk in; ``(part, (chunk row, (method, StagedRef) | None))`` out, the chunk's recipe and
    payload appended to this bundle's staging file (``PartKeys.chunk_rows`` makes the rows)."""

    def __init__(self, output: str, staging: str, chunk_rows, k: float):
        self._output, self._staging = output, staging
        self._chunk_rows, self._k = chunk_rows, k

    def start_bundle(self) -> None:
        self._file = None
        self._name = ""
        self._offset = 0

    def process(self, s: ScoredChunk) -> Iterator:
        part, (row, payload) = self._chunk_rows(s, self._k)
        if payload is not None:
            method, recipe, data = payload
            if self._file is None:
                fs, folder = _folder(self._output, self._staging)
                fs.makedirs(folder, exist_ok=True)
                self._name = f"{uuid.uuid4().hex}.bin"
                self._file = fs.open(f"{folder}/{self._name}", "wb")
            recipe_bytes = recipe.encode()
            self._file.write(recipe_bytes)
            self._file.write(data)
            payload = (method, (self._name, self._offset, len(recipe_bytes), len(data)))
            self._offset += len(recipe_bytes) + len(data)
        yield part, (row, payload)

    def finish_bundle(self) -> None:
        if self._file is not None:
            self._file.close()  # before the bundle's elements are committed to the grouping
            self._file = None

    def teardown(self) -> None:
        if getattr(self, "_file", None) is not None:
            self._file.close()


def staged_payloads(output: str, staging: str, refs: Iterable[tuple], batch_bytes: int) -> Iterator[tuple]:
    """``(key, (method, StagedRef))`` in order in; ``(key, (method, recipe, payload))`` out in the same order,
    read back in batches of about ``batch_bytes`` of payloads."""
    fs, folder = _folder(output, staging)
    batch: list[tuple] = []
    size = 0
    for item in refs:
        batch.append(item)
        size += item[1][1][2] + item[1][1][3]
        if size >= batch_bytes:
            yield from _read_batch(fs, folder, batch)
            batch, size = [], 0
    yield from _read_batch(fs, folder, batch)


def _read_batch(fs, folder: str, batch: list[tuple]) -> Iterator[tuple]:
    if not batch:
        return
    spans = sorted({(f"{folder}/{ref[0]}", ref[1], ref[1] + ref[2] + ref[3]) for _, (_, ref) in batch})
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
    for key, (method, (name, offset, recipe_len, payload_len)) in batch:
        block_starts, block_data = by_path[f"{folder}/{name}"]
        i = bisect.bisect_right(block_starts, offset) - 1  # merged blocks do not overlap
        at = offset - block_starts[i]
        block = block_data[i]
        yield key, (method, block[at:at + recipe_len].decode(), block[at + recipe_len:at + recipe_len + payload_len])


def remove_staging(output: str, staging: str) -> None:
    """Removes the run's staging folder (every part that read from it is committed)."""
    fs, folder = _folder(output, staging)
    if fs.exists(folder):
        fs.rm(folder, recursive=True)
    parent = folder.rsplit("/", 1)[0]
    try:
        if fs.exists(parent) and not fs.ls(parent, detail=False):
            fs.rmdir(parent)
    except OSError:
        pass  # another run's staging appeared meanwhile
