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

:func:`pack_segments` builds the same rows (and, with ``padding_free``, every sequence or packed row of
the batch end to end in one row) without any ``W × W`` mask: a :class:`~unialign.attention.SegmentPlan`
says which slices of a row each query may see, and segment attention runs over those slices, so the
layout's memory is linear in the row width. :func:`pack_shared_prefix`'s dense mask stays as the
fallback (eager attention) and as the oracle the tests compare against.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from unialign.attention import Segment, SegmentPlan
from unialign.data.tokenize import TokenizedExample

FEEDBACK_FIELDS = ("labels", "scores", "rewards", "ref_logps")


def _moved(value, device, non_blocking: bool):
    """A copy of a tensor dataclass with every tensor field on ``device`` (``None`` fields stay ``None``)."""
    changes = {}
    for f in dataclasses.fields(value):
        item = getattr(value, f.name)
        if item is not None:
            changes[f.name] = item.to(device, non_blocking=non_blocking)
    return dataclasses.replace(value, **changes)


@dataclass
class Padded:
    """Right-padded sequences: ``(N, W)`` ids, attention mask (1 = real token) and ``target_mask``
    (the completion tokens, whose log-probs count)."""

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor


@dataclass
class PackedBatch:
    """The prefix-shared layout of a :class:`Batch`, from :func:`pack_shared_prefix`.

    Attributes:
        input_ids / position_ids: ``(R, W)``, one row ``prompt + completion_1 + … + completion_K`` per example.
        allowed: ``(R, 1, W, W)`` bool, true where a query may attend a key.
        seq_index: ``(R, W)``, the plain sequence a scored completion token belongs to, −1 elsewhere.
        source_index: ``(R, W)``, the column whose hidden state predicts each token.
        prompt_target_mask: ``(R, W)`` prompt tokens after the first (when the plain batch has them).
    """

    input_ids: Tensor
    position_ids: Tensor
    allowed: Tensor
    seq_index: Tensor
    source_index: Tensor
    prompt_target_mask: Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> PackedBatch:
        """The same layout on ``device``."""
        return _moved(self, device, non_blocking)


@dataclass
class SegmentBatch:
    """A packed layout of a :class:`Batch` whose attention is confined by segments, from :func:`pack_segments`.

    Attributes:
        input_ids / position_ids: ``(R, W)``; position ids restart at 0 for every sequence or shared prompt.
        seq_index: ``(R, W)``, the plain sequence a scored completion token belongs to, −1 elsewhere.
        source_index: ``(R, W)``, the column whose hidden state predicts each token.
        prompt_index: ``(R, W)``, the batch row whose prompt term a prompt token (after the first) counts
            in, −1 elsewhere (when the plain batch marks prompt tokens).
        plan: the segments of each row.
    """

    input_ids: Tensor
    position_ids: Tensor
    seq_index: Tensor
    source_index: Tensor
    plan: SegmentPlan
    prompt_index: Tensor | None = None

    def to(self, device, non_blocking: bool = False) -> SegmentBatch:
        """The same layout on ``device``."""
        return _moved(self, device, non_blocking)


