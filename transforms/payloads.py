"""The payload format: a small binary header, then the range-coded bitstream.

Header, little-endian, 41 bytes:

    magic "LMCA" | version u8 | method u8 | precision u8 | dtype u8 | device u8
    | rows u16 | length u32 | block u16 | bytes u32 | tokens u32 | crc32 u32
    | model fingerprint (first 8 bytes) | environment hash u32

``method`` 0 is model-coded; 1 is stored (the raw bytes follow), used for the
chunks a tokenizer cannot represent, so every chunk has a payload that
decodes exactly. ``rows``, ``length`` and ``block`` are the fixed shapes the
chunk was coded in; the environment hash covers the library versions and
coding scheme that change logits (the full text sits in the payload
manifest's ``recipe`` column, for error messages).
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import asdict, dataclass

MAGIC = b"LMCA"
FORMAT_VERSION = 1
SCHEME = "block-static-kv/v1"
METHOD_MODEL, METHOD_STORED = 0, 1
DTYPE_CODES = {"float32": 0, "bfloat16": 1, "float16": 2, "bf16-autocast": 3}
DEVICE_CODES = {"cpu": 0, "cuda": 1, "mps": 2}
_HEADER = struct.Struct("<4sBBBBBHIHIII8sI")
HEADER_BYTES = _HEADER.size


class PayloadError(ValueError):
    """A payload that cannot be decoded here; the message says why and what to do."""


@dataclass(frozen=True)
class Recipe:
    """Everything that must match for a payload to decode."""

    precision: int
    dtype: str
    device: str  # device type: cpu, cuda
    rows: int
    block: int
    torch: str
    transformers: str
    scheme: str = SCHEME

    def environment_hash(self) -> int:
        text = f"scheme={self.scheme};torch={self.torch};transformers={self.transformers}"
        return zlib.crc32(text.encode())

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def current(cls, precision: int, dtype: str, device: str, rows: int, block: int) -> "Recipe":
        import torch
        import transformers

        return cls(precision, dtype, device, rows, block, torch.__version__, transformers.__version__)


@dataclass(frozen=True)
class Header:
    method: int
    precision: int
    dtype: str
    device: str
    rows: int
    length: int
    block: int
    n_bytes: int
    n_tokens: int
    crc32: int
    fingerprint: bytes
    environment: int


def pack(header: Header, body: bytes) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, header.method, header.precision, DTYPE_CODES[header.dtype],
                        DEVICE_CODES[header.device], header.rows, header.length, header.block, header.n_bytes,
                        header.n_tokens, header.crc32, header.fingerprint[:8], header.environment) + body


def unpack(payload: bytes) -> tuple[Header, bytes]:
    if len(payload) < HEADER_BYTES or payload[:4] != MAGIC:
        raise PayloadError("not an lmc-audit payload (bad magic or too short): was it cut or overwritten?")
    (_, version, method, precision, dtype, device, rows, length, block, n_bytes, n_tokens, crc, fp,
     env) = _HEADER.unpack_from(payload)
    if version != FORMAT_VERSION:
        raise PayloadError(f"payload format version {version}; this lmc-audit reads version {FORMAT_VERSION}: "
                           "decode it with the lmc-audit release that wrote it")
    dtypes = {v: k for k, v in DTYPE_CODES.items()}
    devices = {v: k for k, v in DEVICE_CODES.items()}
    if method not in (METHOD_MODEL, METHOD_STORED) or dtype not in dtypes or device not in devices:
        raise PayloadError("payload header is corrupt (unknown method, dtype or device code)")
    return Header(method, precision, dtypes[dtype], devices[device], rows, length, block, n_bytes, n_tokens, crc,
                  fp, env), payload[HEADER_BYTES:]


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def stored(data: bytes, fingerprint: str) -> bytes:
    """A payload that holds the chunk's bytes as they are (for chunks the model cannot code)."""
    header = Header(METHOD_STORED, 0, "float32", "cpu", 0, 0, 0, len(data), 0, crc32(data),
                    bytes.fromhex(fingerprint), 0)
    return pack(header, data)
