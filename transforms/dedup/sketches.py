"""``FindDuplicates``: exact and near-duplicate documents as Beam transforms.

Chain (README, "Duplicates"):

1. ``DocSketch`` per document, made while it is read (``document_facts``): a
   normalized-content hash, the sorted set of word n-gram hashes, a MinHash
   signature, the sorted set of its line hashes, and its two NCD samples (``LineSample`` and
   ``head_text``).
2. Exact: GroupByKey on the normalized hash; every member is joined to the
   group's first member, however large the group (never capped: the most
   repeated text is the one that matters most), with no Jaccard or NCD.
3. Near: candidate keys are one per LSH band (``bands`` x ``rows`` hashes) and
   one per each of the ``line_keys`` smallest line hashes (lines of at least
   ``min_line_words`` words: a copy with its paragraphs shuffled, or cut short,
   keeps its lines while its n-grams across paragraph ends change). GroupByKey;
   in a bucket every member is paired with the bucket's first
   ``bucket_centers`` members (datatrove pairs with the first only: a star;
   either way linear, not n^2: ``star_pairs``); a bucket above ``max_bucket``
   members pairs only its first ``max_bucket`` and is counted
   (``dedup_capped_buckets``). Pairs of equal normalized text are left to step 2.
4. Candidate pairs meet their sketches in one CoGroupByKey and one GroupByKey:
   of each pair, the smaller sketch (n-gram and line hashes only,
   ``verification_bytes``, packed on the way: ``pack_hashes``) travels to the
   other document, where the pair is
   verified (``verify``) by the first rule that holds:

   - ``jaccard``: n-gram Jaccard at least ``jaccard_threshold``;
   - ``containment``: |A∩B| / min(|A|, |B|) at least ``containment_threshold``
     (a copy both cut short and edited keeps a high containment while its
     Jaccard falls below the threshold);
   - ``lines``: at least ``min_shared_lines`` lines in common, the shared lines
     at least ``line_containment`` of the smaller line set, and n-gram
     containment at least ``line_ngram_floor`` (a copy with shuffled paragraphs);
   - ``ncd``: the model's normalized compression distance on the documents'
     lines samples at most ``ncd_threshold`` (``rule_ncd``),
     ``NCD = (C(xy) - min(C(x), C(y))) / max(C(x), C(y))`` with C the bits
     under the model. The manifest records the smaller of the two samples'
     NCDs (``pair_ncd``): the lines sample finds copies whose paragraphs moved,
     the head sample copies cut short or re-wrapped; the rule reads only the
     lines samples, drawn from the whole text, since distinct documents that
     begin alike are close in their heads. x, y and xy are each
     scored as one chunk through
     ``ScoreChunks``, a document's C(x) once (however many pairs it is in)
     and C(xy) once per pair, for a pair that another rule verified (its
     NCD is recorded) or that NCD may verify: guarded (below), with
     n-gram containment at least ``ncd_min_containment`` and both lines
     samples drawn from lines (``ncd_rule``, ``ncd_may_decide``). A
     pair that shares one line, band or header and little else costs no
     forward and is never merged by NCD (a copy at NCD 0.3 keeps far more of
     its n-grams than 0.3: 15% word edits keep about 0.44; two documents
     under one licence header share 0.16 in the dedup benchmark).

   The containment, line and NCD rules are guarded so that a short or boilerplate
   document cannot chain distinct documents into one cluster: both documents
   need at least ``min_shingles`` n-grams and the shorter at least
   ``min_length_ratio`` of the longer's bytes. A licence header shared by
   distinct documents is a small part of each: low containment, few shared
   lines; a document that is little more than the header is too short beside
   them. The manifest records every measure and the rule that decided.
5. Verified edges go to one worker for union-find (connected components), as
   datatrove's cluster stage does; edges are small (two ids and a few floats).

MinHash is written here rather than taken from datasketch: the signature must
be a pure function of the text for byte-identical manifests, vectorized over a
document's n-grams, and carried as bytes through Beam; datasketch's objects
are per-document Python state. The hashing follows the usual scheme (sha1
32-bit n-gram hashes, ``(a*h + b) mod (2^61 - 1)`` permutations seeded with
``seed``), so signatures equal datasketch's ``scheme="legacy"`` (its default
before 2.0) with the same seed and size.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import re
import struct
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import zstandard

from lmc_audit.transforms.dedup.components import UnionFind

MERSENNE = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)


NORMALIZERS = ("punctuation", "numbers")


@dataclass(frozen=True)
class DedupOptions:
    """5-grams of words as datatrove; 25 bands x 4 rows (datatrove's 14 x 8 finds a pair at Jaccard 0.5
    with probability 0.05, 25 x 4 with 0.80: ``benchmarks/dedup.py`` measures both).

    ``normalize`` adds datatrove-style simplifications to the text that n-grams and line hashes are taken
    from (exact dedup always compares NFKC, case-folded, whitespace-collapsed text): ``punctuation``
    turns every Unicode punctuation character into a space, ``numbers`` turns every run of digits
    (with ``.`` or ``,`` between digits) into ``0``."""

    ngram: int = 5
    bands: int = 25
    rows: int = 4
    seed: int = 1
    jaccard_threshold: float = 0.5
    ncd_threshold: float = 0.3
    ncd_bytes: int = 1024
    ncd_min_containment: float = 0.3  # NCD is scored for pairs a rule verifies or with n-gram containment this high
    max_bucket: int = 1000  # members of one near-duplicate bucket paired; larger ones are counted, capped
    bucket_centers: int = 4  # each bucket member is compared with this many first members
    containment_threshold: float = 0.6
    line_containment: float = 0.8
    line_ngram_floor: float = 0.3
    min_shared_lines: int = 3
    min_line_words: int = 8
    line_keys: int = 8
    min_shingles: int = 50
    min_length_ratio: float = 0.5
    normalize: tuple[str, ...] = ()
    component_rounds: int = 3  # large-star / small-star rounds before what has not settled is gathered

    def __post_init__(self):
        if self.component_rounds < 0:
            raise ValueError(f"component_rounds must be at least 0, got {self.component_rounds}")
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError("ngram, bands and rows must be at least 1")
        for name in ("containment_threshold", "line_containment", "line_ngram_floor", "min_length_ratio",
                     "ncd_min_containment"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_shared_lines < 1 or self.min_line_words < 1 or self.line_keys < 0 or self.min_shingles < 0:
            raise ValueError("min_shared_lines and min_line_words must be at least 1, line_keys and "
                             "min_shingles at least 0")
        unknown = sorted(set(self.normalize) - set(NORMALIZERS))
        if unknown:
            raise ValueError(f"unknown normalization {', '.join(unknown)}: choose from {', '.join(NORMALIZERS)}")
        if not 0.0 < self.jaccard_threshold <= 1.0:
            raise ValueError(f"jaccard_threshold must be in (0, 1], got {self.jaccard_threshold}")
        if self.ncd_threshold < 0:
            raise ValueError(f"ncd_threshold must be >= 0, got {self.ncd_threshold}")
        if self.ncd_bytes < 1:
            raise ValueError("ncd_bytes must be at least 1")
        if self.max_bucket < 2:
            raise ValueError("max_bucket must be at least 2")
        if self.bucket_centers < 1:
            raise ValueError("bucket_centers must be at least 1")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows


DocKey = tuple[int, int, str]  # (shard index, position, doc_id): input order


@dataclass(frozen=True)
class DocSketch:
    key: DocKey
    shard: str
    bytes: int
    normalized_hash: str
    shingles: bytes  # sorted unique uint32 n-gram hashes
    signature: bytes  # num_perm uint32
    ncd_text: bytes  # at most ncd_bytes drawn from the whole text (LineSample), what NCD compares
    lines: bytes = b""  # sorted unique uint32 hashes of lines of at least min_line_words words
    ncd_head: bytes = b""  # the first ncd_bytes of the simplified text (head_text), NCD's second sample

    @property
    def ncd_samples(self) -> tuple[bytes, bytes]:
        """What NCD compares, in the order of ``NCD_SAMPLES``."""
        return self.ncd_text, self.ncd_head


@dataclass(frozen=True)
class Edge:
    a: DocKey
    b: DocKey
    jaccard: float
    ncd: float | None
    a_info: tuple[str, str]  # (shard, normalized hash)
    b_info: tuple[str, str]
    containment: float | None = None
    line_containment: float | None = None
    length_ratio: float | None = None
    rule: str = "exact"  # exact, jaccard, containment, lines or ncd


def normalize_text(data: bytes) -> str:
    """NFKC, case-folded, every run of whitespace one space: what exact dedup compares."""
    text = unicodedata.normalize("NFKC", data.decode("utf-8", errors="replace")).casefold()
    return " ".join(text.split())


def normalized_hash(data: bytes) -> str:
    return hashlib.sha256(normalize_text(data).encode()).hexdigest()


_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


@functools.cache
def _punctuation_table() -> dict[int, str]:
    return {c: " " for c in range(sys.maxunicode + 1) if unicodedata.category(chr(c)).startswith("P")}


def simplify(text: str, normalize: tuple[str, ...]) -> str:
    """The ``normalize`` steps on already NFKC-normalized, case-folded text (``DedupOptions``)."""
    if "numbers" in normalize:  # first: "1.5" and "10,000" are one number each
        text = _NUMBER.sub("0", text)
    if "punctuation" in normalize:
        text = text.translate(_punctuation_table())
    return text


SHINGLE_CAP = 1 << 16  # n-gram hashes a sketch keeps: the smallest, a bottom-k sketch above it
LINE_CAP = 1 << 12  # line hashes a sketch keeps, likewise


def line_hash(words: list[str]) -> int:
    return struct.unpack("<I", hashlib.sha1(" ".join(words).encode()).digest()[:4])[0]


def bigram_key(words: list[str]) -> int | None:
    """The smallest CRC-32 of the word bigrams of ``words`` (None for fewer than two words)."""
    return min((zlib.crc32(f"{a} {b}".encode()) for a, b in zip(words, words[1:])), default=None)


def line_key(words: list[str]) -> int:
    """What picks a line into the NCD sample (``LineSample``): the smallest CRC-32 of its word bigrams,
    a one-word line's own CRC-32.

    Not the hash of the whole line: a word edit changes that whatever the word, so an edited copy would
    sample other lines than its original and the two samples would share little text; the smallest of
    a line's bigrams moves only when an edit touches that bigram (about 2 in n-1 for an n-word line).
    Measured (``benchmarks/ncd_samples.py``: the dedup benchmark's corpus, 60 copies a kind, NCD under
    xz, which copies again at once after an edit): copies with 5% of their words edited at most 0.3 in
    90% of pairs, against 63% with whole-line hashes. CRC-32 (zlib), not sha1 like the set hashes: it only ranks lines, and it is a
    fraction of sha1's cost per bigram, which every word of every counted line pays."""
    key = bigram_key(words)
    return zlib.crc32(words[0].encode()) if key is None else key


