"""Batching: tokenized rows → padded sequences plus the index maps the trainer needs.

Each real (row, slot) pair becomes one sequence ``prompt + completion``; empty listwise slots make
no sequence at all. ``slot_seq`` maps ``(row, slot)`` to its sequence (−1 when empty), so per-slot
tensors are gathered from per-sequence log-probs without padding rows ever entering a loss.
"""

from __future__ import annotations

from typing import Any

import torch

from unialign.data.tokenize import TokenizedExample

FEEDBACK_FIELDS = ("labels", "scores", "rewards", "ref_logps")


class PreferenceCollator:
    """Collate :class:`TokenizedExample` rows into model inputs.

    Args:
        pad_token_id: id used for right padding (masked out by ``attention_mask``).
        num_slots: ``K``, the number of completion slots per row (the widest row for listwise).
        with_prompt_logps: also mark prompt tokens after the first one (RAO).
        with_kl_pairs: append one mismatched (prompt, other completion) sequence per row (KTO).
    """

    def __init__(self, pad_token_id: int, num_slots: int, with_prompt_logps: bool = False, with_kl_pairs: bool = False):
        self.pad_token_id = pad_token_id
        self.num_slots = num_slots
        self.with_prompt_logps = with_prompt_logps
        self.with_kl_pairs = with_kl_pairs

    def __call__(self, examples: list[TokenizedExample]) -> dict[str, Any]:
        sequences, prompt_lengths = [], []
        slot_seq = torch.full((len(examples), self.num_slots), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            for slot, completion in enumerate(example.completion_ids):
                slot_seq[row, slot] = len(sequences)
                sequences.append(example.prompt_ids + completion)
                prompt_lengths.append(len(example.prompt_ids))
        batch: dict[str, Any] = {"slot_seq": slot_seq}
        if self.with_kl_pairs:
            batch["kl_seq"] = torch.arange(len(sequences), len(sequences) + len(examples))
            for example in examples:
                sequences.append(example.prompt_ids + example.kl_completion_ids)
                prompt_lengths.append(len(example.prompt_ids))
        batch.update(pad_sequences(sequences, prompt_lengths, self.pad_token_id))
        if self.with_prompt_logps:
            first = slot_seq[:, 0]
            batch["prompt_seq"] = first
            mask = torch.zeros_like(batch["target_mask"])
            for seq in first.tolist():
                mask[seq, 1 : prompt_lengths[seq]] = True
            batch["prompt_target_mask"] = mask
        for name in FEEDBACK_FIELDS:
            values = [getattr(e, name) for e in examples]
            if all(v is not None for v in values):
                batch[name] = slot_tensor(values, self.num_slots)
        for name in ("ref_prompt_logps", "ref_kl_logps"):
            values = [getattr(e, name) for e in examples]
            if all(v is not None for v in values):
                batch[name] = torch.tensor(values, dtype=torch.float32)
        return batch


def pad_sequences(sequences: list[list[int]], prompt_lengths: list[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad sequences; ``target_mask`` marks completion tokens (the tokens whose log-prob counts)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, (seq, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        target_mask[i, prompt_length : len(seq)] = True
    return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}


def slot_tensor(values: list[list[float]], num_slots: int) -> torch.Tensor:
    """``(B, K)`` float tensor from ragged per-row lists, zero in empty slots."""
    out = torch.zeros((len(values), num_slots), dtype=torch.float32)
    for row, row_values in enumerate(values):
        out[row, : len(row_values)] = torch.tensor(row_values, dtype=torch.float32)
    return out
