"""Feedback formats: detection and row validation with errors that say where."""

import math

import pytest

from unialign.data.errors import DataError
from unialign.data.formats import detect_format, validate_row


@pytest.mark.parametrize(
    "columns,expected",
    [
        ({"prompt", "chosen", "rejected"}, "pairwise"),
        ({"prompt", "chosen", "rejected", "chosen_score", "rejected_score"}, "pairwise"),
        ({"prompt", "reference", "chosen", "rejected"}, "triple"),
        ({"prompt", "completion", "label"}, "binary"),
        ({"prompt", "completion", "score"}, "score"),
        ({"prompt", "completions", "rewards"}, "listwise"),
        ({"prompt", "completion"}, "sft"),
        ({"messages"}, "sft"),
        ({"prompt"}, "prompt"),
        ({"chosen", "rejected"}, "pairwise"),
    ],
)
def test_detect_format(columns, expected):
    assert detect_format(columns) == expected


def test_unknown_columns_name_the_expected_ones():
    with pytest.raises(DataError, match="cannot tell the feedback format.*pairwise: prompt, chosen, rejected"):
        detect_format({"question", "answer"}, source="x.jsonl")


def test_pairwise_scores_and_labels():
    example = validate_row(
        {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 3, "rejected_score": 1},
        "pairwise",
        0,
        "d",
        score_range=(0, 4),
    )
    assert example.labels == [1.0, 0.0]
    assert example.rewards == [3.0, 1.0]
    assert example.scores == [0.75, 0.25]


def test_implicit_prompt_conversations_are_split_on_the_shared_prefix():
    user = {"role": "user", "content": "hi"}
    row = {
        "chosen": [user, {"role": "assistant", "content": "hello"}],
        "rejected": [user, {"role": "assistant", "content": "go away"}],
    }
    example = validate_row(row, "pairwise", 0, "d")
    assert example.prompt == [user]
    assert example.completions == [
        [{"role": "assistant", "content": "hello"}],
        [{"role": "assistant", "content": "go away"}],
    ]


@pytest.mark.parametrize(
    "row,fmt,field,problem",
    [
        ({"prompt": "p", "completion": "c", "label": "yes"}, "binary", "label", "true or false"),
        ({"prompt": "p", "completion": "c", "score": math.nan}, "score", "score", "finite"),
        ({"prompt": "p", "completion": "c", "score": 1.5}, "score", "score", "outside the declared score range"),
        ({"prompt": "p", "completions": ["a", "b"], "rewards": [1.0]}, "listwise", "rewards", "1 values for 2"),
        ({"prompt": [{"role": "assistant", "content": "x"}], "completion": "c"}, "sft", "prompt", "end with a user"),
        ({"prompt": [{"role": "robot", "content": "x"}], "completion": "c"}, "sft", "prompt", "role 'robot'"),
        ({"prompt": "p", "chosen": "a"}, "pairwise", "rejected", "missing required column"),
    ],
)
def test_bad_rows_name_row_and_field(row, fmt, field, problem):
    with pytest.raises(DataError) as info:
        validate_row(row, fmt, 6, "data.jsonl")
    message = str(info.value)
    assert message.startswith(f"data.jsonl, row 7, field {field!r}")
    assert problem in message
