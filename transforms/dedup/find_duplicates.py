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
NCD_CHUNKS = "ncd_chunks"  # pieces NCD scores: each pair's x + y, each paired document's own sample
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

    def process(self, element) -> Iterator[tuple[dedup.DocKey, dedup.DocKey]]:
        _, members = element
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


_OWN, _FIRST = 0, 1  # what a document's group in ``MeetSecond`` holds: its own sketch, or a pair's first sketch


def _keyed_for_verification(sketch: DocSketch) -> tuple[dedup.DocKey, DocSketch]:
    """A sketch keyed by its document, without its MinHash signature: the signature only makes band
    keys, and the pair join copies a sketch once per pair it is first in."""
    return sketch.key, dataclasses.replace(sketch, signature=b"")


def _route_sketch(element, ncd: bool = False):
    """A document's sketch, its pairs as first and as second in; the sketch out to where it is compared.

    Each pair meets at its second document: the first's sketch goes there once per pair, the second's
    own sketch once per document. One grouping then gives both halves of every pair, so the sketches
    cross one join instead of two, and the pairs' copies go straight into that grouping. With ``ncd``,
    a document in any pair also sends its NCD sample to be scored, once: C(x) is a document's own
    number, the same in every pair it is in (only C(xy) is the pair's)."""
    key, grouped = element
    for sketch in grouped["sketch"]:  # exactly one
        paired = False
        for second in grouped["as_first"]:
            paired = True
            yield second, (_FIRST, sketch)
        if any(True for _ in grouped["as_second"]):
            paired = True
            yield key, (_OWN, sketch)
        if ncd and paired and sketch.ncd_text:
            yield beam.pvalue.TaggedOutput(NCD_CHUNKS, _ncd_chunk(f"{_doc_ref(key)}:x", sketch.ncd_text))


def _pair_at_second(element) -> Iterator[tuple[DocSketch, DocSketch]]:
    _, routed = element
    own = next((s for tag, s in routed if tag == _OWN), None)
    if own is None:
        raise ValueError("a candidate pair's second document has no sketch")
    for tag, first in routed:
        if tag == _FIRST:
            yield first, own


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


class JoinedPair(beam.DoFn):
    """A candidate pair, checked against every rule but NCD's; for its NCD, the concatenation x + y to
    score and where its documents' own C(x) and C(y) are to go (``NCD_USES``)."""

    def __init__(self, options: DedupOptions):
        self._options = options
        self._pairs = Metrics.counter(NAMESPACE, "dedup_candidate_pairs")

    def process(self, pair: tuple[DocSketch, DocSketch]):
        a, b = pair
        self._pairs.inc()
        pid = _pair_id(a.key, b.key)
        yield pid, CheckedPair(a.key, b.key, (a.shard, a.normalized_hash), (b.shard, b.normalized_hash),
                               dedup.verify(a, b, self._options))
        if a.ncd_text and b.ncd_text:
            yield beam.pvalue.TaggedOutput(NCD_CHUNKS, _ncd_chunk(f"{pid}:xy", a.ncd_text + b.ncd_text))
            yield beam.pvalue.TaggedOutput(NCD_USES, (_doc_ref(a.key), (pid, "x")))
            yield beam.pvalue.TaggedOutput(NCD_USES, (_doc_ref(b.key), (pid, "y")))


def _key_by_owner(s: ScoredChunk) -> tuple[str, tuple[str, float | None]]:
    """A scored NCD piece keyed by what it belongs to: a pair (``xy``) or a document (``x``)."""
    owner, role = s.chunk.doc_id.split(":")
    return owner, (role, s.bits)


def _bits_to_pairs(element) -> Iterator[tuple[str, tuple[str, float | None]]]:
    """A document's C(x) out to every pair it is in, as that pair's ``x`` or ``y``."""
    _, grouped = element
    bits = next((b for role, b in grouped["scored"] if role == "x"), None)
    for pid, role in grouped["uses"]:
        yield pid, (role, bits)


class VerifyPair(beam.DoFn):
    """A checked pair and its NCD bits in; an ``Edge`` out when a rule holds (NCD's is the last one)."""

    def __init__(self, options: DedupOptions):
        self._options = options
        self._verified = Metrics.counter(NAMESPACE, "dedup_verified_pairs")

    def process(self, element) -> Iterator[Edge]:
        Progress.add("dedup", items=1)
        _, grouped = element
        bits = dict(grouped["scored"])
        distance = dedup.ncd(bits.get("x"), bits.get("y"), bits.get("xy"))
        for p in grouped["pair"]:
            v = p.verdict
            rule = v.rule or dedup.ncd_rule(distance, self._options)
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
        keyed = sketches | "KeyByDoc" >> beam.Map(_keyed_for_verification)
        joined = ({"sketch": keyed,
                   "as_first": pairs | "KeyByFirst" >> beam.Map(lambda p: (p[0], p[1])),
                   "as_second": pairs | "KeyBySecond" >> beam.Map(lambda p: (p[1], p[0]))}
                  | "JoinSketchAndPairs" >> beam.CoGroupByKey()
                  | "RouteSketches" >> beam.FlatMap(_route_sketch, self._score is not None).with_outputs(
                      NCD_CHUNKS, main="routed"))
        checked = (joined.routed
                   | "MeetSecond" >> beam.GroupByKey()
                   | "PairSketches" >> beam.FlatMap(_pair_at_second)
                   | "Jaccard" >> beam.ParDo(JoinedPair(o)).with_outputs(NCD_CHUNKS, NCD_USES, main="pairs"))
        if self._score is not None:
            pieces = (joined.ncd_chunks, checked.ncd_chunks) | "NcdPieces" >> beam.Flatten()
            pair_bits, doc_bits = (pieces
                                   | "ScoreConcatenations" >> self._score
                                   | "KeyByOwner" >> beam.Map(_key_by_owner)
                                   | "PairsOrDocuments" >> beam.Partition(lambda kv, n: int(kv[1][0] == "x"), 2))
            singles = ({"scored": doc_bits, "uses": checked.ncd_uses}
                       | "JoinDocumentBits" >> beam.CoGroupByKey()
                       | "BitsToPairs" >> beam.FlatMap(_bits_to_pairs))
            scored = (pair_bits, singles) | "AllNcdBits" >> beam.Flatten()
        else:
            scored = sketches.pipeline | "NoNcd" >> beam.Create([])
        near = ({"pair": checked.pairs, "scored": scored}
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