@dataclass
class Batch:
    """One micro-batch of ``B`` rows with ``K`` completion slots, as the trainer and losses read it.

    ``N`` sequences ``prompt + completion`` (one per real slot, then KTO's mismatched ones), padded.

    Attributes:
        input_ids / attention_mask / target_mask: ``(N, W)``, see :class:`Padded`.
        slot_seq: ``(B, K)`` the sequence of each (row, slot), −1 for an empty slot.
        kl_seq: ``(B,)`` KTO's mismatched (prompt, other completion) sequence of each row.
        prompt_seq / prompt_target_mask: ``(B,)`` the sequence whose prompt tokens are scored, and
            ``(N, W)`` those tokens after the first (RAO's prefix term, ORPO's NLL over the prompt).
        labels / scores / rewards: ``(B, K)`` the rows' feedback, where every row has it (binary labels
            as 0/1; scores normalized to [0, 1]; rewards unnormalized).
        reward_targets: ``(B, K)`` rewards already normalized into the loss's reward space (online UNA's
            ``r̃_φ``), set by a rollout.
        ref_logps: ``(B, K)`` precomputed reference log-probs; ``ref_prompt_logps`` / ``ref_kl_logps``
            ``(B,)`` their prompt and KL terms.
        packed: the prefix-shared (dense-mask) or segment layout of the same sequences, once built.
        row_index: ``(B,)`` 0-based dataset rows, for error messages.
    """

    input_ids: Tensor
    attention_mask: Tensor
    target_mask: Tensor
    slot_seq: Tensor
    kl_seq: Tensor | None = None
    prompt_seq: Tensor | None = None
    prompt_target_mask: Tensor | None = None
    labels: Tensor | None = None
    scores: Tensor | None = None
    rewards: Tensor | None = None
    reward_targets: Tensor | None = None
    ref_logps: Tensor | None = None
    ref_prompt_logps: Tensor | None = None
    ref_kl_logps: Tensor | None = None
    packed: PackedBatch | SegmentBatch | None = None
    row_index: Tensor | None = None

    @classmethod
    def of(cls, padded: Padded, slot_seq: Tensor, **fields) -> Batch:
        """A batch of already padded sequences."""
        return cls(padded.input_ids, padded.attention_mask, padded.target_mask, slot_seq, **fields)

    def to(self, device, non_blocking: bool = False) -> Batch:
        """The same batch on ``device`` (accelerate's data loader and the trainer call this)."""
        return _moved(self, device, non_blocking)

    # transformers.Trainer reads the model inputs of a batch by key (token counts, FLOPs); only those two
    # answer, so Trainer never mistakes the feedback ``labels`` for language-model labels.
    _MODEL_INPUTS = ("input_ids", "attention_mask")

    def __contains__(self, key: str) -> bool:
        return key in self._MODEL_INPUTS

    def __getitem__(self, key: str) -> Tensor:
        if key not in self._MODEL_INPUTS:
            raise KeyError(f"{key!r}: a Batch answers only {self._MODEL_INPUTS} by key; read its fields as attributes")
        return getattr(self, key)


class PreferenceCollator:
    """Collate :class:`TokenizedExample` rows into model inputs.

    Args:
        pad_token_id: id used for right padding (masked out by ``attention_mask``).
        num_slots: ``K``, the number of completion slots per row (the widest row for listwise).
        with_prompt_logps: also mark prompt tokens after the first one (RAO).
        with_kl_pairs: append one mismatched (prompt, other completion) sequence per row (KTO).

    The prefix-shared layout is built by the trainer, which alone knows whether the model can use it.
    """

    def __init__(self, pad_token_id: int, num_slots: int, with_prompt_logps: bool = False, with_kl_pairs: bool = False):
        self.pad_token_id = pad_token_id
        self.num_slots = num_slots
        self.with_prompt_logps = with_prompt_logps
        self.with_kl_pairs = with_kl_pairs

    def __call__(self, examples: list[TokenizedExample]) -> Batch:
        sequences, prompt_lengths = [], []
        slot_seq = torch.full((len(examples), self.num_slots), -1, dtype=torch.long)
        for row, example in enumerate(examples):
            for slot, completion in enumerate(example.completion_ids):
                slot_seq[row, slot] = len(sequences)
                sequences.append(example.prompt_ids + completion)
                prompt_lengths.append(len(example.prompt_ids))
        fields: dict[str, Tensor] = {}
        if self.with_kl_pairs:
            fields["kl_seq"] = torch.arange(len(sequences), len(sequences) + len(examples))
            for example in examples:
                sequences.append(example.prompt_ids + example.kl_completion_ids)
                prompt_lengths.append(len(example.prompt_ids))
        padded = pad_sequences(sequences, prompt_lengths, self.pad_token_id)
        if self.with_prompt_logps:
            first = slot_seq[:, 0]
            fields["prompt_seq"] = first
            mask = torch.zeros_like(padded.target_mask)
            for seq in first.tolist():
                mask[seq, 1 : prompt_lengths[seq]] = True
            fields["prompt_target_mask"] = mask
        for name in FEEDBACK_FIELDS:
            values = [getattr(e, name) for e in examples]
            if all(v is not None for v in values):
                fields[name] = slot_tensor(values, self.num_slots)
        for name in ("ref_prompt_logps", "ref_kl_logps"):
            values = [getattr(e, name) for e in examples]
            if all(v is not None for v in values):
                fields[name] = torch.tensor(values, dtype=torch.float32)
        return Batch.of(padded, slot_seq, **fields)


