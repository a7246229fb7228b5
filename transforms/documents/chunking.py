"""``ChunkDocuments``: cut documents into fixed-size byte chunks.

Every byte of a document lands in exactly one chunk; the last chunk of a
document may be shorter. Each chunk carries its sha256 and the sizes the
classical baselines reach on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import apache_beam as beam

from lmc_audit.transforms.documents.baselines import BaselineCompressors
from lmc_audit.transforms.records import Chunk, Document

DEFAULT_CHUNK_BYTES = 2048


def split_document(doc: Document, chunk_bytes: int) -> Iterator[tuple[int, int, bytes]]:
    """(chunk_index, offset in document, bytes) for each chunk of a document or segment."""
    if doc.offset % chunk_bytes:
        raise ValueError(f"segment of {doc.doc_id} starts at {doc.offset}, not a multiple of {chunk_bytes}")
    first = doc.offset // chunk_bytes
    for i, start in enumerate(range(0, len(doc.data), chunk_bytes)):
        yield first + i, doc.offset + start, doc.data[start:start + chunk_bytes]


class ChunkDocumentsFn(beam.DoFn):
    def __init__(self, chunk_bytes: int):
        self._chunk_bytes = chunk_bytes

    def setup(self) -> None:
        self._baselines = BaselineCompressors()

    def process(self, doc: Document) -> Iterator[Chunk]:
        # Lets a document's numbers be finished where its chunks are scored (``DocumentStats``).
        doc_chunks = -(-len(doc.data) // self._chunk_bytes) if doc.whole else 0
        for index, offset, data in split_document(doc, self._chunk_bytes):
            zlib_b, zstd_b, xz_b = self._baselines.sizes(data)
            yield Chunk(doc.doc_id, doc.shard, doc.shard_index, doc.position, index, offset, data,
                        hashlib.sha256(data).digest(), zlib_b, zstd_b, xz_b, doc_chunks=doc_chunks)


class ChunkDocuments(beam.PTransform):
    def __init__(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        super().__init__()
        if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be a positive whole number of bytes, got {chunk_bytes!r}")
        self._chunk_bytes = chunk_bytes

    def expand(self, docs):
        return docs | "CutChunks" >> beam.ParDo(ChunkDocumentsFn(self._chunk_bytes))
