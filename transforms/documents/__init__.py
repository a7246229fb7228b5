"""Documents into chunks, and what is known of a document as it streams by: hashes, sketch, numbers."""
