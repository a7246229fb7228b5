"""Payloads back to bytes: ``PayloadDecoder`` and the in-pipeline ``VerifyPayloads``.

A payload decodes only under the model, dtype, device type, library
versions, MKL reproducibility mode (CPU) and shapes it was coded with. Each is checked against the header
before any decoding, and a mismatch is refused with what differs; after
decoding, the length and CRC32 of the bytes are checked too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from lmc_audit.transforms.coding.block_coding import BlockCoder, DecodeStats, NgramGuesser, ReplayDecoder
from lmc_audit.transforms.mkl_mode import mkl_cbwr_setting
from lmc_audit.transforms.options import ModelOptions
from lmc_audit.transforms.scoring.model_handler import LoadedModel, load_causal_lm, pick_device
from lmc_audit.transforms.scoring.model_loading import model_fingerprint, resolve_model_dir
from lmc_audit.transforms.coding.payloads import (METHOD_STORED, SCHEME_BLOCKS, Header, PayloadError, Recipe, crc32,
                                           unpack)
from lmc_audit.transforms.progress import NAMESPACE, Progress
from lmc_audit.transforms.records import Chunk, ScoredChunk
from lmc_audit.transforms.scoring.tokenization import ChunkTokenizer

log = logging.getLogger(__name__)


class PayloadDecoder:
    """Decodes payloads in groups of up to ``batch_rows`` chunks of one padded length.

    ``window``: positions per replay forward (forward scheme); larger windows let right guesses
    decode more tokens per forward at more compute per forward.
    """

    def __init__(self, model_spec: str, device: str = "auto", trust_remote_code: bool = False,
                 batch_rows: int = 64, window: int = 4):
        self._spec = model_spec
        self._model_dir = resolve_model_dir(model_spec)
        self.fingerprint = model_fingerprint(self._model_dir)
        self._device = pick_device(device)
        self._trust = trust_remote_code
        self._tok = ChunkTokenizer.from_model_dir(self._model_dir, trust_remote_code)
        self._models: dict[str, LoadedModel] = {}
        self._batch_rows = batch_rows
        self._window = window
        self._guesser = NgramGuesser()  # learns from every chunk this decoder decodes
        self.stats = DecodeStats()

    @property
    def forwards(self) -> int:
        return self.stats.forwards

    def _model(self, dtype: str) -> LoadedModel:
        if dtype not in self._models:
            self._models[dtype] = load_causal_lm(self._spec, str(self._device), dtype, self._trust)
        return self._models[dtype]

    def check(self, header: Header, recipe_text: str | None = None) -> None:
        """Raises PayloadError saying what differs between the payload's recipe and this environment."""
        if header.fingerprint != bytes.fromhex(self.fingerprint)[:8]:
            raise PayloadError(
                f"the payload was coded with model fingerprint {header.fingerprint.hex()}…, but --model "
                f"{self._spec} has {self.fingerprint[:16]}…: pass the model that wrote it (run.json names it)")
        if header.method == METHOD_STORED:
            return
        if header.device != self._device.type:
            raise PayloadError(f"the payload was coded on a {header.device} device and this decoder runs on "
                               f"{self._device.type}: logits differ across device types; decode with "
                               f"--device {header.device}")
        here = Recipe.here(header.scheme, header.precision, header.dtype, self._device, header.min_tokens,
                           header.rows, header.block)
        if header.environment == here.environment_hash():
            return
        if here.blas_mode and header.environment == replace(here, blas_mode="").environment_hash():
            return  # coded before recipes recorded MKL's mode (0.4.1 and earlier): its CRC decides
        theirs = Recipe.from_json(recipe_text) if recipe_text else None
        if theirs is not None and theirs.environment_hash() == header.environment:
            what = "; ".join(here.differences(theirs))
            hint = ""
            if theirs.blas_mode and theirs.blas_mode != here.blas_mode:
                hint = (f" MKL's mode is read at a process's first matrix product: start the decode with "
                        f"{mkl_cbwr_setting(theirs.blas_mode)} in its environment.")
            raise PayloadError(f"the payload was coded where {what}: logits would differ, so it cannot decode "
                               f"here. Decode on a machine and with the versions its recipe names.{hint}")
        raise PayloadError(
            "the payload was coded in another environment (its recipe is not at hand: pass the payloads "
            f"manifest's recipe column); here: {here.to_json()}. Decode with the versions and device that coded it.")

    def decode(self, payloads: Sequence[bytes], names: Sequence[str] | None = None,
               recipes: Sequence[str | None] | None = None,
               expected: Sequence[bytes | None] | None = None) -> list[bytes | PayloadError]:
        """Bytes of each payload, or the PayloadError that says why it cannot be decoded.

        ``expected``: the bytes a verifier expects each payload to hold. Their tokens become the replay
        decoder's guesses (``ReplayDecoder.decode``): every token is still decoded from the bitstream and
        checked, so what comes out is what a decode without them gives, in a few wide forwards instead of
        one per couple of tokens. ``lmc-audit decode`` has no such bytes and decodes without them."""
        names = list(names or [f"payload {i}" for i in range(len(payloads))])
        recipes = list(recipes or [None] * len(payloads))
        expected = list(expected or [None] * len(payloads))
        results: list[bytes | PayloadError | None] = [None] * len(payloads)
        groups: dict[tuple, list[tuple[int, Header, bytes]]] = {}
        for i, payload in enumerate(payloads):
            try:
                header, body = unpack(payload)
                self.check(header, recipes[i])
            except PayloadError as exc:
                results[i] = PayloadError(f"{names[i]}: {exc}")
                continue
            if header.method == METHOD_STORED:
                results[i] = self._verify(names[i], header, body)
                continue
            key = (header.scheme, header.dtype, header.length, header.rows, header.block, header.precision,
                   header.min_tokens)
            groups.setdefault(key, []).append((i, header, body))
        for (scheme, dtype, length, rows, block, precision, min_tokens), members in sorted(groups.items()):
            lm = self._model(dtype)
            if scheme == SCHEME_BLOCKS:
                coder = BlockCoder(lm.model, lm.device, precision, rows, block, self._tok.start_id, lm.pad_id)
                group_rows = rows
            else:
                coder = ReplayDecoder(lm.model, lm.device, precision, min_tokens, self._tok.start_id, lm.pad_id,
                                      self._window, self._guesser)
                group_rows = self._batch_rows
            for s in range(0, len(members), group_rows):
                part = members[s:s + group_rows]
                hints = None
                if any(expected[i] is not None for i, _, _ in part):
                    hints = [None if expected[i] is None else np.asarray(self._tok.encode(expected[i])[0], np.int64)
                             for i, _, _ in part]
                shown = _ProgressInBytes(sum(h.n_bytes for _, h, _ in part), sum(h.n_tokens for _, h, _ in part))
                try:
                    with lm.precision():
                        streams, counts = [b for _, _, b in part], [h.n_tokens for _, h, _ in part]
                        tokens, stats = (coder.decode(streams, counts, length, progress=shown) if hints is None
                                         else coder.decode(streams, counts, length, hints, progress=shown))
                    self.stats.add(stats)
                except ValueError as exc:
                    for i, _, _ in part:
                        results[i] = PayloadError(f"{names[i]}: the bitstream is corrupt ({exc})")
                    continue
                for (i, header, _), ids in zip(part, tokens):
                    results[i] = self._verify(names[i], header, self._to_bytes(ids))
                shown.finish(items=len(part))
        return results  # type: ignore[return-value]

    def _to_bytes(self, ids: np.ndarray) -> bytes:
        if self._tok.byte_level:
            if ids.size and (ids.min() < 0 or ids.max() > 255):
                return b""  # an id that is no byte: the CRC check reports it
            return ids.astype(np.uint8).tobytes()
        return self._tok.tokenizer.decode(ids.tolist(), skip_special_tokens=False,
                                          clean_up_tokenization_spaces=False).encode("utf-8", "surrogatepass")

    @staticmethod
    def _verify(name: str, header: Header, data: bytes) -> bytes | PayloadError:
        if len(data) != header.n_bytes or crc32(data) != header.crc32:
            return PayloadError(f"{name}: decoded {len(data)} bytes whose CRC32 does not match the header "
                                f"({header.n_bytes} bytes): the payload is corrupt or was coded elsewhere")
        return data


