"""One validator per feedback format: loading a file for training and converting rows decide alike.

Every case below is a row of one format, written after a good row of that format (so the case is row 2).
Loading is what training does (a jsonl file -> ``read_rows`` -> ``tokenize_rows``, which validates with
``validate_row``); converting is ``convert`` to the same format and, for listwise rows, to every other
format. Both must accept the same rows, and refuse the same rows with the same row, field and problem.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from unialign.config import CHOICES
from unialign.data.builder import DERIVED_FORMATS
from unialign.data.bundled import FORMATS as BUNDLED_FORMATS
from unialign.data.converters import SOURCES, convert, detect_source, ultrafeedback_to_listwise
from unialign.data.errors import DataError
from unialign.data.formats import FEEDBACK_FORMATS, columns_of, detect_format, validate_row
from unialign.data.sources import read_rows
from unialign.data.tokenize import tokenize_rows
from unialign.evaluate import load_pairs, load_prompts
from unialign.feedback import FORMATS, SLOTS, rescale

USER = [{"role": "user", "content": "Name a colour."}]
GOOD = {
    "pairwise": {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."},
    "binary": {"prompt": "Name a colour.", "completion": "Blue.", "label": True},
    "score": {"prompt": "Name a colour.", "completion": "Blue.", "score": 0.75},
    "triple": {"prompt": "Name a colour.", "reference": "Blue, like the sky.", "chosen": "Blue.", "rejected": "Seven."},
    "listwise": {"prompt": "Name a colour.", "completions": ["Blue.", "Seven.", "Red."], "rewards": [0.9, 0.1, 0.5]},
    "sft": {"prompt": "Name a colour.", "completion": "Blue."},
    "prompt": {"prompt": "Name a colour."},
}


def with_(fmt: str, **changes) -> dict:
    """The good row of ``fmt`` with some columns changed (a value of ``...`` removes the column)."""
    row = {**GOOD[fmt], **changes}
    return {k: v for k, v in row.items() if v is not ...}


# (format, row, None when accepted, else (field, the problem exactly as the error states it))
CASES = [
    # pairwise
    ("pairwise", GOOD["pairwise"], None),
    ("pairwise", with_("pairwise", prompt=USER, chosen=[{"role": "assistant", "content": "Blue."}]), None),
    ("pairwise", {"chosen": USER + [{"role": "assistant", "content": "Blue."}],
                  "rejected": USER + [{"role": "assistant", "content": "Seven."}]}, None),  # TRL's implicit prompt
    ("pairwise", with_("pairwise", chosen_score=0.8, rejected_score=0.2, rejected_ended=False, id=7), None),
    ("pairwise", with_("pairwise", rejected=...), ("rejected", "missing required column for pairwise data")),
    ("pairwise", with_("pairwise", chosen=None), ("chosen", "is null; pairwise data needs a value here")),
    ("pairwise", with_("pairwise", rejected="Blue."),
     ("rejected", "is identical to 'chosen'; a preference pair needs two different completions")),
    ("pairwise", with_("pairwise", chosen_score="0.8", rejected_score=0.2),
     ("chosen_score", "must be a number; got '0.8'")),
    ("pairwise", with_("pairwise", chosen_score=math.nan, rejected_score=0.2),
     ("chosen_score", "must be finite; got nan")),
    ("pairwise", with_("pairwise", chosen_ended="no"), ("chosen_ended", "must be true or false; got 'no'")),
    ("pairwise", with_("pairwise", prompt=42),
     ("prompt", "must be a string or a list of {role, content} messages, got int")),
    ("pairwise", with_("pairwise", chosen=[{"role": "assistant", "content": "Blue."}]),
     ("chosen", "a conversational completion needs a conversational prompt (a list of messages)")),
    ("pairwise", with_("pairwise", prompt=USER, chosen=[{"role": "user", "content": "Blue."}]),
     ("chosen", "a conversation completion holds assistant (and tool) messages, starting and ending with an "
                "assistant message; got roles ['user']")),
    # binary: bool labels as TRL writes them, and the integers 1/0; nothing else
    ("binary", with_("binary", label=False), None),
    ("binary", with_("binary", label=1), None),
    ("binary", with_("binary", label=0), None),
    ("binary", with_("binary", label="yes"), ("label", "label must be true or false; got 'yes'")),
    ("binary", with_("binary", label="true"), ("label", "label must be true or false; got 'true'")),
    ("binary", with_("binary", label=2), ("label", "label must be true or false; got 2")),
    ("binary", with_("binary", label=0.5), ("label", "label must be true or false; got 0.5")),
    ("binary", with_("binary", completion="  "),
     ("completion", "is empty; a completion needs at least one token of text")),
    # score: numbers in [0, 1] unless a range is declared; a numeric string is refused, not parsed
    ("score", with_("score", score=1), None),
    ("score", with_("score", score=0.0), None),
    ("score", with_("score", score="0.5"), ("score", "must be a number; got '0.5'")),
    ("score", with_("score", score=True), ("score", "must be a number; got True")),
    ("score", with_("score", score=math.inf), ("score", "must be finite; got inf")),
    ("score", with_("score", score=1.5),
     ("score", "is outside the declared score range [0.0, 1.0]; got 1.5 "
               "(declare its range: score_range in a config, reward_range when converting)")),
    # triple
    ("triple", with_("triple", reference_ended=False), None),
    ("triple", with_("triple", reference=...), ("reference", "missing required column for triple data")),
    ("triple", with_("triple", rejected="Blue."),
     ("rejected", "is identical to 'chosen'; a preference pair needs two different completions")),
    # listwise
    ("listwise", with_("listwise", completions_ended=[True, False, True]), None),
    ("listwise", with_("listwise", rewards=[1.0, 0.0]),
     ("rewards", "must have one value per completion; got 2 values for 3 completions")),
    ("listwise", with_("listwise", rewards=[1.0, "0.5", 0.0]), ("rewards[1]", "must be a number; got '0.5'")),
    ("listwise", with_("listwise", rewards=[1.0, True, 0.0]), ("rewards[1]", "must be a number; got True")),
    ("listwise", with_("listwise", rewards=[1.0, math.nan, 0.0]), ("rewards[1]", "must be finite; got nan")),
    ("listwise", with_("listwise", completions=[], rewards=[]),
     ("completions", "must be a non-empty list of completions")),
    ("listwise", with_("listwise", completions=["Blue.", None, "Red."]),
     ("completions[1]", "is null; a text or a conversation is needed here")),
    ("listwise", with_("listwise", completions=["Blue.", "", "Red."]),
     ("completions[1]", "is empty; a completion needs at least one token of text")),
    ("listwise", with_("listwise", completions_ended=[True, False]),
     ("completions_ended", "must be a list of 3 true/false values, one per completion")),
    ("listwise", with_("listwise", completions_ended=[True, 0, True]),
     ("completions_ended[1]", "must be true or false; got 0")),
    # sft
    ("sft", {"messages": USER + [{"role": "assistant", "content": "Blue."}]}, None),
    ("sft", with_("sft", completion_ended=False), None),
    ("sft", {"messages": USER}, ("messages", "must be a conversation ending with an assistant message")),
    ("sft", with_("sft", completion=""), ("completion", "is empty; a completion needs at least one token of text")),
    # prompt-only
    ("prompt", {"prompt": USER}, None),
    ("prompt", {"prompt": [{"role": "assistant", "content": "Hi."}]},
     ("prompt", "a conversation prompt must end with a user (or tool) message")),
    ("prompt", {"prompt": [{"role": "human", "content": "Hi."}]},
     ("prompt", "message 0 has an unknown role; role 'human' is not one of system, user, assistant, tool")),
    ("prompt", {"prompt": "Hi.\ud800"}, ("prompt", "contains an invalid character; '\\ud800' at position 3")),
]
IDS = [f"{fmt}-{i}-{'ok' if outcome is None else outcome[0]}" for i, (fmt, _, outcome) in enumerate(CASES)]


def load(fmt: str, rows: list[dict], tokenizer, folder: Path):
    """What training does with a file of ``rows``: read it, then validate and tokenize every row."""
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    read = read_rows(str(path))
    return tokenize_rows(read, fmt, tokenizer, max_length=64, max_prompt_length=None, source="data.jsonl")


def conversions(fmt: str) -> list[str]:
    """The targets ``convert`` reaches from ``fmt`` rows (each validates its input with the same validator)."""
    if fmt == "listwise":
        return list(FORMATS)
    return [fmt, "prompt"] + (["binary", "sft"] if fmt == "pairwise" else [])


def converting(fmt: str, rows: list[dict], to: str):
    options = {"reward_range": (0.0, 1.0)} if fmt == "listwise" and to == "score" else {}
    return convert(rows, to=to, source=fmt, **options)


@pytest.mark.parametrize("fmt,row,outcome", CASES, ids=IDS)
def test_loading_and_converting_accept_and_refuse_the_same_rows(fmt, row, outcome, tokenizer, tmp_path):
    rows = [GOOD[fmt], row]
    if outcome is None:
        examples, report = load(fmt, rows, tokenizer, tmp_path)
        assert report.dropped == 0 and [e.row for e in examples] == [0, 1]
        for to in conversions(fmt):
            converting(fmt, rows, to)  # no error
        assert converting(fmt, rows, fmt).rows == rows  # a format converted to itself is returned unchanged
        return
    field, problem = outcome
    with pytest.raises(DataError) as loaded:
        load(fmt, rows, tokenizer, tmp_path)
    assert str(loaded.value) == f"data.jsonl, row 2, field {field!r}: {problem}"
    for to in conversions(fmt):
        with pytest.raises(DataError) as converted:
            converting(fmt, rows, to)
        assert str(converted.value) == f"row 2, field {field!r}: {problem}", to
        assert (converted.value.row, converted.value.field, converted.value.problem) == (1, field, problem)


@pytest.mark.parametrize("fmt,row", [(fmt, row) for fmt, row, outcome in CASES if outcome is None])
def test_loading_and_converting_detect_the_same_format(fmt, row):
    assert detect_format(columns_of([GOOD[fmt], row])) == fmt
    assert detect_source([GOOD[fmt], row]) == fmt


@pytest.mark.parametrize("fmt,row,outcome", [c for c in CASES if c[0] in ("pairwise", "prompt")],
                         ids=[i for i, c in zip(IDS, CASES) if c[0] in ("pairwise", "prompt")])
def test_evaluation_reads_pairs_and_prompts_with_the_same_validator(fmt, row, outcome, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [GOOD[fmt], row]), encoding="utf-8")
    read = load_pairs if fmt == "pairwise" else load_prompts
    if outcome is None:
        loaded = read(str(path))
        expected = validate_row(row, fmt, 1, "d").prompt
        assert (loaded[1]["prompt"] if fmt == "pairwise" else loaded[1]) == expected  # implicit prompts split
        return
    with pytest.raises(DataError) as err:
        read(str(path))
    assert str(err.value) == f"{path}, row 2, field {outcome[0]!r}: {outcome[1]}"


def test_a_declared_range_normalizes_the_same_way_when_loading_and_converting():
    listwise = {"prompt": "p", "completions": ["a", "b", "c"], "rewards": [2.0, 10.0, 4.0]}
    example = validate_row(listwise, "listwise", 0, "d", score_range=(2.0, 10.0))
    assert example.scores == [0.0, 1.0, 0.25]
    converted = convert([listwise], to="score", reward_range=(2.0, 10.0)).rows
    assert [r["score"] for r in converted] == example.scores
    pair = validate_row({"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 9, "rejected_score": 4},
                        "pairwise", 0, "d", score_range=(4, 9))
    assert pair.scores == [1.0, 0.0] and pair.rewards == [9.0, 4.0]


def test_numeric_strings_are_refused_in_ultrafeedback_scores_as_in_score_columns():
    row = {"instruction": "Q", "completions": [{"response": "A", "fine-grained_score": "4.5"}]}
    with pytest.raises(DataError) as err:
        ultrafeedback_to_listwise([row])
    assert str(err.value) == "row 1, field 'completions[0].fine-grained_score': must be a number; got '4.5'"


def test_rescale_is_the_one_range_map_for_floats_and_tensors():
    assert rescale(3.0, (1.0, 5.0)) == 0.5
    assert rescale(torch.tensor([1.0, 5.0, 7.0]), (1, 5)).tolist() == [0.0, 1.0, 1.5]  # the caller clips or refuses
    for bad in ((2.0, 2.0), (3.0, 1.0), (0.0, math.inf), (1.0,), None):
        with pytest.raises(ValueError, match="a range must be \\[low, high\\] with low < high"):
            rescale(1.0, bad)


def test_every_list_of_formats_comes_from_the_one_table():
    assert set(FEEDBACK_FORMATS) == set(FORMATS) == set(SLOTS)
    assert all(spec.slots == SLOTS[name] for name, spec in FEEDBACK_FORMATS.items())
    assert all(set(spec.slots) <= set(spec.required) for spec in FEEDBACK_FORMATS.values())
    assert CHOICES["dataset_format"] == ("auto", *FORMATS)
    assert SOURCES == ("ultrafeedback", "helpsteer2", *FORMATS)
    assert DERIVED_FORMATS == tuple(f for f in FORMATS if f != "listwise")
    assert BUNDLED_FORMATS == (*FORMATS, "prompts")


def test_the_docs_table_lists_each_formats_columns():
    doc = (Path(__file__).resolve().parent.parent / "docs" / "data.md").read_text(encoding="utf-8")
    table = doc.split("| format | required columns | optional columns |", 1)[1].split("\n\n", 1)[0]
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    for name, spec in FEEDBACK_FORMATS.items():
        required, optional = rows[name].split("|")[2:4]
        assert [f"`{c}`" in required for c in spec.required] == [True] * len(spec.required), name
        assert [f"`{c}`" in optional for c in spec.optional] == [True] * len(spec.optional), name


def test_no_module_writes_the_list_of_formats_again():
    """A tuple, list or set literal naming five or more formats outside feedback.py is a second copy."""
    src = Path(__file__).resolve().parent.parent / "src" / "unialign"
    offenders = []
    for path in sorted(src.rglob("*.py")):
        if path.name == "feedback.py" and path.parent == src:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                names = {e.value for e in node.elts if isinstance(e, ast.Constant) and e.value in SLOTS}
                if len(names) >= 5:
                    offenders.append(f"{path.relative_to(src)}:{node.lineno}")
    assert offenders == []
