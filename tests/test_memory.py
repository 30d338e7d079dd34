"""Memory features: gradient checkpointing changes no number, QLoRA trains LoRA on 4-bit weights.

Gradient checkpointing recomputes each decoder layer in backward instead of keeping its activations.
With the same weights and batch, the losses of two steps and the gradients of the second one must
equal those of the run without it, for full fine-tuning and LoRA (adapter-disabled reference), the
chunked and the full log-prob path, prefix sharing on and off, KTO's no-grad KL pass and RAO's prompt
log-probs. Measured on the tiny model: the differences are exactly 0 (the recompute runs the same
kernels on the same inputs); the tolerance below is 1e-6.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, TrainerCallback

from tests.conftest import save_tiny_llama, tiny_dpo_config
from tests.test_methods_train import _rows
from unialign.config import ConfigError, load_config
from unialign.data.collate import PreferenceCollator
from unialign.data.tokenized import max_completions
from unialign.logprobs import unwrap
from unialign.losses.registry import get_method
from unialign.models import load_tokenizer
from unialign.pipeline import prepare_data
from unialign.run import build_models
from unialign.trainer import UnialignTrainer

TOLERANCE = 1e-6


class _Capture(TrainerCallback):
    """Keeps the gradients of the last optimizer step."""

    def __init__(self):
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _train_two_steps(tiny_model_dir, tmp_path, fmt: str, **extra):
    """Two steps on ``fmt`` rows: logged losses, the last step's gradients, each layer-0 MLP call's grad mode."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / f"{fmt}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _rows(fmt)))
    cfg = load_config(
        None, tiny_dpo_config(tiny_model_dir, str(data), tmp_path / "run", max_steps=2, learning_rate=0.5, **extra)
    )
    method = get_method(cfg.loss_type).for_config(cfg)
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = prepare_data(cfg.dataset, cfg, method, tokenizer).examples
    policy, reference = build_models(cfg, method)
    layer_calls = []
    mlp = unwrap(policy).model.layers[0].mlp
    mlp_forward = mlp.forward  # wrapped on the instance: it also sees the recompute, which module hooks do not
    mlp.forward = lambda *a, **k: (layer_calls.append(torch.is_grad_enabled()), mlp_forward(*a, **k))[1]
    capture = _Capture()
    trainer = UnialignTrainer(
        model=policy,
        args=cfg,
        method=method,
        ref_model=reference,
        train_dataset=examples,
        data_collator=PreferenceCollator(
            tokenizer.pad_token_id,
            max_completions(examples),
            with_prompt_logps=method.needs_prompt_logps,
            with_kl_pairs=method.needs_kl_pairs,
        ),
        processing_class=tokenizer,
        callbacks=[capture],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, capture.grads, layer_calls


COMBINATIONS = {
    "full-chunked-packed": ("pairwise", {"loss_type": "dpo"}),
    "full-chunked-plain": ("pairwise", {"loss_type": "dpo", "prefix_sharing": False}),
    "full-logits": ("pairwise", {"loss_type": "dpo", "logprob_impl": "full"}),
    "lora-chunked-packed": ("pairwise", {"loss_type": "dpo", "use_peft": True, "lora_r": 4}),
    "lora-chunked-plain": ("pairwise", {"loss_type": "dpo", "use_peft": True, "lora_r": 4, "prefix_sharing": False}),
    "lora-reentrant": (
        "pairwise",
        {"loss_type": "dpo", "use_peft": True, "lora_r": 4, "gradient_checkpointing_kwargs": {"use_reentrant": True}},
    ),
    "kto-kl-pass": ("binary", {"loss_type": "kto"}),
    "rao-prompt-logps": ("listwise", {"loss_type": "rao"}),
    "tpo-no-reference": ("triple", {"loss_type": "tpo"}),
}


@pytest.mark.parametrize("name", list(COMBINATIONS))
def test_gradient_checkpointing_changes_no_loss_and_no_gradient(tiny_model_dir, tmp_path, name):
    fmt, extra = COMBINATIONS[name]
    kwargs = {k: v for k, v in extra.items() if k != "gradient_checkpointing_kwargs"}
    plain_losses, plain_grads, plain_calls = _train_two_steps(tiny_model_dir, tmp_path / "plain", fmt, **kwargs)
    ckpt_losses, ckpt_grads, ckpt_calls = _train_two_steps(
        tiny_model_dir, tmp_path / "ckpt", fmt, gradient_checkpointing=True, **extra
    )
    # checkpointing really ran: each layer forward with gradients (not the no-grad reference or KL passes)
    # runs once more, in backward
    assert plain_calls.count(True) > 0
    assert len(ckpt_calls) - len(plain_calls) == plain_calls.count(True)
    assert len(plain_losses) == len(ckpt_losses) == 2
    assert plain_losses[0] != plain_losses[1]  # the first step changed the weights the second one sees
    for plain, ckpt in zip(plain_losses, ckpt_losses):
        assert abs(plain - ckpt) <= TOLERANCE
    assert plain_grads and set(plain_grads) == set(ckpt_grads)
    if extra.get("use_peft"):
        assert all("lora_" in n for n in plain_grads)  # the base is frozen; only adapters have gradients
    assert any(g.abs().max() > 0 for g in plain_grads.values())
    for key, grad in plain_grads.items():
        assert (ckpt_grads[key] - grad).abs().max().item() <= TOLERANCE * max(1.0, grad.abs().max().item()), key


def test_memory_settings_may_change_on_resume_but_4bit_loading_may_not():
    from unialign.checkpoints import resume_differences, training_settings

    before = load_config(None, {"output_dir": "x", "report_to": "none", "use_peft": True})
    after = load_config(None, {"output_dir": "x", "report_to": "none", "use_peft": True, "gradient_checkpointing": True,
                               "activation_checkpointing_save_attention": True, "attn_implementation": "eager"})
    marker = {"settings": training_settings(before)}
    assert resume_differences(marker, after, None) == []
    quantized = load_config(None, {"output_dir": "x", "report_to": "none", "use_peft": True, "load_in_4bit": True})
    assert resume_differences(marker, quantized, None) == ["load_in_4bit False → True"]


# ----------------------------------------------------------------------------- QLoRA


@pytest.fixture(scope="module")
def qlora_model_dir(tmp_path_factory, tokenizer) -> str:
    """The tiny Llama with hidden size 64: bitsandbytes' CPU inference path (eval mode, no grad: the
    adapter-disabled reference) repacks 4-bit weights in blocks of 64 inputs and fails on 32."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-64"), tokenizer, hidden_size=64, intermediate_size=128)


def _qlora_config(tiny_model_dir, data_file, tmp_path, **extra):
    return tiny_dpo_config(
        tiny_model_dir, data_file, tmp_path / "run", use_peft=True, lora_r=4, load_in_4bit=True, **extra
    )


def test_qlora_needs_lora():
    with pytest.raises(ConfigError, match="'load_in_4bit' needs use_peft: true: 4-bit weights cannot be trained"):
        load_config(None, {"output_dir": "x", "report_to": "none", "load_in_4bit": True})


def test_qlora_keys_are_checked():
    with pytest.raises(ValueError, match="'bnb_4bit_quant_type' is 'int4'; allowed values: nf4, fp4"):
        load_config(None, {"output_dir": "x", "report_to": "none", "bnb_4bit_quant_type": "int4"})
    cfg = load_config(None, {"output_dir": "x", "report_to": "none", "use_peft": True, "load_in_4bit": True})
    assert (cfg.bnb_4bit_quant_type, cfg.bnb_4bit_compute_dtype, cfg.bnb_4bit_use_double_quant) == (
        "nf4", "bfloat16", False
    )


def test_qlora_refusal_names_the_backend_problem(tiny_model_dir, data_file, tmp_path, monkeypatch):
    import unialign
    from unialign import models

    def broken():
        raise NotImplementedError("no CPU kernel for 4-bit matmul")

    monkeypatch.setattr(models.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(models, "_four_bit_cpu_probe", broken)
    with pytest.raises(ConfigError) as err:
        unialign.train(_qlora_config(tiny_model_dir, data_file, tmp_path))
    assert str(err.value) == (
        "config key 'load_in_4bit' needs a CUDA GPU: bitsandbytes' CPU backend could not run a 4-bit matmul with "
        "its backward on this machine (NotImplementedError: no CPU kernel for 4-bit matmul); install "
        "bitsandbytes>=0.50 (its CPU backend is tested) or train on a GPU"
    )
    assert not (tmp_path / "run" / "model").exists()


def test_qlora_without_bitsandbytes_says_what_to_install(monkeypatch):
    from unialign import models

    real = models.importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None if name == "bitsandbytes" else real(name))
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package: pip install 'unialign\[qlora\]'"):
        models.check_four_bit_backend()


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_qlora_trains_lora_on_4bit_weights_on_cpu(qlora_model_dir, data_file, tmp_path, quant_type):
    """bitsandbytes' CPU backend runs 4-bit forward and backward here: a real QLoRA run, not a refusal."""
    pytest.importorskip("bitsandbytes", reason="QLoRA's CPU test needs bitsandbytes (make setup installs it)")
    import bitsandbytes as bnb

    import unialign

    result = unialign.train(
        _qlora_config(
            qlora_model_dir, data_file, tmp_path, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True
        )
    )
    model = result.trainer.model
    inner = unwrap(model)
    linears = [m for n, m in inner.named_modules() if n.endswith(("q_proj.base_layer", "down_proj.base_layer"))]
    assert len(linears) == 4 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert all(m.weight.quant_state.quant_type == quant_type for m in linears)
    assert inner.config.quantization_config.bnb_4bit_use_double_quant is True
    losses = [e["loss"] for e in result.trainer.state.log_history if "loss" in e]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert abs(losses[0] - 0.6931471805599453) < 1e-6  # step 0: policy = adapter-disabled reference
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = AutoModelForCausalLM.from_pretrained(qlora_model_dir).state_dict()
    # what is not quantized and not LoRA is exactly the checkpoint's (norms, embeddings: frozen, in float32)
    for name, param in model.named_parameters():
        if "lora_" in name or "base_layer" in name:
            continue
        key = name.replace("base_model.model.", "")
        assert torch.equal(param.detach().float(), base[key].float()), name
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; two steps moved it
    # the saved model is the adapter (merging into 4-bit weights would round the update away)
    assert (result.model_dir / "adapter_model.safetensors").exists()
    assert not (result.model_dir / "model.safetensors").exists()


def test_qlora_with_gradient_checkpointing_equals_without(qlora_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA's CPU test needs bitsandbytes (make setup installs it)")
    extra = {"use_peft": True, "lora_r": 4, "load_in_4bit": True, "bnb_4bit_compute_dtype": "float32"}
    plain_losses, plain_grads, plain_calls = _train_two_steps(qlora_model_dir, tmp_path / "plain", "pairwise", **extra)
    ckpt_losses, ckpt_grads, calls = _train_two_steps(
        qlora_model_dir, tmp_path / "ckpt", "pairwise", gradient_checkpointing=True, **extra
    )
    assert len(calls) - len(plain_calls) == plain_calls.count(True) > 0
    for plain, ckpt in zip(plain_losses, ckpt_losses):
        assert abs(plain - ckpt) <= TOLERANCE
    assert set(plain_grads) == set(ckpt_grads) and plain_grads
    for key, grad in plain_grads.items():
        assert (ckpt_grads[key] - grad).abs().max().item() <= TOLERANCE * max(1.0, grad.abs().max().item()), key


def _dequantized_twin(model):
    """A copy of a QLoRA model whose 4-bit layers are plain float32 ``nn.Linear`` with the dequantized weights."""
    import bitsandbytes as bnb

    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                linear = torch.nn.Linear(child.in_features, child.out_features, bias=False)
                weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state).float()
                linear.weight = torch.nn.Parameter(weight, requires_grad=False)
                setattr(module, child_name, linear)
    return twin


def test_qlora_gradients_equal_those_of_the_dequantized_float_model(qlora_model_dir, tmp_path):
    """A reference forward (eval mode, no grad) comes first, as in training: it must not change later gradients."""
    pytest.importorskip("bitsandbytes", reason="QLoRA's CPU test needs bitsandbytes (make setup installs it)")
    from unialign.logprobs import token_logps

    cfg = load_config(
        None,
        tiny_dpo_config(
            qlora_model_dir, "unused", tmp_path, use_peft=True, lora_r=4, load_in_4bit=True,
            bnb_4bit_compute_dtype="float32",
        ),
    )
    policy, _ = build_models(cfg, get_method("dpo"))
    torch.manual_seed(1)
    for name, param in policy.named_parameters():
        if "lora_B" in name:  # B starts at 0, which would give the A matrices no gradient
            torch.nn.init.normal_(param, std=0.1)
    twin = _dequantized_twin(policy)
    ids = torch.randint(5, 900, (2, 12), generator=torch.Generator().manual_seed(0))
    scored = torch.zeros_like(ids, dtype=torch.bool)
    scored[:, 6:] = True
    grads = []
    for model in (policy, twin):
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            token_logps(model, ids, torch.ones_like(ids), scored)
        model.train()
        token_logps(model, ids, torch.ones_like(ids), scored).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    four_bit, dense = grads
    assert set(four_bit) == set(dense) and all("lora_" in n for n in four_bit)
    first = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert dense[first].abs().max() > 0  # the first layer's adapters get gradients through every 4-bit layer
    for name, grad in dense.items():
        # measured: exactly equal (bitsandbytes dequantizes and runs the same float32 matmul); 1e-4 leaves room for
        # other CPU kernels
        assert (four_bit[name] - grad).abs().max().item() <= 1e-4 * max(1.0, grad.abs().max().item()), name


def test_qlora_with_a_separate_reference_loads_it_in_4bit_too(qlora_model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="QLoRA's CPU test needs bitsandbytes (make setup installs it)")
    import bitsandbytes as bnb

    cfg = load_config(None, tiny_dpo_config(qlora_model_dir, "unused", tmp_path, use_peft=True, load_in_4bit=True,
                                            ref_model_name_or_path=qlora_model_dir))
    policy, reference = build_models(cfg, get_method("dpo"))
    assert reference is not None and not hasattr(reference, "disable_adapter")
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in reference.modules()) == 14
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in unwrap(policy).modules()) == 14
