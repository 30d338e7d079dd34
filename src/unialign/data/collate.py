"""Batching: tokenized rows → padded sequences plus the index maps the trainer needs.

Each real (row, slot) pair becomes one sequence ``prompt + completion``; empty listwise slots make
no sequence at all. ``slot_seq`` maps ``(row, slot)`` to its sequence (−1 when empty), so per-slot
tensors are gathered from per-sequence log-probs without padding rows ever entering a loss.

With prefix sharing (:func:`pack_shared_prefix`), the sequences of one row are also packed into a
single row ``prompt + completion_1 + … + completion_K`` (+ KTO's mismatched completion): each
completion's position ids continue from the prompt's end, and a block attention mask lets a
completion token see the prompt and the earlier tokens of its own completion only. The prompt is
then computed once per row instead of once per completion, and every per-sequence value (log-prob
sum, length) comes out exactly as in the plain layout.
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
        prefix_sharing: also add ``batch["packed"]``, the prefix-shared layout of the same sequences
            (see :func:`pack_shared_prefix`), when some row has two or more of them; the trainer uses it
            when ``prefix_sharing`` is on.
    """

    def __init__(
        self,
        pad_token_id: int,
        num_slots: int,
        with_prompt_logps: bool = False,
        with_kl_pairs: bool = False,
        prefix_sharing: bool = False,
    ):
        self.pad_token_id = pad_token_id
        self.num_slots = num_slots
        self.with_prompt_logps = with_prompt_logps
        self.with_kl_pairs = with_kl_pairs
        self.prefix_sharing = prefix_sharing

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
        if self.prefix_sharing and has_shared_prompts(batch):
            batch["packed"] = pack_shared_prefix(batch, self.pad_token_id)
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


def row_groups(batch: dict[str, Any]) -> list[list[int]]:
    """The sequences of each row, in slot order (then KTO's mismatched sequence): they share one prompt."""
    groups = [[s for s in row if s >= 0] for row in batch["slot_seq"].tolist()]
    if "kl_seq" in batch:
        for group, seq in zip(groups, batch["kl_seq"].tolist()):
            group.append(seq)
    return groups


def has_shared_prompts(batch: dict[str, Any]) -> bool:
    """Whether some row of the batch has two or more sequences with one prompt (else packing saves nothing)."""
    return "kl_seq" in batch or bool(((batch["slot_seq"] >= 0).sum(-1) > 1).any())


def split_kl_rows(batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a batch with KTO's mismatched KL sequences into the scored sequences and the KL sequences.

    Both halves are plain batches trimmed to their own longest sequence; the first keeps every key
    but ``kl_seq`` and ``packed`` (it is packed again when needed), the second has one slot per row.
    """
    kl_seq = batch["kl_seq"]
    first = int(kl_seq[0])
    if kl_seq.tolist() != list(range(first, batch["input_ids"].shape[0])):
        raise ValueError("KL sequences must be the last rows of the batch, as PreferenceCollator puts them")
    main = {k: v for k, v in batch.items() if k not in ("kl_seq", "packed")}
    rows = {"input_ids", "attention_mask", "target_mask", "prompt_target_mask"}
    main.update(_trimmed({k: batch[k][:first] for k in rows if k in batch}))
    kl = _trimmed({k: batch[k][first:] for k in ("input_ids", "attention_mask", "target_mask")})
    kl["slot_seq"] = torch.arange(len(kl_seq), device=kl_seq.device)[:, None]
    return main, kl


def _trimmed(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    width = int(tensors["attention_mask"].sum(-1).max())
    return {k: v[:, :width] for k, v in tensors.items()}


def pack_shared_prefix(batch: dict[str, Any], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """The prefix-shared layout of a plain batch: one row ``prompt + completion_1 + … + completion_K`` per example.

    Returns:
        ``input_ids`` and ``position_ids`` ``(R, W)``; ``allowed`` ``(R, 1, W, W)`` bool, true where a
        query may attend a key (causal, within the prompt or within its own completion; a padding
        position sees only itself); ``seq_index`` ``(R, W)``: the plain sequence a scored completion
        token belongs to, −1 elsewhere; ``source_index`` ``(R, W)``: the column whose hidden state
        predicts each token (the prompt's last token for a completion's first token);
        ``prompt_target_mask`` ``(R, W)`` when the plain batch has one (RAO's prompt log-probs, row
        ``r`` = example ``r``).

    Raises:
        ValueError: when the sequences grouped in one row do not start with the same prompt.
    """
    input_ids, attention, target = batch["input_ids"].cpu(), batch["attention_mask"].cpu(), batch["target_mask"].cpu()
    lengths = attention.sum(-1).tolist()
    starts = target.int().argmax(-1).tolist()  # every sequence has at least one completion token
    groups = row_groups(batch)
    rows = []
    for group in groups:
        prompt_length = starts[group[0]]
        prompt = input_ids[group[0], :prompt_length]
        ids, positions, segments, owner = [prompt], [torch.arange(prompt_length)], [torch.zeros(prompt_length)], []
        owner.append(torch.full((prompt_length,), -1))
        for number, seq in enumerate(group, start=1):
            if starts[seq] != prompt_length or not torch.equal(input_ids[seq, :prompt_length], prompt):
                raise ValueError(f"sequences {group[0]} and {seq} of one row do not share a prompt; cannot pack them")
            completion = input_ids[seq, prompt_length : lengths[seq]]
            ids.append(completion)
            positions.append(torch.arange(prompt_length, lengths[seq]))
            segments.append(torch.full((len(completion),), number))
            owner.append(torch.full((len(completion),), seq))
        rows.append((torch.cat(ids), torch.cat(positions), torch.cat(segments), torch.cat(owner), prompt_length))
    width = max(len(r[0]) for r in rows)
    count = len(rows)
    packed_ids = torch.full((count, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((count, width), dtype=torch.long)
    segment = torch.full((count, width), -1, dtype=torch.long)
    seq_index = torch.full((count, width), -1, dtype=torch.long)
    source_index = torch.arange(width).sub(1).clamp(min=0).repeat(count, 1)
    for r, (ids, positions, segments, owner, prompt_length) in enumerate(rows):
        n = len(ids)
        packed_ids[r, :n] = ids
        position_ids[r, :n] = positions
        position_ids[r, n:] = torch.arange(width - n)  # padding: any valid position, never scored
        segment[r, :n] = segments.long()
        seq_index[r, :n] = owner.long()
        first = (segment[r, 1:n] != segment[r, : n - 1]).nonzero().squeeze(1) + 1  # each completion's first token
        source_index[r, first] = prompt_length - 1
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allowed = causal & (key >= 0) & (query >= 0) & ((key == 0) | (key == query))
    allowed |= torch.eye(width, dtype=torch.bool)  # padding rows see themselves: no empty softmax
    device = batch["input_ids"].device
    packed = {
        "input_ids": packed_ids,
        "position_ids": position_ids,
        "allowed": allowed[:, None],
        "seq_index": seq_index,
        "source_index": source_index,
    }
    if "prompt_target_mask" in batch:
        prompt_mask = torch.zeros((count, width), dtype=torch.bool)
        for r, row in enumerate(rows):
            prompt_mask[r, 1 : row[4]] = True
        packed["prompt_target_mask"] = prompt_mask
    return {k: v.to(device) for k, v in packed.items()}
