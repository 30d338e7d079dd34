"""Source names resolve exactly (unialign.data.sources): the user's files are never replaced by the shipped set."""

import ast
import json
import logging
from pathlib import Path

import pytest

from tests.conftest import conversation
from unialign.config import UnialignConfig
from unialign.data.bundled import FOLDER, FORMATS
from unialign.data.errors import DataError
from unialign.data.sources import read_rows, resolve_source
from unialign.evaluate import load_pairs, load_prompts
from unialign.losses.registry import get_method
from unialign.pipeline import prepare_data

USER_ROWS = [
    {"prompt": conversation("Is this my own data?"), "chosen": "Yes, yours.", "rejected": "No."},
    {"prompt": conversation("And this row?"), "chosen": "Also yours.", "rejected": "Shipped."},
]


def _write_jsonl(path: Path, rows=USER_ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _shipped_pairs(split: str) -> int:
    """Pairwise rows the shipped set has: its listwise rows whose rewards are not all tied (the converter's rule)."""
    rows = [json.loads(line) for line in (FOLDER / f"listwise.{split}.jsonl").read_text().splitlines() if line]
    return sum(1 for row in rows if len(set(row["rewards"])) > 1)


@pytest.mark.parametrize("name", ["bundled_pairs.jsonl", "bundled.jsonl", "bundled"])
def test_a_user_file_whose_name_starts_with_bundled_is_the_users_file(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / name)
    assert read_rows(name) == USER_ROWS
    assert load_pairs(name) == USER_ROWS  # evaluation's pairs, read through the same rules


def test_a_folder_named_bundled_is_the_users_folder_and_a_log_line_says_so(tmp_path, monkeypatch, caplog, tokenizer):
    from datasets import Dataset

    monkeypatch.chdir(tmp_path)
    Dataset.from_list(USER_ROWS).save_to_disk(str(tmp_path / "bundled"))
    with caplog.at_level(logging.WARNING, logger="unialign.data.sources"):
        rows = read_rows("bundled", bundled_default="pairwise")
    assert rows == USER_ROWS
    assert "'bundled' is read as the folder ./bundled in the working directory" in caplog.text
    # Training, where the bare word otherwise means the shipped set, reads the user's folder too.
    cfg = UnialignConfig(loss_type="dpo", output_dir=str(tmp_path / "run"), report_to=[], max_length=64)
    data = prepare_data("bundled", cfg, get_method("dpo"), tokenizer)
    assert len(data.examples) == 2 and data.source == "bundled"


def test_the_shipped_set_is_reached_by_its_scheme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "bundled")  # a user file of that name does not shadow the scheme
    train = read_rows("bundled:pairwise")
    assert len(train) == _shipped_pairs("train") and set(train[0]) == {
        "prompt", "chosen", "rejected", "chosen_score", "rejected_score", "chosen_ended", "rejected_ended"}
    assert len(read_rows("bundled:pairwise:test")) == _shipped_pairs("test")
    assert len(read_rows("bundled:pairwise", split="test")) == _shipped_pairs("test")


def test_the_bare_word_means_the_shipped_set_only_where_a_default_format_is_given(tmp_path, monkeypatch, tokenizer):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        read_rows("bundled")
    assert str(err.value) == (
        "bundled: there is no file or folder named 'bundled' here; the shipped dataset is bundled:<format>, "
        "format one of " + ", ".join(FORMATS)
    )
    cfg = UnialignConfig(loss_type="dpo", output_dir=str(tmp_path / "run"), report_to=[], max_length=128)
    data = prepare_data("bundled", cfg, get_method("dpo"), tokenizer)
    assert data.source == "bundled:pairwise" and data.report.total == _shipped_pairs("train")


def test_an_unknown_bundled_format_is_a_one_line_error_naming_the_formats():
    with pytest.raises(DataError) as err:
        read_rows("bundled:nonsense")
    message = str(err.value)
    assert "\n" not in message
    assert message == (
        "bundled:nonsense: unknown bundled format 'nonsense'; write bundled:<format>[:<split>] with format one of "
        "pairwise, binary, score, triple, listwise, sft, prompt, prompts"
    )
    with pytest.raises(DataError, match="unknown bundled split 'dev'; choose one of train, test"):
        read_rows("bundled:pairwise:dev")


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("bundled.jsonl", "file not found"),
        ("./bundled", "file not found"),
        ("data/pairs.parquet", "file not found"),
        ("a/b/c", "file not found"),
        ("pairs", "no such file or folder (a hub dataset is named owner/name; the shipped dataset is "
                  "bundled:<format>)"),
    ],
)
def test_a_missing_path_is_never_sent_to_the_hub(tmp_path, monkeypatch, name, problem):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as err:
        read_rows(name)
    assert str(err.value) == f"{name}: {problem}"


