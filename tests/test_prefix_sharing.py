"""Prefix sharing and padding-free rows give the plain layout's log-probs.

Layouts: packed rows (one prompt, K completions) confined by a dense block mask or by segment
attention, and padding-free rows (every sequence, or every packed row, of the batch end to end).

Every fast path must reproduce, to 1e-5 in float32, the per-sequence log-prob sums, lengths, prompt
log-probs (RAO), mismatched-pair log-probs (KTO) and the gradients (to 1e-5 of their scale) of the
plain path, for rows
with K = 2, 3 and 4 completions of different lengths under prompts of different lengths.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from unialign.config import UnialignConfig
from unialign.data.collate import PackedBatch, PreferenceCollator, SegmentBatch, pack_shared_prefix
from unialign.data.tokenize import TokenizedExample
from unialign.losses.registry import get_method
from unialign.trainer import UnialignTrainer


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


def _examples(num_slots: int, with_kl: bool = False) -> list[TokenizedExample]:
    """Three rows with distinct prompt lengths and completions of unequal lengths (the last row may be short)."""
    gen = torch.Generator().manual_seed(num_slots)

    def ids(n):
        return torch.randint(5, 900, (n,), generator=gen).tolist()

    rows = []
    for row, prompt_length in enumerate((3, 7, 12)):
        slots = num_slots if row < 2 else max(1, num_slots - 1)  # a listwise row with an empty slot
        completions = [ids(2 + (3 * row + 5 * slot) % 9) for slot in range(slots)]
        example = TokenizedExample([1] + ids(prompt_length - 1), completions, row)
        if with_kl:
            example.kl_completion_ids = ids(4 + row)
        rows.append(example)
    return rows


def _trainer(
    model, tmp_path, *, loss_type="dpo", prefix_sharing=False, impl="chunked", packed_attention="segments",
    padding_free=False, ref_model=None,
) -> UnialignTrainer:
    cfg = UnialignConfig(
        output_dir=str(tmp_path),
        loss_type=loss_type,
        prefix_sharing=prefix_sharing,
        packed_attention=packed_attention,
        padding_free=padding_free,
        logprob_impl=impl,
        logprob_chunk_size=7,
        report_to=[],
        use_cpu=True,
    )
    return UnialignTrainer(model=model, args=cfg, method=get_method(loss_type), ref_model=ref_model)


# (prefix_sharing, packed_attention, padding_free) of every fast layout; the plain layout is the oracle
LAYOUTS = {
    "dense-mask": (True, "dense", False),
    "segments": (True, "segments", False),
    "segments-padding-free": (True, "segments", True),
    "padding-free": (False, "segments", True),
}


def _run(trainer, model, batch):
    model.zero_grad()
    out = trainer._logps(model, dataclasses.replace(batch))
    weights = torch.linspace(0.5, 1.5, out.seq.shape[0])
    total = (out.seq * weights).sum()
    for extra in (out.prompt, out.kl):
        if extra is not None:
            total = total + 0.3 * extra.sum()
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in vars(out).items() if v is not None}, grads


@pytest.mark.parametrize(
    "num_slots,with_prompt,with_kl",
    [(2, False, False), (3, False, False), (4, False, False), (4, True, False), (1, False, True), (2, False, True)],
    ids=["pairwise", "triple", "listwise", "listwise-rao-prompt", "binary-kto", "pairwise-kl"],
)
@pytest.mark.parametrize("impl", ["chunked", "full"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_packed_logps_and_gradients_equal_plain(model, tmp_path, num_slots, with_prompt, with_kl, impl, layout):
    examples = _examples(num_slots, with_kl)
    collator = PreferenceCollator(0, num_slots, with_prompt_logps=with_prompt, with_kl_pairs=with_kl)
    batch = collator(examples)
    prefix_sharing, packed_attention, padding_free = LAYOUTS[layout]
    plain_out, plain_grads = _run(_trainer(model, tmp_path, impl=impl), model, batch)
    fast = _trainer(
        model, tmp_path, prefix_sharing=prefix_sharing, impl=impl, packed_attention=packed_attention,
        padding_free=padding_free,
    )
    packed_out, packed_grads = _run(fast, model, batch)
    assert set(plain_out) == set(packed_out)
    for key in plain_out:
        torch.testing.assert_close(packed_out[key], plain_out[key], atol=1e-5, rtol=1e-5, msg=key)
    assert plain_out["seq"].abs().min() > 1.0  # real log-probs, not zeros on both sides
    assert set(plain_grads) == set(packed_grads)
    for name, grad in plain_grads.items():
        # 1e-5 relative to the gradient's scale: float32 sums in another order differ in the last bits
        scale = max(1.0, grad.abs().max().item())
        assert (packed_grads[name] - grad).abs().max().item() <= 1e-5 * scale, name


@pytest.mark.parametrize("packed_attention", ["dense", "segments"])
def test_trainer_packs_once_and_keeps_the_layout_on_the_batch(model, tmp_path, packed_attention):
    examples = _examples(3)
    batch = PreferenceCollator(0, 3)(examples)
    assert batch.packed is None
    plain = _trainer(model, tmp_path)._logps(model, batch)
    assert batch.packed is None  # the plain layout builds none
    with torch.no_grad():
        trainer = _trainer(model, tmp_path, prefix_sharing=True, packed_attention=packed_attention)
        fast = trainer._logps(model, batch)
    packed = batch.packed
    assert type(packed) is (PackedBatch if packed_attention == "dense" else SegmentBatch)
    assert packed.input_ids.shape[0] == len(examples)
    # each row holds its prompt once: packed width < K × plain width, and real tokens add up
    prompt_lengths = [len(e.prompt_ids) for e in examples]
    real = [p + sum(len(c) for c in e.completion_ids) for p, e in zip(prompt_lengths, examples)]
    if packed_attention == "dense":
        assert (packed.allowed[:, 0].diagonal(dim1=-2, dim2=-1)).all()
    else:  # the prompt with its first completion, then one segment per later completion
        assert [len(row) for row in packed.plan.rows] == [len(e.completion_ids) for e in examples]
    assert packed.input_ids.shape[1] == max(real)
    assert int((packed.seq_index >= 0).sum()) == int(batch.target_mask.sum())
    torch.testing.assert_close(fast.seq, plain.seq.detach(), atol=1e-5, rtol=1e-5)


def test_block_mask_and_positions():
    examples = [TokenizedExample([1, 2, 3], [[10, 11], [20, 21, 22]], 0), TokenizedExample([1, 5], [[30], [40]], 1)]
    packed = pack_shared_prefix(PreferenceCollator(0, 2)(examples))
    assert packed.input_ids[0].tolist() == [1, 2, 3, 10, 11, 20, 21, 22]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert packed.position_ids[1, :4].tolist() == [0, 1, 2, 2]
    allowed = packed.allowed[0, 0]
    assert allowed[5, :3].all() and not allowed[5, 3:5].any() and allowed[5, 5]  # 2nd completion: prompt + itself
    assert not allowed[3, 4]  # causal
    assert packed.source_index[0, 5].item() == 2  # 2nd completion is predicted from the prompt's last token
    assert packed.seq_index[0].tolist() == [-1, -1, -1, 0, 0, 1, 1, 1]
    assert packed.seq_index[1, :4].tolist() == [-1, -1, 2, 3]
    assert not packed.allowed[1, 0, 4, :4].any()  # padding sees only itself


def test_rows_without_a_shared_prompt_are_refused():
    batch = PreferenceCollator(0, 2)([TokenizedExample([1, 2], [[5], [6]], 0)])
    batch.input_ids[1, 1] = 9  # corrupt the second sequence's prompt
    with pytest.raises(ValueError, match="do not share a prompt"):
        pack_shared_prefix(batch)


def test_unsupported_attention_falls_back_to_plain(model, tmp_path):
    trainer = _trainer(model, tmp_path, prefix_sharing=True)
    assert trainer._shares_prefix(model)
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"), forward=model.forward)
    assert not trainer._shares_prefix(flash)
    window = SimpleNamespace(
        config=SimpleNamespace(_attn_implementation="sdpa", sliding_window=64), forward=model.forward
    )
    assert not trainer._shares_prefix(window)
    assert not _trainer(model, tmp_path, prefix_sharing=False)._shares_prefix(model)


def test_prefix_sharing_is_on_by_default():
    assert UnialignConfig(output_dir="x", report_to=[]).prefix_sharing is True


@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["plain", "packed"])
def test_kl_sequences_are_scored_without_gradient_and_equal_the_joint_pass(model, tmp_path, prefix_sharing):
    batch = PreferenceCollator(0, 2, with_kl_pairs=True)(_examples(2, with_kl=True))
    trainer = _trainer(model, tmp_path, loss_type="kto", prefix_sharing=prefix_sharing)
    with torch.no_grad():  # no gradient: one joint forward over scored and KL sequences, as the reference does
        joint = trainer._logps(model, dataclasses.replace(batch))
    split = trainer._logps(model, dataclasses.replace(batch))  # training: the KL sequences get a separate no-grad pass
    assert split.seq.requires_grad and not split.kl.requires_grad
    kl_rows = batch.kl_seq.tolist()
    assert split.seq.shape == (kl_rows[0],) and split.kl.shape == (len(kl_rows),) == (len(_examples(2)),)
    for key in ("seq", "lengths"):  # the joint pass also scores the KL sequences, after the scored ones
        torch.testing.assert_close(
            getattr(split, key).detach(), getattr(joint, key)[: kl_rows[0]], atol=1e-5, rtol=1e-5, msg=key
        )
    torch.testing.assert_close(split.kl, joint.kl, atol=1e-5, rtol=1e-5)


def test_split_kl_rows_trims_each_half_and_refuses_interleaved_rows():
    from unialign.data.collate import split_kl_rows

    examples = [TokenizedExample([1, 2], [[3, 4, 5, 6, 7]], 0), TokenizedExample([1, 9], [[3]], 1)]
    examples[0].kl_completion_ids, examples[1].kl_completion_ids = [8], [8, 8]
    batch = PreferenceCollator(0, 1, with_kl_pairs=True)(examples)
    assert batch.input_ids.shape == (4, 7)
    main, kl = split_kl_rows(batch)
    assert main.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7], [1, 9, 3, 0, 0, 0, 0]]
    assert kl.input_ids.tolist() == [[1, 2, 8, 0], [1, 9, 8, 8]]
    assert kl.target_mask.tolist() == [[False, False, True, False], [False, False, True, True]]
    assert kl.slot_seq.tolist() == [[0], [1]] and main.kl_seq is None
    batch.kl_seq = torch.tensor([0, 3])
    with pytest.raises(ValueError, match="must be the last rows"):
        split_kl_rows(batch)


def test_rows_with_one_sequence_are_not_packed(model, tmp_path, monkeypatch):
    trainer = _trainer(model, tmp_path, prefix_sharing=True)
    packed_calls = []
    real = trainer._segment_logps
    monkeypatch.setattr(trainer, "_segment_logps", lambda m, b, s: packed_calls.append(1) or real(m, b, s))
    with torch.no_grad():
        trainer._logps(model, PreferenceCollator(0, 1)(_examples(1)))  # one completion per row: nothing to share
        assert packed_calls == []
        trainer._logps(model, PreferenceCollator(0, 2)(_examples(2)))
        assert packed_calls == [1]
