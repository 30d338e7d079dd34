"""Segment attention (``packed_attention: segments``) and ``padding_free``: exact, linear in the row, refused clearly.

The plain layout (one padded sequence per completion) is the oracle: log-probs, the method's loss and
gradients must match it to 1e-5 in float32 at several prompt lengths and K, with ragged prompts and
completions and rows with padding, for DPO (with a reference model), RAO (listwise, prompt term) and TPO.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

from tests.test_prefix_sharing import _trainer
from unialign.attention import SEGMENT_ATTENTION, Segment, SegmentPlan, placeholder_mask
from unialign.config import ConfigError, UnialignConfig
from unialign.data.collate import PreferenceCollator, pack_segments
from unialign.data.tokenize import TokenizedExample
from unialign.losses.registry import get_method
from unialign.models import load_model


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_model(tiny_model_dir, attn_implementation="sdpa")


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    return load_model(tiny_model_dir, attn_implementation="sdpa")


def _rows(prompt_lengths, num_slots, completion_length, seed=0):
    """Rows with the given prompt lengths; completion lengths vary around ``completion_length`` (ragged)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(5, 900, (n,), generator=gen).tolist()

    rows = []
    for row, prompt_length in enumerate(prompt_lengths):
        lengths = [max(1, completion_length - (5 * row + 3 * slot) % completion_length) for slot in range(num_slots)]
        example = TokenizedExample([1] + ids(prompt_length - 1), [ids(n) for n in lengths], row)
        example.rewards = [float(num_slots - slot) for slot in range(num_slots)]  # RAO's listwise rewards
        rows.append(example)
    return rows


def _loss_and_grads(trainer, model, batch):
    model.zero_grad()
    inputs = trainer.method_inputs(model, dataclasses.replace(batch))
    out = trainer.method.loss(inputs, trainer.args)
    out.loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return inputs, out.loss.detach(), grads


CASES = [  # (loss_type, prompt lengths (ragged: rows with padding), K, completion length)
    ("dpo", (5, 40), 2, 9),
    ("dpo", (130, 17), 2, 30),
    ("rao", (24, 7), 4, 12),
    ("rao", (64, 90), 8, 10),
    ("tpo", (33, 12), 3, 15),
]


