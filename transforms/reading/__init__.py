"""Listing shards and reading them into documents: one reader class per format."""
