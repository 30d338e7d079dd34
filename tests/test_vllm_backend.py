"""The vLLM generation backend without vLLM: weight export, output conversion and the trainer's use of it.

A stand-in ``vllm`` module records what unialign hands the engine (constructor settings, sampling
parameters, prompt ids, weights) and returns token ids the test chooses. What cannot be checked
here is vLLM itself; that needs a GPU (see docs/online.md).
"""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest
import torch

import unialign
from tests.test_online import _config
from unialign.generation import GenerationConfig
from unialign.models import apply_lora, load_model
from unialign.online.vllm_backend import VLLMGenerator, check_vllm_setup, merged_weights


class FakeSample:
    def __init__(self, token_ids, finish_reason):
        self.token_ids, self.finish_reason = token_ids, finish_reason


class FakeLLM:
    """Records its settings and every weight push; samples are chosen by ``script(prompt_ids, k)``."""

    instances: list[FakeLLM] = []
    script = None

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.pushes: list[dict[str, torch.Tensor]] = []
        self.calls: list[tuple[list, object]] = []
        self.cache_resets = 0
        runner = types.SimpleNamespace(model=types.SimpleNamespace(load_weights=self._load))
        self.llm_engine = types.SimpleNamespace(
            model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)))
        FakeLLM.instances.append(self)

    def _load(self, pairs):
        self.pushes.append({name: tensor.clone() for name, tensor in pairs})

    def reset_prefix_cache(self):
        self.cache_resets += 1

    def generate(self, prompts, params, use_tqdm=True):
        self.calls.append((prompts, params))
        return [types.SimpleNamespace(outputs=[FakeSample(*s) for s in FakeLLM.script(p["prompt_token_ids"], params.n)])
                for p in prompts]


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    monkeypatch.setattr(FakeLLM, "instances", [])
    return module


def _lora_model(tiny_model_dir):
    torch.manual_seed(0)
    model = apply_lora(load_model(tiny_model_dir), r=4, alpha=8, dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # fresh adapters are zero; give them a value so merging changes the weights
            param.data.normal_(0, 0.5)
    return model


# ----------------------------------------------------------------------------- weight export
def test_merged_weights_use_plain_names_and_values_and_leave_the_adapter_unmerged(tiny_model_dir):
    model = _lora_model(tiny_model_dir)
    ids = torch.tensor([[1, 2, 3, 4]])
    before = model(input_ids=ids).logits
    plain = load_model(tiny_model_dir)
    with merged_weights(model) as pairs:
        exported = {name: tensor.clone() for name, tensor in pairs}
    assert set(exported) == {name for name, _ in plain.named_parameters()}
    merged = _lora_model(tiny_model_dir).merge_and_unload()  # same seed: the same adapter values
    reference = dict(merged.named_parameters())
    changed = 0
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, reference[name].data, rtol=0, atol=1e-6)
        changed += not torch.equal(tensor, dict(plain.named_parameters())[name].data)
    assert changed >= 2 * 7  # every adapted linear layer of both blocks carries its merged delta
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=0, atol=1e-5)  # unmerged again


def test_merged_weights_of_a_plain_model_are_its_parameters(tiny_model_dir):
    model = load_model(tiny_model_dir)
    with merged_weights(model) as pairs:
        assert [name for name, _ in pairs] == [name for name, _ in model.named_parameters()]


def test_vllm_setups_it_cannot_serve_are_refused_by_name():
    check_vllm_setup(1, None, False)
    check_vllm_setup(1, 2, False)
    with pytest.raises(ValueError, match="this run has 2 processes"):
        check_vllm_setup(2, None, False)
    with pytest.raises(ValueError, match="ZeRO-3 and FSDP"):
        check_vllm_setup(1, 3, False)
    with pytest.raises(ValueError, match="ZeRO-3 and FSDP"):
        check_vllm_setup(1, None, True)


# ----------------------------------------------------------------------------- the generator
def test_generator_maps_settings_and_converts_outputs(fake_vllm, tokenizer, monkeypatch):
    eos = tokenizer.eos_token_id
    hello = tokenizer("hello world", add_special_tokens=False).input_ids
    # per prompt: one sample stopping on EOS (token included), one cut at max_tokens, one stop without the token
    monkeypatch.setattr(FakeLLM, "script", lambda prompt, n: [(hello + [eos], "stop"), (hello, "length"),
                                                              (hello, "stop")][:n])
    engine = VLLMGenerator("some/model", gpu_memory_utilization=0.25, max_model_len=96, seed=7)
    llm = FakeLLM.instances[0]
    assert llm.kwargs == {"model": "some/model", "gpu_memory_utilization": 0.25, "max_model_len": 96, "seed": 7,
                          "dtype": "auto", "enable_prefix_caching": True}
    config = GenerationConfig(max_new_tokens=12, temperature=0.8, top_p=0.9, num_return_sequences=3, seed=None,
                              repetition_penalty=None)
    groups = engine.generate([[5, 6], [7]], config, tokenizer)
    prompts, params = llm.calls[0]
    assert prompts == [{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7]}]
    assert (params.n, params.temperature, params.top_p, params.max_tokens) == (3, 0.8, 0.9, 12)
    assert params.stop_token_ids == [eos] and params.repetition_penalty == 1.0 and params.seed is None
    assert len(groups) == 2 and all(len(g) == 3 for g in groups)
    first = groups[0]
    assert [g.ended for g in first] == [True, False, True]
    assert all(g.token_ids == hello for g in first)  # EOS is never part of token_ids, as with transformers
    assert first[0].text == "hello world"


