"""The trainer end to end on the tiny model: DPO at step 0, weight updates, reference modes, save/reload."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

import unialign
from tests.conftest import tiny_dpo_config
from unialign.config import load_config
from unialign.data.collate import PreferenceCollator
from unialign.data.tokenize import tokenize_rows
from unialign.losses.registry import get_method
from unialign.run import build_models
from unialign.trainer import UnialignTrainer


def _config(tiny_model_dir, data_file, tmp_path, **extra):
    return tiny_dpo_config(tiny_model_dir, data_file, tmp_path / "run", **extra)


def test_dpo_step0_loss_is_ln2_and_training_moves_weights(tiny_model_dir, data_file, tmp_path):
    before = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    result = unialign.train(_config(tiny_model_dir, data_file, tmp_path))
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert lines[0]["rewards/margins"] == 0.0
    assert lines[1]["rewards/margins"] > 0  # one step of DPO separates chosen from rejected
    after = AutoModelForCausalLM.from_pretrained(result.model_dir).state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) == len(before)  # full fine-tuning touches every tensor


def test_lora_trains_only_adapters(tiny_model_dir, data_file, tmp_path):
    result = unialign.train(_config(tiny_model_dir, data_file, tmp_path, use_peft=True, lora_r=4, save_merged=False))
    model = result.trainer.model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        key = name.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(param.detach(), base[key]), name
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # B starts at zero; training moved it


def _reference_logps(tiny_model_dir, data_file, tmp_path, **extra):
    cfg = load_config(None, _config(tiny_model_dir, data_file, tmp_path, **extra))
    method = get_method("dpo")
    tok = unialign.load_tokenizer(tiny_model_dir)
    rows = [json.loads(line) for line in open(data_file)]
    examples, _ = tokenize_rows(rows, "pairwise", tok, max_length=64, max_prompt_length=48)
    policy, reference = build_models(cfg, method)
    trainer = UnialignTrainer(
        model=policy,
        args=cfg,
        method=method,
        ref_model=reference,
        train_dataset=examples,
        data_collator=PreferenceCollator(tok.pad_token_id, 2),
        processing_class=tok,
    )
    batch = trainer._prepare_inputs(trainer.data_collator(examples))
    if cfg.precompute_ref_log_probs:
        trainer.precompute_reference(examples, 3)
        trainer.release_reference_model()
        return torch.tensor([e.ref_logps for e in examples]), trainer
    from unialign.trainer import gather_slots

    return gather_slots(trainer.reference_logps(batch).seq, batch.slot_seq), trainer


def test_three_reference_modes_agree(tiny_model_dir, data_file, tmp_path):
    separate, _ = _reference_logps(tiny_model_dir, data_file, tmp_path)
    adapter, trainer = _reference_logps(tiny_model_dir, data_file, tmp_path, use_peft=True, lora_r=4)
    with torch.no_grad():  # make the adapters non-trivial so "disabled" really means something
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset))
    from unialign.trainer import gather_slots

    adapter_after = gather_slots(trainer.reference_logps(batch).seq, batch.slot_seq)
    precomputed, trainer3 = _reference_logps(tiny_model_dir, data_file, tmp_path, precompute_ref_log_probs=True)
    assert trainer3.ref_model is None
    torch.testing.assert_close(adapter, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter_after, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(precomputed, separate, atol=1e-5, rtol=1e-5)


def test_precomputed_reference_runs_no_reference_forward_during_training(tiny_model_dir, data_file, tmp_path):
    result = unialign.train(_config(tiny_model_dir, data_file, tmp_path, precompute_ref_log_probs=True))
    assert result.trainer.reference_forwards == 1  # 8 rows precomputed in one eval batch of 8, none after
    assert result.trainer.ref_model is None


@pytest.mark.parametrize("merged", [True, False])
def test_save_and_reload_give_the_same_logps(tiny_model_dir, data_file, tmp_path, merged):
    result = unialign.train(_config(tiny_model_dir, data_file, tmp_path, use_peft=True, lora_r=4, save_merged=merged))
    trainer = result.trainer
    batch = trainer._prepare_inputs(trainer.data_collator(trainer.train_dataset[:4]))
    trainer.model.eval()
    with torch.no_grad():
        live = trainer._logps(trainer.model, batch).seq
        reloaded_model = AutoModelForCausalLM.from_pretrained(result.model_dir).eval()
        reloaded = trainer._logps(reloaded_model, batch).seq
    torch.testing.assert_close(reloaded, live, atol=1e-5, rtol=1e-5)
    assert (result.model_dir / ("model.safetensors" if merged else "adapter_model.safetensors")).exists()


@pytest.mark.parametrize("loss_type", ["dpo", "reward_model"])
def test_fresh_adapters_depend_only_on_the_seed(tiny_model_dir, data_file, tmp_path, loss_type):
    def trainable(seed, noise):
        torch.rand(noise)  # whatever ran before in the process must not matter
        cfg = load_config(None, tiny_dpo_config(tiny_model_dir, data_file, tmp_path, loss_type=loss_type,
                                                use_peft=True, lora_r=4, seed=seed))
        policy, _ = build_models(cfg, get_method(loss_type))
        return {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}

    first, again, other = trainable(3, 10), trainable(3, 999), trainable(4, 10)
    assert first.keys() == again.keys() == other.keys()
    randomized = [n for n in first if "lora_A" in n or "score" in n]
    assert randomized
    for name in first:
        assert torch.equal(first[name], again[name]), name
    assert any(not torch.equal(first[n], other[n]) for n in randomized)
