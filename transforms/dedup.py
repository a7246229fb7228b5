"""``FindDuplicates``: exact and near-duplicate documents as Beam transforms.

Chain (README, "Duplicates"):

1. ``DocSketch`` per document (made where a shard's manifests are written,
   which holds each whole document): a normalized-content hash, the sorted set
   of word n-gram hashes, a MinHash signature, the first chunk and its bits.
2. Exact: GroupByKey on the normalized hash; every member is joined to the
   group's first member, however large the group (never capped: the most
   repeated text is the one that matters most), with no Jaccard or NCD.
3. Near: one key per LSH band (``bands`` x ``rows`` hashes), GroupByKey; in a
   bucket every member is paired with the bucket's first member (a star, as
   datatrove does: n-1 pairs, not n^2); a bucket above ``max_bucket`` members
   pairs only its first ``max_bucket`` and is counted (``dedup_capped_buckets``).
   Pairs of equal normalized text are left to step 2.
4. Candidate pairs are joined to both sketches (two CoGroupByKeys) and
   verified: true Jaccard of the n-gram sets, and the model's normalized
   compression distance on the documents' first ``ncd_bytes`` bytes,
   ``NCD = (C(xy) - min(C(x), C(y))) / max(C(x), C(y))`` with C the bits under
   the model: x, y and xy are each scored as one chunk through ``ScoreChunks``
   (half a chunk each by default, so xy fits the context the model is used
   with).
5. Verified edges go to one worker for union-find (connected components), as
   datatrove's cluster stage does; edges are small (two ids and two floats).

MinHash is written here rather than taken from datasketch: the signature must
be a pure function of the text for byte-identical manifests, vectorized over a
document's n-grams, and carried as bytes through Beam; datasketch's objects
are per-document Python state. The hashing follows the usual scheme (sha1
32-bit n-gram hashes, ``(a*h + b) mod (2^61 - 1)`` permutations seeded with
``seed``), so signatures equal datasketch's ``scheme="legacy"`` (its default
before 2.0) with the same seed and size.
"""

from __future__ import annotations

import hashlib
import heapq
import struct
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

MERSENNE = np.uint64((1 << 61) - 1)
MAX_HASH = np.uint64((1 << 32) - 1)


@dataclass(frozen=True)
class DedupOptions:
    """Defaults follow datatrove's MinHash: 5-grams of words, 14 bands x 8 rows."""

    ngram: int = 5
    bands: int = 14
    rows: int = 8
    seed: int = 1
    jaccard_threshold: float = 0.5
    ncd_threshold: float = 0.3
    ncd_bytes: int = 1024
    max_bucket: int = 1000  # members of one near-duplicate bucket paired; larger ones are counted, capped

    def __post_init__(self):
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError("ngram, bands and rows must be at least 1")
        if not 0.0 < self.jaccard_threshold <= 1.0:
            raise ValueError(f"jaccard_threshold must be in (0, 1], got {self.jaccard_threshold}")
        if self.ncd_threshold < 0:
            raise ValueError(f"ncd_threshold must be >= 0, got {self.ncd_threshold}")
        if self.ncd_bytes < 1:
            raise ValueError("ncd_bytes must be at least 1")
        if self.max_bucket < 2:
            raise ValueError("max_bucket must be at least 2")

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
    prefix: bytes  # the first ncd_bytes bytes


@dataclass(frozen=True)
class Edge:
    a: DocKey
    b: DocKey
    jaccard: float
    ncd: float | None
    a_info: tuple[str, str]  # (shard, normalized hash)
    b_info: tuple[str, str]


def normalize_text(data: bytes) -> str:
    """NFKC, case-folded, every run of whitespace one space: what exact dedup compares."""
    text = unicodedata.normalize("NFKC", data.decode("utf-8", errors="replace")).casefold()
    return " ".join(text.split())


def normalized_hash(data: bytes) -> str:
    return hashlib.sha256(normalize_text(data).encode()).hexdigest()


SHINGLE_CAP = 1 << 16  # n-gram hashes a sketch keeps: the smallest, a bottom-k sketch above it


def gram_hashes(grams: list[str]) -> np.ndarray:
    """Sorted unique sha1-32 hashes of n-grams."""
    hashes = [struct.unpack("<I", hashlib.sha1(g.encode()).digest()[:4])[0] for g in grams]
    return np.unique(np.array(hashes, np.uint64)).astype(np.uint32)


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
    text = normalize_text(data)
    shingles = shingle_hashes(text, options.ngram)
    return DocSketch(key, shard, len(data), hashlib.sha256(text.encode()).hexdigest(), shingles.tobytes(),
                     hasher.signature(shingles).tobytes(), data[:options.ncd_bytes])


