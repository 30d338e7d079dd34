"""PPO, GRPO and RLOO end to end on the tiny model, on online UNA's rollout path.

The reward is ``tests.test_online.uppercase_share`` (the share of uppercase characters, in [0, 1]), which
the near-uniform random model can learn at temperature 0.05 (see ``tests/test_online.py``).
"""

import json

import pytest
import torch

import unialign
from tests.test_online import _config, _logs


def _rl_config(tiny_model_dir, tmp_path, method, **extra):
    return _config(tiny_model_dir, tmp_path, loss_type=method, **extra)


def _rewards(tmp_path):
    return [x["reward"] for x in _logs(tmp_path / "run") if "reward" in x]


def test_grpo_raises_the_reward(tiny_model_dir, tmp_path):
    result = unialign.train(_rl_config(tiny_model_dir, tmp_path, "grpo"))
    rewards = _rewards(tmp_path)
    # Measured with this config (6 steps, beta 0.02, lr 1e-2) for seeds 0-4: first step 0.057, 0.040, 0.097,
    # 0.055, 0.065; mean of the last two 0.681, 0.203, 0.118, 1.000, 0.042. Seed 0 (used here) gains 0.62.
    last = sum(rewards[-2:]) / 2
    assert last > rewards[0] + 0.3, rewards
    logs = _logs(tmp_path / "run")
    for key in ("entropy", "kl", "kl/sequence", "clip_ratio/region_mean", "frac_reward_zero_std",
                "completions/mean_length", "completions/eos_fraction", "time/generation", "time/old_logps",
                "time/reference", "time/update"):
        assert key in logs[0], key
    assert logs[0]["kl/sequence"] == pytest.approx(0.0, abs=1e-4)  # π_θ = π_ref at the first rollout
    assert result.trainer.reference_forwards == 6


def test_rloo_raises_the_reward(tiny_model_dir, tmp_path):
    unialign.train(_rl_config(tiny_model_dir, tmp_path, "rloo"))
    rewards = _rewards(tmp_path)
    # Measured (6 steps, beta 0.02, lr 1e-2), seeds 0-4: first 0.057, 0.040, 0.097, 0.055, 0.065; mean of the
    # last two 0.133, 0.198, 0.842, 0.011, 0.000 (at lr 1e-2 two seeds collapse). Seed 0 (here) gains 0.076.
    last = sum(rewards[-2:]) / 2
    assert last > rewards[0] + 0.04 and last > 2 * rewards[0], rewards


def test_ppo_raises_the_reward(tiny_model_dir, tmp_path):
    config = _rl_config(tiny_model_dir, tmp_path, "ppo", num_ppo_epochs=1, max_steps=8, kl_coef=0.0, lam=1.0)
    result = unialign.train(config)
    rewards = _rewards(tmp_path)
    # Measured with this config (8 rollouts, one epoch each, no KL penalty, λ 1, lr 1e-2), seeds 0-2: first step
    # 0.057, 0.040, 0.097; mean of the last two 0.163, 0.667, 1.000. With the defaults
    # (kl_coef 0.05, λ 0.95, 2 epochs of 4 rollouts) the mean of the last two rose by at most 0.027 (seeds 0-4).
    last = sum(rewards[-2:]) / 2
    assert last > rewards[0] + 0.05 and last > 2 * rewards[0], rewards
    logs = _logs(tmp_path / "run")
    for key in ("loss/policy_avg", "loss/value_avg", "policy/clipfrac_avg", "val/clipfrac_avg", "objective/scores",
                "val/vpred", "entropy", "time/value"):
        assert key in logs[0], key
    assert result.trainer.ref_model is None and result.trainer.reference_forwards == 0  # kl_coef 0: no reference


def test_grpo_without_kl_loads_no_reference(tiny_model_dir, tmp_path):
    result = unialign.train(_rl_config(tiny_model_dir, tmp_path, "grpo", beta=0.0, max_steps=1,
                                       max_completion_length=4, per_device_train_batch_size=2, num_generations=2))
    assert result.trainer.ref_model is None and result.trainer.reference_forwards == 0
    assert "kl" not in _logs(tmp_path / "run")[0]


