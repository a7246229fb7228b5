"""A range coder over (cumulative start, frequency) pairs, compiled with numba.

Why our own: the model's distribution is quantized on the device and only
the (start, frequency) of each actual token reaches the host. The
well-kept Python entropy coders take whole distributions (constriction's
``Categorical`` costs O(vocabulary) per symbol: about 15k symbols/s at
50,257) or fixed models; none takes (start, frequency) pairs, and a
pure-Python coder runs at well under 1M symbols/s. This one runs at tens of
millions of symbols/s whatever the vocabulary, because it never sees it.

Design (LZMA's range coder, widened): ``low`` is a 56-bit window in a
uint64 with a carry bit above it, ``range`` stays in [2^48, 2^56), so a total
of 2^precision (precision <= 32) loses at most 2^(precision-48) of the range
per symbol to integer division. Carries propagate through a cached byte and
a count of pending 0xFF bytes. The first byte LZMA writes is always 0 and is
not stored. ``finish`` picks, inside the final interval, the value with the
most trailing zero bytes and drops them: the decoder reads zeros past the end.
Overhead: about one to two bytes per stream.

The encoder writes through a callback-free preallocated buffer (numba
cannot call Python per byte cheaply); ``RangeEncoder`` wraps it with the
usual object interface and refuses use after ``finish()``.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from numba import njit

TOP_BITS = 56
TOP = np.uint64(1 << TOP_BITS)
BOT = np.uint64(1 << 48)
MASK = np.uint64((1 << TOP_BITS) - 1)
MAX_PRECISION = 32


@njit(cache=True)
def _shift_low(low, cache, pending, out, n):
    # Returns (low, cache, pending, n).
    if low < np.uint64(0xFF << 48) or low >= np.uint64(1 << 56):
        carry = np.uint8(low >> np.uint64(56))
        out[n] = np.uint8(cache + carry)
        n += 1
        for _ in range(pending):
            out[n] = np.uint8((0xFF + carry) & 0xFF)
            n += 1
        pending = 0
        cache = np.uint8((low >> np.uint64(48)) & np.uint64(0xFF))
    else:
        pending += 1
    low = (low << np.uint64(8)) & np.uint64((1 << 56) - 1)
    return low, cache, pending, n


@njit(cache=True)
def _encode(starts, freqs, count, precision, out):
    """Codes ``count`` symbols; returns the number of bytes written to ``out``."""
    low = np.uint64(0)
    rng = np.uint64((1 << 56) - 1)
    cache = np.uint8(0)
    pending = 0
    n = 0
    shift = np.uint64(precision)
    for i in range(count):
        r = rng >> shift
        low += r * np.uint64(starts[i])
        rng = r * np.uint64(freqs[i])
        while rng < np.uint64(1 << 48):
            rng <<= np.uint64(8)
            low, cache, pending, n = _shift_low(low, cache, pending, out, n)
    # The value in [low, low + rng) with the most trailing zero bytes.
    for k in (56, 48):
        step = np.uint64(1) << np.uint64(k)
        v = (low + step - np.uint64(1)) & ~(step - np.uint64(1))
        if v - low < rng:
            low = v
            break
    for _ in range(8):
        low, cache, pending, n = _shift_low(low, cache, pending, out, n)
    # Byte 0 is LZMA's leading zero; trailing zeros are implied.
    while n > 1 and out[n - 1] == 0:
        n -= 1
    return n


@njit(cache=True)
def encode_batch(starts, freqs, counts, precision, out, out_lengths):
    """Row b codes starts[b, :counts[b]]; its bytes land in out[b, 1:out_lengths[b]+1]."""
    for b in range(starts.shape[0]):
        n = _encode(starts[b], freqs[b], counts[b], precision, out[b])
        out_lengths[b] = n - 1


@njit(cache=True)
def _next_byte(data, pos, end):
    if pos < end:
        return np.uint64(data[pos])
    return np.uint64(0)


@njit(cache=True)
def decoder_init(data, offsets, ends, code, rng, pos):
    """Starts one decoder per stream; stream b is data[offsets[b]:ends[b]]."""
    for b in range(offsets.shape[0]):
        c = np.uint64(0)
        p = offsets[b]
        for _ in range(7):
            c = (c << np.uint64(8)) | _next_byte(data, p, ends[b])
            p += 1
        code[b] = c
        rng[b] = np.uint64((1 << 56) - 1)
        pos[b] = p


@njit(cache=True)
def decoder_slots(code, rng, precision, slots):
    """The slot in [0, 2^precision) each decoder points at; the caller maps it to a symbol."""
    shift = np.uint64(precision)
    top = np.uint64((1 << precision) - 1)
    for b in range(code.shape[0]):
        s = code[b] // (rng[b] >> shift)
        slots[b] = np.int64(min(s, top))


@njit(cache=True)
def decoder_advance(data, ends, code, rng, pos, starts, freqs, precision, active):
    """Consumes one symbol (start, freq) per active decoder. Returns False on an impossible state."""
    shift = np.uint64(precision)
    ok = True
    for b in range(code.shape[0]):
        if not active[b]:
            continue
        r = rng[b] >> shift
        low = r * np.uint64(starts[b])
        if code[b] < low:
            ok = False
            continue
        c = code[b] - low
        g = r * np.uint64(freqs[b])
        p = pos[b]
        while g < np.uint64(1 << 48):
            c = ((c << np.uint64(8)) | _next_byte(data, p, ends[b])) & np.uint64((1 << 56) - 1)
            p += 1
            g <<= np.uint64(8)
        code[b] = c
        rng[b] = g
        pos[b] = p
    return ok


@njit(cache=True)
def _one_decoder(data):
    """State arrays of a single decoder over ``data``, for the one-stream helpers below."""
    offsets = np.zeros(1, np.int64)
    ends = np.full(1, data.shape[0], np.int64)
    code = np.zeros(1, np.uint64)
    rng = np.zeros(1, np.uint64)
    pos = np.zeros(1, np.int64)
    decoder_init(data, offsets, ends, code, rng, pos)
    return ends, code, rng, pos, np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.int64), \
        np.ones(1, np.bool_)


@njit(cache=True)
def decode_with_cdfs(data, cdfs, precision, symbols):
    """Decodes len(symbols) symbols of one stream, symbol i under cdfs[i] (V+1 cumulative counts)."""
    ends, code, rng, pos, slots, st, fr, active = _one_decoder(data)
    for i in range(symbols.shape[0]):
        decoder_slots(code, rng, precision, slots)
        cdf = cdfs[i]
        s = np.searchsorted(cdf, slots[0], side="right") - 1
        symbols[i] = s
        st[0] = cdf[s]
        fr[0] = cdf[s + 1] - cdf[s]
        if not decoder_advance(data, ends, code, rng, pos, st, fr, precision, active):
            return False
    return True


@njit(cache=True)
def decode_known(data, starts, freqs, precision):
    """Range-decodes a stream whose symbols' (start, freq) are known, checking each slot; the host-side
    cost of decoding (the model finds the symbol from the slot). Returns the number of symbols that matched."""
    ends, code, rng, pos, slots, st, fr, active = _one_decoder(data)
    for i in range(starts.shape[0]):
        decoder_slots(code, rng, precision, slots)
        if not (starts[i] <= slots[0] < starts[i] + freqs[i]):
            return i
        st[0] = starts[i]
        fr[0] = freqs[i]
        decoder_advance(data, ends, code, rng, pos, st, fr, precision, active)
    return starts.shape[0]


def _check(starts: np.ndarray, freqs: np.ndarray, precision: int) -> None:
    if not 1 <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be 1..{MAX_PRECISION} bits, got {precision}")
    if starts.size and (freqs.min() < 1 or starts.min() < 0 or (starts + freqs).max() > (1 << precision)):
        raise ValueError("every symbol needs freq >= 1 and start + freq <= 2**precision; "
                         "quantize the distribution with lmc_audit.transforms.coding.quantize first")


def encode(starts, freqs, precision: int) -> bytes:
    """One stream of symbols given as (start, freq) under a total of 2**precision."""
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    freqs = np.ascontiguousarray(freqs, dtype=np.int64)
    _check(starts, freqs, precision)
    out = np.zeros(len(starts) * 5 + 16, np.uint8)
    n = _encode(starts, freqs, len(starts), precision, out)
    return out[1:n].tobytes()


def encode_rows(starts: np.ndarray, freqs: np.ndarray, counts: np.ndarray, precision: int) -> list[bytes]:
    """Many streams at once: row b codes its first counts[b] symbols."""
    starts = np.ascontiguousarray(starts, dtype=np.int64)
    freqs = np.ascontiguousarray(freqs, dtype=np.int64)
    counts = np.ascontiguousarray(counts, dtype=np.int64)
    for b in range(starts.shape[0]):
        _check(starts[b, :counts[b]], freqs[b, :counts[b]], precision)
    out = np.zeros((starts.shape[0], starts.shape[1] * 5 + 16), np.uint8)
    lengths = np.zeros(starts.shape[0], np.int64)
    encode_batch(starts, freqs, counts, precision, out, lengths)
    return [out[b, 1:lengths[b] + 1].tobytes() for b in range(starts.shape[0])]


def decode(data: bytes, cdfs: np.ndarray, precision: int) -> np.ndarray:
    """Decodes len(cdfs) symbols, symbol i under cumulative counts cdfs[i] (length V+1, ending at 2**precision)."""
    cdfs = np.ascontiguousarray(cdfs, dtype=np.int64)
    symbols = np.zeros(cdfs.shape[0], np.int64)
    if not decode_with_cdfs(np.frombuffer(data, np.uint8), cdfs, precision, symbols):
        raise ValueError("the bitstream is corrupt: it points outside every symbol's interval")
    return symbols


class RangeDecoders:
    """Decoders for many streams stepped together, for model-driven decoding.

    Each step: ``slots()`` -> the caller turns each slot into (symbol, start,
    freq) under the model's quantized distribution -> ``advance(starts, freqs)``.
    """

    def __init__(self, streams: list[bytes], precision: int):
        lengths = np.array([len(s) for s in streams], np.int64)
        self.data = np.frombuffer(b"".join(streams) or b"\0", np.uint8)
        self.offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        self.ends = self.offsets + lengths
        self.precision = precision
        n = len(streams)
        self.code = np.zeros(n, np.uint64)
        self.range = np.zeros(n, np.uint64)
        self.pos = np.zeros(n, np.int64)
        self._slots = np.zeros(n, np.int64)
        decoder_init(self.data, self.offsets, self.ends, self.code, self.range, self.pos)

    def slots(self) -> np.ndarray:
        decoder_slots(self.code, self.range, self.precision, self._slots)
        return self._slots.copy()

    def advance(self, starts: np.ndarray, freqs: np.ndarray, active: np.ndarray) -> None:
        ok = decoder_advance(self.data, self.ends, self.code, self.range, self.pos,
                             np.ascontiguousarray(starts, np.int64), np.ascontiguousarray(freqs, np.int64),
                             self.precision, np.ascontiguousarray(active, np.bool_))
        if not ok:
            raise ValueError("a bitstream is corrupt: it points outside every symbol's interval")


class RangeEncoder:
    """Symbol-at-a-time interface: ``encode(start, freq)``, then ``finish()`` once."""

    def __init__(self, precision: int):
        if not 1 <= precision <= MAX_PRECISION:
            raise ValueError(f"precision must be 1..{MAX_PRECISION} bits, got {precision}")
        self.precision = precision
        self._starts: list[int] = []
        self._freqs: list[int] = []
        self._finished = False

    def encode(self, start: int, freq: int) -> None:
        if self._finished:
            raise RuntimeError("this RangeEncoder has finished; make a new one for another stream")
        if freq < 1 or start < 0 or start + freq > (1 << self.precision):
            raise ValueError(f"(start={start}, freq={freq}) is not inside a total of 2**{self.precision}")
        self._starts.append(start)
        self._freqs.append(freq)

    def finish(self) -> bytes:
        if self._finished:
            raise RuntimeError("finish() was already called")
        self._finished = True
        return encode(np.array(self._starts, np.int64), np.array(self._freqs, np.int64), self.precision)


def warm(precision: int = 24) -> None:
    """Compiles (or loads from numba's cache) every kernel a job calls, through the same entry points and
    argument types as the job, so the cache entries it writes are the ones the job looks up."""
    rng = np.random.default_rng(0)
    freqs = rng.integers(1, 1 << (precision - 8), size=(2, 16), dtype=np.int64)
    starts = rng.integers(0, (1 << precision) - freqs.max(), size=(2, 16), dtype=np.int64)
    streams = encode_rows(starts, freqs, np.array([16, 8], np.int64), precision)
    decoders = RangeDecoders(streams, precision)
    for i in range(8):
        decoders.slots()
        decoders.advance(starts[:, i], freqs[:, i], np.ones(2, np.bool_))


_WARMING = False


def warm_in_background() -> subprocess.Popen | None:
    """Fills numba's on-disk cache from a second process while this one builds and starts the job.

    Why: the first job after an install compiles these kernels (2.2 s on one core here, measured) on the
    job's critical path, in the middle of scoring; a helper process started at launch does it on an
    idle core during the job's own imports and model load, and the job then loads the cached kernels
    (numba writes cache files atomically, so a job that gets there first only compiles them itself).
    Returns the process (the caller may wait for it), or None where it could not start or one was
    already started by this process."""
    global _WARMING
    if _WARMING:
        return None
    _WARMING = True
    try:
        return subprocess.Popen([sys.executable, "-c", "from lmc_audit.transforms.coding.range_coder import warm; warm()"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None
