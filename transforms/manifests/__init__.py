"""Writing the Parquet manifests: schemas, rows, part files, commit markers."""
