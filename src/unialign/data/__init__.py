"""Datasets: feedback formats, loading, converters, tokenization and batching."""
