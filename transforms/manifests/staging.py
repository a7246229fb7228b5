"""Payloads and sketches staged in files on their way to the writer, so that the writer's groupings carry
references.

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

A document's dedup sketch goes the same way (``StageSketches``): the group of a part's documents needs a
document's hashes and snippet for its row, and its sketch (n-gram, line and MinHash hashes) only to copy it
into ``_state/sketches``, so the sketch waits in a staging file too.
"""

from __future__ import annotations

import bisect
import dataclasses
import uuid
from collections.abc import Iterable, Iterator

import apache_beam as beam
import fsspec
from fsspec.utils import merge_offset_ranges

from lmc_audit.transforms.documents.document_facts import DocumentFacts
from lmc_audit.transforms.manifests.state import sketch_bytes
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


class _BundleFile:
    """One bundle's staging file: opened at its first write, closed in ``finish_bundle`` (before the
    bundle's elements are committed to the grouping that carries references into it)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, folder: str):
        self._fs, self._folder = fs, folder
        self._file = None
        self._name = ""
        self._offset = 0

    def write(self, data: bytes) -> tuple[str, int]:
        """Appends ``data``; (the file's name, ``data``'s offset in it). The name comes with the offset: the
        file is named at its first write."""
        if self._file is None:
            self._name = f"{uuid.uuid4().hex}.bin"
            self._file = self._fs.open(f"{self._folder}/{self._name}", "wb")
        at = self._offset
        self._file.write(data)
        self._offset += len(data)
        return self._name, at

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class _StagingDoFn(beam.DoFn):
    """A DoFn that writes to one staging file per bundle (``self._staged``)."""

    def __init__(self, output: str, staging: str):
        self._output, self._staging = output, staging

    def setup(self) -> None:
        self._fs, self._folder = staging_folder(self._output, self._staging)
        self._fs.makedirs(self._folder, exist_ok=True)
        self._staged: _BundleFile | None = None

    def start_bundle(self) -> None:
        self._staged = _BundleFile(self._fs, self._folder)

    def finish_bundle(self) -> None:
        self._staged.close()

    def teardown(self) -> None:
        if getattr(self, "_staged", None) is not None:
            self._staged.close()


class StagePayloads(_StagingDoFn):
    """A scored chunk in; ``(part, (chunk row, (method, ref) | None))`` out, where ``ref`` is (file, recipe
    offset, recipe length, payload offset, payload length) in this bundle's staging file. A recipe is
    written once per file (a bundle's chunks share one or two), a payload per chunk (``PartKeys.chunk_rows``
    makes the rows)."""

    def __init__(self, output: str, staging: str, chunk_rows, k: float):
        super().__init__(output, staging)
        self._chunk_rows, self._k = chunk_rows, k

    def start_bundle(self) -> None:
        super().start_bundle()
        self._recipes: dict[str, tuple[int, int]] = {}

    def process(self, s: ScoredChunk) -> Iterator:
        part, (row, payload) = self._chunk_rows(s, self._k)
        if payload is not None:
            method, recipe, data = payload
            if recipe not in self._recipes:
                encoded = recipe.encode()
                self._recipes[recipe] = (self._staged.write(encoded)[1], len(encoded))
            recipe_at, recipe_len = self._recipes[recipe]
            name, at = self._staged.write(data)
            payload = (method, (name, recipe_at, recipe_len, at, len(data)))
        yield part, (row, payload)


class StageSketches(_StagingDoFn):
    """A document's ``DocumentFacts`` in; ``(part, (facts without the sketch, ref | None))`` out, where ``ref``
    is (file, offset, length) of the sketch's bytes (``sketch_bytes``) in this bundle's staging file.

    Why: the writer's group of a part's documents needs a document's hashes and snippet for its row, and
    its sketch only to copy into ``_state/sketches``. Carried through that group, the sketch (up to 64 Ki
    n-gram hashes a document: about 40 % of the text's bytes for short documents) was most of what the
    group moved and, on DirectRunner, held (21 of 22 MiB on the scale benchmark's large corpus)."""

    def __init__(self, output: str, staging: str, facts_part):
        super().__init__(output, staging)
        self._facts_part = facts_part

    def process(self, facts: DocumentFacts) -> Iterator:
        ref = None
        if facts.sketch is not None:
            data = sketch_bytes(facts.sketch)
            ref = (*self._staged.write(data), len(data))
            facts = dataclasses.replace(facts, sketch=None)
        yield self._facts_part(facts), (facts, ref)


def staged_payloads(output: str, staging: str, refs: Iterable[tuple], batch_bytes: int) -> Iterator[tuple]:
    """``(key, (method, ref))`` in order in; ``(key, (method, recipe, payload))`` out in the same order,
    read back in batches of about ``batch_bytes`` of payloads."""
    fs, folder = staging_folder(output, staging)
    return read_staged(fs, folder, refs, batch_bytes)


def read_staged(fs: fsspec.AbstractFileSystem, folder: str, refs: Iterable[tuple],
                batch_bytes: int) -> Iterator[tuple]:
    """``staged_payloads`` with the staging folder already resolved."""
    def spans(item):
        _, (_, (name, recipe_at, recipe_len, at, length)) = item
        return (name, recipe_at, recipe_len), (name, at, length)

    def rebuilt(item, recipe: bytes, payload: bytes):
        key, (method, _) = item
        return key, (method, recipe.decode(), payload)

    return _read_in_batches(fs, folder, refs, batch_bytes, spans, lambda item: item[1][1][4], rebuilt)


def read_staged_ranges(fs: fsspec.AbstractFileSystem, folder: str, refs: Iterable[tuple],
                       batch_bytes: int) -> Iterator[tuple]:
    """``(key, (file, offset, length))`` in order in (``StageSketches``' refs); ``(key, bytes)`` out in the
    same order, read back in batches of about ``batch_bytes``."""
    return _read_in_batches(fs, folder, refs, batch_bytes, lambda item: (item[1],), lambda item: item[1][2],
                            lambda item, data: (item[0], data))


def _read_in_batches(fs, folder: str, items: Iterable, batch_bytes: int, spans, size, rebuilt) -> Iterator:
    """Items in order in; ``rebuilt(item, *their spans' bytes)`` out in order, a batch of about
    ``batch_bytes`` (``size`` of each item) read at once. ``spans(item)``: the (file, offset, length) it needs."""
    batch: list = []
    total = 0
    for item in items:
        batch.append(item)
        total += size(item)
        if total >= batch_bytes:
            yield from _read_batch(fs, folder, batch, spans, rebuilt)
            batch, total = [], 0
    yield from _read_batch(fs, folder, batch, spans, rebuilt)


def _read_batch(fs, folder: str, batch: list, spans, rebuilt) -> Iterator:
    if not batch:
        return
    wanted = sorted({(f"{folder}/{name}", at, at + length) for item in batch for name, at, length in spans(item)})
    paths, starts, ends = merge_offset_ranges([p for p, _, _ in wanted], [s for _, s, _ in wanted],
                                              [e for _, _, e in wanted], max_gap=MERGE_GAP, sort=True)
    blocks = fs.cat_ranges(paths, starts, ends)
    by_path: dict[str, tuple[list[int], list[bytes]]] = {}
    for path, start, end, block in zip(paths, starts, ends, blocks):
        if isinstance(block, Exception):
            raise OSError(f"lmc-audit cannot read staged data {path}: {block}") from block
        if len(block) != end - start:
            raise OSError(f"lmc-audit: staged data {path} ends early ({len(block)} of {end - start} bytes "
                          f"at {start})")
        found = by_path.setdefault(path, ([], []))
        found[0].append(start)  # ascending: merge_offset_ranges sorted them
        found[1].append(block)

    def read(name: str, at: int, length: int) -> bytes:
        block_starts, block_data = by_path[f"{folder}/{name}"]
        i = bisect.bisect_right(block_starts, at) - 1  # merged blocks do not overlap
        return block_data[i][at - block_starts[i]:at - block_starts[i] + length]

    for item in batch:
        yield rebuilt(item, *(read(*span) for span in spans(item)))


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
