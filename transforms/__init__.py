"""Reusable Beam transforms of lmc-audit: readers, chunking, scoring, manifests."""
