"""Hostile input: every file in tests/data/bad/ gives a DataError naming file, row and field, or a counted drop.

The loaders run as ``prepare_data`` runs them: ``read_rows`` -> ``detect_format`` on the columns every row
has -> ``tokenize_rows``. tests/data/bad/README.md lists the expected outcome of each file. A hypothesis
test then fuzzes validation and tokenization with arbitrary JSON-like rows: the only exception allowed
out is a DataError.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import unialign
from unialign.config import load_config
from unialign.data.errors import DataError, DuplicateKey
from unialign.data.formats import FORMAT_COLUMNS, ROLES, Example, columns_of, detect_format, validate_row
from unialign.data.sources import read_rows
from unialign.data.tokenize import tokenize_rows
from unialign.losses.registry import get_method
from unialign.pipeline import check_shared_first_token, prepare_data

BAD = Path(__file__).parent / "data" / "bad"
MAX_LENGTH = 64


def load(name: str, tokenizer, on_bad_row: str = "error", fmt: str | None = None, **options):
    """read_rows -> detect_format -> tokenize_rows, as prepare_data does it."""
    source = str(BAD / name)
    rows = read_rows(source)
    if not fmt:  # prepare_data stops at an empty file before detecting; tokenize_rows says the same
        fmt = detect_format(columns_of(rows), source) if rows else "prompt"
    options = {"max_length": MAX_LENGTH, "max_prompt_length": None, **options}
    return tokenize_rows(rows, fmt, tokenizer, source=source, on_bad_row=on_bad_row, **options)


def test_the_readme_lists_every_file():
    readme = (BAD / "README.md").read_text(encoding="utf-8")
    data_files = sorted(p.name for p in BAD.iterdir() if p.suffix in (".jsonl", ".json", ".parquet"))
    assert len(data_files) >= 20
    missing = [name for name in data_files if f"`{name}`" not in readme]
    assert not missing, f"README.md does not describe {missing}"


# --- rows that cannot be read at all: always an error (there is no row to drop) --------------------------------

READ_ERRORS = [
    ("malformed_json.jsonl", 3, "is not valid JSON"),
    ("not_an_object.jsonl", 2, "must be a JSON object, got list"),
    ("invalid_utf8.jsonl", 2, "is not valid UTF-8"),
    ("too_many_digits.jsonl", 2, "cannot be read as JSON (Exceeds the limit (4300 digits)"),
    ("deeply_nested.jsonl", 2, "cannot be read as JSON (nested too deeply)"),
    ("not_a_list.json", None, "must hold a list of row objects"),
    ("unknown_columns.jsonl", None, "cannot tell the feedback format from the columns ['answer', 'question']"),
    ("empty.jsonl", None, "has no rows"),
    ("not_parquet.parquet", None, "is not a readable parquet file"),
]


@pytest.mark.parametrize("on_bad_row", ["error", "drop"])
@pytest.mark.parametrize("name,row,problem", READ_ERRORS, ids=[c[0] for c in READ_ERRORS])
def test_unreadable_files_name_file_and_line(name, row, problem, on_bad_row, tokenizer):
    with pytest.raises(DataError) as info:
        load(name, tokenizer, on_bad_row=on_bad_row)
    message = str(info.value)
    where = f"{name}, row {row}: " if row is not None else f"{name}: "
    assert where in message, message
    assert problem in message, message
    assert info.value.row == (row - 1 if row is not None else None)


# A key given twice is valid JSON syntax that does not say which value is meant: a read error like malformed
# JSON (the parser finds it, so it is fatal whatever on_bad_row says), but one that names the row and field.
DUPLICATE = "appears more than once in {}; JSON keys must be unique, and which value was meant cannot be told"


@pytest.mark.parametrize("on_bad_row", ["error", "drop"])
def test_a_duplicated_key_is_an_error_naming_row_and_field(on_bad_row, tokenizer, tmp_path):
    with pytest.raises(DataError) as info:
        load("duplicate_keys.jsonl", tokenizer, on_bad_row=on_bad_row)
    assert str(info.value) == f"{BAD / 'duplicate_keys.jsonl'}, row 2, field 'chosen': the key 'chosen' " + \
        DUPLICATE.format("this row")
    assert (info.value.row, info.value.field) == (1, "chosen")
    # Training (the Arrow path) treats such a row as a bad row: an error, or a counted drop.
    cfg = load_config(None, {"loss_type": "dpo", "output_dir": str(tmp_path), "max_length": MAX_LENGTH,
                             "on_bad_row": on_bad_row})
    if on_bad_row == "error":
        with pytest.raises(DuplicateKey, match=r"duplicate_keys.jsonl, row 2, field 'chosen': the key 'chosen' "):
            prepare_data(str(BAD / "duplicate_keys.jsonl"), cfg, get_method("dpo"), tokenizer)
        return
    data = prepare_data(str(BAD / "duplicate_keys.jsonl"), cfg, get_method("dpo"), tokenizer)
    assert data.report.reasons == {
        "chosen: the key 'chosen' appears more than once in this row": 1,
        "prompt: the key 'content' appears more than once in prompt[0]": 1,
    }
    assert [e.row for e in data.examples] == [0, 3]


def test_a_duplicated_key_inside_a_message_names_the_column(tmp_path):
    lines = (BAD / "duplicate_keys.jsonl").read_text(encoding="utf-8").splitlines()
    nested = tmp_path / "nested.jsonl"
    nested.write_text("\n".join([lines[0], lines[2]]) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_rows(str(nested))
    assert str(info.value) == f"{nested}, row 2, field 'prompt': the key 'content' " + DUPLICATE.format("prompt[0]")
    as_json = tmp_path / "rows.json"  # a .json file: the row is found by position in the list
    as_json.write_text("[" + ", ".join([lines[0], lines[2]]) + "]", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_rows(str(as_json))
    assert str(info.value) == f"{as_json}, row 2, field 'prompt': the key 'content' " + DUPLICATE.format("prompt[0]")
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text('{"data": [], "data": [' + lines[0] + "]}", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_rows(str(wrapped))
    assert str(info.value) == f"{wrapped}: the key 'data' " + DUPLICATE.format("the file's top-level object")


# --- bad rows: an error naming file, 1-based row and field; or, with on_bad_row="drop", exactly those rows dropped

ROW_ERRORS = [
    # file, first bad row, its field, message fragment, every bad row (1-based)
    ("bad_label.jsonl", 3, "label", "label must be true or false; got 'yes'", [3, 5, 6, 7]),
    ("empty_strings.jsonl", 2, "chosen", "is empty", [2, 3, 4, 5]),
    ("lone_surrogate.jsonl", 2, "chosen", r"contains an invalid character; '\ud800'", [2]),
    ("null_value.jsonl", 3, "rejected", "is null", [3]),
    ("wrong_types.jsonl", 2, "prompt", "must be a string or a list of {role, content} messages, got int", [2, 4]),
    ("nan_score.jsonl", 2, "score", "must be finite; got nan", [2, 3, 4, 5]),
    ("out_of_range_score.jsonl", 2, "score", "is outside the declared score range [0.0, 1.0]; got 1.5", [2, 3, 4, 5]),
    ("nan_pairwise_score.jsonl", 3, "chosen_score", "must be finite; got nan", [3]),
    ("nan_reward.jsonl", 2, "rewards[1]", "must be finite; got nan", [2, 3]),
    ("listwise_mismatch.jsonl", 2, "rewards", "got 2 values for 3 completions", [2, 3, 4, 5]),
    ("wrong_roles.jsonl", 2, "prompt", "role 'human' is not one of system, user, assistant, tool", [2, 3, 4, 5, 6, 7]),
    ("identical_pair.jsonl", 2, "rejected", "is identical to 'chosen'; a preference pair needs two different", [2, 3]),
    ("bad_ended_flag.jsonl", 2, "rejected_ended", "must be true or false; got 'no'", [2, 3]),
]


@pytest.mark.parametrize("name,row,field,problem,bad", ROW_ERRORS, ids=[c[0] for c in ROW_ERRORS])
def test_bad_row_is_an_error_naming_file_row_and_field(name, row, field, problem, bad, tokenizer):
    with pytest.raises(DataError) as info:
        load(name, tokenizer)
    message = str(info.value)
    assert f"{name}, row {row}, field {field!r}: " in message, message
    assert problem in message, message
    assert (info.value.row, info.value.field) == (row - 1, field)


@pytest.mark.parametrize("name,row,field,problem,bad", ROW_ERRORS, ids=[c[0] for c in ROW_ERRORS])
def test_bad_rows_are_dropped_counted_and_the_good_ones_kept(name, row, field, problem, bad, tokenizer):
    examples, report = load(name, tokenizer, on_bad_row="drop")
    total = len(read_rows(str(BAD / name)))
    assert report.total == total
    assert report.dropped == len(bad)
    assert sorted(r for rows in report.examples.values() for r in rows) == bad
    assert [e.row + 1 for e in examples] == [r for r in range(1, total + 1) if r not in bad]
    assert f"dropped {len(bad)} of {total} rows" in report.summary()


def test_drop_reasons_group_rows_whatever_the_bad_value(tokenizer):
    _, report = load("bad_label.jsonl", tokenizer, on_bad_row="drop")
    assert dict(report.reasons) == {"label: label must be true or false": 4}
    _, report = load("out_of_range_score.jsonl", tokenizer, on_bad_row="drop")
    assert report.reasons["score: is outside the declared score range [0.0, 1.0]"] == 2


def test_nan_and_infinity_literals_pass_json_but_not_validation(tokenizer):
    rows = read_rows(str(BAD / "nan_score.jsonl"))  # Python's json accepts NaN, Infinity, -Infinity and 1e400
    assert math.isnan(rows[1]["score"]) and rows[2]["score"] == math.inf and rows[4]["score"] == math.inf
    for index, value in ((1, "nan"), (2, "inf"), (3, "-inf"), (4, "inf")):
        with pytest.raises(
            DataError, match=rf"nan_score.jsonl, row {index + 1}, field 'score': must be finite; got {value}"
        ):
            validate_row(rows[index], "score", index, "nan_score.jsonl")


def test_out_of_range_scores_are_fine_once_the_range_is_declared(tokenizer):
    with pytest.raises(DataError, match=r"row 4, field 'score': must be finite; got an integer too large"):
        load("out_of_range_score.jsonl", tokenizer, score_range=(-1.0, 2.0))
    examples, report = load("out_of_range_score.jsonl", tokenizer, on_bad_row="drop", score_range=(-1.0, 2.0))
    assert [e.row + 1 for e in examples] == [1, 2, 3, 6] and report.dropped == 2
    assert examples[1].scores == [pytest.approx(2.5 / 3)] and examples[1].rewards == [1.5]


def test_missing_column_is_named_when_the_format_is_set(tokenizer):
    with pytest.raises(DataError, match=r"missing_column.jsonl, row 2, field 'rejected': missing required column"):
        load("missing_column.jsonl", tokenizer, fmt="pairwise")
    examples, report = load("missing_column.jsonl", tokenizer, on_bad_row="drop", fmt="pairwise")
    assert report.dropped == 1 and [e.row + 1 for e in examples] == [1, 3, 4]


def test_missing_column_is_named_when_the_format_is_detected(tokenizer, tmp_path):
    cfg = load_config(None, {"loss_type": "dpo", "output_dir": str(tmp_path), "max_length": MAX_LENGTH})
    with pytest.raises(DataError, match=r"missing_column.jsonl, row 2, field 'rejected'"):
        prepare_data(str(BAD / "missing_column.jsonl"), cfg, get_method("dpo"), tokenizer)


def test_extra_columns_are_allowed_and_ignored(tokenizer):
    rows = read_rows(str(BAD / "extra_columns.jsonl"))
    assert {"id", "source", "meta"} <= set(rows[0])
    examples, report = load("extra_columns.jsonl", tokenizer)
    assert report.dropped == 0 and len(examples) == 3
    plain = [{k: r[k] for k in FORMAT_COLUMNS["pairwise"]} for r in rows]
    expected, _ = tokenize_rows(plain, "pairwise", tokenizer, max_length=MAX_LENGTH, max_prompt_length=None)
    assert [(e.prompt_ids, e.completion_ids) for e in examples] == [(e.prompt_ids, e.completion_ids) for e in expected]


def test_prompt_longer_than_max_length_is_always_dropped_and_counted(tokenizer):
    for on_bad_row in ("error", "drop"):
        examples, report = load("long_prompt.jsonl", tokenizer, on_bad_row=on_bad_row)
        assert dict(report.reasons) == {"prompt longer than max_length": 1}
        assert report.examples["prompt longer than max_length"] == [2]
        assert [e.row + 1 for e in examples] == [1, 3, 4]
    examples, report = load("long_prompt.jsonl", tokenizer, max_prompt_length=32)  # truncated from the left instead
    assert report.dropped == 0 and len(examples[1].prompt_ids) == 32


def test_huge_strings_are_truncated_not_a_crash(tokenizer):
    rows = read_rows(str(BAD / "huge_strings.jsonl"))
    assert len(rows[0]["chosen"]) >= 200_000 and len(rows[1]["prompt"]) >= 20_000
    for max_length in (MAX_LENGTH, 512):
        examples, report = load("huge_strings.jsonl", tokenizer, max_length=max_length)
        assert [e.row + 1 for e in examples] == [1, 3] and dict(report.reasons) == {"prompt longer than max_length": 1}
        first = examples[0]
        assert len(first.prompt_ids) + len(first.completion_ids[0]) == max_length  # the long completion is cut
        assert first.completion_ids[0][-1] != tokenizer.eos_token_id
        assert all(len(first.prompt_ids) + len(c) <= max_length for c in first.completion_ids)


def test_rao_prompts_must_share_the_first_token(tokenizer):
    examples, report = load("rao_first_token.jsonl", tokenizer)
    assert report.dropped == 0
    with pytest.raises(DataError) as info:
        check_shared_first_token(examples, str(BAD / "rao_first_token.jsonl"), tokenizer)
    message = str(info.value)
    assert "rao_first_token.jsonl, row 3, field 'prompt': prompt starts with token" in message
    assert "one shared first token" in message


def test_rao_first_token_check_runs_in_prepare_data_even_when_dropping(tokenizer, tmp_path):
    cfg = load_config(
        None, {"loss_type": "rao", "output_dir": str(tmp_path), "max_length": MAX_LENGTH, "on_bad_row": "drop"}
    )
    with pytest.raises(DataError, match=r"rao_first_token.jsonl, row 3, field 'prompt'"):
        prepare_data(str(BAD / "rao_first_token.jsonl"), cfg, get_method("rao"), tokenizer)


STRICT_TEMPLATE = (
    "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
)


def test_a_chat_template_that_refuses_a_conversation_gives_a_data_error(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "chat_template", STRICT_TEMPLATE)
    rows = [
        {"prompt": [{"role": "user", "content": "a"}], "completion": "b"},
        {"prompt": [{"role": "user", "content": "a"}, {"role": "user", "content": "again"}], "completion": "b"},
    ]
    with pytest.raises(DataError, match=r"data.jsonl, row 2, field 'prompt': the tokenizer's chat template refuses"):
        tokenize_rows(rows, "sft", tokenizer, max_length=MAX_LENGTH, max_prompt_length=None, source="data.jsonl")
    examples, report = tokenize_rows(
        rows, "sft", tokenizer, max_length=MAX_LENGTH, max_prompt_length=None, source="data.jsonl", on_bad_row="drop"
    )
    assert len(examples) == 1 and report.examples == {
        "prompt: the tokenizer's chat template refuses this conversation: "
        "Conversation roles must alternate user/assistant/user/assistant/...": [2]
    }


def test_train_with_on_bad_row_drop_records_the_drop_in_data_report(tiny_model_dir, tmp_path):
    config = dict(
        model_name_or_path=tiny_model_dir,
        dataset=str(BAD / "wrong_roles.jsonl"),
        loss_type="dpo",
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        report_to="none",
        disable_tqdm=True,
        max_length=MAX_LENGTH,
        seed=0,
    )
    with pytest.raises(DataError, match=r"wrong_roles.jsonl, row 2, field 'prompt'"):
        unialign.train(config)  # on_bad_row defaults to error: stops before any model is loaded
    result = unialign.train({**config, "on_bad_row": "drop"})
    assert result.dropped.dropped == 6 and result.dropped.total == 8
    report = (tmp_path / "run" / "data_report.txt").read_text(encoding="utf-8")
    assert report.startswith("dropped 6 of 8 rows: ")
    assert "prompt: message 0 has an unknown role (rows [2]…)" in report
    assert (
        "chosen: a conversation completion holds assistant (and tool) messages, starting and ending with an "
        "assistant message (rows [5]…)"
    ) in report


# --- fuzzing: arbitrary JSON-like rows never raise anything but DataError ---------------------------------------

# Text with every kind of character, lone surrogates (legal as JSON escapes) and control characters included.
texts = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "Zs", "Lo", "So"]), max_size=12),
    st.sampled_from(["", " ", "\n", "\x00", "<|im_start|>", "<|im_end|>", "{{ raise_exception('x') }}", "\ud800"]),
)
numbers = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.sampled_from([0, 1, -1, 2, 10**400, -(10**400)]),
    st.floats(allow_nan=True, allow_infinity=True),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3), max_leaves=8
)
messages = st.fixed_dictionaries(
    {},
    optional={"role": st.sampled_from((*ROLES, "human", "tool")) | anything, "content": texts | anything},
)
conversations = st.lists(messages | anything, max_size=4)
fields = st.one_of(texts, conversations, numbers, st.booleans(), anything, st.lists(texts | conversations, max_size=4))
COLUMNS = sorted({c for cols in FORMAT_COLUMNS.values() for c in cols} | {"messages", "chosen_score", "rejected_score"})


@st.composite
def rows(draw):
    fmt = draw(st.sampled_from(sorted(FORMAT_COLUMNS)))
    names = list(FORMAT_COLUMNS[fmt]) + draw(st.lists(st.sampled_from(COLUMNS), max_size=3))
    names = [n for n in names if draw(st.integers(0, 9))]  # now and then a required column goes missing
    row = {name: draw(fields) for name in names}
    extra = draw(st.dictionaries(texts, anything, max_size=2))
    return fmt, {**extra, **row}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=rows(), on_bad_row=st.sampled_from(["error", "drop"]), score_range=st.sampled_from([None, (0.0, 4.0)]))
def test_fuzz_validation_and_tokenization_raise_only_data_errors(case, on_bad_row, score_range, tokenizer):
    fmt, row = case
    try:
        example = validate_row(row, fmt, 0, "fuzz.jsonl", score_range)
    except DataError as err:
        assert str(err).startswith("fuzz.jsonl, row 1")
    else:
        assert isinstance(example, Example)
    try:
        examples, report = tokenize_rows(
            [row, row],
            fmt,
            tokenizer,
            max_length=32,
            max_prompt_length=16,
            source="fuzz.jsonl",
            on_bad_row=on_bad_row,
            score_range=score_range,
        )
    except DataError as err:
        assert str(err).startswith("fuzz.jsonl")
    else:
        assert len(examples) + report.dropped == 2
        for e in examples:
            assert e.prompt_ids and len(e.prompt_ids) <= 16
            assert all(1 <= len(c) <= 32 - len(e.prompt_ids) for c in e.completion_ids)


@settings(max_examples=100, deadline=None)
@given(columns=st.sets(st.sampled_from(COLUMNS) | texts, max_size=6))
def test_fuzz_detect_format_names_a_format_or_raises_data_error(columns):
    try:
        assert detect_format(columns, "fuzz.jsonl") in FORMAT_COLUMNS
    except DataError as err:
        assert str(err).startswith("fuzz.jsonl: cannot tell the feedback format")


json_lines = st.one_of(
    st.builds(lambda row: json.dumps(row[1], allow_nan=True).encode("utf-8", "surrogatepass"), rows()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"NaN", b"[]", b"{", b'{"a": 1}}', b"\xef\xbb\xbf{}", b'"\xc3\x28"', b"[" * 3000]),
)


@settings(max_examples=100, deadline=None)
@given(lines=st.lists(json_lines, min_size=1, max_size=4), suffix=st.sampled_from([".jsonl", ".json"]))
def test_fuzz_file_readers_return_objects_or_raise_data_error(lines, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{suffix}"
        path.write_bytes(b"\n".join(lines))
        try:
            result = read_rows(str(path))
        except DataError as err:
            assert str(err).startswith(str(path))
        else:
            assert all(isinstance(r, dict) for r in result)
