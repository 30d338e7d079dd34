"""Datasets: feedback formats, sources, converters, tokenization and batching."""

from unialign.data.bundled import load_bundled

__all__ = ["load_bundled"]