SAMPLE_LINE_BYTES = 256  # bytes of one line an NCD sample keeps


class LineSample:
    """The text NCD compares: lines drawn from the whole document by content, at most ``ncd_bytes``.

    A model compares only what fits its context (about 1 KB per side for a 2,048-byte chunk), so NCD
    cannot take two whole documents. The document's first bytes are the wrong kilobyte for a copy whose
    paragraphs are shuffled or whose start was cut. Instead, of the lines that line hashes count
    (``min_line_words`` words or more, simplified as for hashing), the ``ncd_bytes // 32`` with the
    smallest keys (``line_key``: a line's smallest word-bigram hash, which most edits leave alone) are
    kept, each cut to ``SAMPLE_LINE_BYTES``, and joined in key order: two copies keep the same lines in
    the same order wherever the lines sit, as bottom-k MinHash keeps the same n-grams, and an edited
    copy keeps most of them. A document whose sampled lines fill less than half of ``ncd_bytes`` (prose
    without line breaks) is compared by its head sample (``head_text``) instead, which NCD then scores
    once. Fed line by line in
    document order; of lines with equal keys the first counts. Memory: at most ``ncd_bytes // 32``
    lines."""

    def __init__(self, ncd_bytes: int):
        self._ncd_bytes = ncd_bytes
        self._keep = max(1, ncd_bytes // 32)
        self._heap: list[tuple[int, bytes]] = []  # (-key, text): the largest kept key on top
        self._keys: set[int] = set()

    def offer(self, key: int, text: bytes) -> None:
        if key in self._keys:
            return
        if len(self._heap) < self._keep:
            heapq.heappush(self._heap, (-key, text[:SAMPLE_LINE_BYTES]))
            self._keys.add(key)
        elif key < -self._heap[0][0]:
            dropped, _ = heapq.heapreplace(self._heap, (-key, text[:SAMPLE_LINE_BYTES]))
            self._keys.discard(-dropped)
            self._keys.add(key)

    def text(self, head: bytes) -> bytes:
        """The sample; ``head`` is the document's head sample (``head_text``), taken when lines are few."""
        lines = b"\n".join(text for _, text in sorted(self._heap, key=lambda item: -item[0]))[:self._ncd_bytes]
        return lines if len(lines) >= self._ncd_bytes // 2 else head[:self._ncd_bytes]


def head_text(text: str, options: DedupOptions) -> bytes:
    """NCD's second sample: the first ``ncd_bytes`` of the document's words as n-grams see them (``text``
    NFKC-normalized and case-folded; simplified by the options; every whitespace run one space).

    The lines sample (``LineSample``) is built for copies whose paragraphs moved, but a copy cut short
    keeps only the lines of its part, so the two samples share little (a 60% prefix: median NCD 0.48
    under the bundled model), and a re-wrapped copy breaks its lines elsewhere (median 0.80). Both keep
    their first words: whitespace collapsed, a prefix's head is its original's and a re-wrapped copy's
    head is its original's. A document's head is also where a shared header sits (a licence), which is
    why it is a second sample beside the lines, never the only one, and why NCD's rule is guarded
    (``ncd_rule``). Cut at a byte count (the model reads bytes)."""
    return " ".join(simplify(text, options.normalize).split()).encode()[:options.ncd_bytes]


NCD_SAMPLES = ("lines", "head")  # a document's NCD samples (DocSketch.ncd_samples); a pair's NCD is the smallest


def pair_ncd(bits: dict[str, float | None]) -> float | None:
    """A pair's NCD as the manifest records it, from the bits of each sample's x, y and x + y (keys ``x0``,
    ``y0``, ``xy0``, ``x1``, ..., indexed as ``NCD_SAMPLES``): the smallest of the samples' NCDs, None when
    no sample has all three.

    The smallest, because each sample misses a kind of copy that the other keeps (``head_text``). It says
    how close the model finds two documents where they are most alike, which for two documents that
    begin alike (one licence header, one generator's template) is their beginning: so it is recorded,
    and NCD's rule reads ``rule_ncd`` instead."""
    found = [d for i in range(len(NCD_SAMPLES))
             if (d := ncd(bits.get(f"x{i}"), bits.get(f"y{i}"), bits.get(f"xy{i}"))) is not None]
    return min(found, default=None)


def lines_drawn(sketch: DocSketch) -> bool:
    """Whether a document's lines sample was drawn from its lines across the whole text, not taken from its
    head (``LineSample.text``: a document whose lines are few)."""
    return bool(sketch.ncd_text) and sketch.ncd_text != sketch.ncd_head


def ncd_may_decide(a: DocSketch, b: DocSketch) -> bool:
    """Whether NCD's rule may verify the pair: both lines samples drawn from lines, so that ``rule_ncd``
    compares what the texts hold, not two heads."""
    return lines_drawn(a) and lines_drawn(b)


def rule_ncd(bits: dict[str, float | None]) -> float | None:
    """The NCD that NCD's rule reads: the lines samples' (``x0``, ``y0``, ``xy0``), drawn from each whole
    text, never the heads'.

    Measured on real files (``benchmarks/ncd_templated.py``, the bundled model): distinct Python modules
    made from one template (the ``encodings`` codecs, generated by one script), whose n-gram containment
    (0.3-0.5) passes NCD's guards and no other rule verifies, are as close in their heads as copies
    (median 0.25; 47 of 63 such pairs at most 0.3) and far apart in their lines samples (median 0.88,
    none at most 0.3); over 54 such pairs from 14 directories the smaller of both samples' NCDs is at
    most 0.3 for 8 and at most 0.6 for 26, the lines samples' (both drawn) for none and 1. In the dedup
    benchmark no copy that the other rules miss and the guards allow is at most 0.3 in its heads. A
    document's head says how it begins, not what it holds."""
    return ncd(bits.get("x0"), bits.get("y0"), bits.get("xy0"))


def ncd_text(head: bytes, text: str, options: DedupOptions) -> bytes:
    """``LineSample`` of a whole document (``text`` NFKC-normalized and case-folded, line breaks kept;
    ``head`` its ``head_text``): the reference that ``DocumentDescriber``'s streaming equals."""
    sample = LineSample(options.ncd_bytes)
    for words in (simplify(line, options.normalize).split() for line in text.split("\n")):
        if len(words) >= options.min_line_words:
            sample.offer(line_key(words), " ".join(words).encode()[:SAMPLE_LINE_BYTES])
    return sample.text(head)


def line_hashes(text: str, options: DedupOptions) -> np.ndarray:
    """Sorted unique hashes of the simplified lines of at least ``min_line_words`` words, the
    ``LINE_CAP`` smallest (``text`` NFKC-normalized and case-folded, line breaks kept)."""
    hashes = [line_hash(w) for w in (simplify(line, options.normalize).split() for line in text.split("\n"))
              if len(w) >= options.min_line_words]
    return np.unique(np.array(hashes, np.uint32))[:LINE_CAP]


def gram_hashes(grams: list[str]) -> np.ndarray:
    """Sorted unique sha1-32 hashes of n-grams."""
    sha1 = hashlib.sha1
    # Joined digests read as little-endian words: the same values as unpacking each, at 2/3 the time.
    raw = b"".join([sha1(g.encode()).digest()[:4] for g in grams])
    return np.unique(np.frombuffer(raw, "<u4")).astype(np.uint32)


def shingle_hashes(text: str, n: int) -> np.ndarray:
    """Sorted unique sha1-32 hashes of the word n-grams (one n-gram of all words when fewer than n)."""
    words = text.split()
    if not words:
        return np.zeros(0, np.uint32)
    return gram_hashes([" ".join(words[i:i + n]) for i in range(max(1, len(words) - n + 1))])


class MinHasher:
    def __init__(self, num_perm: int, seed: int = 1):
        gen = np.random.RandomState(seed)
        ab = np.array([(gen.randint(1, MERSENNE, dtype=np.uint64), gen.randint(0, MERSENNE, dtype=np.uint64))
                       for _ in range(num_perm)], dtype=np.uint64)
        self.a, self.b = ab[:, 0].copy(), ab[:, 1].copy()

    BLOCK = 4096  # shingles per [block, num_perm] temporary: 3.5 MiB at 112 permutations

    def signature(self, shingles: np.ndarray) -> np.ndarray:
        out = np.full(len(self.a), MAX_HASH, np.uint64)
        for start in range(0, len(shingles), self.BLOCK):
            h = shingles[start:start + self.BLOCK].astype(np.uint64)[:, None]
            with np.errstate(over="ignore"):  # uint64 wrap-around is part of the scheme
                permuted = ((h * self.a + self.b) % MERSENNE) & MAX_HASH
            np.minimum(out, permuted.min(axis=0), out=out)
        return out.astype(np.uint32)


def make_sketch(key: DocKey, shard: str, data: bytes, options: DedupOptions, hasher: MinHasher) -> DocSketch:
    """A whole document's sketch at once: the reference that ``DocumentDescriber``'s streaming equals."""
    folded = unicodedata.normalize("NFKC", data.decode("utf-8", errors="replace")).casefold()
    text = " ".join(folded.split())
    shingles = shingle_hashes(simplify(text, options.normalize), options.ngram)
    head = head_text(text, options)
    return DocSketch(key, shard, len(data), hashlib.sha256(text.encode()).hexdigest(), shingles.tobytes(),
                     hasher.signature(shingles).tobytes(), ncd_text(head, folded, options),
                     line_hashes(folded, options).tobytes(), head)


@dataclass(frozen=True)
class Overlap:
    """Sizes of two hash sets and of their intersection; estimates where a set is a bottom-k sketch."""

    both: float
    a: float
    b: float

    @property
    def jaccard(self) -> float:
        union = self.a + self.b - self.both
        return self.both / union if union > 0 else 1.0

    @property
    def containment(self) -> float:
        smaller = min(self.a, self.b)
        return min(1.0, self.both / smaller) if smaller > 0 else 1.0


def _distinct(x: np.ndarray, cap: int) -> float:
    """Size of the set a sorted sketch stands for: its length when whole, else the k-minimum-values
    estimate (k - 1) / (k-th smallest hash as a fraction of the hash range)."""
    if len(x) < cap:
        return float(len(x))
    return (len(x) - 1) / ((float(x[-1]) + 1.0) / 2.0 ** 32)


def overlap(x: np.ndarray, y: np.ndarray, cap: int) -> Overlap:
    """Exact when both sets are whole; when a sketch holds only its ``cap`` smallest hashes, the bottom-k
    estimate: Jaccard is the share of the k smallest hashes of the union that both hold (k the smaller
    sketch's size; standard error about sqrt(J(1-J)/k)), and set sizes are k-minimum-values estimates."""
    if len(x) < cap and len(y) < cap:
        both = len(np.intersect1d(x, y, assume_unique=True))
        return Overlap(float(both), float(len(x)), float(len(y)))
    k = min(len(x), len(y))
    union = np.union1d(x, y)[:k]
    share = float(np.isin(union, np.intersect1d(x, y, assume_unique=True), assume_unique=True).sum() / k)
    a, b = _distinct(x, cap), _distinct(y, cap)
    return Overlap(share * (a + b) / (1.0 + share), a, b)  # |A∩B| = J (|A| + |B|) / (1 + J)


def shingle_overlap(a: DocSketch, b: DocSketch) -> Overlap:
    return overlap(np.frombuffer(a.shingles, np.uint32), np.frombuffer(b.shingles, np.uint32), SHINGLE_CAP)


def jaccard(a: DocSketch, b: DocSketch) -> float:
    """Jaccard similarity of the n-gram sets (``overlap``: exact, or a bottom-k estimate)."""
    return shingle_overlap(a, b).jaccard


@dataclass(frozen=True)
class Verdict:
    jaccard: float
    containment: float
    line_containment: float | None
    length_ratio: float
    rule: str | None  # the first rule that holds, None when none does
    guarded: bool = True  # both have min_shingles n-grams and the length ratio is at least min_length_ratio


def verify(a: DocSketch, b: DocSketch, options: DedupOptions, distance: float | None = None) -> Verdict:
    """The rules of this module's docstring, step 4, in order; ``distance`` is the lines samples' NCD
    (``rule_ncd``), which NCD's rule reads only when both documents' lines samples were drawn from their
    lines (``ncd_may_decide``)."""
    grams = shingle_overlap(a, b)
    lines = overlap(np.frombuffer(a.lines, np.uint32), np.frombuffer(b.lines, np.uint32), LINE_CAP)
    ratio = min(a.bytes, b.bytes) / max(a.bytes, b.bytes) if max(a.bytes, b.bytes) else 1.0
    line_share = lines.containment if min(lines.a, lines.b) > 0 else None
    guarded = min(grams.a, grams.b) >= options.min_shingles and ratio >= options.min_length_ratio
    rule = None
    if grams.jaccard >= options.jaccard_threshold:
        rule = "jaccard"
    elif guarded and grams.containment >= options.containment_threshold:
        rule = "containment"
    elif (guarded and line_share is not None and lines.both >= options.min_shared_lines
          and line_share >= options.line_containment and grams.containment >= options.line_ngram_floor):
        rule = "lines"
    verdict = Verdict(grams.jaccard, grams.containment, line_share, ratio, rule, guarded)
    if rule or not ncd_may_decide(a, b):
        return verdict
    return dataclasses.replace(verdict, rule=ncd_rule(distance, verdict, options))


def ncd_rule(distance: float | None, verdict: Verdict, options: DedupOptions) -> str | None:
    """The last rule, alone: "ncd" when ``distance``, the lines samples' NCD (``rule_ncd``), is at most
    ``ncd_threshold``, for a pair that the guards allow (as the containment and line rules) and whose
    n-gram containment is at least ``ncd_min_containment`` (``verify`` and ``CheckPair`` also need both
    lines samples drawn from the whole text, ``ncd_may_decide``).

    Not the heads' NCD: two distinct documents that begin with the same licence header, or were made
    from one template, are close in their heads (the dedup benchmark's 560-byte header: median 0.48;
    templated Python modules: ``rule_ncd``). The guards keep a document that is little more than a
    header from chaining every document under it into one cluster, and the floor keeps pairs that share
    a line or a header and little else from costing a forward: the header is a small share of each
    document's n-grams (0.16 there), a copy's is not (15% word edits keep about 0.44)."""
    if distance is None or distance > options.ncd_threshold:
        return None
    return "ncd" if verdict.guarded and verdict.containment >= options.ncd_min_containment else None


def ncd(cx: float | None, cy: float | None, cxy: float | None) -> float | None:
    if cx is None or cy is None or cxy is None or max(cx, cy) <= 0:
        return None
    return (cxy - min(cx, cy)) / max(cx, cy)


def band_keys(key: DocKey, signature: bytes, options: DedupOptions,
              lines: bytes = b"") -> Iterator[tuple[bytes, DocKey]]:
    """One LSH bucket key per band of the signature (none for an empty signature: a text without n-grams,
    which only exact dedup can match), and one per each of the ``line_keys`` smallest line hashes."""
    sig = np.frombuffer(signature, np.uint32)
    for band in range(options.bands if signature else 0):
        part = sig[band * options.rows:(band + 1) * options.rows]
        yield band.to_bytes(2, "big") + hashlib.sha1(part.tobytes()).digest()[:12], key
    for line in np.frombuffer(lines, np.uint32)[:options.line_keys]:
        yield b"L" + int(line).to_bytes(4, "big"), key


# (document, shard, MinHash signature or b"" without n-grams, line hashes, bytes its verification needs)
ExactMember = tuple[DocKey, str, bytes, bytes, int]


_RAW, _ZSTD_GAPS, _ZSTD_TEXT = b"r", b"z", b"t"  # pack_hashes's and pack_text's tags


def _tagged(raw: bytes, tag: bytes, coded: bytes) -> bytes:
    """``coded`` behind its tag where it is smaller than ``raw``, else ``raw`` behind ``_RAW``: a set or
    sample too small for a zstd frame (about 10 bytes) to pay goes as it is."""
    return tag + coded if len(coded) < len(raw) else _RAW + raw


def _untagged(packed: bytes, tag: bytes, decode) -> bytes:
    """What ``_tagged`` packed: the raw bytes, or ``decode`` of the coded ones."""
    if not packed:
        return b""
    if packed[:1] == _RAW:
        return packed[1:]
    assert packed[:1] == tag, f"tag {packed[:1]!r}, expected {tag!r} or {_RAW!r}"
    return decode(packed[1:])


def pack_hashes(raw: bytes) -> bytes:
    """Sorted uint32 hashes (a sketch's n-gram or line hashes) as they cross the pair join: the gaps
    between them, their bytes grouped by significance (so the high bytes, mostly zero, sit together),
    zstd level 1, after a one-byte tag; a set too small for that to pay goes as it is. Uniform hashes
    leave nothing to compress but the gaps' size, about log2(e * mean gap) bits
    a hash: 0.75-0.76 of the raw bytes for a document's n-gram hashes, within 1 % of zstd's levels 3-19
    (measured). Lossless, so verification's Jaccard and containment stay exact; ``unpack_hashes``
    inverts it. Not what sketches store (incremental state keeps the raw hashes): only the pair join's
    transit, held by the shuffle (Dataflow) or in memory (DirectRunner)."""
    hashes = np.frombuffer(raw, "<u4")
    if len(hashes) == 0:
        return b""
    gaps = np.diff(hashes, prepend=np.uint32(0)).astype("<u4")  # sorted: no gap wraps around
    return _tagged(raw, _ZSTD_GAPS, zstandard.compress(gaps.view(np.uint8).reshape(-1, 4).T.tobytes(), 1))


def _hashes_from_gap_planes(coded: bytes) -> bytes:
    planes = np.frombuffer(zstandard.decompress(coded), np.uint8).reshape(4, -1)
    gaps = np.ascontiguousarray(planes.T).view("<u4").ravel()
    return np.cumsum(gaps, dtype=np.uint32).astype("<u4").tobytes()


def unpack_hashes(packed: bytes) -> bytes:
    return _untagged(packed, _ZSTD_GAPS, _hashes_from_gap_planes)


def pack_text(text: bytes) -> bytes:
    """A document's NCD sample (up to ``ncd_bytes`` of its text) as it crosses the pair join: zstd level 1
    behind a one-byte tag, or as it is where a frame would not pay. About 0.53 of the raw bytes on the
    scale benchmark's Python sources (levels 3 and 9: 0.530, 0.521, at 1.2x and 3x the time: measured);
    the sample travels once per candidate pair, so it was a third of the pair join's bytes. Lossless:
    C(x), C(xy) and the manifests are unchanged; ``unpack_text`` inverts it."""
    return _tagged(text, _ZSTD_TEXT, zstandard.compress(text, 1)) if text else b""


def unpack_text(packed: bytes) -> bytes:
    return _untagged(packed, _ZSTD_TEXT, zstandard.decompress)


def verification_bytes(sketch: DocSketch) -> int:
    """Bytes of what a pair's verification compares (n-gram and line hashes): the pair join moves the
    smaller of its two documents' (``FindDuplicates``)."""
    return len(sketch.shingles) + len(sketch.lines)


def exact_member(sketch: DocSketch) -> tuple[str, ExactMember]:
    return sketch.normalized_hash, (sketch.key, sketch.shard, sketch.signature if sketch.shingles else b"",
                                    sketch.lines, verification_bytes(sketch))


def _first(members: Iterable[ExactMember]) -> ExactMember:
    return min(members, key=lambda m: m[0])


def exact_edges(element: tuple[str, Iterable[ExactMember]]) -> Iterator[Edge]:
    """Every document of one normalized text joined to the first in input order: never capped.

    The most repeated text of a corpus is the one dedup most needs to catch, so an exact group is
    joined whole. Memory stays constant: one pass finds the first member, a second streams the edges
    (a grouped value is re-iterable in Beam). The texts are equal: no Jaccard or NCD is needed."""
    text_hash, members = element
    first = _first(members)
    for key, shard, *_ in members:
        if key != first[0]:
            yield Edge(first[0], key, 1.0, None, (first[1], text_hash), (shard, text_hash), 1.0, None, None, "exact")


SizedKey = tuple[DocKey, int]  # a document and its ``verification_bytes``


def representative_band_keys(element: tuple[str, Iterable[ExactMember]],
                             options: DedupOptions) -> Iterator[tuple[bytes, SizedKey]]:
    """Band keys of each distinct text's first document only: copies of one text join their cluster
    through exact edges, so they never crowd the near-duplicate buckets. The document goes into its
    buckets with its verification size, so that a pair knows which of its sketches is the smaller."""
    _, members = element
    key, _, signature, lines, size = _first(members)
    for band, _ in band_keys(key, signature, options, lines):
        yield band, (key, size)


Member = TypeVar("Member", DocKey, SizedKey)  # sorts in input order: a DocKey first


def star_pairs(members: Iterable[Member], max_bucket: int, centers: int = 1) -> Iterator[tuple[Member, Member]]:
    """Each member paired with each of the bucket's first ``centers`` members in input order that come
    before it; of a bucket larger than ``max_bucket``, the first ``max_bucket`` members. At most
    ``centers`` pairs per member, and ``max_bucket`` keys held, whatever the bucket.

    One center (datatrove's star) suffices when a shared bucket means a duplicate. With verification
    it does not: when the first member is a loose copy (a 30% prefix) that fails verification with
    the others, the others, true copies of one another, would never be compared."""
    smallest = heapq.nsmallest(max_bucket, members)  # members are distinct: one key per document
    for i, other in enumerate(smallest[1:], start=1):
        for center in smallest[:min(i, centers)]:
            yield center, other


def edge_rank(e: Edge) -> tuple:
    """A document's best edge is the smallest rank: highest Jaccard, then lowest NCD, then the first pair."""
    return -e.jaccard, e.ncd if e.ncd is not None else 2.0, e.a, e.b


def node_info(key: DocKey, e: Edge) -> tuple[str, str]:
    """(shard, normalized hash) of one end of an edge."""
    return e.a_info if e.a == key else e.b_info


def cluster_id_of(root: DocKey) -> int:
    """A cluster's id from its kept document alone (63 bits of a hash): found without ranking all clusters."""
    return int.from_bytes(hashlib.sha1(repr(root).encode()).digest()[:8], "big") >> 1


def duplicate_row(key: DocKey, root: DocKey, size: int, best: Edge, root_hash: str) -> dict:
    """One row of the duplicates manifest: ``key`` in the cluster kept as ``root``, of ``size`` members."""
    keep = key == root
    matched = best.b if best.a == key else best.a
    shard, h = node_info(key, best)
    return {
        "doc_id": key[2], "shard": shard, "position": key[1], "cluster_id": cluster_id_of(root),
        "cluster_size": size, "keep": keep, "kept_doc_id": root[2],
        "reason": "kept" if keep else ("exact" if h == root_hash else "near"),
        "matched_doc_id": matched[2], "jaccard": best.jaccard, "ncd": best.ncd,
        "containment": best.containment, "line_containment": best.line_containment,
        "length_ratio": best.length_ratio, "rule": "kept" if keep else best.rule,
    }


def duplicate_rows(edges: Iterable[Edge]) -> list[dict]:
    """Rows of the duplicates manifest from verified edges, in memory: the reference that
    ``FindDuplicates`` (connected components as shuffles) is tested against.

    Keep rule: the first document of a cluster in input order (shard listing
    order, then line/row, then id) is kept; every other one is dropped and
    points at it. Rows come by kept document, then member.
    """
    uf = UnionFind()
    best: dict[DocKey, Edge] = {}
    for e in edges:
        uf.union(e.a, e.b)
        for me in (e.a, e.b):
            if me not in best or edge_rank(e) < edge_rank(best[me]):
                best[me] = e
    clusters: dict[DocKey, list[DocKey]] = {}
    for key in uf.parent:
        clusters.setdefault(uf.find(key), []).append(key)
    rows = []
    for root in sorted(clusters):
        members = sorted(clusters[root])
        root_hash = node_info(root, best[root])[1]
        rows.extend(duplicate_row(key, root, len(members), best[key], root_hash) for key in members)
    return rows