def jaccard(a: DocSketch, b: DocSketch) -> float:
    """Jaccard similarity of the n-gram sets: exact when both sets are whole; when a sketch holds only
    its ``SHINGLE_CAP`` smallest hashes, the bottom-k estimate (the share of the k smallest hashes of
    the union that both hold, k the smaller sketch's size; standard error about sqrt(J(1-J)/k))."""
    x, y = np.frombuffer(a.shingles, np.uint32), np.frombuffer(b.shingles, np.uint32)
    if len(x) >= SHINGLE_CAP or len(y) >= SHINGLE_CAP:
        k = min(len(x), len(y))
        union = np.union1d(x, y)[:k]
        both = np.intersect1d(x, y, assume_unique=True)
        return float(np.isin(union, both, assume_unique=True).sum() / k) if k else 1.0
    union = len(np.union1d(x, y))
    return len(np.intersect1d(x, y, assume_unique=True)) / union if union else 1.0


def ncd(cx: float | None, cy: float | None, cxy: float | None) -> float | None:
    if cx is None or cy is None or cxy is None or max(cx, cy) <= 0:
        return None
    return (cxy - min(cx, cy)) / max(cx, cy)


def band_keys(key: DocKey, signature: bytes, options: DedupOptions) -> Iterator[tuple[bytes, DocKey]]:
    """One LSH bucket key per band of the signature; none for an empty signature (a text without n-grams,
    which only exact dedup can match)."""
    sig = np.frombuffer(signature, np.uint32)
    for band in range(options.bands if signature else 0):
        part = sig[band * options.rows:(band + 1) * options.rows]
        yield band.to_bytes(2, "big") + hashlib.sha1(part.tobytes()).digest()[:12], key


ExactMember = tuple[DocKey, str, bytes]  # (document, shard, MinHash signature or b"" without n-grams)


def exact_member(sketch: DocSketch) -> tuple[str, ExactMember]:
    return sketch.normalized_hash, (sketch.key, sketch.shard, sketch.signature if sketch.shingles else b"")


def _first(members: Iterable[ExactMember]) -> ExactMember:
    return min(members, key=lambda m: m[0])


def exact_edges(element: tuple[str, Iterable[ExactMember]]) -> Iterator[Edge]:
    """Every document of one normalized text joined to the first in input order: never capped.

    The most repeated text of a corpus is the one dedup most needs to catch, so an exact group is
    joined whole. Memory stays constant: one pass finds the first member, a second streams the edges
    (a grouped value is re-iterable in Beam). The texts are equal: no Jaccard or NCD is needed."""
    text_hash, members = element
    first = _first(members)
    for key, shard, _ in members:
        if key != first[0]:
            yield Edge(first[0], key, 1.0, None, (first[1], text_hash), (shard, text_hash))


def representative_band_keys(element: tuple[str, Iterable[ExactMember]],
                             options: DedupOptions) -> Iterator[tuple[bytes, DocKey]]:
    """Band keys of each distinct text's first document only: copies of one text join their cluster
    through exact edges, so they never crowd the near-duplicate buckets."""
    _, members = element
    key, _, signature = _first(members)
    yield from band_keys(key, signature, options)


def star_pairs(members: Iterable[DocKey], max_bucket: int) -> Iterator[tuple[DocKey, DocKey]]:
    """Each member paired with the bucket's first member in input order; of a bucket larger than
    ``max_bucket``, the first ``max_bucket`` members. Holds ``max_bucket`` keys, whatever the bucket."""
    smallest = heapq.nsmallest(max_bucket, members)  # members are distinct: one key per document
    for other in smallest[1:]:
        yield smallest[0], other


class _Components:
    """Union-find over document keys."""

    def __init__(self):
        self.parent: dict[DocKey, DocKey] = {}

    def find(self, x: DocKey) -> DocKey:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: DocKey, b: DocKey) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            # The smaller key (earlier in input order) stays the root.
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo


def duplicate_rows(edges: Iterable[Edge]) -> list[dict]:
    """Rows of the duplicates manifest from verified edges.

    Keep rule: the first document of a cluster in input order (shard listing
    order, then line/row, then id) is kept; every other one is dropped and
    points at it.
    """
    uf = _Components()
    best: dict[DocKey, Edge] = {}
    hashes: dict[DocKey, tuple[str, str]] = {}
    for e in sorted(edges, key=lambda e: (e.a, e.b)):
        hashes[e.a], hashes[e.b] = e.a_info, e.b_info
        uf.union(e.a, e.b)
        for me in (e.a, e.b):
            cur = best.get(me)
            if cur is None or (e.jaccard, -(e.ncd if e.ncd is not None else 2.0)) > (
                    cur.jaccard, -(cur.ncd if cur.ncd is not None else 2.0)):
                best[me] = e
    clusters: dict[DocKey, list[DocKey]] = {}
    for key in uf.parent:
        clusters.setdefault(uf.find(key), []).append(key)
    rows = []
    for cluster_id, root in enumerate(sorted(clusters)):
        members = sorted(clusters[root])
        for key in members:
            keep = key == root
            e = best[key]
            matched = e.b if e.a == key else e.a
            shard, h = hashes[key]
            rows.append({
                "doc_id": key[2], "shard": shard, "position": key[1], "cluster_id": cluster_id,
                "cluster_size": len(members), "keep": keep, "kept_doc_id": root[2],
                "reason": "kept" if keep else ("exact" if h == hashes[root][1] else "near"),
                "matched_doc_id": matched[2], "jaccard": e.jaccard, "ncd": e.ncd,
            })
    return rows
