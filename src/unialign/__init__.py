"""unialign: every alignment method as one implicit-vs-explicit reward loss, on one trainer.

The public names are imported on first use, so ``import unialign`` stays cheap (no torch or
transformers until a function needs them).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "UnialignConfig": "unialign.config",
    "load_config": "unialign.config",
    "load_model": "unialign.models",
    "load_tokenizer": "unialign.models",
    "train": "unialign.pipeline",
    "TrainResult": "unialign.run",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str) -> Any:
    """Import a public name's module the first time the name is used."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'unialign' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