def test_weights_are_pushed_once_per_optimizer_step(fake_vllm, tiny_model_dir, monkeypatch):
    engine = VLLMGenerator("m", gpu_memory_utilization=0.3, max_model_len=64, seed=0)
    llm = FakeLLM.instances[0]
    model = _lora_model(tiny_model_dir)
    assert engine.sync_weights(model, step=0) is True
    assert engine.sync_weights(model, step=0) is False  # another micro-batch of the same step
    assert engine.sync_weights(model, step=1) is True
    assert len(llm.pushes) == 2 and llm.cache_resets == 2
    assert set(llm.pushes[0]) == {name for name, _ in load_model(tiny_model_dir).named_parameters()}


# ----------------------------------------------------------------------------- in the online trainer
def _samples_upper_then_lower(tokenizer, monkeypatch):
    """The stand-in engine answers every prompt with "ABC DEF" + EOS, then "abc def" cut at the length limit."""
    eos = tokenizer.eos_token_id
    upper = tokenizer("ABC DEF", add_special_tokens=False).input_ids
    lower = tokenizer("abc def", add_special_tokens=False).input_ids
    monkeypatch.setattr(FakeLLM, "script", lambda prompt, n: [(upper + [eos], "stop"), (lower, "length")][:n])
    monkeypatch.setattr("unialign.online.trainer.check_backend", lambda name: None)  # no GPU here; vllm is faked


def test_online_training_samples_through_the_engine_with_the_current_weights(fake_vllm, tiny_model_dir, tmp_path,
                                                                             tokenizer, monkeypatch):
    _samples_upper_then_lower(tokenizer, monkeypatch)
    result = unialign.train(_config(tiny_model_dir, tmp_path, generation_backend="vllm", max_steps=3,
                                    num_generations=2, use_peft=True, lora_r=4, lora_alpha=8, max_length=64,
                                    vllm_gpu_memory_utilization=0.4))
    llm = FakeLLM.instances[0]
    assert llm.kwargs["gpu_memory_utilization"] == 0.4 and llm.kwargs["max_model_len"] == 64
    assert llm.kwargs["model"] == tiny_model_dir
    assert len(llm.calls) == 3 and len(llm.pushes) == 3  # one rollout and one weight push per step
    base = dict(load_model(tiny_model_dir).named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(llm.pushes[0][name], base[name].data)  # step 0: LoRA B is zero, the weights are the base's
    assert not torch.equal(llm.pushes[2][name], llm.pushes[1][name])  # later pushes carry the updates
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "reward" in row]
    assert len(steps) == 3
    # the engine's samples were scored: per prompt one "ABC DEF" (6 of 7 characters uppercase, ended) and one
    # "abc def" (cut at the length limit)
    assert steps[0]["reward"] == pytest.approx((6 / 7) / 2, abs=1e-6)
    assert steps[0]["completions/eos_fraction"] == pytest.approx(0.5)
    assert result.model_dir.is_dir()


@pytest.mark.parametrize("loss_type", ["grpo", "rloo", "ppo"])
def test_the_policy_gradient_methods_sample_through_the_engine_too(fake_vllm, tiny_model_dir, tmp_path, tokenizer,
                                                                   monkeypatch, loss_type):
    _samples_upper_then_lower(tokenizer, monkeypatch)
    extra = {"num_ppo_epochs": 1} if loss_type == "ppo" else {}  # one rollout per optimizer step, as the others
    unialign.train(_config(tiny_model_dir, tmp_path, loss_type=loss_type, generation_backend="vllm", max_steps=2,
                           num_generations=2, use_peft=True, lora_r=4, lora_alpha=8, max_length=64,
                           vllm_gpu_memory_utilization=0.4, **extra))
    llm = FakeLLM.instances[0]
    assert len(llm.calls) == 2 and len(llm.pushes) == 2  # one rollout and one weight push per step
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "reward" in row]
    assert len(steps) == 2
    assert steps[0]["reward"] == pytest.approx((6 / 7) / 2, abs=1e-6)  # the engine's two samples were scored
    assert steps[0]["completions/eos_fraction"] == pytest.approx(0.5)
