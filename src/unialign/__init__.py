"""unialign: every alignment method as one implicit-vs-explicit reward loss, on one trainer.

The public names are imported on first use, so ``import unialign`` stays cheap (no torch or
transformers until a function needs them).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

# bitsandbytes (which peft imports whenever it is installed) warns at import, on CPUs with AVX512-BF16, that an
# optional kernel from the Hugging Face hub is missing; its own CPU kernel is used instead, so the line tells a
# user nothing to act on. Set before that import so it is never printed; real errors still are.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

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
