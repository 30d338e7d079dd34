"""activation_checkpointing_save_attention: the recompute skips the attention kernel and changes no number.

With checkpointing, each layer's forward with gradients runs again in backward, attention kernel included.
With ``activation_checkpointing_save_attention`` the kernel's outputs are kept from the forward instead, so the
kernel runs exactly as often as without checkpointing, and the losses and gradients of two steps equal those
of plain checkpointing (to 1e-6; measured 0 on the tiny model).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.modeling_layers import GradientCheckpointingLayer

import unialign
from tests.conftest import tiny_dpo_config
from tests.test_memory import TOLERANCE, _train_two_steps
from tests.test_online import _config as online_config
from tests.test_online import _logs as online_logs
from unialign.checkpointing import attention_kernels, attention_saving_layers, save_attention_in_checkpoints
from unialign.config import ConfigError, load_config
from unialign.models import load_model

CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


class _CountKernel(TorchDispatchMode):
    """Counts calls of the CPU flash-attention kernel's forward, the recompute's included."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func is CPU_FLASH
        return func(*args, **(kwargs or {}))


def _run(tiny_model_dir, tmp_path, fmt, **extra):
    with _CountKernel() as counter:
        losses, grads, _ = _train_two_steps(tiny_model_dir, tmp_path, fmt, **extra)
    return losses, grads, counter.calls


CASES = {
    "segment-attention": ("pairwise", {"loss_type": "dpo"}),  # prefix sharing: the CPU flash kernel per segment
    "sdpa-plain": ("pairwise", {"loss_type": "dpo", "prefix_sharing": False}),
    "lora": ("pairwise", {"loss_type": "dpo", "use_peft": True, "lora_r": 4}),
    "kto-kl-pass": ("binary", {"loss_type": "kto"}),
    "rao-prompt-logps": ("listwise", {"loss_type": "rao"}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_saved_attention_skips_the_kernel_in_the_recompute_and_changes_no_number(tiny_model_dir, tmp_path, name):
    fmt, extra = CASES[name]
    _, _, plain_calls = _run(tiny_model_dir, tmp_path / "plain", fmt, **extra)
    ckpt_losses, ckpt_grads, ckpt_calls = _run(tiny_model_dir, tmp_path / "ckpt", fmt, gradient_checkpointing=True,
                                               **extra)
    saved_losses, saved_grads, saved_calls = _run(tiny_model_dir, tmp_path / "saved", fmt, gradient_checkpointing=True,
                                                  activation_checkpointing_save_attention=True, **extra)
    assert plain_calls > 0
    assert ckpt_calls > plain_calls  # plain checkpointing runs the kernel again in backward
    assert saved_calls == plain_calls  # saving its outputs: never again
    assert len(saved_losses) == 2 and saved_losses[0] != saved_losses[1]
    assert all(abs(a - b) <= TOLERANCE for a, b in zip(ckpt_losses, saved_losses))
    assert set(saved_grads) == set(ckpt_grads) and any(g.abs().max() > 0 for g in ckpt_grads.values())
    for key, grad in ckpt_grads.items():
        assert (saved_grads[key] - grad).abs().max().item() <= TOLERANCE * max(1.0, grad.abs().max().item()), key


def test_the_cpu_flash_kernel_is_among_the_saved_kernels():
    assert CPU_FLASH in attention_kernels()
    assert torch.ops.aten.mm.default not in attention_kernels()


def _config(tiny_model_dir, tmp_path, **extra):
    return load_config(None, tiny_dpo_config(tiny_model_dir, "unused.jsonl", tmp_path, **extra))


@pytest.mark.parametrize("extra, expected", [
    ({}, "activation_checkpointing is off"),
    ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
     "needs non-reentrant checkpointing, but activation_checkpointing_kwargs is {'use_reentrant': True}"),
    ({"activation_checkpointing": True, "activation_checkpointing_kwargs": {"preserve_rng_state": False}},
     "use_reentrant unset means reentrant to torch"),
])
def test_save_attention_refuses_what_it_cannot_apply(tiny_model_dir, tmp_path, extra, expected):
    with pytest.raises(ConfigError, match="activation_checkpointing_save_attention") as info:
        _config(tiny_model_dir, tmp_path, activation_checkpointing_save_attention=True, **extra)
    assert expected in str(info.value)


def test_save_attention_accepts_transformers_own_keys(tiny_model_dir, tmp_path):
    cfg = _config(tiny_model_dir, tmp_path, activation_checkpointing_save_attention=True, gradient_checkpointing=True,
                  gradient_checkpointing_kwargs={"every_n_layers": 2})
    assert cfg.activation_checkpointing and cfg.activation_checkpointing_save_attention


def test_wrapping_the_layers_needs_checkpointing_and_happens_once(tiny_model_dir):
    model = load_model(tiny_model_dir)
    with pytest.raises(ValueError, match="no layer of the model is checkpointed"):
        save_attention_in_checkpoints(model)
    model.activation_checkpointing_enable()
    layers = model.config.num_hidden_layers
    assert attention_saving_layers(model) == 0
    assert save_attention_in_checkpoints(model) == layers
    assert attention_saving_layers(model) == layers
    first = model.model.layers[0]._gradient_checkpointing_func
    assert first.keywords["context_fn"] is not None and first.keywords["use_reentrant"] is False
    assert save_attention_in_checkpoints(model) == layers
    assert model.model.layers[0]._gradient_checkpointing_func is first  # not wrapped twice
    half = load_model(tiny_model_dir)
    half.activation_checkpointing_enable(every_n_layers=2)
    assert save_attention_in_checkpoints(half) == layers // 2
    model.activation_checkpointing_enable({"use_reentrant": True})
    with pytest.raises(ValueError, match="needs non-reentrant checkpointing"):
        save_attention_in_checkpoints(model)


def test_online_una_with_kept_attention_trains_as_with_plain_checkpointing(tiny_model_dir, tmp_path):
    runs = {}
    for name, extra in (("recomputed", {}), ("kept", {"activation_checkpointing_save_attention": True})):
        (tmp_path / name).mkdir()
        config = online_config(tiny_model_dir, tmp_path / name, max_steps=2, gradient_checkpointing=True, **extra)
        result = unialign.train(config)
        runs[name] = [entry["loss"] for entry in online_logs(tmp_path / name / "run")]
        layers = [m for m in result.trainer.model.modules()
                  if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        assert len(layers) == 2  # the tiny model's layers, checkpointed
        assert attention_saving_layers(result.trainer.model) == (2 if name == "kept" else 0)
    assert len(runs["kept"]) == 2 and runs["kept"] == pytest.approx(runs["recomputed"], abs=1e-6)
