"""Reward-source specs: callable, LLM judge parsing and counting, unknown specs."""

import pytest

from unialign.rewards.sources import LLMJudge, load_reward


def count_words(prompts, completions):
    """Reward = number of words (for tests)."""
    return [len(c.split()) for c in completions]


def test_callable_spec_imports_only_what_is_named():
    reward = load_reward("callable:tests.test_reward_sources:count_words")
    assert reward(["q", "q"], ["one two", "three"]) == [2.0, 1.0]


def test_unknown_spec_lists_the_forms():
    with pytest.raises(ValueError, match="use offline, callable:module:function, reward-model:PATH or llm-judge:MODEL"):
        load_reward("gpt4")


def test_llm_judge_parses_scores_and_counts_unparseable(tiny_model_dir):
    judge = LLMJudge(tiny_model_dir)
    assert judge.parse("Score: 7/10") == 7.0
    assert judge.parse("11 then 3") == 3.0
    assert judge.unparseable == 0
    assert judge.parse("great answer!") == 1.0 and judge.unparseable == 1
    scores = judge(["What is 2+2?", "Name a color."], ["4", "Blue."])  # a random tiny model rarely replies a number
    assert len(scores) == 2 and all(1.0 <= s <= 10.0 for s in scores)
    assert judge.bounds == (1.0, 10.0) and judge.normalize([1.0, 10.0]) == [0.0, 1.0]
