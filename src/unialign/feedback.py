"""What every layer agrees on about feedback formats: their names, their slot layouts, and the one way a
bounded score or reward is mapped onto [0, 1].

The losses index completions by slot, ``config.py`` checks ``dataset_format`` against the names, and
``unialign.data.formats`` holds the validator table keyed by the same names. This module is a leaf
(it imports nothing from unialign, and no torch), so all three can import it whatever their layer.
"""

from __future__ import annotations

import math
from typing import Any

# Completion columns in slot order, per feedback format (docs/data.md, SPEC §2). Losses index slots
# by these positions. Listwise rows have a variable number of completions (masked); prompt-only rows none.
SLOTS: dict[str, tuple[str, ...]] = {
    "pairwise": ("chosen", "rejected"),
    "binary": ("completion",),
    "score": ("completion",),
    "triple": ("reference", "chosen", "rejected"),
    "listwise": (),
    "sft": ("completion",),
    "prompt": (),
}

# Every feedback format's name, in the order messages list them.
FORMATS: tuple[str, ...] = tuple(SLOTS)


def rescale(value: Any, bounds: tuple[float, float] | list[float]) -> Any:
    """``(value − low) / (high − low)``: a value of the range ``[low, high]`` mapped onto [0, 1].

    The one range normalization of the package: score columns with a declared ``score_range``, the
    ``score`` converter's ``reward_range``, a bounded reward source's ``bounds`` and online UNA's
    ``reward_normalization: range`` all go through it. ``value`` may be a float or a tensor; values
    outside the range map outside [0, 1], and each caller decides whether that is an error or a clip.

    Raises:
        ValueError: unless ``bounds`` is two finite numbers with ``low < high``.
    """
    try:
        low, high = (float(b) for b in bounds)
    except (TypeError, ValueError):
        raise ValueError(f"a range must be [low, high] with low < high, got {bounds!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"a range must be [low, high] with low < high, got {list(bounds)}")
    return (value - low) / (high - low)
