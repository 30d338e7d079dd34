"""Evaluation: win/tie/loss aggregation, KL estimate, implicit-reward accuracy, reports and files."""

from __future__ import annotations

import argparse
import json
import shutil

import pytest
import torch

from tests.conftest import conversation
from unialign.cli import add_eval_arguments
from unialign.data.tokenize import encode_completion, encode_prompt
from unialign.evaluate import (
    compare,
    completion_logps,
    evaluate,
    evaluate_paths,
    implicit_pair_stats,
    pair_sequences,
    pair_stats,
    paired_difference,
    run_eval_cli,
)
from unialign.generation import GenerationConfig, generate
from unialign.models import load_model
from unialign.rewards.sources import CallableReward

PROMPTS = ["Tell me about tea.", conversation("Name a colour."), "Count to three.", conversation("Say hi.")]
GEN = GenerationConfig(temperature=0, max_new_tokens=6, batch_size=2)
BETA = 0.3


def length_reward(prompts, completions):
    """A deterministic reward for the file-level tests: the completion's length in characters."""
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def policy_and_reference(tiny_model_dir):
    """The tiny model as reference and a copy with perturbed weights as policy."""
    reference = load_model(tiny_model_dir).eval()
    policy = load_model(tiny_model_dir).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return policy, reference


def direct_logp(model, prompt_ids: list[int], completion_ids: list[int]) -> float:
    """Summed completion log-prob from one unpadded forward pass over full logits."""
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    positions = range(len(prompt_ids) - 1, ids.shape[1] - 1)
    return sum(logps[pos, ids[0, pos + 1]].item() for pos in positions)


def test_compare_counts_wins_ties_losses():
    outcome = compare([1.0, 0.5, 0.2, 0.3, 2.0], [0.5, 0.5, 0.7, 0.3 + 1e-9, 1.0], tie_tolerance=1e-6)
    assert (outcome.wins, outcome.ties, outcome.losses) == (2, 2, 1)
    assert outcome.rates() == {"win_rate": 0.4, "tie_rate": 0.4, "loss_rate": 0.2}
    with pytest.raises(ValueError):
        compare([1.0], [1.0, 2.0])


def test_pair_stats_accuracy_is_strict_and_margin_scaled():
    stats = pair_stats([1.0, 0.0, -1.0], [0.0, 0.0, 1.0], beta=0.5)
    assert stats.accuracy == pytest.approx(1 / 3)
    assert stats.mean_margin == pytest.approx(0.5 * (1.0 + 0.0 - 2.0) / 3)


def test_paired_difference_mean_and_standard_error():
    mean, stderr = paired_difference([1.0, 0.5, 0.9], [0.5, 0.5, 0.3])
    # differences 0.5, 0.0, 0.6: mean 11/30; sample variance ((2/15)^2 + (11/30)^2 + (7/30)^2) / 2 = 0.1033...
    assert mean == pytest.approx(11 / 30)
    assert stderr == pytest.approx((((4 / 30) ** 2 + (11 / 30) ** 2 + (7 / 30) ** 2) / 2 / 3) ** 0.5)
    assert paired_difference([0.7], [0.2]) == pytest.approx((0.5, 0.0))
    assert paired_difference([], []) == (0.0, 0.0)


def test_several_samples_per_prompt_are_paired_by_index(tiny_model_dir, tokenizer):
    model = load_model(tiny_model_dir)
    sampled = GenerationConfig(temperature=1.0, max_new_tokens=5, batch_size=4, seed=3)
    reward = CallableReward(length_reward, name="length")
    report = evaluate(model, model, tokenizer, PROMPTS[:2], reward, generation=sampled, progress=False,
                      samples_per_prompt=3)
    assert report.num_prompts == 2 and report.samples_per_prompt == 3
    assert report.outcomes.total == 6 and len(report.samples) == 6
    assert [s["prompt"] for s in report.samples] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert (report.mean_difference, report.difference_stderr) == (0.0, 0.0)
    assert "2 prompts × 3 samples" in report.to_markdown()
    with pytest.raises(ValueError, match="samples_per_prompt"):
        evaluate(model, model, tokenizer, PROMPTS, reward, generation=sampled, samples_per_prompt=0)


