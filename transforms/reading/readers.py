"""One reader class per input format, each filling in one method, ``read``.

Every reader streams: it never holds a whole shard in memory. Text files
larger than ``segment_bytes`` are emitted as several segments of one document;
JSONL is read line by line; Parquet batch by batch inside a row group.

A record that cannot become a document is yielded as a ``DeadLetter`` with
its position and the reason, and reading goes on. A shard that breaks in the
middle (a truncated ``.gz``) keeps the documents before the break and ends
with one dead letter for the rest.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import fsspec

from lmc_audit.transforms.records import DeadLetter, Document, ReadTask, ShardSpec

Record = Document | DeadLetter
MISSING = object()  # a record without the text field, as opposed to one whose field is null


class ShardReader:
    """Base class: subclasses implement ``read`` for one ``ReadTask``."""

    def __init__(self, text_field: str = "text", id_field: str | None = None,
                 chunk_bytes: int = 2048, segment_bytes: int = 64 << 20):
        self.text_field = text_field
        self.id_field = id_field
        # Segments end on chunk boundaries so that chunk indices stay global.
        self.segment_bytes = max(chunk_bytes, segment_bytes // chunk_bytes * chunk_bytes)

    def read(self, task: ReadTask) -> Iterator[Record]:
        raise NotImplementedError

    def plan(self, shard: ShardSpec, split_bytes: int) -> list[ReadTask]:
        """Parts of the shard that can be read in parallel; the whole file by default."""
        return [ReadTask(shard)]

    # Helpers shared by the record-oriented formats.
    def _open(self, shard: ShardSpec):
        if shard.compression == "zstd":
            # fsspec hands back zstandard's raw reader, which cannot read lines;
            # a BufferedReader over it can. Multi-frame files (pzstd) read whole.
            import zstandard

            raw = fsspec.open(shard.path, "rb").open()
            return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True,
                                                                                   closefd=True))
        return fsspec.open(shard.path, "rb", compression=shard.compression).open()

    @staticmethod
    def default_id(shard: ShardSpec, position: int) -> str:
        return f"{shard.path}#{position}"

    def _document(self, shard: ShardSpec, position: int, text, doc_id) -> Record:
        if doc_id is None or doc_id == "":
            doc_id = self.default_id(shard, position)
        elif not isinstance(doc_id, str):
            doc_id = json.dumps(doc_id) if not isinstance(doc_id, (bytes, bytearray)) else bytes(doc_id).decode("utf-8", "backslashreplace")
        if text is MISSING:
            return DeadLetter(shard.path, shard.index, position, doc_id,
                              f"missing text field {self.text_field!r}")
        if text is None:
            return DeadLetter(shard.path, shard.index, position, doc_id, f"text field {self.text_field!r} is null")
        if isinstance(text, str):
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as exc:
                return DeadLetter(shard.path, shard.index, position, doc_id,
                                  f"text is not valid Unicode ({exc.reason} at character {exc.start})")
        elif isinstance(text, (bytes, bytearray)):
            data = bytes(text)
        else:
            return DeadLetter(shard.path, shard.index, position, doc_id,
                              f"text field {self.text_field!r} is {type(text).__name__}, not a string")
        if not data:
            return DeadLetter(shard.path, shard.index, position, doc_id, "empty document")
        return Document(doc_id, shard.path, shard.index, position, data, whole=True)


class TextReader(ShardReader):
    """A plain-text file is one document; its bytes are taken as they are."""

    def read(self, task: ReadTask) -> Iterator[Record]:
        shard = task.shard
        doc_id = self.default_id(shard, 0)
        offset = 0
        try:
            with self._open(shard) as f:
                while True:
                    block = f.read(self.segment_bytes)
                    if not block:
                        break
                    yield Document(doc_id, shard.path, shard.index, 0, block, offset)
                    offset += len(block)
        except Exception as exc:
            yield DeadLetter(shard.path, shard.index, 0, doc_id,
                             f"read failed after {offset} bytes: {type(exc).__name__}: {exc}")
            return
        if offset == 0:
            yield DeadLetter(shard.path, shard.index, 0, doc_id, "empty document")


class JsonlReader(ShardReader):
    """One JSON object per line. Uncompressed files split into byte ranges.

    A record's position is the byte offset of its line in an uncompressed file
    and its line number (from 0) in a compressed one. Line numbers of a split
    file would need a pass over everything before each range, on one worker,
    before any range is read; a byte offset is known where the line is read.
    A compressed stream cannot be split, so its one reader counts lines anyway.
    The rule depends only on the file's name, never on its size or on
    ``split_bytes``, so positions and default ids do not change with them."""

    def plan(self, shard: ShardSpec, split_bytes: int) -> list[ReadTask]:
        if shard.compression or shard.size <= split_bytes:
            return [ReadTask(shard)]
        # A line belongs to the range that holds its first byte.
        return [ReadTask(shard, byte_start=start, byte_end=min(start + split_bytes, shard.size))
                for start in range(0, shard.size, split_bytes)]

    def read(self, task: ReadTask) -> Iterator[Record]:
        shard = task.shard
        by_offset = not shard.compression
        lines, pos, records = 0, task.byte_start, 0
        try:
            with self._open(shard) as f:
                if task.byte_start > 0:
                    f.seek(task.byte_start - 1)
                    pos = task.byte_start - 1 + len(f.readline())
                for line in f:
                    if task.byte_end is not None and pos >= task.byte_end:
                        break
                    record = self._parse(shard, pos if by_offset else lines, line)
                    pos += len(line)
                    lines += 1
                    if record is not None:
                        records += 1
                        yield record
        except Exception as exc:
            where = f"byte {pos}" if by_offset else f"line {lines}"
            yield DeadLetter(shard.path, shard.index, pos if by_offset else lines, None,
                             f"shard unreadable from {where} on: {type(exc).__name__}: {exc}")
            return
        if records == 0 and task.byte_start == 0 and (task.byte_end is None or task.byte_end >= shard.size):
            # An empty (or all-blank) file is in the manifests and the report, not silently absent.
            yield DeadLetter(shard.path, shard.index, -1, None,
                             "empty file: no records" if lines == 0 else "no records: every line is blank")

    def _parse(self, shard: ShardSpec, line_no: int, line: bytes) -> Record | None:
        if not line.strip():
            return None  # blank lines hold no document
        try:
            obj = json.loads(line)
        except UnicodeDecodeError as exc:
            return DeadLetter(shard.path, shard.index, line_no, None, f"invalid UTF-8 in JSON line: {exc.reason} at byte {exc.start}")
        except ValueError as exc:
            return DeadLetter(shard.path, shard.index, line_no, None, f"malformed JSON: {exc}")
        if not isinstance(obj, dict):
            return DeadLetter(shard.path, shard.index, line_no, None, f"JSON line is a {type(obj).__name__}, not an object")
        doc_id = obj.get(self.id_field) if self.id_field else None
        return self._document(shard, line_no, obj.get(self.text_field, MISSING), doc_id)


class ParquetReader(ShardReader):
    """Text and id columns of a Parquet file; each row group is a read task."""

    batch_rows = 1024

    def plan(self, shard: ShardSpec, split_bytes: int) -> list[ReadTask]:
        import pyarrow.parquet as pq

        if shard.compression:
            return [ReadTask(shard)]
        with fsspec.open(shard.path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        tasks, first = [], 0
        for rg in range(meta.num_row_groups):
            tasks.append(ReadTask(shard, row_group=rg, first_row=first))
            first += meta.row_group(rg).num_rows
        return tasks or [ReadTask(shard)]

    def read(self, task: ReadTask) -> Iterator[Record]:
        import pyarrow.parquet as pq

        shard = task.shard
        row = task.first_row
        try:
            with self._open(shard) as f:
                pf = pq.ParquetFile(f)
                names = pf.schema_arrow.names
                if self.text_field not in names:
                    yield DeadLetter(shard.path, shard.index, -1, None,
                                     f"no column {self.text_field!r} (columns: {', '.join(names)}); pass --text-field")
                    return
                columns = [self.text_field] + ([self.id_field] if self.id_field in names else [])
                groups = [task.row_group] if task.row_group is not None else None
                for batch in pf.iter_batches(batch_size=self.batch_rows, row_groups=groups, columns=columns):
                    texts = batch.column(self.text_field).to_pylist()
                    ids = batch.column(self.id_field).to_pylist() if self.id_field in columns else [None] * len(texts)
                    for text, doc_id in zip(texts, ids):
                        yield self._document(shard, row, text, doc_id)
                        row += 1
        except Exception as exc:
            yield DeadLetter(shard.path, shard.index, row, None,
                             f"shard unreadable from row {row} on: {type(exc).__name__}: {exc}")
            return
        if row == 0 and task.row_group is None:
            yield DeadLetter(shard.path, shard.index, -1, None, "empty file: no rows")


READERS: dict[str, type[ShardReader]] = {"text": TextReader, "jsonl": JsonlReader, "parquet": ParquetReader}
