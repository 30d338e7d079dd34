"""The Arrow data path (unialign.data.tokenized): same items as the list path, worker processes, the cache."""

import copy
import json
import pickle

import pytest

import unialign
import unialign.data.tokenize as tokenization
from tests.conftest import conversation, tiny_dpo_config
from unialign.checkpoints import data_fingerprint, load_ref_logps, save_ref_logps
from unialign.config import UnialignConfig
from unialign.data.errors import DataError
from unialign.data.io import read_jsonl
from unialign.data.sources import open_table, read_rows
from unialign.data.tokenize import attach_kl_pairs, tokenize_rows
from unialign.data.tokenized import cache_fingerprint, field_codecs
from unialign.losses.registry import get_method
from unialign.pipeline import prepare_data
from unialign.trainer import example_length


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """Each test starts with an empty tokenized cache of its own."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _rows(count: int = 24) -> list[dict]:
    rows = []
    for i in range(count):
        prompt = conversation(f"Question {i // 2}: tell me about item {i // 2}.")  # pairs of rows share a prompt
        rows.append({"prompt": prompt, "chosen": f"Item {i} is fine." * (1 + i % 3), "rejected": f"No {i}.",
                     "chosen_score": 0.75, "rejected_score": 0.25})
    return rows


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _config(tmp_path, **extra) -> UnialignConfig:
    return UnialignConfig(output_dir=str(tmp_path / "run"), report_to=[], **{"max_length": 48, **extra})


def _list_path(rows, fmt, tokenizer, cfg, source):
    examples, report = tokenize_rows(rows, fmt, tokenizer, max_length=cfg.max_length,
                                     max_prompt_length=cfg.max_prompt_length, source=source,
                                     on_bad_row=cfg.on_bad_row, score_range=cfg.score_range)
    return examples, report


LISTWISE = [
    {"prompt": conversation("Pick one."), "completions": ["First.", "Second one.", "Third, longer one."],
     "rewards": [0.9, 0.5, 0.1]},
    {"prompt": conversation("A second prompt."), "completions": ["Only two.", "Yes."], "rewards": [0.2, 0.8]},
    {"prompt": conversation("Once more."), "completions": ["A", "B", "C"], "rewards": [0.3, 0.3, 0.6]},
]
BINARY = [  # prompts A A B B A A: KTO's partner search must skip same-prompt neighbours and wrap around
    {"prompt": conversation(p), "completion": f"Answer {i}.", "label": i % 2 == 0}
    for i, p in enumerate(["A?", "A?", "B?", "B?", "A?", "A?"])
]


@pytest.mark.parametrize(
    ("method", "rows", "extra"),
    [
        ("dpo", _rows(), {}),
        ("una_score", _rows(), {}),
        ("rao", LISTWISE, {"score_range": [0, 1]}),
        ("kto", BINARY, {}),
        ("tpo", [{"prompt": "P", "reference": "R r.", "chosen": "C.", "rejected": "X."}] * 3, {}),
    ],
)
def test_lazy_items_equal_the_list_path(tmp_path, tokenizer, method, rows, extra):
    source = _write(tmp_path / "data.jsonl", rows)
    cfg = _config(tmp_path, loss_type=method, **extra)
    data = prepare_data(source, cfg, get_method(method), tokenizer)
    expected, report = _list_path(rows, data.format, tokenizer, cfg, source)
    if method == "kto":
        attach_kl_pairs(expected, cfg.max_length)
    assert list(data.examples) == expected  # every field of every item
    assert [data.examples[i] for i in range(len(expected))] == expected
    assert data.examples[-1] == expected[-1] and data.examples[1:3] == expected[1:3]
    assert data.report.summary() == report.summary()
    for packed in (True, False):
        assert data.examples.example_lengths(packed) == [example_length(e, packed) for e in expected]
    assert data_fingerprint(data.examples) == data_fingerprint(expected)


def test_two_processes_give_the_same_items_and_drop_report(tmp_path, tokenizer):
    rows = _rows(40)
    rows[3] = {**rows[3], "prompt": conversation("long " * 80)}  # over max_length: always a counted drop
    rows[29] = {**rows[29], "chosen": 7}  # a bad row in the second worker's half
    rows[33] = {k: v for k, v in rows[33].items() if k != "rejected"}
    source = _write(tmp_path / "data.jsonl", rows)
    cfg = _config(tmp_path, loss_type="dpo", on_bad_row="drop")
    one = prepare_data(source, cfg, get_method("dpo"), tokenizer)
    expected, report = _list_path(rows, "pairwise", tokenizer, cfg, source)
    two = prepare_data(source, _config(tmp_path, loss_type="dpo", on_bad_row="drop", dataset_num_proc=2),
                       get_method("dpo"), tokenizer)
    assert list(one.examples) == list(two.examples) == expected
    assert one.report.summary() == two.report.summary() == report.summary()
    assert report.summary() == (
        "dropped 3 of 40 rows: 1 × prompt longer than max_length (rows [4]…); "
        "1 × chosen: must be a string or a list of {role, content} messages, got int (rows [30]…); "
        "1 × rejected: missing required column for pairwise data (rows [34]…)"
    )


@pytest.mark.parametrize("bad_rows", [(29,), (5, 29)])
def test_a_bad_row_in_a_worker_is_the_same_one_line_error_in_the_main_process(tmp_path, tokenizer, bad_rows):
    rows = _rows(40)
    for index in bad_rows:
        rows[index] = {**rows[index], "chosen": ""}
    source = _write(tmp_path / "data.jsonl", rows)
    first = bad_rows[0]
    expected = f"{source}, row {first + 1}, field 'chosen': is empty; a completion needs at least one token of text"
    with pytest.raises(DataError) as listed:
        _list_path(rows, "pairwise", tokenizer, _config(tmp_path, loss_type="dpo"), source)
    assert str(listed.value) == expected
    for num_proc in (None, 2):
        with pytest.raises(DataError) as err:
            prepare_data(source, _config(tmp_path, loss_type="dpo", dataset_num_proc=num_proc), get_method("dpo"),
                         tokenizer)
        assert str(err.value) == expected and "\n" not in str(err.value)
        assert (err.value.source, err.value.row, err.value.field) == (source, first, "chosen")


def test_an_unreadable_line_past_format_detection_is_reported_by_line(tmp_path, tokenizer):
    lines = [json.dumps(r) for r in _rows(60)]
    lines[55] = '{"prompt": "cut off'
    lines.insert(10, "")  # blank lines are skipped and still counted as lines
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        prepare_data(str(path), _config(tmp_path, loss_type="dpo", on_bad_row="drop", dataset_num_proc=2),
                     get_method("dpo"), tokenizer)
    with pytest.raises(DataError) as whole_file:
        read_jsonl(path)  # the reader that parses the whole file up front says the same
    assert str(err.value) == str(whole_file.value)
    assert str(err.value).startswith(f"{path}, row 57: is not valid JSON (")


def _count_tokenize_calls(monkeypatch) -> list:
    calls = []
    original = tokenization.tokenize_example

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(tokenization, "tokenize_example", counting)
    return calls


def test_a_second_run_reads_the_cache_and_a_changed_setting_does_not(tmp_path, tokenizer, monkeypatch):
    source = _write(tmp_path / "data.jsonl", _rows())
    method = get_method("dpo")
    calls = _count_tokenize_calls(monkeypatch)
    first = prepare_data(source, _config(tmp_path, loss_type="dpo"), method, tokenizer)
    assert len(calls) == 24 and not first.examples.from_cache

    second = prepare_data(source, _config(tmp_path, loss_type="dpo"), method, tokenizer)
    assert len(calls) == 24 and second.examples.from_cache  # not one row tokenized again
    assert list(second.examples) == list(first.examples)
    assert prepare_data(source, _config(tmp_path, loss_type="dpo", dataset_num_proc=2), method,
                        tokenizer).examples.from_cache  # the cache does not depend on the process count

    changes = {
        "max_length": lambda: prepare_data(source, _config(tmp_path, loss_type="dpo", max_length=64), method,
                                           tokenizer),
        "max_prompt_length": lambda: prepare_data(
            source, _config(tmp_path, loss_type="dpo", max_prompt_length=30), method, tokenizer),
        "data": lambda: prepare_data(_write(tmp_path / "data.jsonl", _rows(25)), _config(tmp_path, loss_type="dpo"),
                                     method, tokenizer),
    }
    for name, run in changes.items():
        before = len(calls)
        assert not run().examples.from_cache, name
        assert len(calls) > before, name
    table, codecs = open_table(source), field_codecs()
    keys = {fmt: cache_fingerprint(table, fmt, tokenizer, max_length=48, max_prompt_length=None, on_bad_row="error",
                                   score_range=None, codecs=codecs) for fmt in ("pairwise", "sft")}
    assert keys["pairwise"] != keys["sft"]


def test_the_tokenizer_and_the_tokenization_version_are_part_of_the_cache_key(tmp_path, tokenizer, monkeypatch):
    source = _write(tmp_path / "data.jsonl", _rows())
    method, cfg = get_method("dpo"), _config(tmp_path, loss_type="dpo")
    prepare_data(source, cfg, method, tokenizer)
    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    changed = prepare_data(source, cfg, method, other)
    assert not changed.examples.from_cache
    assert changed.examples[0].prompt_ids != prepare_data(source, cfg, method, tokenizer).examples[0].prompt_ids
    assert prepare_data(source, cfg, method, tokenizer).examples.from_cache
    monkeypatch.setattr(tokenization, "TOKENIZATION_VERSION", "lead-bumped-it")
    assert not prepare_data(source, cfg, method, tokenizer).examples.from_cache


def test_the_cache_lives_in_the_datasets_cache_not_beside_the_data(tmp_path, tokenizer):
    from datasets import Dataset

    folder = tmp_path / "saved"
    Dataset.from_list(_rows()).save_to_disk(str(folder))
    before = sorted(p.name for p in folder.iterdir())
    data = prepare_data(str(folder), _config(tmp_path, loss_type="dpo"), get_method("dpo"), tokenizer)
    assert len(data.examples) == 24
    assert sorted(p.name for p in folder.iterdir()) == before
    assert list((tmp_path / "hf-cache" / "unialign" / "tokenized").glob("*.arrow"))


def test_side_store_holds_reference_values_and_they_round_trip_through_the_checkpoint_file(tmp_path, tokenizer):
    data = prepare_data(_write(tmp_path / "data.jsonl", _rows()), _config(tmp_path, loss_type="dpo"),
                        get_method("dpo"), tokenizer).examples
    values = [[-1.5 - i, -2.25 - i] for i in range(len(data))]
    data.set_values("ref_logps", range(len(data)), values)
    assert [e.ref_logps for e in data] == values and data[3].ref_prompt_logps is None
    save_ref_logps(tmp_path / "ref.safetensors", {"train": data}, "ref-model")
    again = prepare_data(str(tmp_path / "data.jsonl"), _config(tmp_path, loss_type="dpo"), get_method("dpo"),
                         tokenizer).examples
    assert again[0].ref_logps is None
    load_ref_logps(tmp_path / "ref.safetensors", {"train": again}, "ref-model")
    assert [e.ref_logps for e in again] == values
    copied = pickle.loads(pickle.dumps(again))  # what a DataLoader worker receives
    assert copied[5] == again[5] and len(pickle.dumps(again)) < 20_000


def _train_config(tiny_model_dir, dataset, tmp_path, **extra):
    return tiny_dpo_config(tiny_model_dir, dataset, tmp_path / "run", **extra)


@pytest.mark.parametrize("kind", ["dataset", "rows", "path"])
def test_train_accepts_a_datasets_object_a_list_of_rows_and_a_path(tiny_model_dir, tmp_path, pairwise_rows, kind):
    from pathlib import Path

    from datasets import Dataset

    path = Path(_write(tmp_path / "pairs.jsonl", pairwise_rows))
    dataset = {"dataset": Dataset.from_list(pairwise_rows), "rows": list(pairwise_rows), "path": path}[kind]
    result = unialign.train(_train_config(tiny_model_dir, dataset, tmp_path, eval_dataset=dataset,
                                          eval_strategy="steps", eval_steps=2))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    shown = {"dataset": "<datasets.Dataset: 8 rows>", "rows": "<list: 8 rows>", "path": str(path)}[kind]
    assert config["dataset"] == config["eval_dataset"] == shown
    assert result.dropped.summary() == "kept all 8 rows"
    assert "eval_loss" in result.metrics and (result.model_dir / "model.safetensors").is_file()
    assert f"Data: `{shown}` (pairwise, 8 rows" in (result.model_dir / "README.md").read_text()


def test_a_dataset_dict_gives_its_split_and_lists_its_splits_when_one_is_missing(tmp_path, tokenizer, pairwise_rows):
    from datasets import Dataset, DatasetDict

    both = DatasetDict({"train": Dataset.from_list(pairwise_rows), "validation": Dataset.from_list(pairwise_rows[:3])})
    assert len(prepare_data(both, _config(tmp_path, loss_type="dpo"), get_method("dpo"), tokenizer).examples) == 8
    with pytest.raises(DataError, match=r"has no split 'test'; splits: train, validation"):
        prepare_data(both, _config(tmp_path, loss_type="dpo"), get_method("dpo"), tokenizer, split="test")


def test_rows_given_as_a_list_are_validated_like_a_file(tmp_path, tokenizer):
    rows = _rows(4) + ["not a row"]
    with pytest.raises(DataError) as err:
        prepare_data(rows, _config(tmp_path, loss_type="dpo"), get_method("dpo"), tokenizer)
    assert str(err.value) == "<list: 5 rows>, row 5: a row must be an object with named fields, got str"
    assert read_rows(rows) == rows
