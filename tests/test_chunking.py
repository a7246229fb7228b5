"""ChunkDocuments: every byte in exactly one chunk, baselines on each chunk."""

from __future__ import annotations

import hashlib
import zlib

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from lmc_audit.transforms.documents.chunking import ChunkDocuments, split_document
from lmc_audit.transforms.records import Document


def doc(doc_id: str, data: bytes, offset: int = 0) -> Document:
    return Document(doc_id, "shard", 0, 0, data, offset)


@pytest.mark.parametrize("size", [1, 5, 2047, 2048, 2049, 10_000])
def test_chunks_cover_every_byte_once(size):
    data = bytes((i * 7) % 256 for i in range(size))
    pieces = list(split_document(doc("d", data), 2048))
    assert b"".join(p[2] for p in pieces) == data
    assert [p[0] for p in pieces] == list(range(len(pieces)))
    assert [p[1] for p in pieces] == [2048 * i for i in range(len(pieces))]
    assert all(len(p[2]) == 2048 for p in pieces[:-1]) and 1 <= len(pieces[-1][2]) <= 2048


def test_segment_keeps_global_chunk_indices():
    pieces = list(split_document(doc("d", b"x" * 100, offset=4096), 2048))
    assert pieces == [(2, 4096, b"x" * 100)]
    with pytest.raises(ValueError, match="not a multiple"):
        list(split_document(doc("d", b"x", offset=100), 2048))


def test_chunk_documents_in_pipeline():
    docs = [doc("a", b"abc" * 1000), doc("b", b"\xff\x00 invalid utf-8 is just bytes")]
    expected = []
    for d in docs:
        for i, off, data in split_document(d, 1024):
            expected.append((d.doc_id, i, off, data, hashlib.sha256(data).digest(), len(zlib.compress(data, 9))))
    with TestPipeline() as p:
        out = (p | beam.Create(docs) | ChunkDocuments(1024)
               | beam.Map(lambda c: (c.doc_id, c.chunk_index, c.offset, c.data, c.sha256, c.zlib_bytes)))
        assert_that(out, equal_to(expected))


@pytest.mark.parametrize("bad", [0, -1, 1.5, None])
def test_chunk_size_is_validated(bad):
    with pytest.raises(ValueError, match="chunk_bytes"):
        ChunkDocuments(bad)