@pytest.mark.parametrize("joined_keys", ["cpu-function", "cat"])
@pytest.mark.parametrize("padding_free", [False, True], ids=["rows", "padding-free"])
@pytest.mark.parametrize("loss_type,prompt_lengths,num_slots,completion_length", CASES)
def test_segment_layout_loss_logps_and_gradients_equal_plain(
    policy, reference, tmp_path, loss_type, prompt_lengths, num_slots, completion_length, padding_free, joined_keys,
    monkeypatch,
):
    if joined_keys == "cat":  # the path other devices (and attention dropout) take: SDPA over torch.cat
        monkeypatch.setattr("unialign.attention._HAS_CPU_FLASH_OPS", False)
    method = get_method(loss_type)
    batch = PreferenceCollator(0, num_slots, with_prompt_logps=method.needs_prompt_logps)(
        _rows(prompt_lengths, num_slots, completion_length)
    )
    ref = reference if method.needs_reference else None
    plain = _trainer(policy, tmp_path, loss_type=loss_type, ref_model=ref)
    fast = _trainer(
        policy, tmp_path, loss_type=loss_type, prefix_sharing=True, padding_free=padding_free, ref_model=ref
    )
    assert fast.segment_attention and policy.config._attn_implementation == SEGMENT_ATTENTION
    plain_in, plain_loss, plain_grads = _loss_and_grads(plain, policy, batch)
    fast_in, fast_loss, fast_grads = _loss_and_grads(fast, policy, batch)
    for name in ("policy_logps", "lengths", "ref_logps", "prompt_logps", "prompt_lengths", "ref_prompt_logps"):
        expected = getattr(plain_in, name)
        if expected is not None:
            actual = getattr(fast_in, name).detach()
            torch.testing.assert_close(actual, expected.detach(), atol=1e-5, rtol=1e-5, msg=name)
    assert plain_in.policy_logps[plain_in.completion_mask].abs().min() > 1.0  # real log-probs on both sides
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-5)
    assert set(fast_grads) == set(plain_grads)
    for name, grad in plain_grads.items():
        assert (fast_grads[name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name


def test_segment_layout_by_hand():
    examples = [TokenizedExample([1, 2, 3], [[10, 11], [20, 21, 22]], 0), TokenizedExample([1, 5], [[30], [40]], 1)]
    batch = PreferenceCollator(0, 2, with_prompt_logps=True)(examples)
    rows = pack_segments(batch, prefix_sharing=True, padding_free=False)
    assert rows.input_ids.tolist() == [[1, 2, 3, 10, 11, 20, 21, 22], [1, 5, 30, 40, 0, 0, 0, 0]]
    assert rows.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3, 4, 5]
    assert rows.position_ids[1, :4].tolist() == [0, 1, 2, 2]
    assert rows.plan.rows == [[Segment(0, 0, 0, 5), Segment(0, 3, 5, 8)], [Segment(0, 0, 0, 3), Segment(0, 2, 3, 4)]]
    assert rows.seq_index.tolist() == [[-1, -1, -1, 0, 0, 1, 1, 1], [-1, -1, 2, 3, -1, -1, -1, -1]]
    assert rows.source_index[0].tolist() == [0, 0, 1, 2, 3, 2, 5, 6]  # 2nd completion predicted from the prompt's end
    assert rows.prompt_index.tolist() == [[-1, 0, 0, -1, -1, -1, -1, -1], [-1, 1, -1, -1, -1, -1, -1, -1]]
    # the second completion's keys are the prompt's (3) then its own (3, causally); the first completion is not in them
    assert rows.plan.masks[0][1].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert rows.plan.masks[0][0] is None  # the prompt and first completion: plain causal, no mask
    flat = pack_segments(batch, prefix_sharing=True, padding_free=True)
    assert flat.input_ids.tolist() == [[1, 2, 3, 10, 11, 20, 21, 22, 1, 5, 30, 40]]
    assert flat.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 4, 5, 0, 1, 2, 2]]
    assert flat.plan.rows == [[Segment(0, 0, 0, 5), Segment(0, 3, 5, 8), Segment(8, 8, 8, 11), Segment(8, 10, 11, 12)]]
    assert flat.source_index[0, 8:].tolist() == [8, 8, 9, 9]  # column 8 starts a new example (never scored)
    plain_flat = pack_segments(batch, prefix_sharing=False, padding_free=True)
    assert plain_flat.input_ids.shape == (1, int(batch.attention_mask.sum()))  # no padding token at all
    assert plain_flat.plan.rows[0][1] == Segment(5, 5, 5, 11) and plain_flat.plan.masks[0] == [None] * 4


@pytest.mark.parametrize("prompt_length,num_slots", [(256, 2), (512, 4), (1024, 8)])
def test_segment_layout_holds_nothing_quadratic_in_the_row(prompt_length, num_slots):
    completion = 16
    example = TokenizedExample(list(range(1, prompt_length + 1)), [[7] * completion] * num_slots, 0)
    rows = pack_segments(PreferenceCollator(0, num_slots)([example]), prefix_sharing=True, padding_free=False)
    width = prompt_length + num_slots * completion
    assert rows.input_ids.shape == (1, width)
    for field in dataclasses.fields(rows):
        value = getattr(rows, field.name)
        if isinstance(value, torch.Tensor):
            assert value.numel() == width, field.name
    # completion k (k ≥ 2) masks C queries × (prompt + C) keys: linear in the prompt length and in K
    expected = (num_slots - 1) * completion * (prompt_length + completion)
    assert rows.plan.mask_elements() == expected
    assert expected < width * width // 4


