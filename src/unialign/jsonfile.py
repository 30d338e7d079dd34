"""Writing JSON that every JSON parser can read.

Python's ``json`` writes ``NaN``, ``Infinity`` and ``-Infinity`` by default, which are not JSON
(RFC 8259): ``jq``, JavaScript's ``JSON.parse`` and most other parsers refuse the whole file. Every
JSON file unialign writes for a user (``eval.json``, ``metrics.jsonl``, ``config.json``, data files,
bench and experiment records, checkpoint markers) goes through :func:`dumps`, which writes a
non-finite float as ``null``. A value that must be finite is checked by its writer before it gets
here. Internal transports that Python alone reads back (cache keys, Arrow row text) keep
``json.dumps``, so a ``NaN`` in user data still reaches validation as a ``NaN``.

This module is a leaf: it imports nothing from unialign.
"""

from __future__ import annotations

import json
import math
from typing import Any


def finite_or_null(value: Any) -> Any:
    """``value`` with every non-finite float (in nested dicts, lists and tuples too) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(item) for item in value]
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``value`` with non-finite floats written as ``null``: always valid JSON.

    Takes ``json.dumps``'s keyword arguments (``indent``, ``ensure_ascii``, ``default``...) except
    ``allow_nan``, which is always false; a value produced by ``default`` is cleaned the same way.
    """
    default = kwargs.pop("default", None)
    if default is not None:
        kwargs["default"] = lambda item: finite_or_null(default(item))
    return json.dumps(finite_or_null(value), allow_nan=False, **kwargs)


__all__ = ["dumps", "finite_or_null"]
