"""Crash-safe run state: complete checkpoints, resume, the metrics file and cached reference log-probs.

``transformers.Trainer`` writes a checkpoint file by file, so a kill during a save leaves a folder that
looks like a checkpoint but lacks (or has half of) the optimizer or trainer state. unialign writes a
marker, :data:`MARKER`, into a checkpoint only after every process has finished writing it. The marker
records the size and sha256 of every file, and the settings the checkpoint was trained with; resume
only ever picks a checkpoint whose marker is readable and whose files still match it, and refuses to
continue with settings that change what is trained (:data:`RESUME_SAFE_KEYS` lists those that do not).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from array import array
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save

from unialign import jsonfile
from unialign.data.tokenize import TokenizedExample
from unialign.data.tokenized import field_values, store_values, token_arrays
from unialign.rundir import CHECKPOINT_MARKER, CHECKPOINT_RE

logger = logging.getLogger(__name__)

MARKER = CHECKPOINT_MARKER
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
    match = CHECKPOINT_RE.match(Path(path).name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    """Whether a checkpoint folder was fully written (its completion marker exists; see :func:`verify_checkpoint`)."""
    return (Path(path) / MARKER).is_file()


def read_marker(path: Path) -> dict[str, Any]:
    """The completion marker's contents: step, data fingerprint, files (size, sha256), settings."""
    return json.loads((Path(path) / MARKER).read_text(encoding="utf-8"))


def mark_complete(path: Path, step: int, data_fingerprint: str | None, settings: dict[str, Any] | None = None) -> None:
    """Record that every file of the checkpoint at ``path`` is written. Call it last, on one process.

    The marker lists each file with its size and sha256 (:func:`verify_checkpoint` checks them) and
    ``settings``, what :func:`training_settings` recorded (:func:`resume_differences` compares them).
    """
    path = Path(path)
    files = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER):
        files[file.relative_to(path).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file)}
    info = {"step": step, "data_fingerprint": data_fingerprint, "files": files, "settings": settings}
    atomic_write_text(path / MARKER, jsonfile.dumps(info) + "\n")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_checkpoint(path: Path) -> str | None:
    """What is wrong with the checkpoint at ``path``, or ``None`` when it is complete and intact.

    Complete: its marker exists, is readable and records the folder's step. Intact: every file the
    marker lists has the recorded size and sha256 (a marker from before files were recorded skips this).
    """
    path = Path(path)
    if not (path / MARKER).is_file():
        return f"it has no {MARKER}, so its save was interrupted"
    try:
        marker = read_marker(path)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"its {MARKER} is unreadable ({' '.join(str(err).split())}), so the save may not have finished"
    step = marker.get("step") if isinstance(marker, dict) else None
    if not isinstance(step, int) or isinstance(step, bool):
        return f"its {MARKER} records no step, so the save may not have finished"
    if checkpoint_step(path) not in (None, step):
        return f"its {MARKER} records step {step}, not the folder's step"
    files = marker.get("files") or {}
    if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
        return f"its {MARKER} has an unreadable file list, so the save may not have finished"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected.get("size"):
            return f"{file} is {size} bytes but was saved with {expected.get('size')} (truncated or overwritten)"
        if _sha256(file) != expected.get("sha256"):
            return f"{file} does not match the sha256 recorded when it was saved (corrupted)"
    return None


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Every ``checkpoint-N`` folder in ``output_dir``, oldest step first, complete or not."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [p for p in output_dir.iterdir() if p.is_dir() and checkpoint_step(p) is not None]
    return sorted(found, key=checkpoint_step)