def test_transformers_builds_no_mask_for_a_segment_forward(policy, tmp_path, monkeypatch):
    batch = PreferenceCollator(0, 4)(_rows((50, 20), 4, 8))
    trainer = _trainer(policy, tmp_path, prefix_sharing=True, padding_free=True)

    def refuse(*args, **kwargs):
        raise AssertionError("a mask was built for a segment forward")

    monkeypatch.setitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, SEGMENT_ATTENTION, refuse)
    with torch.no_grad():
        out = trainer._logps(policy, dataclasses.replace(batch))
    assert out.seq.shape == (8,)
    with pytest.raises(AssertionError, match="a mask was built"):  # a plain forward does build one
        _trainer(policy, tmp_path)._logps(policy, dataclasses.replace(batch))


def test_gradient_checkpointing_recomputes_segments_exactly(tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, attn_implementation="sdpa")
    batch = PreferenceCollator(0, 3)(_rows((30, 11), 3, 7))
    plain = _trainer(model, tmp_path, loss_type="tpo")
    fast = _trainer(model, tmp_path, loss_type="tpo", prefix_sharing=True, padding_free=True)
    _, plain_loss, plain_grads = _loss_and_grads(plain, model, batch)
    model.gradient_checkpointing_enable()
    model.train()
    _, fast_loss, fast_grads = _loss_and_grads(fast, model, batch)
    torch.testing.assert_close(fast_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name, grad in plain_grads.items():
        assert (fast_grads[name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name


def test_unpacked_forwards_are_plain_sdpa_after_the_switch(tiny_model_dir):
    sdpa = load_model(tiny_model_dir, attn_implementation="sdpa")
    switched = load_model(tiny_model_dir, attn_implementation="sdpa")
    switched.set_attn_implementation(SEGMENT_ATTENTION)
    ids = torch.tensor([[1, 5, 9, 13, 2, 2], [1, 7, 3, 4, 8, 6]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        torch.testing.assert_close(switched(ids, attention_mask=mask).logits, sdpa(ids, attention_mask=mask).logits)


def test_eager_falls_back_to_the_dense_mask_with_the_reason(tiny_model_dir, tmp_path, caplog):
    eager = load_model(tiny_model_dir, attn_implementation="eager")
    with caplog.at_level(logging.WARNING, logger="unialign.trainer"):
        trainer = _trainer(eager, tmp_path, prefix_sharing=True)
    assert not trainer.segment_attention and eager.config._attn_implementation == "eager"
    assert caplog.records[-1].getMessage() == (
        "packed_attention segments is off for this model: attn_implementation eager: segment attention runs over "
        "sdpa; the dense block mask is used"
    )


def test_padding_free_refusals(tiny_model_dir, tmp_path):
    eager = load_model(tiny_model_dir, attn_implementation="eager")
    with pytest.raises(ValueError) as err:
        _trainer(eager, tmp_path, padding_free=True)
    assert str(err.value) == (
        "padding_free needs segment attention, which this model cannot use: attn_implementation eager: segment "
        "attention runs over sdpa"
    )
    with pytest.raises(ConfigError) as err:
        UnialignConfig(output_dir="x", report_to=[], padding_free=True, packed_attention="dense")
    assert str(err.value) == (
        "config key 'padding_free' needs packed_attention: segments (got dense): a dense mask over a whole "
        "padding-free row is quadratic in the micro-batch's total tokens"
    )
    with pytest.raises(ConfigError) as err:
        UnialignConfig(output_dir="x", report_to=[], padding_free=True, attn_implementation="eager")
    assert str(err.value).startswith("config key 'padding_free' needs attn_implementation sdpa (got eager)")
    with pytest.raises(ValueError, match="packed_attention"):
        UnialignConfig(output_dir="x", report_to=[], packed_attention="flex")


def test_segment_plan_refuses_unordered_segments():
    with pytest.raises(ValueError, match=r"is not ordered key_start <= prefix_end <= start < end"):
        SegmentPlan.build([[Segment(0, 5, 3, 8)]])


@pytest.mark.parametrize("use_peft", [False, True], ids=["full", "lora"])
def test_training_padding_free_logs_the_padded_runs_losses(tiny_model_dir, data_file, tmp_path, use_peft):
    """Two DPO steps end to end (reference forward included; with LoRA, the adapter-disabled reference)."""
    import json

    import unialign
    from tests.conftest import tiny_dpo_config

    logs = {}
    for name, extra in {"padded": {"prefix_sharing": False}, "padding-free": {"padding_free": True}}.items():
        peft = {"use_peft": True, "lora_r": 4, "save_merged": False} if use_peft else {}
        result = unialign.train(tiny_dpo_config(tiny_model_dir, data_file, tmp_path / name, **extra, **peft))
        assert result.trainer.segment_attention == (name == "padding-free")
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        logs[name] = [json.loads(line) for line in lines if '"loss"' in line]
    assert len(logs["padded"]) == len(logs["padding-free"]) == 2
    for padded, packed in zip(logs["padded"], logs["padding-free"]):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert packed[key] == pytest.approx(padded[key], abs=1e-5, rel=1e-5), key


def test_a_model_not_switched_to_segment_attention_gives_nan_not_wrong_values(tiny_model_dir):
    plain_sdpa = load_model(tiny_model_dir, attn_implementation="sdpa")
    batch = PreferenceCollator(0, 2)(_rows((9, 6), 2, 5))
    rows = pack_segments(batch, prefix_sharing=True, padding_free=True)
    with torch.no_grad():  # the plan is ignored by plain sdpa, which applies the all-false stand-in mask instead
        logits = plain_sdpa(
            rows.input_ids, attention_mask=placeholder_mask(1, "cpu"), position_ids=rows.position_ids,
            unialign_segments=rows.plan,
        ).logits
    assert torch.isnan(logits).all()


@pytest.mark.parametrize("packed_attention,padding_free", [("segments", True), ("segments", False), ("dense", False)])
def test_build_layout_makes_the_layout_the_trainer_then_uses(policy, tmp_path, packed_attention, padding_free):
    from unialign.data.collate import PackedBatch, SegmentBatch

    batch = PreferenceCollator(0, 2)(_rows((12, 5), 2, 4))
    trainer = _trainer(policy, tmp_path, prefix_sharing=True, packed_attention=packed_attention,
                       padding_free=padding_free)
    built = trainer.build_layout(batch).packed
    assert type(built) is (SegmentBatch if packed_attention == "segments" else PackedBatch)
    assert built.input_ids.shape[0] == (1 if padding_free else 2)
    with torch.no_grad():
        trainer._logps(policy, batch)
    assert batch.packed is built  # scored with the layout built beforehand, not a new one
    plain = PreferenceCollator(0, 2)(_rows((12, 5), 2, 4))
    assert _trainer(policy, tmp_path).build_layout(plain).packed is None


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3)])
def test_cpu_segment_attention_equals_sdpa_calls_and_keeps_only_the_layers_own_tensors(heads, kv_heads, monkeypatch):
    """On CPU one autograd function runs a layer's segments over the flash kernel's own ops: the same output
    and gradients as one SDPA call per segment (grouped heads too), while keeping for backward only the
    layer's query, key and value, the one output and per-segment log-sum-exps: no per-call output, no joined
    copy of a prompt's keys."""
    import unialign.attention as attention

    prompt, own, dim = 24, 7, 8
    rows = [[Segment(0, 0, 0, prompt + own), Segment(0, prompt, prompt + own, prompt + 2 * own),
             Segment(0, prompt, prompt + 2 * own, prompt + 3 * own)],
            [Segment(0, 0, 0, 9), Segment(9, 9, 9, 20)]]  # a padding-free row: two sequences, then padding
    width = prompt + 3 * own + 2
    module = torch.nn.Module()

    def run(plan):
        torch.manual_seed(1)
        leaves = [torch.randn(2, n, width, dim, requires_grad=True) for n in (heads, kv_heads, kv_heads)]
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            out, _ = attention.segment_attention_forward(module, *leaves, None, unialign_segments=plan)
        out.backward(torch.ones_like(out))
        return out, [t.grad for t in leaves], leaves, kept

    fast_plan, slow_plan = SegmentPlan.build(rows), SegmentPlan.build(rows)
    fast, fast_grads, leaves, kept = run(fast_plan)
    assert fast_plan._masks == {}  # the CPU function reads no mask, so none was made
    monkeypatch.setattr(attention, "_HAS_CPU_FLASH_OPS", False)
    slow, slow_grads, _, slow_kept = run(slow_plan)
    # the SDPA path's masks: the prompt's keys and its own, not the completion between; float32, made once
    assert list(slow_plan._masks) == [(torch.float32, torch.device("cpu"))]
    assert slow_plan.additive_masks(torch.float32, "cpu")[0][2].shape == (own, prompt + own)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-6)
    for a, b in zip(fast_grads, slow_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert fast[1, 20:].abs().sum() == 0 and fast_grads[0][1, :, 20:].abs().sum() == 0  # padding: nothing
    big = {t.untyped_storage().data_ptr() for t in kept if t.dim() == 4}
    assert big == {t.untyped_storage().data_ptr() for t in (*leaves, fast)}
    assert len({t.untyped_storage().data_ptr() for t in slow_kept if t.dim() == 4}) > len(big)  # what it saves


def test_cpu_segment_attention_under_bf16_autocast_takes_mixed_dtypes_as_sdpa_does(monkeypatch):
    """Under CPU autocast, RoPE can leave query and key in float32 while value is bf16 (transformers' bf16
    mixed precision); the CPU function casts as autocast casts an SDPA call, and matches that call."""
    import unialign.attention as attention

    plan = SegmentPlan.build([[Segment(0, 0, 0, 20), Segment(0, 12, 20, 28)]])

    def run():
        torch.manual_seed(2)
        q, k = torch.randn(1, 4, 28, 8, requires_grad=True), torch.randn(1, 2, 28, 8, requires_grad=True)
        v = torch.randn(1, 2, 28, 8, dtype=torch.bfloat16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, _ = attention.segment_attention_forward(torch.nn.Module(), q, k, v, None, unialign_segments=plan)
        out.float().sum().backward()
        return out, q.grad

    fast, fast_grad = run()
    monkeypatch.setattr(attention, "_HAS_CPU_FLASH_OPS", False)
    slow, slow_grad = run()
    assert fast.dtype == torch.bfloat16  # autocast's dtype (the SDPA path writes its bf16 pieces into float32)
    torch.testing.assert_close(fast.float(), slow.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(fast_grad, slow_grad, atol=5e-2, rtol=5e-2)


def test_layout_bytes_are_per_token_tensors_on_cpu_plus_the_sdpa_masks():
    """The layouts benchmark's byte count: the CPU path builds 4 int64 tensors per position (ids, positions, owner,
    source; no prompt index without prompt log-probs) and no mask; the
    SDPA path adds one float32 mask of C × (P + C) per completion after the first."""
    from benchmarks.layouts import layout_bytes

    prompt, completions, length = 64, 3, 16
    sizes = layout_bytes(prompt, completions, length)
    width = prompt + completions * length
    assert sizes["width"] == width
    assert sizes["segment_layout_bytes"] == 4 * 8 * width
    assert sizes["segment_sdpa_layout_bytes"] == 4 * 8 * width + 4 * (completions - 1) * length * (prompt + length)
    assert sizes["dense_mask_layout_bytes"] > width * width * 4  # the W × W additive mask alone
