"""Crash-safe run state: complete checkpoints, resume, the metrics file and cached reference log-probs.

``transformers.Trainer`` writes a checkpoint file by file, so a kill during a save leaves a folder that
looks like a checkpoint but lacks (or has half of) the optimizer or trainer state. unialign writes a
marker, :data:`MARKER`, into a checkpoint only after every process has finished writing it; resume
only ever picks a checkpoint that has one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from unialign import jsonfile
from unialign.data.tokenize import TokenizedExample
from unialign.data.tokenized import field_values, store_values, token_arrays

logger = logging.getLogger(__name__)

MARKER = "unialign_checkpoint.json"
REF_LOGPS_FILE = "ref_logps.safetensors"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_REF_FIELDS = ("ref_prompt_logps", "ref_kl_logps")


# ----------------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------- checkpoints
def checkpoint_step(path: Path) -> int | None:
    """The step in a ``checkpoint-N`` folder name, or ``None`` for any other name."""
    match = _CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder was fully written (its completion marker exists)."""
    return (Path(path) / MARKER).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    """The completion marker's contents (step, data fingerprint)."""
    return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))


def mark_complete(path: Path, step: int, data_fingerprint: str | None) -> None:
    """Record that every file of the checkpoint at ``path`` is written. Call it last, on one process."""
    info = {"step": step, "data_fingerprint": data_fingerprint}
    atomic_write_text(Path(path) / MARKER, jsonfile.dumps(info) + "\n")


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Every ``checkpoint-N`` folder in ``output_dir``, oldest step first, complete or not."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The complete checkpoint with the highest step, or ``None``. Incomplete ones are skipped with a warning."""
    for path in reversed(list_checkpoints(output_dir)):
        if is_complete(path):
            return path
        logger.warning("skipping %s: it has no %s, so its save was interrupted", path, MARKER)
    return None


def resolve_resume(output_dir: Path, resume: bool, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint a run continues from, or ``None`` to start fresh.

    ``resume_from_checkpoint`` (a path) wins over ``resume``; it must be a complete checkpoint.
    ``resume`` picks the newest complete checkpoint in ``output_dir``, and starts fresh with a logged
    message when there is none.
    """
    if resume_from_checkpoint:
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise ValueError(f"resume_from_checkpoint: {path} is not a folder")
        if not is_complete(path):
            raise ValueError(
                f"resume_from_checkpoint: {path} has no {MARKER}: its save was interrupted or it was not written "
                "by unialign, so it may be incomplete. Pick a complete checkpoint, or use resume=true to take "
                "the newest complete one"
            )
        return path
    if not resume:
        return None
    path = latest_complete_checkpoint(output_dir)
    if path is None:
        logger.warning("resume=true but %s holds no complete checkpoint: starting from scratch", output_dir)
    else:
        logger.warning("resuming from %s", path)
    return path


# ----------------------------------------------------------------------------- metrics.jsonl
def prepare_metrics_file(path: Path, resume_step: int | None) -> None:
    """Make ``metrics.jsonl`` ready for appending: empty for a fresh run; on resume, only what the checkpoint saw.

    On resume, lines of steps after the checkpoint are dropped (the resumed run logs them again), and so
    is a training summary line (``train_runtime``): the resumed run writes its own.
    """
    path = Path(path)
    if resume_step is None:
        path.unlink(missing_ok=True)
        return
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if entry.get("step", 0) <= resume_step and "train_runtime" not in entry:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))


# ----------------------------------------------------------------------------- data fingerprint
def data_fingerprint(examples: Sequence[TokenizedExample]) -> str:
    """A hash of the tokenized rows (prompt, completions, KL completion) in order: changes when the data does."""
    digest = hashlib.sha256()
    for parts in token_arrays(examples):
        for ids in parts:
            digest.update(len(ids).to_bytes(4, "little"))
            digest.update(ids.astype("<i8").tobytes() if isinstance(ids, np.ndarray) else array("q", ids).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- reference log-probs
def save_ref_logps(path: Path, splits: dict[str, Sequence[TokenizedExample]], reference: str) -> None:
    """Write the precomputed reference log-probs of each split, keyed by row position, atomically.

    Per split ``s``: ``s.ref_logps`` (all completions' values, flat) with ``s.offsets`` (row ``i``'s values
    are ``ref_logps[offsets[i]:offsets[i+1]]``), and ``s.ref_prompt_logps`` / ``s.ref_kl_logps`` when the
    method has them. The metadata records each split's row count and :func:`data_fingerprint`.
    """
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    metadata = {"reference": reference}
    for name, examples in splits.items():
        ref_logps = field_values(examples, "ref_logps")
        lengths = [len(values) for values in ref_logps]
        tensors[f"{name}.ref_logps"] = torch.tensor([v for values in ref_logps for v in values], dtype=torch.float32)
        tensors[f"{name}.offsets"] = torch.tensor([0, *lengths], dtype=torch.int64).cumsum(0)
        for field in _REF_FIELDS:
            column = field_values(examples, field)
            if all(value is not None for value in column):
                tensors[f"{name}.{field}"] = torch.tensor(column, dtype=torch.float32)
        metadata[f"{name}.rows"] = str(len(examples))
        metadata[f"{name}.fingerprint"] = data_fingerprint(examples)
    atomic_write_bytes(Path(path), save(tensors, metadata=metadata))


def load_ref_logps(
    path: Path,
    splits: dict[str, Sequence[TokenizedExample]],
    reference: str,
    required: Sequence[str] = (),
) -> None:
    """Fill ``ref_logps`` (and prompt/KL terms) into each split's examples from :func:`save_ref_logps`'s file.

    ``required`` names the extra terms the method needs (``ref_prompt_logps``, ``ref_kl_logps``). Raises
    ``ValueError`` naming the file when it was written for other data, another reference model or a method
    that computed other terms.
    """
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = set(handle.keys())
        tensors = {key: handle.get_tensor(key) for key in keys}
    hint = f"delete {path} to compute them again, or restore the data and model the run started with"
    if metadata.get("reference") != reference:
        raise ValueError(
            f"{path}: reference log-probs were computed with reference {metadata.get('reference')!r}, "
            f"but this run's reference is {reference!r}; {hint}"
        )
    for name, examples in splits.items():
        if f"{name}.ref_logps" not in keys:
            raise ValueError(f"{path}: has no reference log-probs for the {name} data; {hint}")
        saved_rows = int(metadata[f"{name}.rows"])
        if saved_rows != len(examples):
            raise ValueError(
                f"{path}: holds reference log-probs for {saved_rows} {name} rows, but the {name} data now has "
                f"{len(examples)} rows; {hint}"
            )
        if metadata[f"{name}.fingerprint"] != data_fingerprint(examples):
            raise ValueError(
                f"{path}: the {name} data changed since its reference log-probs were computed "
                f"(same {saved_rows} rows, different tokens); {hint}"
            )
        missing = [field for field in required if f"{name}.{field}" not in keys]
        if missing:
            terms = ", ".join(missing)
            raise ValueError(f"{path}: has no {terms} for the {name} data (another method wrote it); {hint}")
        values, offsets = tensors[f"{name}.ref_logps"], tensors[f"{name}.offsets"].tolist()
        extra = {field: tensors[f"{name}.{field}"].tolist() for field in _REF_FIELDS if f"{name}.{field}" in keys}
        rows = range(len(examples))
        store_values(examples, "ref_logps", rows, [values[offsets[i] : offsets[i + 1]].tolist() for i in rows])
        for field, column in extra.items():
            store_values(examples, field, rows, column)
