"""Elements that flow between the pipeline's transforms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lmc_audit.transforms.scoring.signals import SignalSummary


@dataclass(frozen=True)
class ShardSpec:
    """One input file. ``index`` is its place in the sorted listing."""

    index: int
    path: str
    format: str  # "text" | "jsonl" | "parquet"
    compression: str | None  # fsspec name: "gzip", "zstd", "bz2", "xz" or None
    size: int


@dataclass(frozen=True)
class ReadTask:
    """A part of a shard that one worker reads: the whole file, a row group or a byte range."""

    shard: ShardSpec
    row_group: int | None = None
    first_row: int = 0
    byte_start: int = 0
    byte_end: int | None = None


@dataclass(frozen=True)
class Document:
    """A document, or a segment of one when a plain-text file is too large to hold.

    ``offset`` is where ``data`` starts inside the document; it is a multiple
    of the chunk size, so chunk indices stay global.
    """

    doc_id: str
    shard: str
    shard_index: int
    position: int  # line (JSONL), row (Parquet) or 0 (text)
    data: bytes
    offset: int = 0
    # True when ``data`` is the whole document (a JSONL or Parquet record). A plain-text file is read in
    # segments, and a segment does not know whether more follow.
    whole: bool = False


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    shard: str
    shard_index: int
    position: int
    chunk_index: int
    offset: int
    data: bytes
    sha256: bytes
    zlib_bytes: int
    zstd_bytes: int
    xz_bytes: int
    size: int = -1  # bytes of the chunk (set from ``data`` when not given)
    doc_chunks: int = 0  # chunks of the whole document; 0 where not known (a plain-text file's segments)

    def __post_init__(self):
        if self.size < 0:
            object.__setattr__(self, "size", len(self.data))


@dataclass(frozen=True)
class TokenizedChunk:
    chunk: Chunk
    # [start] + targets[:-1] is the model input; targets are scored.
    targets: tuple[int, ...]
    start_id: int
    padded_length: int
    # Why the chunk is not scored (``ScoredChunk.flags``); it still goes through RunInference, unscored,
    # so the scored chunks need no Flatten, which DirectRunner would hold whole in memory.
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class ScoredChunk:
    chunk: Chunk
    tokens: int
    bits: float | None  # None when flagged
    padded_length: int
    flags: tuple[str, ...] = field(default=())
    payload: bytes | None = None  # header + bitstream; None when coding is off
    coded_bits: int | None = None  # bits of the bitstream alone
    recipe: str | None = None  # the coding recipe as JSON (what the payload needs to decode)
    # Bounded summaries of the per-token log p(target) (nats) and Min-K%++ z; None when flagged.
    logp: "SignalSummary | None" = None
    zscores: "SignalSummary | None" = None


@dataclass(frozen=True)
class DeadLetter:
    shard: str
    shard_index: int
    position: int  # line / row index, -1 when the whole shard failed
    doc_id: str | None
    reason: str
