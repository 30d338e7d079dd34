"""The dataset builder: prompts → k sampled completions → explicit rewards → every feedback format.

This is how the papers made their training data (sample from a model, score with a reward model or
judge). The builder appends finished prompts to ``listwise.all.jsonl`` as it goes, so a restart
skips them; the split by prompt and the derived formats are written at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from unialign import jsonfile
from unialign.data.converters import convert
from unialign.data.errors import DataError
from unialign.data.formats import LISTWISE_ENDED, validate_row
from unialign.data.io import write_rows
from unialign.data.sources import read_rows
from unialign.feedback import FORMATS
from unialign.generation import GenerationConfig, check_distinct_samples, generate
from unialign.rewards.base import RewardSource

logger = logging.getLogger(__name__)

# Every format but listwise is derived from the listwise rows the builder samples.
DERIVED_FORMATS = tuple(f for f in FORMATS if f != "listwise")


def prompt_id(row: dict[str, Any]) -> str:
    """A stable id: the row's ``id`` or a hash of its prompt."""
    if row.get("id") is not None:
        return str(row["id"])
    return hashlib.sha1(json.dumps(row["prompt"], sort_keys=True).encode()).hexdigest()[:12]


def in_heldout(pid: str, fraction: float) -> bool:
    """Deterministic split by prompt id, independent of order and of how many prompts there are."""
    bucket = int(hashlib.sha256(pid.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def as_conversation(prompt: Any) -> list[dict]:
    """Plain-string prompts become one user turn, so the chat template frames them as in chat use."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def check_build_options(
    *, k: int, heldout_fraction: float, prompts_per_batch: int, names: dict[str, str] | None = None
) -> None:
    """Refuse builder settings that would write useless data or fail only after sampling every prompt.

    ``names`` maps an option to what the caller calls it (the CLI passes its flags), so the message
    names the argument the user typed.
    """
    names = names or {}

    def refuse(option: str, expected: str, value: Any) -> ValueError:
        return ValueError(f"{names.get(option, option)} must be {expected}; got {value!r}")

    if not _is_int(k) or k < 1:
        raise refuse("k", "an integer of at least 1 (completions sampled per prompt)", k)
    if isinstance(heldout_fraction, bool) or not isinstance(heldout_fraction, (int, float)) \
            or not 0 <= heldout_fraction < 1:
        raise refuse("heldout_fraction", "at least 0 and below 1 (the fraction of prompts held out)", heldout_fraction)
    if not _is_int(prompts_per_batch) or prompts_per_batch < 1:
        raise refuse("prompts_per_batch", "an integer of at least 1", prompts_per_batch)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_prompt_rows(rows: list[dict[str, Any]], source: str) -> None:
    """Every row must be a valid prompt row (a ``prompt`` column, string or conversation), and there must be one.

    Raises:
        DataError: naming ``source`` (and the row and field of the first bad row).
    """
    if not rows:
        raise DataError("has no rows; the builder needs at least one row with a `prompt`", source=source)
    for index, row in enumerate(rows):
        validate_row(row, "prompt", index, source)


def build_dataset(
    prompts: list[dict[str, Any]],
    model,
    tokenizer,
    reward: RewardSource,
    out_dir: str | Path,
    *,
    k: int = 4,
    generation: GenerationConfig | None = None,
    heldout_fraction: float = 0.2,
    prompts_per_batch: int = 8,
    progress: bool = True,
) -> dict[str, int]:
    """Sample, score and write the dataset; returns row counts per written file.

    Resumable: prompts already in ``out_dir/listwise.all.jsonl`` are not sampled again.

    Raises:
        ValueError: for ``k`` < 1, ``heldout_fraction`` outside [0, 1), ``prompts_per_batch`` < 1, or
            ``k`` > 1 with greedy decoding (``k`` identical completions).
        DataError: when ``prompts`` is empty or a row has no valid ``prompt``; both before any sampling.
    """
    check_build_options(k=k, heldout_fraction=heldout_fraction, prompts_per_batch=prompts_per_batch)
    generation = replace(generation or GenerationConfig(), num_return_sequences=k)
    check_distinct_samples(generation.temperature, k, "k")
    check_prompt_rows(prompts, "prompts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    raw_path = out / "listwise.all.jsonl"
    done = {row["id"] for row in read_rows(raw_path)} if raw_path.exists() else set()
    todo = [p for p in prompts if prompt_id(p) not in done]
    bar = tqdm(
        total=len(prompts), initial=len(prompts) - len(todo), desc="building", disable=not progress, unit="prompt"
    )
    for start in range(0, len(todo), prompts_per_batch):
        batch = todo[start : start + prompts_per_batch]
        conversations = [as_conversation(p["prompt"]) for p in batch]
        samples = generate(model, tokenizer, conversations, generation, progress=False)
        flat_prompts = [c for c, group in zip(conversations, samples) for _ in group]
        flat_texts = [g.text for group in samples for g in group]
        scores = [float(s) for s in reward(flat_prompts, flat_texts)]
        check_rewards(scores, [prompt_id(p) for p in batch], k, getattr(reward, "name", type(reward).__name__))
        with open(raw_path, "a", encoding="utf-8") as handle:
            for i, (row, conversation, group) in enumerate(zip(batch, conversations, samples)):
                record = {
                    "id": prompt_id(row),
                    "prompt": conversation,
                    "completions": [g.text for g in group],
                    "rewards": scores[i * k : (i + 1) * k],
                    "ended": [g.ended for g in group],
                }
                handle.write(jsonfile.dumps(record, ensure_ascii=False) + "\n")
        bar.update(len(batch))
    bar.close()
    return write_splits(read_rows(raw_path), out, heldout_fraction, reward.bounds)


def check_rewards(scores: list[float], ids: list[str], k: int, name: str) -> None:
    """Refuse a reward source's output unless it is one finite number per completion.

    A NaN written to ``listwise.all.jsonl`` would poison every derived format (and the resumed run).
    """
    if len(scores) != k * len(ids):
        raise ValueError(f"reward source {name} returned {len(scores)} rewards for {k * len(ids)} completions")
    for position, score in enumerate(scores):
        if not math.isfinite(score):
            raise ValueError(
                f"reward source {name} returned {score} for completion {position % k + 1} of prompt "
                f"{ids[position // k]!r}; rewards must be finite numbers"
            )


def listwise_record(row: dict[str, Any]) -> dict[str, Any]:
    """A shipped listwise row: id, prompt, completions, rewards and, where a sample hit the length cap,
    ``completions_ended`` (the raw file calls it ``ended``), so that tokenization gives
    unfinished samples no terminator."""
    record = {k: row[k] for k in ("id", "prompt", "completions", "rewards")}
    ended = row.get("ended", row.get(LISTWISE_ENDED))
    if ended is not None:
        record[LISTWISE_ENDED] = [bool(e) for e in ended]
    return record


def write_splits(
    rows: list[dict[str, Any]], out: Path, heldout_fraction: float, bounds: tuple[float, float] | None
) -> dict[str, int]:
    """Split listwise rows by prompt and write every derived format for each split."""
    counts = {}
    if bounds is None:  # unbounded reward: normalize scores by the range seen over both splits
        seen = [r for row in rows for r in row["rewards"]]
        bounds = (min(seen), max(seen)) if min(seen) < max(seen) else (min(seen), min(seen) + 1.0)
        logger.warning("reward source has no bounds; score format uses the observed range %s", bounds)
    for split in ("train", "test"):
        part = [r for r in rows if in_heldout(r["id"], heldout_fraction) == (split == "test")]
        listwise = [listwise_record(r) for r in part]
        write_rows(listwise, out / f"listwise.{split}.jsonl")
        counts[f"listwise.{split}"] = len(listwise)
        for fmt in DERIVED_FORMATS:
            options = {"reward_range": bounds} if fmt == "score" else {}
            result = convert([{k: v for k, v in r.items() if k != "id"} for r in listwise], to=fmt, **options)
            write_rows(list(result.rows), out / f"{fmt}.{split}.jsonl")
            counts[f"{fmt}.{split}"] = len(result.rows)  # drops are logged by the converter
    return counts
