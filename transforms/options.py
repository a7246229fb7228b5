"""The audit's options: one frozen object with a part per stage.

``pipelines.audit.audit_options`` builds an ``AuditOptions`` once from the command line, checked when it
is built; the job's graph passes it whole, and each transform takes its part (``ReadCorpus`` the read
options, ``ScoreChunks`` the model and coding options, ``FindDuplicates`` the dedup options, ...), so no
transform takes the same six values one by one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the stages' own options live beside them; this module stays light to import
    from lmc_audit.transforms.dedup.sketches import DedupOptions
    from lmc_audit.transforms.scoring.model_handler import CodingOptions
    from lmc_audit.transforms.scoring.signals import SignalOptions


@dataclass(frozen=True)
class ReadOptions:
    """How shards become documents and chunks."""

    text_field: str = "text"  # JSON field or Parquet column holding the text
    id_field: str | None = None  # ... holding the id (default: <shard>#<line, byte offset or row>)
    chunk_bytes: int = 2048
    split_bytes: int = 64 << 20  # uncompressed JSONL shards larger than this are read in byte ranges

    def __post_init__(self):
        if not self.text_field:
            raise ValueError("text_field must name the field or column that holds the text")
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be at least 1, got {self.chunk_bytes}")
        if self.split_bytes < 1 << 16:
            raise ValueError(f"split_bytes={self.split_bytes} is too small; use at least 65536")


# Padded positions per forward when --max-batch-tokens is not given, by the device the model runs on.
# A CPU forward runs faster in smaller batches (4 rows of 2,048 tokens beat 8 rows in 7 of 8 interleaved
# rounds on a 2-core machine, about +10 % tokens/s); a GPU wants the larger batch. Batch size never
# changes a payload or a manifest (tested), only the speed.
BATCH_TOKENS = {"cpu": 8192, "cuda": 16384}


@dataclass(frozen=True)
class ModelOptions:
    """A causal LM and how it runs: every step that runs it (scoring, NCD, verification) takes these."""

    spec: str = "bundled"  # "bundled", a local folder or an fsspec URL of a Hugging Face model folder
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    max_batch_tokens: int | None = None  # padded positions per forward; None: per device (BATCH_TOKENS)
    max_batch_rows: int = 64
    length_granularity: int = 64  # chunks are padded to a multiple of this many tokens
    accelerator: str | None = None  # Beam resource hint of the steps that run the model (right fitting)

    def __post_init__(self):
        for name in ("max_batch_tokens", "max_batch_rows", "length_granularity"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


# Default text bytes per part file: a writer holds one part's chunk rows and payloads (with a byte-level
# model a payload is up to the chunk's size), so this bounds the writer, not the shard.
PART_BYTES = 16 << 20


@dataclass(frozen=True)
class OutputOptions:
    """Where the manifests go and how a shard's files are cut."""

    path: str
    part_bytes: int = PART_BYTES  # a shard is written as one part file per this many bytes of its text

    def __post_init__(self):
        if not self.path:
            raise ValueError("output must be a directory path or fsspec URL")
        if self.part_bytes < 1 << 16:
            raise ValueError(f"part_bytes must be at least 64 KiB (65536), got {self.part_bytes}")


@dataclass(frozen=True)
class AuditOptions:
    """Everything the job's graph is built from: the parts above, ``signals`` (``SignalOptions``: Min-K%'s
    k, flag thresholds), ``coding`` (``CodingOptions``) and ``dedup`` (``DedupOptions``), each None when
    turned off, and ``reference``, the reference model's options (the scoring model's with another spec)."""

    read: ReadOptions
    model: ModelOptions
    output: OutputOptions
    signals: SignalOptions
    coding: CodingOptions | None = None
    dedup: DedupOptions | None = None
    reference: ModelOptions | None = None
    verify_fraction: float = 0.01  # of the chunks, decoded after the job to check the payloads

    def __post_init__(self):
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be in [0, 1], got {self.verify_fraction}")
        if self.coding is not None and self.model.length_granularity % self.coding.block:
            raise ValueError(f"length_granularity ({self.model.length_granularity}) must be a multiple of the "
                             f"coding block ({self.coding.block})")
