"""``ScoreChunks``: tokenize, batch by length, score with RunInference.

Chain: ``Tokenize`` -> ``SortAndBatchElements`` (by padded length, within a
bundle, under a token budget) -> ``RunInference`` with the project's handler.
Beam's ``BatchElements`` length bucketing only acts on the streaming path in
Beam 2.77, so batch jobs sort-and-batch first and run the handler unbatched.
Chunks the tokenizer flags and batches the model fails on come out as
flagged ``ScoredChunk`` elements: nothing is dropped.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.transforms.util import SortAndBatchElements

from lmc_audit.transforms import payloads
from lmc_audit.transforms.model_handler import CausalLMHandler, CodingOptions
from lmc_audit.transforms.model_loading import validate_model_spec
from lmc_audit.transforms.records import ScoredChunk, TokenizedChunk
from lmc_audit.transforms.tokenization import FLAGGED, TokenizeChunksFn


def _padded_length(item: TokenizedChunk) -> int:
    return item.padded_length


def _failed_batch_to_rows(failure) -> list[ScoredChunk]:
    batch, exc = failure
    reason = f"inference_error: {type(exc).__name__}: {exc}"[:500]
    return [ScoredChunk(item.chunk, len(item.targets), None, item.padded_length, (reason,)) for item in batch]


class StoreUncodable(beam.DoFn):
    """Flagged chunks get a stored payload, so every chunk still decodes to its bytes."""

    def __init__(self, coding: CodingOptions | None):
        self._coding = coding

    def process(self, scored: ScoredChunk):
        if self._coding is None or scored.payload is not None:
            yield scored
            return
        data = scored.chunk.data
        yield dataclasses.replace(scored, payload=payloads.stored(data, self._coding.fingerprint),
                                  coded_bits=8 * len(data))


class ScoreChunks(beam.PTransform):
    def __init__(self, model_spec: str = "bundled", device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, max_batch_tokens: int = 16384,
                 max_batch_rows: int = 64, length_granularity: int = 64, coding: CodingOptions | None = None):
        super().__init__()
        validate_model_spec(model_spec)
        if length_granularity < 1:
            raise ValueError("length_granularity must be at least 1")
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be at least 1")
        if coding is not None and length_granularity % coding.block:
            raise ValueError(f"length_granularity {length_granularity} must be a multiple of the coding block "
                             f"{coding.block}")
        self._coding = coding
        self._handler = CausalLMHandler(model_spec, device, dtype, trust_remote_code, max_batch_tokens, coding)
        self._tokenize = TokenizeChunksFn(model_spec, trust_remote_code, length_granularity)
        if coding is None:
            self._max_batch_tokens = max_batch_tokens
            self._max_batch_rows = max_batch_rows
        else:
            # Coding forwards always have exactly coding.rows rows: hand the model whole groups.
            self._max_batch_rows = coding.rows * max(1, max_batch_rows // coding.rows)
            self._max_batch_tokens = self._max_batch_rows * (1 << 20)

    def expand(self, chunks):
        tokenized = chunks | "Tokenize" >> beam.ParDo(self._tokenize).with_outputs(FLAGGED, main="main")
        scored, failed = (
            tokenized.main
            | "SortAndBatch" >> SortAndBatchElements(
                min_batch_size=1, max_batch_size=self._max_batch_rows,
                max_batch_weight=self._max_batch_tokens, element_size_fn=_padded_length)
            | "RunInference" >> RunInference(self._handler.with_no_batching()).with_exception_handling()
        )
        failed_rows = failed.failed_inferences | "FlagFailedBatches" >> beam.FlatMap(_failed_batch_to_rows)
        return (
            (scored, tokenized[FLAGGED], failed_rows)
            | "AllChunks" >> beam.Flatten()
            | "StoreUncodable" >> beam.ParDo(StoreUncodable(self._coding))
        )
