"""``disable_dropout`` (on by default, as TRL's): no dropout anywhere, so step-0 DPO is exactly ln 2.

The model here is the tiny random Llama of ``tests/conftest.py`` with ``attention_dropout=0.3``
(Llama's only dropout: its attention passes it to SDPA as ``dropout_p`` in training mode) and LoRA
adapters with ``lora_dropout=0.3``.
"""

import json
import math

import pytest
import torch

import unialign
from tests.conftest import save_tiny_llama, tiny_dpo_config
from unialign.config import load_config
from unialign.losses.registry import get_method
from unialign.run import build_models

DROPOUT = 0.3


@pytest.fixture(scope="module")
def dropout_model_dir(tmp_path_factory, tokenizer) -> str:
    """The conftest's tiny Llama, with attention dropout 0.3 in its config."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-dropout"), tokenizer, attention_dropout=DROPOUT)


def _config(model_dir, data_file, tmp_path, **extra):
    lora = {"use_peft": True, "lora_r": 4, "lora_alpha": 8, "lora_dropout": DROPOUT}
    return tiny_dpo_config(model_dir, data_file, tmp_path / "run", **(lora | extra))


def _policy(model_dir, data_file, tmp_path, **extra):
    cfg = load_config(None, _config(model_dir, data_file, tmp_path, **extra))
    policy, _ = build_models(cfg, get_method(cfg.loss_type))
    return policy


def _token_logps(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def _ids(tokenizer) -> torch.Tensor:
    return torch.tensor([tokenizer("Cats are lovely, and tea is warm when it rains on the maps.")["input_ids"]])


def _make_lora_nonzero(model) -> None:
    # B starts at 0, which would hide LoRA dropout: the adapter path would add 0 either way.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)


def _dropout_probabilities(model) -> list[float]:
    """Every dropout probability the forward can read: dropout modules, attention attributes, the config."""
    values = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    values += [m.attention_dropout for m in model.modules() if hasattr(m, "attention_dropout")]
    return values + [model.config.attention_dropout]


def test_training_forwards_are_identical_by_default(dropout_model_dir, data_file, tokenizer, tmp_path):
    policy = _policy(dropout_model_dir, data_file, tmp_path)
    _make_lora_nonzero(policy)
    ids = _ids(tokenizer)
    policy.train()
    first, second = _token_logps(policy, ids), _token_logps(policy, ids)
    assert torch.equal(first, second)
    policy.eval()
    assert torch.equal(first, _token_logps(policy, ids))  # training mode computes what eval mode does


def test_training_forwards_differ_with_dropout_kept(dropout_model_dir, data_file, tokenizer, tmp_path):
    policy = _policy(dropout_model_dir, data_file, tmp_path, disable_dropout=False)
    ids = _ids(tokenizer)
    policy.train()
    assert not torch.equal(_token_logps(policy, ids), _token_logps(policy, ids))
    assert set(_dropout_probabilities(policy)) == {DROPOUT}  # lora_dropout and attention_dropout, untouched


def test_lora_dropout_alone_is_disabled(tiny_model_dir, data_file, tokenizer, tmp_path):
    # The conftest model has no attention dropout: here only the adapters' dropout could make noise.
    kept = _policy(tiny_model_dir, data_file, tmp_path, disable_dropout=False)
    off = _policy(tiny_model_dir, data_file, tmp_path)
    ids = _ids(tokenizer)
    for policy in (kept, off):
        _make_lora_nonzero(policy)
        policy.train()
    assert not torch.equal(_token_logps(kept, ids), _token_logps(kept, ids))
    assert torch.equal(_token_logps(off, ids), _token_logps(off, ids))


@pytest.mark.parametrize("loss_type,use_peft", [("dpo", False), ("reward_model", True), ("una_online", True)])
def test_every_built_model_has_no_dropout_left(loss_type, use_peft, dropout_model_dir, data_file, tmp_path):
    cfg = load_config(None, _config(dropout_model_dir, data_file, tmp_path, loss_type=loss_type, use_peft=use_peft))
    policy, reference = build_models(cfg, get_method(loss_type))
    assert (reference is not None) == (loss_type == "dpo")  # a separate reference without LoRA
    for model in (policy, reference):
        if model is not None:
            probabilities = _dropout_probabilities(model)
            assert len(probabilities) > 1 and set(probabilities) == {0.0}


def _step0_loss(model_dir, data_file, tmp_path, **extra) -> float:
    unialign.train(_config(model_dir, data_file, tmp_path, max_steps=1, logging_steps=1, **extra))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return next(line["loss"] for line in lines if "loss" in line)


def test_step0_dpo_loss_is_ln2_with_dropout_in_the_model(dropout_model_dir, data_file, tmp_path):
    # LoRA: the reference is the adapter-disabled base in eval mode, the policy runs in training mode.
    assert _step0_loss(dropout_model_dir, data_file, tmp_path) == pytest.approx(math.log(2), abs=1e-6)


def test_step0_dpo_loss_is_not_ln2_when_dropout_is_kept(dropout_model_dir, data_file, tmp_path):
    # B = 0 makes the LoRA path add nothing at step 0, but attention dropout still perturbs the
    # training-mode policy and not the eval-mode reference. Measured (seed 0): 0.693702, ln 2 + 5.5e-4;
    # with dropout disabled the same run logs ln 2 + 2e-9.
    loss = _step0_loss(dropout_model_dir, data_file, tmp_path, disable_dropout=False)
    assert abs(loss - math.log(2)) > 1e-4