def latest_complete_checkpoint(output_dir: Path) -> Path | None:
    """The intact checkpoint with the highest step, or ``None``. Others are skipped with a warning naming why."""
    for path in reversed(list_checkpoints(output_dir)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        logger.warning("skipping %s: %s", path, problem)
    return None


def last_checkpoint_hint(output_dir: Path) -> str:
    """Where a run stopped by a failed write can continue from, as the end of its error message.

    Checks markers only (no hashing): it is called on the error path, right after a failure.
    """
    for path in reversed(list_checkpoints(output_dir)):
        try:
            step = read_marker(path).get("step")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(step, int):
            return f"{path} (step {step}) is the last complete checkpoint: fix the cause, then resume=true continues"
    return "there is no complete checkpoint to resume from (save_strategy: steps keeps some)"


def resolve_resume(output_dir: Path, resume: bool, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint a run continues from, or ``None`` to start fresh.

    ``resume_from_checkpoint`` (a path) wins over ``resume``; it must be complete and intact.
    ``resume`` picks the newest intact checkpoint in ``output_dir``, skipping (with a warning naming the
    file) any whose save was interrupted or whose files no longer match their marker, and starts fresh
    with a logged message when there is none.
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
        problem = verify_checkpoint(path)
        if problem is not None:
            raise ValueError(
                f"resume_from_checkpoint: {path} cannot be trusted: {problem}. Pick another checkpoint, or use "
                "resume=true to take the newest intact one"
            )
        return path
    if not resume:
        return None
    newest = list_checkpoints(output_dir)
    path = latest_complete_checkpoint(output_dir)
    if path is None:
        logger.warning("resume=true but %s holds no complete checkpoint: starting from scratch", output_dir)
    elif path != newest[-1]:
        logger.warning("resuming from %s, the newest intact checkpoint", path)
    else:
        logger.warning("resuming from %s", path)
    return path


# ----------------------------------------------------------------------------- what a resume may change
# Keys that may differ between a checkpoint and the run resuming from it: they decide how a run is logged,
# saved, evaluated, launched or computed, not what is trained (the log-prob, prefix-sharing and compile
# options give the same values). Every other config key is compared. `dataset` is compared by path and the
# data by its fingerprint. This is the one list.
RESUME_SAFE_KEYS = frozenset(
    {
        "output_dir", "overwrite_output_dir", "resume", "resume_from_checkpoint", "resume_force",
        "ignore_data_skip", "restore_callback_states_from_checkpoint",
        "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level",
        "log_level_replica", "log_on_each_node", "report_to", "run_name", "project", "disable_tqdm",
        "skip_memory_metrics", "include_num_input_tokens_seen", "trackio_space_id", "trackio_bucket_id",
        "trackio_static_space_id",
        "save_strategy", "save_steps", "save_total_limit", "save_on_each_node", "save_only_model", "save_merged",
        "push_to_hub", "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push",
        "hub_revision",
        "eval_dataset", "eval_strategy", "eval_steps", "eval_delay", "eval_on_start", "eval_accumulation_steps",
        "eval_do_concat_batches", "eval_use_gather_object", "per_device_eval_batch_size", "batch_eval_metrics",
        "prediction_loss_only", "include_for_metrics", "metric_for_best_model", "greater_is_better",
        "load_best_model_at_end", "do_train", "do_eval", "do_predict", "bf16_full_eval", "fp16_full_eval",
        "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
        "dataloader_prefetch_factor", "dataloader_multiprocessing_context", "local_rank", "ddp_timeout", "debug",
        "torch_empty_cache_steps", "cpu_keep_freed_memory", "compile_layers", "logprob_impl", "logprob_chunk_size",
        "prefix_sharing", "packed_attention", "padding_free", "gradient_checkpointing", "gradient_checkpointing_kwargs",
        "on_nonfinite",
        # transformers 5.2x's names for gradient checkpointing; the attention kernel computes the same values
        "activation_checkpointing", "activation_checkpointing_kwargs", "activation_checkpointing_save_attention",
        "attn_implementation",
        "allow_pickle", "trust_remote_code", "vllm_gpu_memory_utilization", "vllm_max_model_len",
    }
)
# Keys that may grow on resume, to train a run further (a decaying learning-rate schedule then follows the new end).
RESUME_GROWABLE_KEYS = frozenset({"max_steps", "num_train_epochs"})


class ResumeMismatchError(ValueError):
    """A resume whose settings differ from the checkpoint's in keys that change what is trained."""


def training_settings(args: Any) -> dict[str, Any]:
    """The config values (as JSON) a checkpoint records: every key but :data:`RESUME_SAFE_KEYS`."""
    values = json.loads(args.to_json_string())
    return {key: value for key, value in values.items() if key not in RESUME_SAFE_KEYS}


def resume_differences(marker: dict[str, Any], args: Any, data_fingerprint: str | None) -> list[str]:
    """``key old → new`` for every recorded setting this run changes, and the training data if it changed.

    Keys the checkpoint did not record (older markers, keys added since) are not compared; the keys of
    :data:`RESUME_GROWABLE_KEYS` may grow.
    """
    saved = marker.get("settings") or {}
    current = training_settings(args)
    changed = []
    for key in sorted(saved.keys() & current.keys()):
        old, new = saved[key], current[key]
        if old == new:
            continue
        if key in RESUME_GROWABLE_KEYS and _grows(old, new):
            continue
        changed.append(f"{key} {old!r} → {new!r}")
    recorded = marker.get("data_fingerprint")
    if recorded is not None and data_fingerprint is not None and recorded != data_fingerprint:
        changed.append(f"training data (tokenized rows) {recorded} → {data_fingerprint}")
    return changed


def _grows(old: Any, new: Any) -> bool:
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (old, new))
    return numbers and old > 0 and new > old


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
