"""The bundled dataset: prompts written for unialign, 4 SmolLM2-135M-Instruct samples each, scored
by the offline judge (see CARD.md). Only the listwise rows ship; every other format is derived on
load with the same converters users call, so the formats can never disagree."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from unialign.data.converters import convert
from unialign.data.errors import DataError
from unialign.data.io import read_jsonl
from unialign.feedback import FORMATS as FEEDBACK_FORMATS

FOLDER = Path(__file__).parent
FORMATS = (*FEEDBACK_FORMATS, "prompts")  # "prompts": another name for the prompt-only rows
# "val" and "eval" partition the held-out "test" prompts: "val" (about a third, by a hash of the prompt id)
# is for choosing hyperparameters, "eval" for the final numbers, so no setting is chosen on the prompts it is
# reported on. Neither shares a prompt with "train".
SPLITS = ("train", "test", "val", "eval")
EVAL_PROMPTS = "bundled:prompts:test"  # the held-out prompts evaluation reads by default
VAL_SHARE = 3  # one prompt id in VAL_SHARE (by hash) goes to "val"


def heldout_part(prompt_id: str) -> str:
    """``val`` or ``eval``: which part of the held-out prompts the prompt with this id belongs to."""
    bucket = int(hashlib.sha256(f"val:{prompt_id}".encode()).hexdigest(), 16) % VAL_SHARE
    return "val" if bucket == 0 else "eval"


def load_bundled(fmt: str = "pairwise", split: str = "train") -> list[dict[str, Any]]:
    """Rows of the bundled dataset in one feedback format (``prompts`` = prompt-only) and split.

    In a config or on the command line the same rows are ``bundled:<format>`` (``bundled:<format>:<split>``).
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown bundled format {fmt!r}; choose one of {', '.join(FORMATS)}", source="bundled")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}", source="bundled")
    path = FOLDER / f"listwise.{'train' if split == 'train' else 'test'}.jsonl"
    if not path.exists():
        raise DataError("the bundled dataset is missing from this installation", source=str(path))
    rows = read_jsonl(path)
    if split in ("val", "eval"):
        rows = [row for row in rows if heldout_part(str(row["id"])) == split]
    rows = [{k: v for k, v in row.items() if k != "id"} for row in rows]
    target = "prompt" if fmt == "prompts" else fmt
    if target == "listwise":
        return rows
    options = {"reward_range": (0.0, 1.0)} if target == "score" else {}
    return list(convert(rows, to=target, **options).rows)
