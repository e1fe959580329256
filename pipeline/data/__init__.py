"""Data flow: sources -> preprocess -> pretokenize (+ adaptive lengths) -> corpus (Parquet shards, manifest)."""
