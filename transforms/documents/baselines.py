"""Classical compressors on the same chunks the model compresses.

zlib level 9, zstd level 19 and xz preset 9 each compress every chunk on its
own, as in the reference paper's chunked baselines, so their bits compare
with the model's bits byte for byte. xz keeps its container (as the ``xz``
tool writes it). Its dictionary is sized to the chunk: LZMA's output does not
depend on a dictionary larger than the input, but setting up a 64 MiB one per
chunk would dominate the cost.
"""

from __future__ import annotations

import lzma
import zlib

import zstandard


class BaselineCompressors:
    def __init__(self) -> None:
        self._zstd = zstandard.ZstdCompressor(level=19)

    def sizes(self, data: bytes) -> tuple[int, int, int]:
        """Compressed sizes in bytes: (zlib -9, zstd -19, xz -9)."""
        dict_size = max(4096, 1 << (max(len(data), 1) - 1).bit_length())
        xz = lzma.compress(data, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64,
                           filters=[{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": min(dict_size, 64 << 20)}])
        return len(zlib.compress(data, 9)), len(self._zstd.compress(data)), len(xz)
