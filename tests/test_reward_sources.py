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
    assert judge.bounds == (1.0, 10.0)


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tmp_path_factory, tokenizer):
    """A tiny random Llama sequence classifier with SmolLM2's tokenizer (which has a chat template)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    folder = tmp_path_factory.mktemp("tiny-rm")
    LlamaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_reward_model_reads_the_conversation_through_its_own_chat_template(tiny_reward_model_dir, tokenizer):
    import torch

    from unialign.rewards.sources import RewardModel

    rm = load_reward(f"reward-model:{tiny_reward_model_dir}")
    assert isinstance(rm, RewardModel)
    conversation = [{"role": "user", "content": "Name a color."}]
    prompt = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    expected = tokenizer(prompt + "Blue.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert rm.encode("Name a color.", "Blue.") == expected
    assert rm.encode(conversation, "Blue.") == expected
    # the score is read at the end-of-turn token, as in training: nothing follows it
    assert tokenizer.decode(rm.encode("Name a color.", "Blue.")).endswith("<|im_start|>assistant\nBlue.<|im_end|>")
    scores = rm(["Name a color.", "Say hi."], ["Blue.", "Hello there, friend."])
    with torch.no_grad():
        alone = rm.model(input_ids=torch.tensor([rm.encode("Name a color.", "Blue.")])).logits[0, 0].item()
    assert scores[0] == pytest.approx(alone, abs=1e-5)  # padding the batch does not change a score


def test_reward_model_without_chat_template_concatenates_prompt_and_completion(tiny_reward_model_dir):
    rm = load_reward(f"reward-model:{tiny_reward_model_dir}")
    rm.tokenizer.chat_template = None
    tok = rm.tokenizer
    ids = rm.encode([{"role": "user", "content": "Name a color."}], "Blue.")
    completion = tok("Blue.", add_special_tokens=False)["input_ids"]
    assert ids == tok("Name a color.")["input_ids"] + completion + [tok.eos_token_id]