class _ProgressInBytes:
    """A decode group's progress, forward by forward, as the bytes its tokens stand for (tokens are bytes
    with a byte-level model; else the group's bytes per token): a group of a few chunks in the blocks
    scheme takes minutes, and the progress line should move meanwhile, not jump when the group ends."""

    def __init__(self, total_bytes: int, total_tokens: int):
        self.total_bytes, self.per_token = total_bytes, total_bytes / max(1, total_tokens)
        self.tokens = self.shown = 0

    def __call__(self, tokens: int) -> None:
        self.tokens += tokens
        now = min(self.total_bytes, int(self.tokens * self.per_token))
        if now > self.shown:
            Progress.add("decoding", bytes=now - self.shown)
            self.shown = now

    def finish(self, items: int) -> None:
        """The group decoded: its chunks count, and the bytes not shown yet."""
        Progress.add("decoding", items=items, bytes=self.total_bytes - self.shown)
        self.shown = self.total_bytes


def chunk_name(doc_id: str, chunk_index: int) -> str:
    return f"chunk {chunk_index} of document {doc_id!r}"


def selected_for_verification(chunk: Chunk, fraction: float) -> bool:
    """A fixed sample, the same on every run and every machine: the chunks whose content hash falls
    under ``fraction``. Content, not document ids, picks them: default ids hold the input's path,
    which differs between checkouts and buckets."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return int.from_bytes(chunk.sha256[:8], "big") < fraction * 2**64


class VerifyPayloadsFn(beam.DoFn):
    def __init__(self, model_spec: str, device: str, trust_remote_code: bool, batch_rows: int,
                 expected_bytes: int = 0):
        self._spec, self._device, self._trust = model_spec, device, trust_remote_code
        self._batch_rows = batch_rows
        self._expected_bytes = expected_bytes

    def setup(self) -> None:
        Progress.expect(self._expected_bytes, stages=("decoding",))
        self._decoder = PayloadDecoder(self._spec, self._device, self._trust, self._batch_rows)
        self._ok = Metrics.counter(NAMESPACE, "payloads_verified")
        self._failed = Metrics.counter(NAMESPACE, "payloads_failed")
        self._failed_names = Metrics.string_set(NAMESPACE, "payloads_failed_chunks")
        # Model time of verification, apart from scoring's (run.json's ``job_metrics.model_seconds``).
        self._latency = Metrics.distribution(NAMESPACE, "verification_batch_latency_micro_secs")

    def process(self, batch: list[ScoredChunk]) -> Iterator[tuple[str, bool]]:
        names = [chunk_name(s.chunk.doc_id, s.chunk.chunk_index) for s in batch]
        t0 = time.perf_counter()
        decoded = self._decoder.decode([s.payload for s in batch], names, [s.recipe for s in batch],
                                       [s.chunk.data for s in batch])
        self._latency.update(int((time.perf_counter() - t0) * 1e6))
        for scored, name, got in zip(batch, names, decoded):
            if isinstance(got, bytes) and got == scored.chunk.data:
                self._ok.inc()
                yield name, True
            else:
                reason = str(got) if isinstance(got, PayloadError) else f"{name}: decoded bytes differ"
                log.error("payload verification failed: %s", reason)
                self._failed.inc()
                self._failed_names.add(name)
                yield name, False


MAX_VERIFY_BUCKETS = 4096


def _batches(keyed, size: int):
    """(key, iterable of chunks) -> lists of up to ``size`` chunks, in content-hash order within a list."""
    _, values = keyed
    batch = []
    for value in values:
        batch.append(value)
        if len(batch) == size:
            yield sorted(batch, key=lambda s: s.chunk.sha256)
            batch = []
    if batch:
        yield sorted(batch, key=lambda s: s.chunk.sha256)


def verification_buckets(fraction: float, input_bytes: int, chunk_bytes: int, batch_rows: int) -> int:
    """Keys per padded length for the verification sample: enough that each holds about one decode group
    of the expected sample, so groups fill up on a small corpus and spread over workers on a large one."""
    expected = fraction * input_bytes / max(1, chunk_bytes)
    return int(min(MAX_VERIFY_BUCKETS, max(1, expected // max(1, batch_rows))))


class VerifyPayloads(beam.PTransform):
    """Decodes a reproducible sample of the payloads and compares them with the chunks' bytes.

    The sample is keyed by (padded length, bucket of the content hash) and grouped, and each group is
    cut into decode groups of up to ``batch_rows`` chunks of one padded length whatever the bundles.
    The chunks' own bytes are the decoder's guesses (``PayloadDecoder.decode``'s ``expected``), so a
    group costs its padded length over ``hinted_width`` forwards, not one per couple of tokens. A key's
    values are iterated, never held whole, so memory stays at one decode group."""

    def __init__(self, model: ModelOptions, fraction: float, batch_rows: int = 64, buckets: int = 1,
                 input_bytes: int = 0):
        """``model``: the model that coded the payloads, and how it runs. Its ``accelerator`` is the Beam
        resource hint of the decode step under right fitting: payloads coded on a GPU decode only on that
        kind of device, so the step that runs the model goes where the scoring ran; picking and grouping
        the sample stay on CPU workers. ``input_bytes``: the listed input's size; ``fraction`` of it is
        what the progress line's decoding stage estimates its time left against."""
        super().__init__()
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"the verified fraction must be in [0, 1], got {fraction}")
        if batch_rows < 1 or buckets < 1:
            raise ValueError("batch_rows and buckets must be at least 1")
        if input_bytes < 0:
            raise ValueError(f"input_bytes must be at least 0, got {input_bytes}")
        self._fn = VerifyPayloadsFn(model.spec, model.device, model.trust_remote_code, batch_rows,
                                    int(fraction * input_bytes))
        self._fraction = fraction
        self._batch_rows = batch_rows
        self._buckets = buckets
        self._accelerator = model.accelerator

    def expand(self, scored):
        fraction, buckets = self._fraction, self._buckets
        decode = beam.ParDo(self._fn)
        if self._accelerator:
            decode = decode.with_resource_hints(accelerator=self._accelerator)
        return (
            scored
            | "PickSample" >> beam.Filter(lambda s: s.payload is not None
                                          and selected_for_verification(s.chunk, fraction))
            | "KeyByLength" >> beam.Map(
                lambda s: ((s.padded_length, int.from_bytes(s.chunk.sha256[8:12], "big") % buckets), s))
            | "Group" >> beam.GroupByKey()
            | "Batch" >> beam.FlatMap(_batches, self._batch_rows)
            | "Decode" >> decode
        )