def test_identical_models_give_zero_kl_and_all_ties(tiny_model_dir, tokenizer):
    first, second = load_model(tiny_model_dir), load_model(tiny_model_dir)
    reward = CallableReward(length_reward, name="length")
    report = evaluate(first, second, tokenizer, PROMPTS, reward, generation=GEN, progress=False)
    assert abs(report.kl) <= 1e-6
    assert report.to_dict()["tie_rate"] == 1.0
    assert (report.outcomes.wins, report.outcomes.losses) == (0, 0)
    assert report.policy == report.reference
    same = evaluate(first, first, tokenizer, PROMPTS, reward, generation=GEN, progress=False)
    assert same.kl == 0.0 and same.outcomes.ties == len(PROMPTS)


@pytest.fixture(scope="module")
def known_texts(policy_and_reference, tokenizer):
    """Greedy generations of both models, computed independently of :func:`evaluate`."""
    policy, reference = policy_and_reference
    policy_gens = [g[0] for g in generate(policy, tokenizer, PROMPTS, GEN, progress=False)]
    reference_gens = [g[0] for g in generate(reference, tokenizer, PROMPTS, GEN, progress=False)]
    return policy_gens, reference_gens


@pytest.fixture(scope="module")
def preferred(known_texts):
    """Per prompt, the string the test reward pays 1 for: policy's (0, 1), reference's (2), neither (3)."""
    policy_gens, reference_gens = known_texts
    return [policy_gens[0].text, policy_gens[1].text, reference_gens[2].text, None]


@pytest.fixture(scope="module")
def report(policy_and_reference, tokenizer, preferred, pairwise_rows_module):
    """One evaluation of the perturbed policy against the tiny model, with pairs and β = 0.3."""
    policy, reference = policy_and_reference
    return evaluate(policy, reference, tokenizer, PROMPTS, CallableReward(_prefers(preferred), "prefers"),
                    generation=GEN, pairs=pairwise_rows_module, beta=BETA, progress=False)


@pytest.fixture(scope="module")
def pairwise_rows_module():
    """Six conversational preference pairs, module-scoped so one evaluation serves several tests."""
    topics = ["cats", "tea", "rain", "maps", "bread", "music"]
    return [{"prompt": conversation(f"Say something about {t}."), "chosen": f"{t.capitalize()} are lovely.",
             "rejected": f"I will not talk about {t}."} for t in topics]


def _prefers(preferred):
    index = {json.dumps(p): i for i, p in enumerate(PROMPTS)}

    def reward(prompts, completions):
        return [float(c == preferred[index[json.dumps(p)]]) for p, c in zip(prompts, completions)]

    return reward


def test_win_tie_loss_under_a_reward_that_prefers_known_strings(report, known_texts, preferred):
    policy_texts, reference_texts = ([g.text for g in gens] for gens in known_texts)
    assert policy_texts != reference_texts, "the perturbation should change some generations"
    expected = {"wins": 0, "ties": 0, "losses": 0}
    for i in range(len(PROMPTS)):
        mine, theirs = float(policy_texts[i] == preferred[i]), float(reference_texts[i] == preferred[i])
        expected["wins" if mine > theirs else "losses" if mine < theirs else "ties"] += 1
    counts = report.to_dict()
    assert {k: counts[k] for k in expected} == expected
    assert [s["policy"] for s in report.samples] == policy_texts
    assert [s["reference"] for s in report.samples] == reference_texts
    assert [s["policy_reward"] for s in report.samples] == _prefers(preferred)(PROMPTS, policy_texts)


def test_kl_matches_direct_computation(report, policy_and_reference, known_texts, tokenizer):
    policy, reference = policy_and_reference
    eos = tokenizer.eos_token_id
    diffs = []
    for prompt, gen in zip(PROMPTS, known_texts[0]):
        prompt_ids, completion = encode_prompt(prompt, tokenizer), gen.token_ids + ([eos] if gen.ended else [])
        diffs.append(direct_logp(policy, prompt_ids, completion) - direct_logp(reference, prompt_ids, completion))
    assert report.kl == pytest.approx(sum(diffs) / len(diffs), abs=1e-4)
    assert report.kl != 0.0


