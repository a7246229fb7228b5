"""Encode chunks from the scoring forward; decode them by replaying it bit for bit.

A payload decodes only when the decoder sees the encoder's logits bit for
bit (a 1e-6 difference in one entry of a 50k-entry table breaks it). Two
schemes, both recorded in every payload (``payloads``):

**forward** (the default). The encoder *is* the scoring forward: one
teacher-forced forward over the chunk's padded length L, logits quantized
on the device, only (start, freq) of each real token to the host range
coder. The decoder replays it in windows: each row runs K positions from
its first undecoded one, with the keys and values of the positions before
it in a ``ReplayCache``; the window's logits at a position whose inputs
are all known equal the scoring forward's there, so that token decodes;
inputs after it are *guesses* (below), and each position whose guess turns
out right decodes too. A wrong guess costs lookahead, never a wrong bit:
logits at a position never depend on what stands after it.

The shape rule that makes window logits equal the full forward's
(measured, README "The determinism contract", tested on a grid):
attention through ``exact_attention`` (keys cut to a multiple of 512 or
the whole padded length; a window of at least 4 positions), and every
forward, scoring or window, runs at least ``min_tokens`` token rows
(rows x positions), because the CPU matmul kernels round rows of a small
call (fewer than 16 rows here) differently from rows of a large one; and,
on CPU, MKL in strict reproducibility mode (``lmc_audit.transforms`` sets
``MKL_CBWR``), without which some CPUs round mid-sized calls by thread
count too. The encoder adds zero rows to a forward that would be smaller;
the decoder widens its windows (or adds rows). The model handler checks the
rule at load on the device in use and falls back to **blocks** where it fails.

**blocks** (the fallback, the pre-0.2 design): encoder and decoder run the
very same shapes, ``rows`` x ``block`` aligned windows in a cache of L,
so nothing depends on kernels being shape-invariant; it costs L / block
forwards to encode.

Guesses (``NgramGuesser``): where the decoded text ends in an 8-token run
seen earlier, the tokens that followed it (prompt-lookup decoding, strong
on repeated text); else a chain from counts of what followed each 6-, 4-,
3-, 2- and 1-token context in everything decoded so far; else the window's
own argmax at the next positions (Jacobi decoding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lmc_audit.transforms.coding import range_coder
from lmc_audit.transforms.scoring.exact_attention import ReplayCache, replay
from lmc_audit.transforms.coding.quantize import MAX_TABLE_ENTRIES, quantize, pick
from lmc_audit.transforms.scoring.tokenization import teacher_forcing

LN2 = math.log(2.0)
MIN_TOKENS = 16  # default least token rows per forward (see the shape rule above)
MIN_WINDOW = 4
HINTED_WINDOW = 64  # widest window of a decode whose expected tokens are known: the load-time check's wide ones
HINTED_TOKENS = 1024  # token rows of such a forward: [rows, heads, window, keys] attention scores stay small


def hinted_width(rows: int) -> int:
    """Window of a decode with expected tokens: up to ``HINTED_WINDOW``, at most ``HINTED_TOKENS`` token rows."""
    return max(MIN_WINDOW, min(HINTED_WINDOW, HINTED_TOKENS // max(1, rows)) // MIN_WINDOW * MIN_WINDOW)


def rows_for(rows: int, length: int, min_tokens: int) -> int:
    """Rows a forward of ``rows`` chunks of ``length`` positions runs with: zero rows added up to the rule."""
    return max(rows, -(-min_tokens // length))


def expected_inputs(expected: Sequence[np.ndarray | None] | None, streams: int, rows: int, length: int,
                    start_id: int, pad_id: int) -> tuple[list[np.ndarray | None], np.ndarray]:
    """(each row's expected tokens or None, [rows, length] inputs): the start token, then each row's expected
    tokens as its guesses (a decoder's inputs after what it has decoded are guesses), else padding."""
    hints: list[np.ndarray | None] = [None] * rows
    if expected is not None:
        if len(expected) != streams:
            raise ValueError(f"{len(expected)} expected token rows for {streams} streams")
        hints[:streams] = [None if e is None else np.asarray(e, np.int64)[:length] for e in expected]
    inputs = np.full((rows, length), pad_id, np.int64)
    inputs[:, 0] = start_id
    for r, hint in enumerate(hints):
        if hint is not None:
            inputs[r, 1:1 + len(hint[:length - 1])] = hint[:length - 1]
    return hints, inputs


def hint_holds(hint: np.ndarray | None, decoded: np.ndarray, first: int) -> bool:
    """Whether a row's expected tokens still agree with what it decoded, up to input ``first``: checked at
    the last decoded token only, since a disagreement stops the row's forward there and drops the hint."""
    return hint is not None and len(hint) >= first and decoded[first - 2] == hint[first - 2]


def scoring_logits(model, inputs: torch.Tensor, min_tokens: int) -> torch.Tensor:
    """[R, L] inputs -> [R, L, V] logits of the plain teacher-forced forward, run with at least
    ``min_tokens`` token rows (zero rows added and dropped)."""
    rows, length = inputs.shape
    total = rows_for(rows, length, min_tokens)
    if total > rows:
        inputs = torch.cat([inputs, inputs.new_zeros(total - rows, length)])
    return model(input_ids=inputs, use_cache=False).logits[:rows]


def code_symbols(logits: torch.Tensor, targets: torch.Tensor, precision: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, L, V] logits, [R, L] targets -> [R, L] (start, freq) of each target, on the device.

    Sliced over rows and positions so the int64 tables stay under ``MAX_TABLE_ENTRIES``; each
    position's table depends on its own logits only, so slicing never changes a value."""
    rows, length, vocab = logits.shape
    step = max(1, MAX_TABLE_ENTRIES // vocab)
    starts = torch.empty((rows, length), dtype=torch.int64, device=logits.device)
    freqs = torch.empty_like(starts)
    flat_logits, flat_targets = logits.reshape(-1, vocab), targets.reshape(-1)
    flat_s, flat_f = starts.view(-1), freqs.view(-1)
    for a in range(0, rows * length, step):
        b = min(a + step, rows * length)
        flat_s[a:b], flat_f[a:b] = pick(quantize(flat_logits[a:b], precision), flat_targets[a:b])
    return starts, freqs


def encode_streams(starts: np.ndarray, freqs: np.ndarray, counts: list[int], precision: int) -> list[bytes]:
    """Host side: one bitstream per row from its first ``counts[r]`` (start, freq) pairs."""
    return range_coder.encode_rows(starts, freqs, np.asarray(counts, np.int64), precision)


@dataclass
class DecodeStats:
    """Forwards run and tokens decoded: tokens / (forwards x live rows) is the acceptance."""

    forwards: int = 0
    row_forwards: int = 0  # sum over forwards of the rows still decoding
    tokens: int = 0
    guessed: dict = field(default_factory=lambda: {"expected": 0, "lookup": 0, "argmax": 0})

    @property
    def tokens_per_row_forward(self) -> float:
        return self.tokens / self.row_forwards if self.row_forwards else 0.0

    def add(self, other: "DecodeStats") -> None:
        self.forwards += other.forwards
        self.row_forwards += other.row_forwards
        self.tokens += other.tokens
        for k, v in other.guessed.items():
            self.guessed[k] = self.guessed.get(k, 0) + v


class NgramGuesser:
    """Guesses from what the decoder has decoded so far, shared by every row and group it decodes.

    Two sources, as in prompt-lookup and n-gram speculative decoding: the continuation of the latest
    earlier occurrence of the row's last ``LONG_MATCH`` tokens (exact repeats), else a greedy chain from
    counts of which token followed each context of ``ORDERS`` tokens (backing off to shorter contexts).
    The counts persist across groups, so a long decode learns the corpus it decodes. Memory is bounded:
    the tokens of the latest ``MAX_ROWS`` rows are kept, and the tables start afresh past
    ``MAX_CONTEXTS`` entries (Python dicts of tuples: about 120 MiB at 150,000 contexts, measured on
    source code). Only rows decoded without expected tokens use it (``lmc-audit decode``).
    """

    LONG_MATCH = 8
    ORDERS = (6, 4, 3, 2, 1)
    MAX_ROWS = 512
    MAX_CONTEXTS = 200_000

    def __init__(self):
        self.rows: dict[int, list[int]] = {}
        self.latest: dict[tuple, tuple[int, int]] = {}  # long n-gram -> (row key, index after it)
        self.best: dict[tuple, int] = {}  # context -> most frequent next token
        self.counts: dict[tuple, dict[int, int]] = {}
        self._next_key = 0

    def start(self) -> int:
        """A new row; returns its key."""
        key = self._next_key
        self._next_key += 1
        self.rows[key] = []
        while len(self.rows) > self.MAX_ROWS:
            del self.rows[next(iter(self.rows))]
        if len(self.counts) > self.MAX_CONTEXTS:
            self.counts.clear()
            self.best.clear()
        if len(self.latest) > self.MAX_CONTEXTS:
            self.latest.clear()
        return key

    def push(self, key: int, token: int) -> None:
        tokens = self.rows[key]
        tokens.append(token)
        end = len(tokens)
        n = self.LONG_MATCH
        if end > n:
            self.latest[tuple(tokens[end - 1 - n:end - 1])] = (key, end - 1)
        for n in self.ORDERS:
            if end > n:
                ctx = tuple(tokens[end - 1 - n:end - 1])
                seen = self.counts.setdefault(ctx, {})
                seen[token] = seen.get(token, 0) + 1
                if seen[token] >= seen.get(self.best.get(ctx, token), 0):
                    self.best[ctx] = token

    def guess(self, key: int, count: int) -> list[int]:
        tokens = self.rows[key]
        end = len(tokens)
        n = self.LONG_MATCH
        if end >= n:
            hit = self.latest.get(tuple(tokens[end - n:]))
            if hit is not None and hit[0] in self.rows:
                found = self.rows[hit[0]][hit[1]:hit[1] + count]
                if found:
                    return found
        out: list[int] = []
        context = tokens[-max(self.ORDERS):]
        for _ in range(count):
            for n in self.ORDERS:
                if len(context) >= n:
                    nxt = self.best.get(tuple(context[len(context) - n:]))
                    if nxt is not None:
                        break
            else:
                break
            out.append(nxt)
            context = (context + [nxt])[-max(self.ORDERS):]
        return out


class ReplayDecoder:
    """Decodes payloads of the **forward** scheme by replaying the scoring forward in windows."""

    def __init__(self, model, device: torch.device, precision: int, min_tokens: int, start_id: int, pad_id: int,
                 window: int = 4, guesser: NgramGuesser | None = None):
        if window < MIN_WINDOW:
            raise ValueError(f"a replay window holds at least {MIN_WINDOW} positions, got {window}")
        self.model, self.device, self.precision = model, device, precision
        self.min_tokens, self.start_id, self.pad_id, self.window = min_tokens, start_id, pad_id, window
        self.guesser = guesser or NgramGuesser()

    def shape(self, rows: int, length: int) -> tuple[int, int]:
        """(rows, window) of every forward for ``rows`` chunks of ``length``: at least ``min_tokens`` token rows."""
        width = max(self.window, -(-self.min_tokens // rows))
        width = min(length, -(-width // MIN_WINDOW) * MIN_WINDOW)
        return max(rows, -(-self.min_tokens // width)), width

    @torch.inference_mode()
    def decode(self, streams: list[bytes], n_tokens: list[int], length: int,
               expected: Sequence[np.ndarray | None] | None = None,
               progress: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], DecodeStats]:
        """Token ids of each stream. ``expected``: the tokens each row should decode to, when known (a
        verifier has the chunk): they are the guesses, in windows of ``hinted_width`` positions. Every
        token is still decoded from the stream, and each guess is checked against it, so the result is
        the same as without them; right guesses only let one forward decode a whole window.
        ``progress``: called after each forward with the tokens it decoded (a long group shows movement)."""
        if not streams:
            return [], DecodeStats()
        if max(n_tokens) > length:
            raise ValueError(f"a payload says {max(n_tokens)} tokens but was coded in {length} positions")
        if length < MIN_WINDOW:
            raise ValueError(f"padded length {length} is shorter than a replay window ({MIN_WINDOW})")
        real = len(streams)
        rows, width = self.shape(real, length)
        hints, inputs = expected_inputs(expected, real, rows, length, self.start_id, self.pad_id)
        if expected is not None:
            width = min(length, max(width, hinted_width(rows)))
        n = np.zeros(rows, np.int64)
        n[:real] = n_tokens
        decoders = range_coder.RangeDecoders(list(streams) + [b""] * (rows - real), self.precision)
        out = np.zeros((rows, length), np.int64)
        known = np.zeros(rows, np.int64)  # targets decoded per row; inputs up to position known[r] are exact
        # A row decoded against expected tokens has its guesses already: it neither teaches the n-gram
        # tables nor asks them (a verifier's sample would fill them to their cap, about 120 MiB of dicts
        # for 270 chunks of source code, for guesses it never uses).
        keys = [None if hints[r] is not None else self.guesser.start() for r in range(rows)]
        cache = ReplayCache(rows, length, self.device)
        stats = DecodeStats()
        reported = 0
        offsets = np.arange(width)
        with replay(cache):
            while np.any(known < n):
                live = known < n
                starts = np.minimum(known, length - width)
                index = cache.window(torch.from_numpy(starts), width)
                window_in = torch.from_numpy(np.take_along_axis(inputs, starts[:, None] + offsets, 1)).to(self.device)
                logits = self.model(input_ids=window_in, position_ids=index, use_cache=False).logits  # [R, W, V]
                stats.forwards += 1
                stats.row_forwards += int(live.sum())
                upper = torch.cumsum(quantize(logits, self.precision), dim=-1)  # [R, W, V]
                for i in range(width):
                    act = live & (known == starts + i)
                    if not act.any():
                        if not (live & (known > starts + i)).any():
                            break
                        continue
                    slots = torch.from_numpy(decoders.slots()).to(self.device)
                    col = upper[:, i].contiguous()
                    symbols = torch.searchsorted(col, slots.unsqueeze(-1), right=True).squeeze(-1)
                    symbols = symbols.clamp_max(col.shape[-1] - 1)
                    hi = col.gather(-1, symbols.unsqueeze(-1)).squeeze(-1)
                    lo = torch.where(symbols > 0, col.gather(-1, (symbols - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1),
                                     torch.zeros_like(hi))
                    sym, lo, hi = symbols.cpu().numpy(), lo.cpu().numpy(), hi.cpu().numpy()
                    decoders.advance(lo, hi - lo, act)
                    for r in np.flatnonzero(act):
                        y = int(sym[r])
                        out[r, known[r]] = y
                        if keys[r] is not None:
                            self.guesser.push(keys[r], y)
                        known[r] += 1
                        stats.tokens += 1
                        j = known[r]  # the input position the decoded token feeds
                        if j < length:
                            if j < starts[r] + width and inputs[r, j] != y:
                                live[r] = False  # positions after j saw a wrong guess
                            inputs[r, j] = y
                        if known[r] >= n[r]:
                            live[r] = False
                    if not live.any():
                        break
                self._guess(inputs, out, known, n, starts, width, logits, keys, stats, hints)
                if progress is not None:
                    progress(int(known.sum()) - reported)
                    reported = int(known.sum())
        return [out[r, :n[r]].copy() for r in range(real)], stats

    def _guess(self, inputs, out, known, n, starts, width, logits, keys, stats, hints) -> None:
        length = inputs.shape[1]
        argmax = None
        for r in np.flatnonzero(known < n):
            first = int(known[r]) + 1  # inputs[first:] are unknown
            count = min(width - 1, length - first)
            if count <= 0:
                continue
            if hint_holds(hints[r], out[r], first):
                stats.guessed["expected"] += 1
                continue  # the expected tokens still hold: the inputs ahead are already them
            hints[r] = None  # none, or the row decodes to something else (a failed check): other guesses
            guess = self.guesser.guess(keys[r], count) if keys[r] is not None else []
            if guess:
                stats.guessed["lookup"] += 1
            else:
                # Jacobi: this window's argmax at positions first-1.. predicted the inputs at first..
                if argmax is None:
                    argmax = logits.argmax(-1).cpu().numpy()
                a = first - 1 - int(starts[r])
                guess = argmax[r, a:a + count].tolist() if 0 <= a < width else []
                stats.guessed["argmax"] += 1
            inputs[r, first:first + len(guess)] = guess


class BlockCoder:
    """The **blocks** scheme: encoder and decoder run the same ``rows`` x ``block`` aligned windows."""

    def __init__(self, model, device: torch.device, precision: int, rows: int, block: int, start_id: int,
                 pad_id: int):
        self.model, self.device, self.precision = model, device, precision
        self.rows, self.block, self.start_id, self.pad_id = rows, block, start_id, pad_id

    def _forward(self, cache: ReplayCache, inputs: torch.Tensor, start: int) -> torch.Tensor:
        index = cache.window(torch.full((self.rows,), start, dtype=torch.int64), self.block)
        return self.model(input_ids=inputs, position_ids=index, use_cache=False).logits

    @torch.inference_mode()
    def encode(self, group_targets: list[np.ndarray], length: int) -> tuple[list[bytes], np.ndarray]:
        """Bitstreams of up to ``rows`` chunks sharing ``length``, and [R, L] log p(target) (nats)."""
        if not 0 < len(group_targets) <= self.rows:
            raise ValueError(f"a group holds 1..{self.rows} chunks, got {len(group_targets)}")
        if length % self.block:
            raise ValueError(f"padded length {length} is not a multiple of the block {self.block}")
        inputs, targets = (torch.from_numpy(a).to(self.device) for a in
                           teacher_forcing(group_targets, self.rows, length, self.start_id, self.pad_id))
        cache = ReplayCache(self.rows, length, self.device)
        starts = torch.empty((self.rows, length), dtype=torch.int64, device=self.device)
        freqs = torch.empty_like(starts)
        logp = torch.empty((self.rows, length), dtype=torch.float32, device=self.device)
        with replay(cache):
            for s in range(0, length, self.block):
                logits = self._forward(cache, inputs[:, s:s + self.block], s).float()
                tgt = targets[:, s:s + self.block]
                starts[:, s:s + self.block], freqs[:, s:s + self.block] = code_symbols(logits, tgt, self.precision)
                logp[:, s:s + self.block] = (logits.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
                                             - torch.logsumexp(logits, dim=-1))
        counts = [len(t) for t in group_targets] + [0] * (self.rows - len(group_targets))
        streams = encode_streams(starts.cpu().numpy(), freqs.cpu().numpy(), counts, self.precision)
        return streams[:len(group_targets)], logp.cpu().numpy()

    @torch.inference_mode()
    def decode(self, streams: list[bytes], n_tokens: list[int], length: int,
               expected: Sequence[np.ndarray | None] | None = None,
               progress: Callable[[int], None] | None = None) -> tuple[list[np.ndarray], DecodeStats]:
        """Token ids of each stream; ``expected`` and ``progress`` as in ``ReplayDecoder.decode``. A row's
        expected tokens are its guesses inside each block while they agree with what it decodes (else the
        block's argmax): right ones decode a whole block per forward, as the encoder coded it, so a
        verifier's decode costs about the encoder's L / block forwards instead of one per token."""
        if not 0 < len(streams) <= self.rows:
            raise ValueError(f"a group holds 1..{self.rows} chunks, got {len(streams)}")
        n = np.zeros(self.rows, np.int64)
        n[:len(streams)] = n_tokens
        if n.max() > length:
            raise ValueError(f"a payload says {n.max()} tokens but was coded in {length} positions")
        hints, inputs = expected_inputs(expected, len(streams), self.rows, length, self.start_id, self.pad_id)
        decoders = range_coder.RangeDecoders(list(streams) + [b""] * (self.rows - len(streams)), self.precision)
        out = np.zeros((self.rows, length), np.int64)
        known = np.zeros(self.rows, np.int64)
        cache = ReplayCache(self.rows, length, self.device)
        stats = DecodeStats()
        reported = 0
        K = self.block
        with replay(cache):
            for s in range(0, length, K):
                end = np.minimum(n, s + K)
                if np.all(known >= n):
                    break
                while np.any(known < end):
                    logits = self._forward(cache, torch.from_numpy(inputs[:, s:s + K].copy()).to(self.device), s)
                    stats.forwards += 1
                    live = known < end
                    stats.row_forwards += int(live.sum())
                    for j in range(int(known[live].min()), s + K):
                        act = live & (known == j)
                        if not act.any():
                            if not (live & (known > j)).any():
                                break
                            continue
                        freqs = quantize(logits[:, j - s], self.precision)
                        upper = torch.cumsum(freqs, dim=-1)
                        slots = torch.from_numpy(decoders.slots()).to(self.device)
                        symbols = torch.searchsorted(upper, slots.unsqueeze(-1), right=True).squeeze(-1)
                        symbols = symbols.clamp_max(upper.shape[-1] - 1)
                        st, fr = pick(freqs, symbols)
                        sym, st, fr = symbols.cpu().numpy(), st.cpu().numpy(), fr.cpu().numpy()
                        decoders.advance(st, fr, act)
                        for r in np.flatnonzero(act):
                            y = sym[r]
                            out[r, j] = y
                            known[r] = j + 1
                            stats.tokens += 1
                            if j + 1 < length:
                                if j + 1 < s + K and inputs[r, j + 1] != y:
                                    live[r] = False
                                inputs[r, j + 1] = y
                            if known[r] >= end[r]:
                                live[r] = False
                        if not live.any():
                            break
                    guesses = None
                    for r in np.flatnonzero(known < end):
                        first = int(known[r]) + 1  # inputs[first:] are unknown
                        if first >= s + K:
                            continue
                        if hint_holds(hints[r], out[r], first):
                            stats.guessed["expected"] += 1
                            continue  # the expected tokens still hold: the inputs ahead are already them
                        hints[r] = None  # the row decodes to something else: the block's argmax from here
                        if guesses is None:
                            guesses = logits.argmax(-1).cpu().numpy()
                        inputs[r, first:s + K] = guesses[r, first - 1 - s:K - 1]
                        stats.guessed["argmax"] += 1
                    if progress is not None:
                        progress(int(known.sum()) - reported)
                        reported = int(known.sum())
        return [out[r, :n[r]].copy() for r in range(len(streams))], stats
