"""Tokenization and truncation (SPEC §1)."""

import pytest

from tests.conftest import conversation
from unialign.data.errors import DataError
from unialign.data.formats import Example
from unialign.data.tokenize import encode_completion, encode_prompt, tokenize_example, tokenize_rows


def test_conversation_prompt_uses_chat_template_with_generation_prompt(tokenizer):
    ids = encode_prompt(conversation("Hi"), tokenizer)
    text = tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_completion_is_text_plus_eos_for_plain_and_the_template_turn_for_conversation(tokenizer):
    plain = encode_completion("Say hi.", "Hello there.", tokenizer)
    chat = encode_completion(conversation("Say hi."), [{"role": "assistant", "content": "Hello there."}], tokenizer)
    assert plain[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(plain[:-1]) == "Hello there."
    # SmolLM2's template ends a turn with <|im_end|>, which is also its EOS: the same ids here.
    assert chat == plain


def test_prompt_and_completion_are_tokenized_separately(tokenizer):
    example = Example(prompt="The cat", completions=["s sat."], row=0)
    tokens = tokenize_example(example, tokenizer, max_length=64, max_prompt_length=32)
    assert tokens.prompt_ids == tokenizer("The cat")["input_ids"]
    assert tokens.completion_ids[0] == tokenizer("s sat.", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id
    ]


def test_long_prompt_keeps_its_end_and_long_completion_keeps_its_start(tokenizer):
    prompt = " ".join(f"w{i}" for i in range(200))
    completion = " ".join(f"c{i}" for i in range(200))
    full_prompt = tokenizer(prompt)["input_ids"]
    full_completion = encode_completion(prompt, completion, tokenizer)
    tokens = tokenize_example(Example(prompt, [completion], 0), tokenizer, max_length=40, max_prompt_length=16)
    assert tokens.prompt_ids == full_prompt[-16:]
    assert tokens.completion_ids[0] == full_completion[:24]
    assert len(tokens.prompt_ids) + len(tokens.completion_ids[0]) == 40


def test_prompt_over_budget_is_dropped_and_counted(tokenizer):
    rows = [{"prompt": "word " * 100, "completion": "ok"}, {"prompt": "short", "completion": "fine"}]
    examples, report = tokenize_rows(rows, "sft", tokenizer, max_length=32, max_prompt_length=None)
    assert len(examples) == 1 and examples[0].row == 1
    assert report.dropped == 1 and report.reasons == {"prompt longer than max_length": 1}
    assert "dropped 1 of 2 rows" in report.summary()


def test_empty_completion_is_rejected_with_row_and_field(tokenizer):
    rows = [{"prompt": "a", "chosen": "yes", "rejected": "no"}, {"prompt": "b", "chosen": "  ", "rejected": "no"}]
    with pytest.raises(DataError, match=r"train.jsonl, row 2, field 'chosen': is empty"):
        tokenize_rows(rows, "pairwise", tokenizer, max_length=32, max_prompt_length=16, source="train.jsonl")


def test_bad_rows_can_be_dropped_and_counted(tokenizer):
    rows = [{"prompt": "a", "chosen": "yes", "rejected": "no"}, {"prompt": "b", "chosen": 3, "rejected": "no"}]
    examples, report = tokenize_rows(
        rows, "pairwise", tokenizer, max_length=32, max_prompt_length=16, on_bad_row="drop"
    )
    assert len(examples) == 1 and report.dropped == 1
    assert list(report.examples.values()) == [[2]]


def test_truncation_never_leaves_an_empty_completion(tokenizer):
    tokens = tokenize_example(
        Example("x " * 50, ["long answer " * 20], 0), tokenizer, max_length=20, max_prompt_length=19
    )
    assert len(tokens.prompt_ids) == 19 and len(tokens.completion_ids[0]) == 1