def test_ppo_trains_a_value_model_over_epochs_of_minibatches_and_checkpoints_it(tiny_model_dir, tmp_path):
    config = _rl_config(tiny_model_dir, tmp_path, "ppo", num_ppo_epochs=2, num_mini_batches=2, max_steps=4,
                        max_completion_length=4, per_device_train_batch_size=2, num_generations=2,
                        save_strategy="steps", save_steps=4)
    result = unialign.train(config)
    trainer = result.trainer
    assert trainer.reference_forwards == 1  # 2 epochs × 2 minibatches: one rollout for the four steps
    value_params = {id(p) for p in trainer.value_model.parameters() if p.requires_grad}
    assert {id(p) for p in trainer.optimizer.param_groups[-1]["params"]} == value_params  # its own group, last
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoint-4" / "value_model.safetensors"))
    head = saved["model.score.weight"]
    assert torch.equal(head, trainer.value_model.model.score.weight.detach().cpu())
    assert not torch.allclose(head, torch.zeros_like(head))
    logs = _logs(tmp_path / "run")
    assert ["objective/kl" in x for x in logs] == [True, False, False, False]

    # The final value model is saved inside model/, in the Hugging Face layout, with the trained weights.
    from transformers import AutoModelForSequenceClassification

    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "model" / "value_model")
    for name, weight in trainer.value_model.model.state_dict().items():
        assert torch.equal(value.state_dict()[name], weight.cpu()), name


def test_ppo_resume_restores_the_value_model(tiny_model_dir, tmp_path):
    config = _rl_config(tiny_model_dir, tmp_path, "ppo", num_ppo_epochs=1, max_steps=2, max_completion_length=4,
                        per_device_train_batch_size=2, num_generations=2, save_strategy="steps", save_steps=2)
    unialign.train(config)
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoint-2" / "value_model.safetensors"))
    resumed = unialign.train({**config, "max_steps": 3, "resume": True, "resume_force": True})
    assert resumed.trainer.state.global_step == 3
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == [1, 2, 3]
    # the resumed value model started from the checkpoint's weights, then took one more step
    head = resumed.trainer.value_model.model.score.weight.detach().cpu()
    assert not torch.equal(head, saved["model.score.weight"])
    assert torch.allclose(head, saved["model.score.weight"], atol=0.1)


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_group_methods_refuse_one_sample_per_prompt(tiny_model_dir, tmp_path, method):
    with pytest.raises(ValueError, match="'num_generations' must be at least 2 for " + method):
        unialign.train(_rl_config(tiny_model_dir, tmp_path, method, num_generations=1))


def test_too_many_minibatches_is_refused(tiny_model_dir, tmp_path):
    config = _rl_config(tiny_model_dir, tmp_path, "ppo", num_mini_batches=3, per_device_train_batch_size=2,
                        max_steps=1, max_completion_length=4, num_generations=2)
    with pytest.raises(ValueError, match="'num_mini_batches' \\(3\\) is larger than the 2 prompts"):
        unialign.train(config)


def test_ppo_with_lora_saves_the_value_model_merged(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForSequenceClassification

    from unialign.online.trainer import OnlineTrainer

    batch = torch.tensor([[5, 6, 7, 8]])
    before_save = {}
    save = OnlineTrainer.save_companion_models

    def recording_save(self, model_dir):
        with torch.no_grad():  # the LoRA-wrapped value model's values, before merging
            before_save["values"] = self.value_model(batch, torch.ones_like(batch))
        return save(self, model_dir)

    monkeypatch.setattr(OnlineTrainer, "save_companion_models", recording_save)
    config = _rl_config(tiny_model_dir, tmp_path, "ppo", num_ppo_epochs=1, max_steps=1, max_completion_length=4,
                        per_device_train_batch_size=2, num_generations=2, use_peft=True, lora_r=4, lora_alpha=8,
                        lora_dropout=0.0)
    unialign.train(config)

    folder = tmp_path / "run" / "model" / "value_model"
    assert not (folder / "adapter_config.json").exists()
    value = AutoModelForSequenceClassification.from_pretrained(folder)
    with torch.no_grad():
        hidden = value.model(input_ids=batch).last_hidden_state
        torch.testing.assert_close(value.score(hidden).squeeze(-1), before_save["values"], atol=1e-5, rtol=1e-5)
