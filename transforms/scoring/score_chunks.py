"""``ScoreChunks``: tokenize, batch by length, score with RunInference.

Chain: ``Tokenize`` -> ``BatchByPaddedLength`` (batches of one padded length
under a row and token budget, in bounded memory) -> ``RunInference`` with the
project's handler, unbatched. Beam's ``BatchElements`` length bucketing only
acts on the streaming path in Beam 2.77, and ``SortAndBatchElements`` holds a
whole bundle, so the batching is the project's own.
Chunks the tokenizer flags and batches the model fails on come out as
flagged ``ScoredChunk`` elements: nothing is dropped. Flagged chunks ride the
same chain (the handler passes them through unscored) and the handler flags a
failed batch itself, so the chain has no Flatten: DirectRunner materializes
every Flatten whole, and this one would hold every scored chunk of the job.
"""

from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.ml.inference.base import RunInference
from apache_beam.utils.windowed_value import WindowedValue

from lmc_audit.transforms.coding import payloads
from lmc_audit.transforms.scoring.model_handler import CausalLMHandler, CodingOptions
from lmc_audit.transforms.scoring.model_loading import validate_model_spec
from lmc_audit.transforms.options import BATCH_TOKENS, ModelOptions
from lmc_audit.transforms.records import ScoredChunk, TokenizedChunk
from lmc_audit.transforms.scoring.tokenization import TokenizeChunksFn


class BatchByPaddedLength(beam.DoFn):
    """Tokenized chunks in; batches of one padded length out, each at most ``max_rows`` chunks and
    ``max_tokens`` padded positions.

    Written here instead of Beam's ``SortAndBatchElements``, which holds a whole bundle to sort it: a
    bundle is everything one read task yields (a 64 MiB split, or a 500 MB text file read whole), so
    memory would grow with the input. Here a batch leaves as soon as it is full, and a worker holds
    at most one unfinished batch per padded length (``max length / --length-granularity`` of them).
    Every batch has one padded length, so no batch pads more than its chunks' own shapes; payloads
    and scores do not depend on batch-mates, so the batching never changes a manifest."""

    def __init__(self, max_rows: int, max_tokens: int):
        self._max_rows, self._max_tokens = max_rows, max_tokens

    def start_bundle(self) -> None:
        self._open: dict[tuple, list[TokenizedChunk]] = {}

    def process(self, item: TokenizedChunk, window=beam.DoFn.WindowParam):
        key = (window, item.padded_length)  # flagged chunks: padded length 0, batched by rows alone
        batch = self._open.setdefault(key, [])
        batch.append(item)
        limit = self._max_rows if item.flags else min(self._max_rows, max(1, self._max_tokens // item.padded_length))
        if len(batch) >= limit:
            del self._open[key]
            yield batch

    def finish_bundle(self):
        for (window, _), batch in sorted(self._open.items(), key=lambda kv: kv[0][1]):
            yield WindowedValue(batch, window.max_timestamp(), [window])
        self._open = {}


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
    """Chunks in; ``ScoredChunk`` out, coded when ``coding`` is given. ``model`` says which model runs and
    how (its ``accelerator`` becomes this transform's resource hint)."""

    def __init__(self, model: ModelOptions = ModelOptions(), coding: CodingOptions | None = None):
        super().__init__()
        validate_model_spec(model.spec)
        if coding is not None and model.length_granularity % coding.block:
            raise ValueError(f"length_granularity {model.length_granularity} must be a multiple of the coding block "
                             f"{coding.block}")
        self._coding = coding
        self._handler = CausalLMHandler(model.spec, model.device, model.dtype, model.trust_remote_code,
                                        model.max_batch_tokens, coding)
        self._tokenize = TokenizeChunksFn(model.spec, model.trust_remote_code, model.length_granularity)
        if coding is None:
            # The handler cuts a batch into forwards for its device; batches are cut for the largest.
            self._max_batch_tokens = model.max_batch_tokens or max(BATCH_TOKENS.values())
            self._max_batch_rows = model.max_batch_rows
        else:
            # Coding forwards always have exactly coding.rows rows: hand the model whole groups.
            self._max_batch_rows = coding.rows * max(1, model.max_batch_rows // coding.rows)
            self._max_batch_tokens = self._max_batch_rows * (1 << 20)
        if model.accelerator:
            self.with_resource_hints(accelerator=model.accelerator)

    def expand(self, chunks):
        return (chunks
                | "Tokenize" >> beam.ParDo(self._tokenize)
                | "BatchByPaddedLength" >> beam.ParDo(BatchByPaddedLength(self._max_batch_rows, self._max_batch_tokens))
                | "RunInference" >> RunInference(self._handler.with_no_batching())
                | "StoreUncodable" >> beam.ParDo(StoreUncodable(self._coding)))
