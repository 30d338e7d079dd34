"""The bundled dataset: prompts written for unialign, 4 SmolLM2-135M-Instruct samples each, scored
by the offline judge (see CARD.md). Only the listwise rows ship; every other format is derived on
load with the same converters users call, so the formats can never disagree."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from unialign.data.converters import convert
from unialign.data.errors import DataError
from unialign.data.io import read_jsonl
from unialign.feedback import FORMATS as FEEDBACK_FORMATS

FOLDER = Path(__file__).parent
FORMATS = (*FEEDBACK_FORMATS, "prompts")  # "prompts": another name for the prompt-only rows
SPLITS = ("train", "test")
EVAL_PROMPTS = "bundled:prompts:test"  # the held-out prompts evaluation reads by default


def load_bundled(fmt: str = "pairwise", split: str = "train") -> list[dict[str, Any]]:
    """Rows of the bundled dataset in one feedback format (``prompts`` = prompt-only) and split.

    In a config or on the command line the same rows are ``bundled:<format>`` (``bundled:<format>:<split>``).
    """
    if fmt not in FORMATS:
        raise DataError(f"unknown bundled format {fmt!r}; choose one of {', '.join(FORMATS)}", source="bundled")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; choose train or test", source="bundled")
    path = FOLDER / f"listwise.{split}.jsonl"
    if not path.exists():
        raise DataError("the bundled dataset is missing from this installation", source=str(path))
    rows = [{k: v for k, v in row.items() if k != "id"} for row in read_jsonl(path)]
    target = "prompt" if fmt == "prompts" else fmt
    if target == "listwise":
        return rows
    options = {"reward_range": (0.0, 1.0)} if target == "score" else {}
    return list(convert(rows, to=target, **options).rows)
