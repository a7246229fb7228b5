"""Explicit Arrow schemas of every manifest. The README documents each column."""

from __future__ import annotations

import pyarrow as pa

CHUNKS = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("position", pa.int64(), nullable=False),
    pa.field("chunk_index", pa.int32(), nullable=False),
    pa.field("offset", pa.int64(), nullable=False),
    pa.field("bytes", pa.int32(), nullable=False),
    pa.field("tokens", pa.int32(), nullable=False),
    pa.field("bits", pa.float64()),
    pa.field("bpb", pa.float64()),
    pa.field("coded_bits", pa.int64()),
    pa.field("zlib_bits", pa.int64(), nullable=False),
    pa.field("zstd_bits", pa.int64(), nullable=False),
    pa.field("xz_bits", pa.int64(), nullable=False),
    pa.field("min_k", pa.float64()),
    pa.field("min_k_pp", pa.float64()),
    pa.field("reference_bits", pa.float64()),
    pa.field("padded_length", pa.int32(), nullable=False),
    pa.field("sha256", pa.binary(32), nullable=False),
    pa.field("flags", pa.list_(pa.string()), nullable=False),
])

DOCUMENTS = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("position", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("chunks", pa.int32(), nullable=False),
    pa.field("tokens", pa.int64(), nullable=False),
    pa.field("scored_bytes", pa.int64(), nullable=False),
    pa.field("flagged_chunks", pa.int32(), nullable=False),
    pa.field("bits", pa.float64()),
    pa.field("bpb", pa.float64()),
    pa.field("coded_bits", pa.int64()),
    pa.field("coded_bpb", pa.float64()),
    pa.field("zlib_bpb", pa.float64(), nullable=False),
    pa.field("zstd_bpb", pa.float64(), nullable=False),
    pa.field("xz_bpb", pa.float64(), nullable=False),
    pa.field("zlib_ratio", pa.float64()),
    pa.field("min_k", pa.float64()),
    pa.field("min_k_pp", pa.float64()),
    pa.field("reference_bits", pa.float64()),
    pa.field("reference_bpb", pa.float64()),
    pa.field("reference_diff_bpb", pa.float64()),
    pa.field("memorization_flags", pa.list_(pa.string()), nullable=False),
    pa.field("content_hash", pa.string(), nullable=False),
    pa.field("normalized_hash", pa.string(), nullable=False),
    pa.field("snippet", pa.string(), nullable=False),
])

SHARDS = pa.schema([
    pa.field("shard", pa.string(), nullable=False),
    pa.field("documents", pa.int64(), nullable=False),
    pa.field("dead_letters", pa.int64(), nullable=False),
    pa.field("chunks", pa.int64(), nullable=False),
    pa.field("flagged_chunks", pa.int64(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("scored_bytes", pa.int64(), nullable=False),
    pa.field("bits", pa.float64(), nullable=False),
    pa.field("bpb", pa.float64()),
    pa.field("coded_bits", pa.int64()),
    pa.field("coded_bpb", pa.float64()),
    pa.field("zlib_bpb", pa.float64()),
    pa.field("zstd_bpb", pa.float64()),
    pa.field("xz_bpb", pa.float64()),
    pa.field("min_doc_bpb", pa.float64()),
    pa.field("p05_doc_bpb", pa.float64()),
    pa.field("p25_doc_bpb", pa.float64()),
    pa.field("median_doc_bpb", pa.float64()),
    pa.field("p75_doc_bpb", pa.float64()),
    pa.field("p95_doc_bpb", pa.float64()),
    pa.field("max_doc_bpb", pa.float64()),
    pa.field("exact_duplicates", pa.int64(), nullable=False),
    pa.field("near_duplicates", pa.int64(), nullable=False),
    pa.field("exact_duplicate_rate", pa.float64()),
    pa.field("near_duplicate_rate", pa.float64()),
    pa.field("flagged_bpb", pa.int64(), nullable=False),
    pa.field("flagged_zlib_ratio", pa.int64(), nullable=False),
    pa.field("flagged_min_k", pa.int64(), nullable=False),
    pa.field("flagged_min_k_pp", pa.int64(), nullable=False),
    pa.field("flagged_reference_diff", pa.int64(), nullable=False),
    pa.field("flagged_documents", pa.int64(), nullable=False),
])

DEAD_LETTER = pa.schema([
    pa.field("shard", pa.string(), nullable=False),
    pa.field("position", pa.int64(), nullable=False),
    pa.field("doc_id", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
])

PAYLOADS = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("position", pa.int64(), nullable=False),
    pa.field("chunk_index", pa.int32(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("recipe", pa.string(), nullable=False),
    pa.field("payload", pa.binary(), nullable=False),
])

DUPLICATES = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("position", pa.int64(), nullable=False),
    pa.field("cluster_id", pa.int64(), nullable=False),
    pa.field("cluster_size", pa.int64(), nullable=False),
    pa.field("keep", pa.bool_(), nullable=False),
    pa.field("kept_doc_id", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("matched_doc_id", pa.string(), nullable=False),
    pa.field("jaccard", pa.float64(), nullable=False),
    pa.field("ncd", pa.float64()),
    pa.field("containment", pa.float64()),
    pa.field("line_containment", pa.float64()),
    pa.field("length_ratio", pa.float64()),
    pa.field("rule", pa.string(), nullable=False),
])

# Internal state for incremental runs (``_state/sketches``): a document's dedup sketch.
SKETCHES = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False),
    pa.field("position", pa.int64(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("bytes", pa.int64(), nullable=False),
    pa.field("normalized_hash", pa.string(), nullable=False),
    pa.field("shingles", pa.binary(), nullable=False),
    pa.field("signature", pa.binary(), nullable=False),
    pa.field("ncd_text", pa.binary(), nullable=False),
    pa.field("lines", pa.binary(), nullable=False),
    pa.field("ncd_head", pa.binary(), nullable=False),
])

MANIFESTS = {
    "chunks": CHUNKS,
    "documents": DOCUMENTS,
    "shards": SHARDS,
    "dead_letter": DEAD_LETTER,
    "payloads": PAYLOADS,
    "duplicates": DUPLICATES,
}
