"""Reward lists with weights, per-source log columns, and the completions table of online runs."""

import json

import pytest

import unialign
from tests.test_online import _config, _logs
from unialign.rewards.sources import CallableReward, load_reward, load_weighted_reward


def length_reward(prompts, completions):
    """Reward: the completion's length in characters."""
    return [float(len(text)) for text in completions]


def one(prompts, completions):
    """Reward 1 for every completion."""
    return [1.0] * len(completions)


def test_weighted_list_sums_the_sources_and_keeps_each():
    reward = load_reward([
        {"source": "callable:tests.test_weighted_rewards:length_reward", "weight": 0.5},
        {"source": "callable:tests.test_weighted_rewards:one", "weight": -2, "name": "bias"},
    ])
    per_source = reward.score(["p", "q"], ["abcd", "ab"])
    assert per_source == {"length_reward": [4.0, 2.0], "bias": [1.0, 1.0]}
    assert reward(["p", "q"], ["abcd", "ab"]) == [0.5 * 4 - 2, 0.5 * 2 - 2]
    assert reward.name == "0.5*length_reward + -2*bias"


def test_a_single_spec_is_a_one_source_sum_with_its_bounds():
    source = CallableReward(one, "one", bounds=(0.0, 1.0))
    weighted = load_weighted_reward(source)
    assert weighted.components == [("one", source, 1.0)] and weighted.bounds == (0.0, 1.0)
    assert weighted.name == "one"
    negative = load_weighted_reward([{"source": source, "weight": -2.0}])
    assert negative.bounds == (-2.0, 0.0)


@pytest.mark.parametrize("spec,message", [
    ([{"weight": 1.0}], "config key 'reward'[0] has no 'source'"),
    ([{"source": "offline", "weight": "heavy"}], "config key 'reward'[0] field 'weight' must be a number"),
    ([{"source": "offline", "wieght": 1}], "config key 'reward'[0] has unknown field 'wieght'"),
    ([{"source": "offline"}, {"source": "offline"}], "config key 'reward'[1]: the name 'offline' is used twice"),
    ([], "non-empty list"),
    ("callable:tests.no_such_module:f", "cannot import module 'tests.no_such_module'"),
    ("callable:tests.test_weighted_rewards:missing", "has no function 'missing'"),
])
def test_bad_reward_lists_name_the_entry(spec, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_weighted_reward(spec)


def test_grpo_run_logs_each_source_and_writes_the_completions_table(tiny_model_dir, tmp_path):
    rewards = [
        {"source": "callable:tests.test_online:uppercase_share", "weight": 1.0},
        {"source": "callable:tests.test_weighted_rewards:one", "weight": 0.5, "name": "bias"},
    ]
    config = _config(tiny_model_dir, tmp_path, loss_type="grpo", reward=rewards, max_steps=2, max_completion_length=4,
                     per_device_train_batch_size=2, num_generations=2, log_completions=True,
                     num_completions_to_print=3)
    unialign.train(config)
    logs = _logs(tmp_path / "run")
    assert logs[0]["reward/bias/mean"] == 1.0 and logs[0]["reward/bias/std"] == 0.0
    assert logs[0]["reward"] == pytest.approx(logs[0]["reward/uppercase_share/mean"] + 0.5, abs=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 1, 1, 2, 2, 2]
    first = rows[0]
    assert set(first) == {"step", "prompt", "completion", "reward", "reward/uppercase_share", "reward/bias",
                          "advantage"}
    assert first["prompt"].startswith("Say something about")
    assert first["reward"] == pytest.approx(first["reward/uppercase_share"] + 0.5)
    # the two samples of the first prompt: GRPO's group advantages are opposite (or both 0 for equal rewards)
    assert rows[0]["advantage"] == pytest.approx(-rows[1]["advantage"], abs=1e-5)


def test_the_completions_table_goes_to_wandb_when_it_is_configured_and_running(tmp_path, monkeypatch):
    import sys
    from types import SimpleNamespace

    from unialign.online.completions import CompletionsLog

    logged = []

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    fake = SimpleNamespace(run=object(), Table=Table, log=logged.append)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    rows = [{"step": 2, "prompt": "p", "completion": "c", "reward": 0.5, "advantage": 0.1}]
    CompletionsLog(tmp_path, ["wandb"]).write(rows)
    table = logged[0]["completions"]
    assert table.columns == ["step", "prompt", "completion", "reward", "advantage"]
    assert table.data == [[2, "p", "c", 0.5, 0.1]]
    CompletionsLog(tmp_path, []).write(rows)  # not configured: the file only
    fake.run = None
    CompletionsLog(tmp_path, ["wandb"]).write(rows)  # configured but no run started: the file only
    assert len(logged) == 1
    assert len((tmp_path / "completions.jsonl").read_text().splitlines()) == 3