def pad_sequences(sequences: list[list[int]], prompt_lengths: list[int], pad_token_id: int) -> Padded:
    """Right-pad sequences; ``target_mask`` marks completion tokens (the tokens whose log-prob counts)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    target_mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, (seq, prompt_length) in enumerate(zip(sequences, prompt_lengths)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention_mask[i, : len(seq)] = 1
        target_mask[i, prompt_length : len(seq)] = True
    return Padded(input_ids, attention_mask, target_mask)


def slot_tensor(values: list[list[float]], num_slots: int) -> torch.Tensor:
    """``(B, K)`` float tensor from ragged per-row lists, zero in empty slots."""
    out = torch.zeros((len(values), num_slots), dtype=torch.float32)
    for row, row_values in enumerate(values):
        out[row, : len(row_values)] = torch.tensor(row_values, dtype=torch.float32)
    return out


def row_groups(batch: Batch) -> list[list[int]]:
    """The sequences of each row, in slot order (then KTO's mismatched sequence): they share one prompt."""
    groups = [[s for s in row if s >= 0] for row in batch.slot_seq.tolist()]
    if batch.kl_seq is not None:
        for group, seq in zip(groups, batch.kl_seq.tolist()):
            group.append(seq)
    return groups


def has_shared_prompts(batch: Batch) -> bool:
    """Whether some row of the batch has two or more sequences with one prompt (else packing saves nothing)."""
    return batch.kl_seq is not None or bool(((batch.slot_seq >= 0).sum(-1) > 1).any())


def split_kl_rows(batch: Batch) -> tuple[Batch, Batch]:
    """Split a batch with KTO's mismatched KL sequences into the scored sequences and the KL sequences.

    Both halves are plain batches trimmed to their own longest sequence; the first keeps every field
    but ``kl_seq`` and ``packed`` (it is packed again when needed), the second has one slot per row.
    """
    kl_seq = batch.kl_seq
    first = int(kl_seq[0])
    if kl_seq.tolist() != list(range(first, batch.input_ids.shape[0])):
        raise ValueError("KL sequences must be the last rows of the batch, as PreferenceCollator puts them")
    width = _width(batch.attention_mask[:first])
    rows = ("input_ids", "attention_mask", "target_mask", "prompt_target_mask")
    trimmed = {k: getattr(batch, k)[:first, :width] for k in rows if getattr(batch, k) is not None}
    main = dataclasses.replace(batch, kl_seq=None, packed=None, **trimmed)
    kl_width = _width(batch.attention_mask[first:])
    kl = Batch(
        *(getattr(batch, k)[first:, :kl_width] for k in rows[:3]),
        slot_seq=torch.arange(len(kl_seq), device=kl_seq.device)[:, None],
    )
    return main, kl


def _width(attention_mask: Tensor) -> int:
    return int(attention_mask.sum(-1).max())


def pack_shared_prefix(batch: Batch, pad_token_id: int = 0) -> PackedBatch:
    """The prefix-shared layout of a plain batch: one row ``prompt + completion_1 + … + completion_K`` per example.

    Returns:
        A :class:`PackedBatch`: ``allowed`` is causal, within the prompt or within a token's own
        completion (a padding position sees only itself); ``source_index`` is the prompt's last token
        for a completion's first token; ``prompt_target_mask`` row ``r`` is example ``r``.

    Raises:
        ValueError: when the sequences grouped in one row do not start with the same prompt.
    """
    input_ids, attention, target = batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.target_mask.cpu()
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
    prompt_mask = None
    if batch.prompt_target_mask is not None:
        prompt_mask = torch.zeros((count, width), dtype=torch.bool)
        for r, row in enumerate(rows):
            prompt_mask[r, 1 : row[4]] = True
    packed = PackedBatch(packed_ids, position_ids, allowed[:, None], seq_index, source_index, prompt_mask)
    return packed.to(batch.input_ids.device)


def pack_segments(batch: Batch, *, prefix_sharing: bool, padding_free: bool, pad_token_id: int = 0) -> SegmentBatch:
    """The batch's sequences as packed rows confined by segments, with no ``W × W`` tensor.

    With ``prefix_sharing`` each example becomes ``prompt + completion_1 + … + completion_K`` (+ KTO's
    mismatched completion): the prompt and the first completion form one causal segment, every later
    completion a segment that sees the prompt and itself. Without it every sequence is its own segment.
    With ``padding_free`` all of them go end to end into one row (position ids restart per example),
    else one example per row, right-padded.

    Raises:
        ValueError: when the sequences grouped in one row do not start with the same prompt.
    """
    input_ids, attention, target = batch.input_ids.cpu(), batch.attention_mask.cpu(), batch.target_mask.cpu()
    lengths = attention.sum(-1).tolist()
    starts = target.int().argmax(-1).tolist()  # every sequence has at least one completion token
    groups = row_groups(batch) if prefix_sharing else [[seq] for seq in range(input_ids.shape[0])]
    prompt_rows = {} if batch.prompt_target_mask is None else {s: b for b, s in enumerate(batch.prompt_seq.tolist())}
    units = [_segment_unit(input_ids, lengths, starts, group, prompt_rows) for group in groups]
    if padding_free:
        units = [_joined(units)]
    width = max(len(u[0]) for u in units)
    count = len(units)
    packed_ids = torch.full((count, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((count, width), dtype=torch.long)
    seq_index = torch.full((count, width), -1, dtype=torch.long)
    source_index = torch.zeros((count, width), dtype=torch.long)
    prompt_index = torch.full((count, width), -1, dtype=torch.long)
    for r, (ids, positions, owners, sources, prompt_owners, _) in enumerate(units):
        n = len(ids)
        packed_ids[r, :n], position_ids[r, :n], seq_index[r, :n] = ids, positions, owners
        source_index[r, :n], prompt_index[r, :n] = sources, prompt_owners
    plan = SegmentPlan.build([u[5] for u in units])
    prompts = None if batch.prompt_target_mask is None else prompt_index
    packed = SegmentBatch(packed_ids, position_ids, seq_index, source_index, plan, prompts)
    return packed.to(batch.input_ids.device)


def _segment_unit(input_ids: Tensor, lengths: list[int], starts: list[int], group: list[int], prompt_rows: dict):
    """One example's tokens, positions, owners, sources, prompt owners and segments, from column 0."""
    first = group[0]
    prompt_length = starts[first]
    prompt = input_ids[first, :prompt_length]
    ids, positions, owners = [input_ids[first, : lengths[first]]], [torch.arange(lengths[first])], []
    owners.append(torch.cat([torch.full((prompt_length,), -1), torch.full((lengths[first] - prompt_length,), first)]))
    segments = [Segment(0, 0, 0, lengths[first])]  # the prompt and the first completion: one causal sequence
    cursor = lengths[first]
    sources = torch.arange(-1, cursor - 1).clamp(min=0)
    later_sources = []
    for seq in group[1:]:
        if starts[seq] != prompt_length or not torch.equal(input_ids[seq, :prompt_length], prompt):
            raise ValueError(f"sequences {first} and {seq} of one row do not share a prompt; cannot pack them")
        completion = input_ids[seq, prompt_length : lengths[seq]]
        ids.append(completion)
        positions.append(torch.arange(prompt_length, lengths[seq]))
        owners.append(torch.full((len(completion),), seq))
        segments.append(Segment(0, prompt_length, cursor, cursor + len(completion)))
        # a later completion's first token is predicted from the prompt's last token
        rest = torch.arange(cursor, cursor + len(completion) - 1)
        later_sources.append(torch.cat([torch.tensor([prompt_length - 1]), rest]))
        cursor += len(completion)
    prompt_owners = torch.full((cursor,), -1)
    if first in prompt_rows:
        prompt_owners[1:prompt_length] = prompt_rows[first]
    sources = torch.cat([sources, *later_sources])
    return torch.cat(ids), torch.cat(positions), torch.cat(owners), sources, prompt_owners, segments


def _joined(units: list) -> tuple:
    """Units end to end in one row: columns (sources, segments) shifted by each unit's offset."""
    offset, sources, segments = 0, [], []
    for ids, _, _, unit_sources, _, unit_segments in units:
        sources.append(unit_sources + offset)
        segments += [
            Segment(s.key_start + offset, s.prefix_end + offset, s.start + offset, s.end + offset)
            for s in unit_segments
        ]
        offset += len(ids)
    return (
        torch.cat([u[0] for u in units]),
        torch.cat([u[1] for u in units]),
        torch.cat([u[2] for u in units]),
        torch.cat(sources),
        torch.cat([u[4] for u in units]),
        segments,
    )