def test_implicit_accuracy_matches_direct_computation(report, policy_and_reference, tokenizer, pairwise_rows_module):
    policy, reference = policy_and_reference
    margins = []
    for row in pairwise_rows_module:
        prompt_ids = encode_prompt(row["prompt"], tokenizer)
        ratio = {}
        for side in ("chosen", "rejected"):
            ids = encode_completion(row["prompt"], row[side], tokenizer)
            ratio[side] = direct_logp(policy, prompt_ids, ids) - direct_logp(reference, prompt_ids, ids)
        margins.append(BETA * ratio["chosen"] - BETA * ratio["rejected"])
    assert report.pairs.num_pairs == len(pairwise_rows_module)
    assert report.pairs.accuracy == pytest.approx(sum(m > 0 for m in margins) / len(margins))
    assert report.pairs.mean_margin == pytest.approx(sum(margins) / len(margins), abs=1e-5)


def test_precomputed_reference_logps_give_the_same_pair_stats(report, policy_and_reference, tokenizer,
                                                              pairwise_rows_module):
    policy, reference = policy_and_reference
    sequences = pair_sequences(pairwise_rows_module, tokenizer)
    assert len(sequences) == 2 * len(pairwise_rows_module)
    values = completion_logps(reference, sequences, tokenizer.pad_token_id)
    # reference=None: were the reference model needed, this would fail
    stats = implicit_pair_stats(policy, None, tokenizer, pairwise_rows_module, BETA, reference_logps=values)
    assert (stats.num_pairs, stats.accuracy) == (report.pairs.num_pairs, report.pairs.accuracy)
    assert stats.mean_margin == pytest.approx(report.pairs.mean_margin, abs=1e-6)
    with pytest.raises(ValueError, match="11 reference log-probs for 12 pair completions"):
        implicit_pair_stats(policy, None, tokenizer, pairwise_rows_module, BETA, reference_logps=values[:-1])


def test_lengths_rewards_and_markdown(report, known_texts, preferred):
    gens = known_texts[0]
    lengths = [len(g.token_ids) + g.ended for g in gens]
    assert report.policy.mean_length == pytest.approx(sum(lengths) / len(lengths))
    assert report.policy.eos_fraction == pytest.approx(sum(g.ended for g in gens) / len(gens))
    rewards = _prefers(preferred)(PROMPTS, [g.text for g in gens])
    assert report.policy.mean_reward == pytest.approx(sum(rewards) / len(rewards))

    markdown = report.to_markdown()
    for number in (report.kl, report.policy.mean_reward, report.reference.mean_reward,
                   report.pairs.accuracy, report.pairs.mean_margin, report.to_dict()["win_rate"]):
        assert f"{number:.4f}" in markdown
    assert f"| mean length (tokens) | {report.policy.mean_length:.2f} |" in markdown
    assert len(report.to_dict()["samples"]) == len(PROMPTS)
    json.dumps(report.to_dict())  # JSON-ready


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def test_evaluate_paths_writes_json_and_markdown(tiny_model_dir, tmp_path, pairwise_rows):
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", pairwise_rows)
    report = evaluate_paths(tiny_model_dir, tiny_model_dir, prompts, "callable:tests.test_evaluate:length_reward",
                            tmp_path / "out", max_new_tokens=4, limit=3, pairs=pairs, beta=0.2, progress=False)
    saved = json.loads((tmp_path / "out" / "eval.json").read_text(encoding="utf-8"))
    assert saved["num_prompts"] == report.num_prompts == 3
    assert saved["kl"] == 0.0 and saved["tie_rate"] == 1.0
    assert saved["pairs"]["num_pairs"] == 3 and saved["beta"] == 0.2
    assert len(saved["samples"]) == 3
    assert (tmp_path / "out" / "eval.md").read_text(encoding="utf-8") == report.to_markdown()


def test_cli_on_a_run_directory_reads_reference_from_config(tiny_model_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "config.json").write_text(json.dumps({"model_name_or_path": tiny_model_dir, "beta": 0.25}))
    prompts = _write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    parser = add_eval_arguments(argparse.ArgumentParser())
    args = parser.parse_args([str(run), "--prompts", prompts, "--judge", "callable:tests.test_evaluate:length_reward",
                              "--limit", "2", "--max-new-tokens", "3"])
    assert run_eval_cli(args) == 0
    saved = json.loads((run / "eval" / "eval.json").read_text(encoding="utf-8"))
    assert saved["settings"]["reference"] == tiny_model_dir
    assert saved["settings"]["model"] == str(run / "model")
    assert saved["beta"] == 0.25 and saved["num_prompts"] == 2
    assert abs(saved["kl"]) <= 1e-6
    assert "win / tie / loss" in capsys.readouterr().out
