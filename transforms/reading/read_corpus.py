"""``ReadCorpus``: shards in, documents and dead letters out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import apache_beam as beam
from apache_beam.metrics import Metrics

from lmc_audit.transforms.arrow_memory import arrow_memory_to_os
from lmc_audit.transforms.dedup.sketches import DedupOptions, MinHasher
from lmc_audit.transforms.documents.document_facts import DocumentDescriber
from lmc_audit.transforms.options import ReadOptions
from lmc_audit.transforms.progress import NAMESPACE, Progress
from lmc_audit.transforms.reading.readers import READERS, ShardReader
from lmc_audit.transforms.records import DeadLetter, ReadTask, ShardSpec

DEAD_LETTER = "dead_letter"
FACTS = "facts"


class _ReaderFn(beam.DoFn):
    def __init__(self, reader_kwargs: dict):
        self._reader_kwargs = reader_kwargs
        self._readers: dict[str, ShardReader] = {}

    def setup(self) -> None:
        arrow_memory_to_os()  # Parquet shards are read through Arrow's buffers
        self._readers = {fmt: cls(**self._reader_kwargs) for fmt, cls in READERS.items()}


class PlanReadTasks(_ReaderFn):
    """Splits a shard into tasks that can be read in parallel (row groups, byte ranges)."""

    def __init__(self, reader_kwargs: dict, split_bytes: int):
        super().__init__(reader_kwargs)
        self._split_bytes = split_bytes

    def process(self, shard: ShardSpec) -> Iterator:
        try:
            yield from self._readers[shard.format].plan(shard, self._split_bytes)
        except Exception:
            # The read itself reports what is wrong with the file, with position.
            yield ReadTask(shard)


class ReadTasks(_ReaderFn):
    """Reads one task; documents to the main output, bad records to ``dead_letter``, and each document's
    ``DocumentFacts`` (hashes, snippet, dedup sketch) to ``facts``, computed as its bytes stream by."""

    def __init__(self, reader_kwargs: dict, expected_bytes: int = 0, dedup_options: DedupOptions | None = None):
        super().__init__(reader_kwargs)
        self._expected_bytes = expected_bytes
        self._dedup = dedup_options

    def setup(self) -> None:
        super().setup()
        Progress.expect(self._expected_bytes)
        self._records = Metrics.counter(NAMESPACE, "input_records")
        self._dead = Metrics.counter(NAMESPACE, "dead_letter_records")
        self._bytes = Metrics.counter(NAMESPACE, "input_bytes")
        self._hasher = MinHasher(self._dedup.num_perm, self._dedup.seed) if self._dedup else None

    def process(self, task: ReadTask) -> Iterator:
        describer = None
        for record in self._readers[task.shard.format].read(task):
            if isinstance(record, DeadLetter):
                self._records.inc()
                self._dead.inc()
                yield beam.pvalue.TaggedOutput(DEAD_LETTER, record)
                continue
            if record.offset == 0:  # later segments belong to the same document, and follow it
                self._records.inc()
                if describer is not None:
                    yield beam.pvalue.TaggedOutput(FACTS, describer.finish())
                describer = DocumentDescriber((record.shard_index, record.position, record.doc_id), record.shard,
                                              self._reader_kwargs["chunk_bytes"], self._dedup, self._hasher)
            describer.update(record.data)
            self._bytes.inc(len(record.data))
            Progress.add("reading", items=int(record.offset == 0), bytes=len(record.data))
            yield record
        if describer is not None:
            yield beam.pvalue.TaggedOutput(FACTS, describer.finish())


class ReadCorpus(beam.PTransform):
    """Reads listed shards into ``Document`` elements.

    Returns a tagged tuple: ``main`` (documents), ``dead_letter`` and ``facts`` (one ``DocumentFacts``
    per document, with its dedup sketch when ``dedup_options`` are given).
    """

    def __init__(self, shards: Sequence[ShardSpec], read: ReadOptions = ReadOptions(),
                 dedup_options: DedupOptions | None = None):
        super().__init__()
        self._shards = list(shards)
        self._reader_kwargs = {"text_field": read.text_field, "id_field": read.id_field,
                               "chunk_bytes": read.chunk_bytes}
        self._split_bytes = read.split_bytes
        self._dedup = dedup_options

    def expand(self, pbegin):
        return (
            pbegin
            | "ListShards" >> beam.Create(self._shards, reshuffle=False)
            | "PlanReadTasks" >> beam.ParDo(PlanReadTasks(self._reader_kwargs, self._split_bytes))
            | "SpreadTasks" >> beam.Reshuffle()
            | "ReadTasks" >> beam.ParDo(ReadTasks(self._reader_kwargs, sum(s.size for s in self._shards),
                                                  self._dedup))
            .with_outputs(DEAD_LETTER, FACTS, main="main")
        )
