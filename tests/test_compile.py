"""compile_layers: the transformer blocks compiled in place give the eager model's log-probs and gradients.

Compiling on CPU runs inductor's C++ backend (gcc), so these tests take tens of seconds; one module-scoped
compiled model serves all of them, and its blocks are compiled for dynamic shapes, so batches of
different lengths and both layouts (plain padded rows, packed rows with a 4D block mask) reuse one graph.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from unialign.config import UnialignConfig
from unialign.data.collate import PreferenceCollator
from unialign.data.tokenize import TokenizedExample
from unialign.losses.registry import get_method
from unialign.models import compile_blocks
from unialign.trainer import UnialignTrainer


def _model(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def _trainer(model, tmp_path, *, compile_layers: bool, prefix_sharing: bool) -> UnialignTrainer:
    cfg = UnialignConfig(
        output_dir=str(tmp_path), loss_type="dpo", prefix_sharing=prefix_sharing, compile_layers=compile_layers,
        report_to=[], use_cpu=True,
    )
    return UnialignTrainer(model=model, args=cfg, method=get_method("dpo"))


def _batch(prompt_lengths: tuple[int, ...], prefix_sharing: bool) -> dict:
    gen = torch.Generator().manual_seed(sum(prompt_lengths))

    def ids(n):
        return torch.randint(5, 900, (n,), generator=gen).tolist()

    rows = [
        TokenizedExample([1] + ids(n - 1), [ids(3 + n % 5), ids(6 + n % 3)], i) for i, n in enumerate(prompt_lengths)
    ]
    return PreferenceCollator(0, 2)(rows)


def _logps_and_grads(trainer, model, batch):
    model.zero_grad()
    seq = trainer._logps(model, dataclasses.replace(batch)).seq
    (seq * torch.linspace(0.5, 1.5, seq.shape[0])).sum().backward()
    return seq.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.fixture(scope="module")
def eager(tiny_model_dir):
    return _model(tiny_model_dir)


@pytest.fixture(scope="module")
def compiled(tiny_model_dir):
    return _model(tiny_model_dir)


@pytest.mark.parametrize("prefix_sharing", [False, True], ids=["plain", "packed"])
def test_compiled_blocks_give_eager_logps_and_gradients(eager, compiled, tmp_path, prefix_sharing):
    eager_trainer = _trainer(eager, tmp_path / "e", compile_layers=False, prefix_sharing=prefix_sharing)
    compiled_trainer = _trainer(compiled, tmp_path / "c", compile_layers=True, prefix_sharing=prefix_sharing)
    assert all(layer._compiled_call_impl is not None for layer in compiled.model.layers)
    for lengths in [(3, 7, 12), (5, 9)]:  # two batch shapes: the dynamic graph must serve both
        batch = _batch(lengths, prefix_sharing)
        want, want_grads = _logps_and_grads(eager_trainer, eager, batch)
        got, got_grads = _logps_and_grads(compiled_trainer, compiled, batch)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert got_grads.keys() == want_grads.keys()
        for name, grad in want_grads.items():
            scale = grad.abs().max().clamp_min(1e-6)
            torch.testing.assert_close(got_grads[name] / scale, grad / scale, atol=1e-5, rtol=0, msg=name)


def test_compile_blocks_keeps_the_module_tree_and_state_dict(tiny_model_dir):
    model = _model(tiny_model_dir)
    keys = list(model.state_dict())
    assert compile_blocks(model) == model.config.num_hidden_layers
    assert list(model.state_dict()) == keys
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    assert model.model.embed_tokens._compiled_call_impl is None  # only the repeated blocks


def test_trainer_compiles_only_when_asked(tiny_model_dir, tmp_path):
    model = _model(tiny_model_dir)
    _trainer(model, tmp_path, compile_layers=False, prefix_sharing=True)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)


def test_a_model_without_repeated_blocks_is_refused():
    with pytest.raises(ValueError, match="names no repeated block class"):
        compile_blocks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_lora_policy_and_adapter_disabled_reference_match_eager(tiny_model_dir, tmp_path):
    from unialign.models import apply_lora

    def lora_model():
        torch.manual_seed(7)  # the same fresh adapters in both copies
        model = apply_lora(_model(tiny_model_dir), r=4, alpha=8, dropout=0.0)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; make the adapters matter
                torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(len(name)))
        return model

    eager, compiled = lora_model(), lora_model()
    eager_trainer = _trainer(eager, tmp_path / "e", compile_layers=False, prefix_sharing=True)
    compiled_trainer = _trainer(compiled, tmp_path / "c", compile_layers=True, prefix_sharing=True)
    batch = _batch((4, 9, 6), prefix_sharing=True)
    want, want_grads = _logps_and_grads(eager_trainer, eager, batch)
    got, got_grads = _logps_and_grads(compiled_trainer, compiled, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert want_grads and all("lora_" in name for name in want_grads)
    for name, grad in want_grads.items():
        scale = grad.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(got_grads[name] / scale, grad / scale, atol=1e-5, rtol=0, msg=name)
    reference = compiled_trainer.reference_logps(dataclasses.replace(batch)).seq
    expected = eager_trainer.reference_logps(dataclasses.replace(batch)).seq
    torch.testing.assert_close(reference, expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(reference, got)  # the adapters were really off for the reference