def test_an_owner_name_string_is_a_hub_dataset_and_its_failure_says_it_needs_a_network(monkeypatch, tmp_path):
    import datasets

    monkeypatch.chdir(tmp_path)
    assert resolve_source("HuggingFaceH4/ultrafeedback_binarized").kind == "hub"

    def offline(name, split):
        raise ConnectionError(f"cannot reach the hub for {name}")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        read_rows("someone/prefs")
    assert str(err.value) == (
        "someone/prefs: is not a local file or folder, so it was read as a hub dataset (owner/name, needs a network "
        "connection), which failed: cannot reach the hub for someone/prefs"
    )


def test_paths_rows_and_datasets_objects_are_sources(tmp_path):
    from datasets import Dataset, DatasetDict

    path = _write_jsonl(tmp_path / "pairs.jsonl")
    assert read_rows(path) == USER_ROWS
    assert read_rows(list(USER_ROWS)) == USER_ROWS
    assert read_rows(Dataset.from_list(USER_ROWS)) == USER_ROWS
    both = DatasetDict({"train": Dataset.from_list(USER_ROWS), "test": Dataset.from_list(USER_ROWS[:1])})
    assert read_rows(both, split="test") == USER_ROWS[:1]
    with pytest.raises(DataError, match="has no split 'validation'; splits: train, test"):
        read_rows(both, split="validation")
    assert resolve_source(both).name == "<datasets.DatasetDict: train 2 rows, test 1 rows>"
    assert resolve_source(list(USER_ROWS)).name == "<list: 2 rows>"


def test_a_file_without_suffix_is_told_by_its_content(tmp_path):
    (tmp_path / "as_list").write_text(json.dumps(USER_ROWS), encoding="utf-8")
    assert read_rows(tmp_path / "as_list") == USER_ROWS
    assert read_rows(_write_jsonl(tmp_path / "as_lines")) == USER_ROWS


def test_evaluation_prompts_use_the_same_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "bundled_prompts.jsonl", [{"prompt": "mine"}])
    assert load_prompts("bundled_prompts.jsonl") == ["mine"]
    shipped = [json.loads(line) for line in (FOLDER / "listwise.test.jsonl").read_text().splitlines() if line]
    assert len(load_prompts("bundled:prompts")) == len(shipped)  # evaluation reads the test split


def test_online_prompts_use_the_same_rules(tmp_path, monkeypatch, tokenizer):
    from unialign.online.rollout import prepare_prompts

    monkeypatch.chdir(tmp_path)
    cfg = UnialignConfig(loss_type="una_online", output_dir=str(tmp_path / "run"), report_to=[], reward="offline",
                         max_length=128, max_completion_length=16)
    shipped = prepare_prompts("bundled", cfg, get_method("una_online"), tokenizer)
    assert shipped.source == "bundled:prompt" and len(shipped.records) > 100
    _write_jsonl(tmp_path / "bundled", [{"prompt": "one of mine"}, {"prompt": "another"}])
    mine = prepare_prompts("bundled", cfg, get_method("una_online"), tokenizer)
    assert [r.prompt for r in mine.records] == ["one of mine", "another"]


def test_data_convert_reads_a_user_file_named_like_the_bundled_set(tmp_path, monkeypatch):
    from unialign.cli import main

    monkeypatch.chdir(tmp_path)
    listwise = [{"prompt": "p", "completions": ["a", "b"], "rewards": [1.0, 0.0]}]
    _write_jsonl(tmp_path / "bundled_listwise.jsonl", listwise)
    assert main(["data", "convert", "bundled_listwise.jsonl", "out.jsonl", "--to", "pairwise"]) == 0
    assert read_rows("out.jsonl") == [
        {"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 1.0, "rejected_score": 0.0}
    ]


def test_the_readme_name_for_the_bundled_set_is_importable():
    from unialign.data import load_bundled

    assert load_bundled("pairwise") == read_rows("bundled:pairwise")


def test_io_is_the_lowest_layer_and_knows_no_dataset_names():
    source = (Path(__file__).resolve().parents[1] / "src" / "unialign" / "data" / "io.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom)}
    imported |= {a.name for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Import) for a in node.names}
    # unialign.jsonfile is a leaf (it imports nothing from unialign): writing valid JSON, nothing more.
    assert {name for name in imported if name.startswith("unialign")} == {"unialign.data.errors", "unialign.jsonfile"}
    assert 'startswith("bundled' not in source
