"""Exact and near-duplicate detection: sketches, verified pairs, clusters as connected components."""
