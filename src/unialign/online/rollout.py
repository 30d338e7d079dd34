"""Prompts in, rollouts out: the data side of online UNA.

A *rollout* is one micro-batch of ``B`` prompts with ``K = num_generations`` completions sampled
for each, their explicit rewards and targets, and the log-probs the loss compares against. It is
laid out like an offline batch (``slot_seq`` maps ``(prompt, sample)`` to a sequence), so the
trainer computes policy log-probs for it exactly as it does offline.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from unialign.data.collate import Batch, pad_sequences
from unialign.data.errors import DataError, PromptTooLong
from unialign.data.formats import detect_format, validate_row
from unialign.data.sources import read_rows, resolve_source
from unialign.data.tokenize import DropReport, encode_prompt_capped
from unialign.losses.registry import Method, check_format

logger = logging.getLogger(__name__)


@dataclass
class PromptRecord:
    """One training prompt: as written (for the reward source) and as token ids (for the policy)."""

    prompt: Any
    prompt_ids: list[int]
    row: int


@dataclass
class PreparedPrompts:
    """The prompts of a dataset, ready for online training."""

    records: list[PromptRecord]
    report: DropReport
    source: str
    format: str = "prompt"

    @property
    def examples(self) -> list[PromptRecord]:
        """Alias so that code written for offline data (model cards) can count rows."""
        return self.records


def prepare_prompts(source: str, cfg, method: Method, tokenizer, split: str = "train") -> PreparedPrompts:
    """Read a dataset's prompts and tokenize them once.

    Any dataset with a ``prompt`` column works (its other columns are ignored); ``bundled`` means the
    bundled prompts. Prompts longer than ``max_prompt_length`` are cut as in offline training (the template's
    structure kept, the oldest text cut); a prompt
    that leaves less than ``max_completion_length`` tokens of ``max_length`` is dropped and counted.
    """
    resolved = resolve_source(source, bundled_default="prompt")
    source = resolved.name
    rows = read_rows(resolved, split=split)
    if not rows:
        raise DataError("has no rows", source=source)
    fmt = cfg.dataset_format
    if fmt == "auto":
        columns = {key for row in rows[:50] if isinstance(row, dict) for key in row}
        fmt = "prompt" if "prompt" in columns else detect_format(columns, source)
    check_format(method, fmt)
    budget = cfg.max_length - cfg.max_completion_length
    if budget < 1:
        raise ValueError(
            f"config key 'max_completion_length' ({cfg.max_completion_length}) must be smaller than "
            f"'max_length' ({cfg.max_length}) so that a prompt fits"
        )
    report = DropReport(total=len(rows))
    records = []
    for index, row in enumerate(rows):
        try:
            example = validate_row(row, "prompt", index, source)
            ids = encode_prompt_capped(example.prompt, tokenizer, cfg.max_prompt_length, cfg.split_special_tokens)
            if not ids:
                raise DataError("tokenizes to no tokens; a prompt needs at least one", field="prompt")
            if len(ids) > budget:
                raise PromptTooLong(
                    f"prompt alone has {len(ids)} tokens, over max_length={cfg.max_length} minus "
                    f"max_completion_length={cfg.max_completion_length}",
                    field="prompt",
                )
            records.append(PromptRecord(example.prompt, ids, index))
        except DataError as err:
            overlong = isinstance(err, PromptTooLong)
            if not overlong and cfg.on_bad_row == "error":
                raise DataError(err.problem, source=source, row=index, field=err.field) from None
            report.add("prompt longer than max_length" if overlong else f"{err.field}: {err.problem}", index)
    if report.dropped:
        logger.warning("%s: %s", source, report.summary())
    if not records:
        raise DataError(f"no usable prompts ({report.summary()})", source=source)
    return PreparedPrompts(records, report, source)


class RepeatedChunkSampler(torch.utils.data.Sampler):
    """Shuffled prompt indices where every chunk of ``chunk_size`` indices is yielded ``repeats`` times.

    With ``chunk_size`` = prompts per optimizer step and ``repeats = num_iterations``, the trainer sees
    the same prompts for ``num_iterations`` consecutive optimizer steps and reuses their rollouts
    instead of skipping prompts.
    """

    def __init__(self, num_items: int, chunk_size: int, repeats: int, seed: int = 0):
        self.num_items, self.chunk_size, self.repeats, self.seed = num_items, chunk_size, repeats, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle differently in each epoch (called by Trainer)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).tolist()
        for start in range(0, self.num_items, self.chunk_size):
            chunk = order[start : start + self.chunk_size]
            for _ in range(self.repeats):
                yield from chunk

    def __len__(self) -> int:
        return self.num_items * self.repeats


def collate_prompt_indices(indices: list[int]) -> dict[str, Tensor]:
    """The training dataloader yields prompt indices; rollouts are built from them in the trainer."""
    return {"prompt_index": torch.tensor(indices, dtype=torch.long)}


@dataclass
class Rollout:
    """Sampled completions of one micro-batch of prompts, scored and laid out for the loss.

    ``batch`` holds the sequences with ``slot_seq`` ``(B, K)``; for online UNA also the ``(B, K)`` tensors
    ``ref_logps`` (the ratio's base), ``scores`` (``s_φ``), ``rewards`` (the raw rewards) and ``reward_targets``
    (``r̃_φ``); for token-level methods it is a :class:`TokenBatch`.
    ``metrics`` are logged once per rollout; ``passes`` counts the optimizer passes made over it.
    """

    key: tuple[int, ...]
    batch: Batch
    metrics: dict[str, Tensor] = field(default_factory=dict)
    passes: int = 0


@dataclass
class TokenBatch(Batch):
    """A rollout's :class:`Batch` with what the token-level methods (PPO, GRPO, RLOO) read, all ``(N, T)``
    in the completion layout unless said otherwise.

    Attributes:
        tok_index / tok_mask: the columns of each sequence's completion tokens, left-aligned, and their mask.
        old_tok_logps / tok_entropy: the sampling policy's log-probs of those tokens and its entropy there.
        ref_tok_logps: the reference's log-probs (when the method needs a reference).
        advantages: ``(N,)`` or ``(N, T)``, from the method's estimator; ``returns`` / ``old_values`` for PPO.
    """

    tok_index: Tensor | None = None
    tok_mask: Tensor | None = None
    old_tok_logps: Tensor | None = None
    tok_entropy: Tensor | None = None
    ref_tok_logps: Tensor | None = None
    advantages: Tensor | None = None
    returns: Tensor | None = None
    old_values: Tensor | None = None

    @classmethod
    def extend(cls, batch: Batch) -> TokenBatch:
        """``batch``'s fields in a :class:`TokenBatch` (the token fields still unset)."""
        return cls(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)})


def rollout_sequences(
    prompt_ids: list[list[int]], completions: list[list[list[int]]], pad_token_id: int
) -> Batch:
    """Pad ``prompt + completion`` for every sample; sample ``j`` of prompt ``i`` is sequence ``i·K + j``.

    Args:
        prompt_ids: ``B`` prompts as token ids.
        completions: for each prompt, its ``K`` completions as token ids (EOS included when sampled).
    Returns:
        The padded sequences with ``slot_seq`` ``(B, K)``; no feedback yet.
    """
    k = len(completions[0])
    if any(len(c) != k for c in completions):
        raise ValueError("every prompt needs the same number of completions")
    sequences, lengths = [], []
    for ids, samples in zip(prompt_ids, completions):
        for sample in samples:
            sequences.append(ids + sample)
            lengths.append(len(ids))
    slot_seq = torch.arange(len(sequences)).view(len(prompt_ids), k)
    return Batch.of(pad_sequences(sequences, lengths, pad_token_id), slot_seq)
