"""The payload format: a small binary header, then the range-coded bitstream.

Header, little-endian, 44 bytes (format version 2):

    magic "LMCA" | version u8 | method u8 | scheme u8 | precision u8 | dtype u8 | device u8
    | rows u16 | length u32 | block u16 | min_tokens u16 | bytes u32 | tokens u32 | crc32 u32
    | model fingerprint (first 8 bytes) | environment hash u32

``method`` 0 is model-coded; 1 is stored (the raw bytes follow), used for the
chunks a tokenizer cannot represent, so every chunk has a payload that
decodes exactly. ``scheme`` says how the coding logits were computed:

- ``forward`` (0): by the scoring forward over the chunk's padded ``length``;
  the decoder reproduces them by replaying windows (``coding.replay``).
  ``min_tokens`` is the least number of token rows every forward runs with
  (rows x positions); ``rows`` and ``block`` are 0, the decoder picks its own.
- ``blocks`` (1): the fallback when the device's kernels depend on shape:
  ``rows`` x ``block`` forwards of a fixed shape on both sides.

The environment hash covers everything else that changes the logits'
bits (``Recipe.bit_fields``); the full recipe sits as JSON in the payload
manifest's ``recipe`` column, so a mismatch can be named field by field.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass, fields

MAGIC = b"LMCA"
FORMAT_VERSION = 2
SCHEME_FORWARD, SCHEME_BLOCKS = "forward", "blocks"
SCHEME_CODES = {SCHEME_FORWARD: 0, SCHEME_BLOCKS: 1}
METHOD_MODEL, METHOD_STORED = 0, 1
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2, "bf16-autocast": 3}
DEVICE_CODES = {"cpu": 0, "cuda": 1, "mps": 2}
_HEADER = struct.Struct("<4sBBBBBBHIHHIII8sI")
HEADER_BYTES = _HEADER.size
METHOD_OFFSET = 5  # byte of the method code, for readers that only need it


class PayloadError(ValueError):
    """A payload that cannot be decoded here; the message says why and what to do."""


@dataclass(frozen=True)
class Recipe:
    """Everything that must match for a payload to decode; ``Recipe.here`` fills the environment part."""

    scheme: str
    precision: int
    dtype: str
    device: str  # device type: cpu, cuda
    device_name: str  # the GPU's name, or the CPU kernels' instruction set (torch's cpu capability)
    compute_capability: str  # CUDA only, else ""
    cuda: str  # CUDA runtime torch was built with, else ""
    cublas: str  # the cuBLAS wheel's version where one is installed, else ""
    torch: str
    transformers: str
    attention: str  # lmc_exact's version
    min_tokens: int
    rows: int  # blocks scheme only
    block: int  # blocks scheme only
    # MKL's reproducibility mode on CPU (``transforms.mkl_mode``); "" on GPUs, without MKL, and in the
    # recipes of payloads coded before lmc-audit recorded it (0.4.1 and earlier)
    blas_mode: str = ""

    def bit_fields(self) -> dict:
        """The fields whose change changes the logits' bits (all of them, today); ``blas_mode`` only when
        recorded, so that the hash in earlier payloads' headers still matches their recipes."""
        fields_ = asdict(self)
        if not self.blas_mode:
            del fields_["blas_mode"]
        return fields_

    def environment_hash(self) -> int:
        text = json.dumps(self.bit_fields(), sort_keys=True)
        return zlib.crc32(text.encode())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe | None":
        try:
            data = json.loads(text)
            data.setdefault("blas_mode", "")  # recipes written before it was recorded
            return cls(**{f.name: data[f.name] for f in fields(cls)})
        except (TypeError, ValueError, KeyError):
            return None

    def differences(self, other: "Recipe") -> list[str]:
        """'field: theirs vs ours' for every field that differs."""
        mine, theirs = asdict(self), asdict(other)
        return [f"{k} {theirs[k]!r} (here {mine[k]!r})" for k in mine if mine[k] != theirs[k]]

    @classmethod
    def here(cls, scheme: str, precision: int, dtype: str, device, min_tokens: int, rows: int = 0,
             block: int = 0) -> "Recipe":
        import torch
        import transformers

        from lmc_audit.transforms.mkl_mode import mkl_mode
        from lmc_audit.transforms.scoring.exact_attention import VERSION as ATTENTION

        device = torch.device(device)
        name, capability, cuda, cublas = torch.backends.cpu.get_cpu_capability(), "", "", ""
        blas = mkl_mode() if device.type == "cpu" else ""
        if device.type == "cuda":
            props = torch.cuda.get_device_properties(device)
            name, capability = props.name, f"{props.major}.{props.minor}"
            cuda = torch.version.cuda or ""
            cublas = _cublas_version()
        return cls(scheme, precision, dtype, device.type, name, capability, cuda, cublas, torch.__version__,
                   transformers.__version__, ATTENTION, min_tokens, rows, block, blas)


def _cublas_version() -> str:
    from importlib import metadata

    for dist in ("nvidia-cublas-cu13", "nvidia-cublas-cu12", "nvidia-cublas-cu11", "nvidia-cublas"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return "bundled"


@dataclass(frozen=True)
class Header:
    method: int
    scheme: str
    precision: int
    dtype: str
    device: str
    rows: int
    length: int
    block: int
    min_tokens: int
    n_bytes: int
    n_tokens: int
    crc32: int
    fingerprint: bytes
    environment: int


def pack(header: Header, body: bytes) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, header.method, SCHEME_CODES[header.scheme], header.precision,
                        DTYPE_CODES[header.dtype], DEVICE_CODES[header.device], header.rows, header.length,
                        header.block, header.min_tokens, header.n_bytes, header.n_tokens, header.crc32,
                        header.fingerprint[:8], header.environment) + body


def unpack(payload: bytes) -> tuple[Header, bytes]:
    if len(payload) < 6 or payload[:4] != MAGIC:
        raise PayloadError("not an lmc-audit payload (bad magic or too short): was it cut or overwritten?")
    if payload[4] != FORMAT_VERSION:
        raise PayloadError(f"payload format version {payload[4]}; this lmc-audit reads version {FORMAT_VERSION}: "
                           "decode it with the lmc-audit release that wrote it (0.1.x wrote version 1)")
    if len(payload) < HEADER_BYTES:
        raise PayloadError("payload shorter than its header: was it cut?")
    (_, _, method, scheme, precision, dtype, device, rows, length, block, min_tokens, n_bytes, n_tokens, crc, fp,
     env) = _HEADER.unpack_from(payload)
    dtypes = {v: k for k, v in DTYPE_CODES.items()}
    devices = {v: k for k, v in DEVICE_CODES.items()}
    schemes = {v: k for k, v in SCHEME_CODES.items()}
    if method not in (METHOD_MODEL, METHOD_STORED) or dtype not in dtypes or device not in devices \
            or scheme not in schemes:
        raise PayloadError("payload header is corrupt (unknown method, scheme, dtype or device code)")
    return Header(method, schemes[scheme], precision, dtypes[dtype], devices[device], rows, length, block,
                  min_tokens, n_bytes, n_tokens, crc, fp, env), payload[HEADER_BYTES:]


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def stored(data: bytes, fingerprint: str) -> bytes:
    """A payload that holds the chunk's bytes as they are (for chunks the model cannot code)."""
    header = Header(METHOD_STORED, SCHEME_FORWARD, 0, "float32", "cpu", 0, 0, 0, 0, len(data), 0, crc32(data),
                    bytes.fromhex(fingerprint), 0)
    return pack(header, data)
