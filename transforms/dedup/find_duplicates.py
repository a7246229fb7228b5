"""``FindDuplicates``: sketches in, rows of the ``duplicates/`` manifest out.

The steps and the reasons for them are in ``dedup``'s docstring. Counters:
``dedup_candidate_pairs``, ``dedup_verified_pairs``, ``dedup_capped_buckets``.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from lmc_audit.transforms.dedup.components import ConnectedComponents
from lmc_audit.transforms.progress import NAMESPACE, Progress
from lmc_audit.transforms.dedup import sketches as dedup
from lmc_audit.transforms.dedup.sketches import DedupOptions, DocSketch, Edge
from lmc_audit.transforms.records import Chunk, ScoredChunk

NCD_SHARD = "<ncd>"
NCD_CHUNKS = "ncd_chunks"  # each paired document's own samples, for NCD to score
NCD_PIECES = "ncd_pieces"  # a checked pair's x + y per sample, for NCD to score
NCD_USES = "ncd_uses"  # (document, (pair, role)): where a document's C(x) goes


def _pair_id(a: dedup.DocKey, b: dedup.DocKey) -> str:
    return hashlib.sha1(repr((a, b)).encode()).hexdigest()


def _doc_ref(key: dedup.DocKey) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()


def _ncd_chunk(name: str, data: bytes) -> Chunk:
    return Chunk(name, NCD_SHARD, -1, 0, 0, 0, data, hashlib.sha256(data).digest(), 0, 0, 0)


class PairBuckets(beam.DoFn):
    def __init__(self, max_bucket: int, centers: int):
        self._max_bucket, self._centers = max_bucket, centers
        self._capped = Metrics.counter(NAMESPACE, "dedup_capped_buckets")

    def process(self, element) -> Iterator[tuple[dedup.SizedKey, dedup.SizedKey]]:
        _, members = element  # (document, verification bytes)
        size = 0

        def counted():
            nonlocal size
            for m in members:
                size += 1
                yield m

        pairs = list(dedup.star_pairs(counted(), self._max_bucket, self._centers))  # < centers * max_bucket
        if size > self._max_bucket:
            self._capped.inc()
        yield from pairs


_OWN, _SENT = 0, 1  # what a document's group at a meeting holds: its own part, or one its pair sent

# What verification compares, as a plain tuple (Beam's coder writes it without pickling a class):
# (key, shard, bytes, normalized hash, n-gram hashes, line hashes, NCD samples), the hashes packed
# (``dedup.pack_hashes``: a fifth to a quarter fewer bytes through both groupings of the pair join) and
# the NCD samples too (``dedup.pack_text``: about half), the samples empty when the job scores no NCD.
VerificationPart = tuple[dedup.DocKey, str, int, str, bytes, bytes, tuple[bytes, bytes]]


def _keyed_for_verification(sketch: DocSketch, ncd: bool = False) -> tuple[dedup.DocKey, VerificationPart]:
    """A document's verification part keyed by the document: all of its sketch that the pair join needs
    (not the MinHash signature, which only makes band keys)."""
    return sketch.key, _verification_part(sketch, ncd)


def _verification_part(s: DocSketch, ncd: bool = False) -> VerificationPart:
    samples = (dedup.pack_text(s.ncd_text), dedup.pack_text(s.ncd_head)) if ncd else (b"", b"")
    return (s.key, s.shard, s.bytes, s.normalized_hash, dedup.pack_hashes(s.shingles), dedup.pack_hashes(s.lines),
            samples)


def _from_verification_part(part: VerificationPart) -> DocSketch:
    key, shard, size, normalized, shingles, lines, (ncd_text, ncd_head) = part
    return DocSketch(key, shard, size, normalized, dedup.unpack_hashes(shingles), b"", dedup.unpack_text(ncd_text),
                     dedup.unpack_hashes(lines), dedup.unpack_text(ncd_head))


def _orient(pair: tuple[dedup.SizedKey, dedup.SizedKey]) -> tuple[dedup.DocKey, dedup.DocKey, bool]:
    """(sender, receiver, whether the sender is the pair's first): the smaller sketch travels."""
    (a, a_size), (b, b_size) = pair
    return (a, b, True) if a_size <= b_size else (b, a, False)


def _route_sketch(element, ncd: bool = False):
    """A document's verification part, the pairs it sends to and receives in; its part out to where they
    meet.

    Each pair meets at its receiver, the document with the larger sketch: the sender's verification
    part goes there once per pair, the receiver's own once per document, so one grouping gives both
    halves of every pair and the bytes that cross it are, per pair, the smaller sketch's. With ``ncd``
    the part carries the NCD samples, and a document in any pair sends each sample to be scored once
    (``NCD_CHUNKS``, roles ``x0`` and ``x1`` in the order of ``dedup.NCD_SAMPLES``): C(x) is a
    document's own number, the same in every pair it is in (only C(xy) is the pair's)."""
    key, grouped = element
    for part in grouped["sketch"]:  # exactly one
        paired = False
        for receiver, sender_is_first in grouped["as_sender"]:
            paired = True
            yield receiver, (_SENT, part, sender_is_first)
        if any(True for _ in grouped["as_receiver"]):
            paired = True
            yield key, (_OWN, part, None)
        if ncd and paired:
            for i, sample in enumerate(part[-1]):
                if sample and not (i and sample == part[-1][0]):  # a sample equal to the first: scored once
                    yield beam.pvalue.TaggedOutput(NCD_CHUNKS, _ncd_chunk(f"{_doc_ref(key)}:x{i}",
                                                                          dedup.unpack_text(sample)))


def _pairs_at_receiver(element) -> Iterator[tuple[DocSketch, DocSketch]]:
    """The pairs that meet at one document, each as (first's sketch, second's) in the pair's order; the
    receiver's own part is unpacked once, however many pairs meet there."""
    _, routed = element
    own = next((part for tag, part, _ in routed if tag == _OWN), None)
    if own is None:
        raise ValueError("a candidate pair's receiving document sent nothing of its own")
    own_sketch = _from_verification_part(own)
    for tag, sent, sender_is_first in routed:
        if tag == _SENT:
            sent_sketch = _from_verification_part(sent)
            yield (sent_sketch, own_sketch) if sender_is_first else (own_sketch, sent_sketch)


@dataclasses.dataclass(frozen=True)
class CheckedPair:
    """A candidate pair once its sketches are compared: what the NCD join carries instead of the two
    sketches (which hold up to ``SHINGLE_CAP`` n-gram hashes each), so that join holds a few numbers a
    pair."""

    a: dedup.DocKey
    b: dedup.DocKey
    a_info: tuple[str, str]  # (shard, normalized hash)
    b_info: tuple[str, str]
    verdict: dedup.Verdict  # every rule but NCD's
    ncd_decides: bool = False  # both lines samples drawn from the whole text (``dedup.ncd_may_decide``)


class CheckPair(beam.DoFn):
    """A candidate pair's two sketches in; the pair, checked against every rule but NCD's, out,
    and with ``ncd`` its x + y to score (``NCD_PIECES``) and where C(x) and C(y) go (``NCD_USES``).

    NCD is scored for a pair that a rule verified (the manifest's ``ncd`` column) or that NCD's rule could
    verify (``dedup.ncd_rule``: guarded, n-gram containment at least ``ncd_min_containment``, both lines
    samples drawn from the whole text); the others, which share a line, a band or a header and little
    else (1,701 of 9,346 candidates on the scale benchmark's corpus of Python sources at containment
    0.1, before NCD took the texts' heads), cost no forward and are counted (``dedup_ncd_pairs_skipped``)."""

    def __init__(self, options: DedupOptions, ncd: bool = False):
        self._options, self._ncd = options, ncd
        self._pairs = Metrics.counter(NAMESPACE, "dedup_candidate_pairs")
        self._skipped = Metrics.counter(NAMESPACE, "dedup_ncd_pairs_skipped")

    def process(self, pair: tuple[DocSketch, DocSketch]):
        a, b = pair
        self._pairs.inc()
        verdict = dedup.verify(a, b, self._options)
        decides = self._ncd and dedup.ncd_may_decide(a, b)
        yield _pair_id(a.key, b.key), CheckedPair(a.key, b.key, (a.shard, a.normalized_hash),
                                                  (b.shard, b.normalized_hash), verdict, decides)
        if not self._ncd:
            return
        if verdict.rule is None and (not decides or not verdict.guarded
                                     or verdict.containment < self._options.ncd_min_containment):
            self._skipped.inc()
            return
        yield from _concatenation(((a.key, a.ncd_samples), (b.key, b.ncd_samples)))


def _concatenation(samples: tuple[tuple[dedup.DocKey, tuple[bytes, ...]], tuple[dedup.DocKey, tuple[bytes, ...]]]):
    """A pair's NCD samples in; x + y of each sample to score (``NCD_PIECES``, roles ``xy0``, ``xy1``), and
    where its documents' own C(x) and C(y) are to go (``NCD_USES``), out. A sample empty on either side
    gives no NCD of its own, and neither does one equal to the first on both sides (a text with few
    lines, whose lines sample is its head: the same NCD); a pair with none has no NCD."""
    (a, xs), (b, ys) = samples
    pid = _pair_id(a, b)
    scored = False
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x and y and not (i and (x, y) == (xs[0], ys[0])):
            scored = True
            yield beam.pvalue.TaggedOutput(NCD_PIECES, _ncd_chunk(f"{pid}:xy{i}", x + y))
    if scored:
        yield beam.pvalue.TaggedOutput(NCD_USES, (_doc_ref(a), (pid, "x")))
        yield beam.pvalue.TaggedOutput(NCD_USES, (_doc_ref(b), (pid, "y")))


def _key_by_owner(s: ScoredChunk) -> tuple[str, tuple[str, float | None]]:
    """A scored NCD piece keyed by what it belongs to: a pair (``xy0``, ``xy1``) or a document (``x0``, ``x1``)."""
    owner, role = s.chunk.doc_id.split(":")
    return owner, (role, s.bits)


def _bits_to_pairs(element) -> Iterator[tuple[str, tuple[str, float | None]]]:
    """A document's C(x) of each sample out to every pair it is in, as that pair's ``x0``, ``x1`` or ``y0``,
    ``y1``."""
    _, grouped = element
    bits = [(role[1:], b) for role, b in grouped["scored"]]  # (sample index, bits)
    for pid, role in grouped["uses"]:
        for i, b in bits:
            yield pid, (f"{role}{i}", b)


class VerifyPair(beam.DoFn):
    """A checked pair and its NCD bits in; an ``Edge`` out when a rule holds (NCD's is the last one: it reads
    the lines samples' NCD, ``dedup.rule_ncd``; the edge records the smaller of both samples', ``pair_ncd``)."""

    def __init__(self, options: DedupOptions):
        self._options = options
        self._verified = Metrics.counter(NAMESPACE, "dedup_verified_pairs")

    def process(self, element) -> Iterator[Edge]:
        Progress.add("dedup", items=1)
        _, grouped = element
        bits = dict(grouped["scored"])
        distance = dedup.pair_ncd(bits)
        for p in grouped["pair"]:
            v = p.verdict
            rule = v.rule or (dedup.ncd_rule(dedup.rule_ncd(bits), v, self._options) if p.ncd_decides else None)
            if rule is not None:
                self._verified.inc()
                yield Edge(p.a, p.b, v.jaccard, distance, p.a_info, p.b_info, v.containment, v.line_containment,
                           v.length_ratio, rule)


def _edge_ends(e: Edge) -> Iterator[tuple[dedup.DocKey, Edge]]:
    yield e.a, e
    yield e.b, e


def _best_edge(edges: Iterable[Edge]) -> Edge:
    return min(edges, key=dedup.edge_rank)


def _member_of_cluster(element) -> Iterator[tuple[dedup.DocKey, tuple[dedup.DocKey, Edge]]]:
    node, grouped = element
    for root in grouped["label"]:  # exactly one
        for best in grouped["best"]:  # exactly one
            yield root, (node, best)


def cluster_rows(element) -> Iterator[tuple[dedup.DocKey, dedup.DocKey, dict]]:
    """A cluster's members in; their rows out, with (kept document, member) to sort them by. Two passes
    over the grouped members (size and the kept document's hash, then the rows): nothing held."""
    root, members = element
    size, root_hash = 0, None
    for node, best in members:
        size += 1
        if node == root:
            root_hash = dedup.node_info(root, best)[1]
    for node, best in members:
        yield root, node, dedup.duplicate_row(node, root, size, best, root_hash)


class FindDuplicates(beam.PTransform):
    """``DocSketch`` elements in; rows of the duplicates manifest out, as (kept document's key,
    document's key, row), one per document in a cluster.

    ``score`` is a ``ScoreChunks`` (no coding) with the audit's model: it gives C(x), C(y) and C(xy)
    for the NCD. Without it, NCD is left empty. Clusters are the connected components of the verified
    edges, found by ``ConnectedComponents`` in ``options.component_rounds`` unrolled rounds (exact
    whatever the number; fewer rounds leave more to gather on one worker): no step holds every edge.
    """

    def __init__(self, options: DedupOptions = DedupOptions(), score: beam.PTransform | None = None):
        super().__init__()
        self._options = options
        self._score = score
        self._rounds = options.component_rounds

    def expand(self, sketches):
        o = self._options
        texts = (sketches
                 | "KeyByNormalizedHash" >> beam.Map(dedup.exact_member)
                 | "GroupByNormalizedHash" >> beam.GroupByKey())
        exact = texts | "ExactEdges" >> beam.FlatMap(dedup.exact_edges)
        pairs = (texts
                 | "BandKeys" >> beam.FlatMap(dedup.representative_band_keys, o)
                 | "GroupByBand" >> beam.GroupByKey()
                 | "BucketPairs" >> beam.ParDo(PairBuckets(o.max_bucket, o.bucket_centers))
                 | "UniquePairs" >> beam.Distinct())
        ncd = self._score is not None
        keyed = sketches | "KeyByDoc" >> beam.Map(_keyed_for_verification, ncd)
        oriented = pairs | "SmallerSketchTravels" >> beam.Map(_orient)
        joined = ({"sketch": keyed,
                   "as_sender": oriented | "KeyBySender" >> beam.Map(lambda o: (o[0], (o[1], o[2]))),
                   "as_receiver": oriented | "KeyByReceiver" >> beam.Map(lambda o: (o[1], o[0]))}
                  | "JoinSketchAndPairs" >> beam.CoGroupByKey()
                  | "RouteSketches" >> beam.FlatMap(_route_sketch, ncd).with_outputs(NCD_CHUNKS, main="routed"))
        checked = (joined.routed
                   | "MeetAtReceiver" >> beam.GroupByKey()
                   | "PairParts" >> beam.FlatMap(_pairs_at_receiver)
                   | "Jaccard" >> beam.ParDo(CheckPair(o, ncd)).with_outputs(NCD_PIECES, NCD_USES, main="checked"))
        if ncd:
            pieces = (joined.ncd_chunks, checked[NCD_PIECES]) | "NcdPieces" >> beam.Flatten()
            pair_bits, doc_bits = (pieces
                                   | "ScoreConcatenations" >> self._score
                                   | "KeyByOwner" >> beam.Map(_key_by_owner)
                                   | "PairsOrDocuments" >> beam.Partition(lambda kv, n: int(not kv[1][0].startswith("xy")), 2))
            singles = ({"scored": doc_bits, "uses": checked[NCD_USES]}
                       | "JoinDocumentBits" >> beam.CoGroupByKey()
                       | "BitsToPairs" >> beam.FlatMap(_bits_to_pairs))
            scored = (pair_bits, singles) | "AllNcdBits" >> beam.Flatten()
        else:
            scored = sketches.pipeline | "NoNcd" >> beam.Create([])
        near = ({"pair": checked.checked, "scored": scored}
                | "JoinNcd" >> beam.CoGroupByKey()
                | "Verify" >> beam.ParDo(VerifyPair(o)))
        edges = (exact, near) | "AllEdges" >> beam.Flatten()
        labels = (edges
                  | "EdgePairs" >> beam.Map(lambda e: (e.a, e.b))
                  | "Clusters" >> ConnectedComponents(self._rounds))
        best = (edges
                | "EdgeEnds" >> beam.FlatMap(_edge_ends)
                | "BestEdge" >> beam.CombinePerKey(_best_edge))
        return (
            {"label": labels, "best": best}
            | "JoinLabelAndEdge" >> beam.CoGroupByKey()
            | "KeyByCluster" >> beam.FlatMap(_member_of_cluster)
            | "GroupByCluster" >> beam.GroupByKey()
            | "ClusterRows" >> beam.FlatMap(cluster_rows)
        )
