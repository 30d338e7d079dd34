"""Config loading: YAML, overrides, method defaults, errors that name the key."""

import dataclasses
from pathlib import Path

import pytest
from transformers import TrainingArguments

from unialign.config import UnialignConfig, load_config, parse_overrides


def test_method_defaults_fill_unset_fields_and_explicit_values_win():
    cfg = load_config(None, {"loss_type": "dpo", "output_dir": "x"})
    assert cfg.beta == 0.1 and cfg.learning_rate == 5e-7
    cfg = load_config(None, {"loss_type": "dpo", "beta": 0.3, "learning_rate": 1e-4, "output_dir": "x"})
    assert cfg.beta == 0.3 and cfg.learning_rate == 1e-4


def test_trl_alias_names_the_method():
    assert load_config(None, {"loss_type": "sigmoid", "output_dir": "x"}).loss_type == "dpo"


def test_yaml_with_overrides_and_relative_paths(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    path = tmp_path / "run.yaml"
    path.write_text("loss_type: dpo\ndataset: data.jsonl\nbeta: 0.2\nmax_steps: 5\noutput_dir: out\n")
    cfg = load_config(path, ["beta=0.05", "use_peft=true"])
    assert cfg.beta == 0.05 and cfg.use_peft is True and cfg.max_steps == 5
    assert cfg.dataset == str(tmp_path / "data.jsonl")


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown config key 'bta'; did you mean beta"):
        load_config(None, {"bta": 0.1})


def test_bad_choice_names_the_allowed_values():
    with pytest.raises(ValueError, match=r"'una_loss' is 'l1'; allowed values: mse, bce"):
        load_config(None, {"una_loss": "l1"})


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown loss_type 'dpp'; choose one of: .*dpo"):
        load_config(None, {"loss_type": "dpp"})


def test_prompt_budget_must_leave_room_for_a_completion():
    with pytest.raises(ValueError, match="max_prompt_length"):
        load_config(None, {"max_length": 64, "max_prompt_length": 64})


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must be a mapping"):
        load_config(path)


def test_overrides_are_parsed_as_yaml_scalars():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=text", "e=[1, 2]"]) == {
        "a": 1,
        "b": 0.5,
        "c": True,
        "d": "text",
        "e": [1, 2],
    }
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["novalue"])


def test_every_unialign_key_is_documented():
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [f.name for f in dataclasses.fields(UnialignConfig) if f.name not in inherited]
    doc = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text(encoding="utf-8")
    assert len(own) > 40
    assert [name for name in own if f"| `{name}` |" not in doc] == []


def test_numbers_written_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("learning_rate: 1e-5\nbeta: 2e-1\nmax_steps: 1e1\nuse_cpu: true\n")  # YAML reads these as text
    cfg = load_config(path)
    assert (cfg.learning_rate, cfg.beta, cfg.max_steps) == (1e-5, 0.2, 10)
    assert isinstance(cfg.max_steps, int)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"use_peft": "maybe"}, "config key 'use_peft' must be true or false; got 'maybe'"),
        ({"beta": "abc"}, "config key 'beta' must be a number or null; got 'abc'"),
        ({"max_length": 12.5}, "config key 'max_length' must be a whole number; got 12.5"),
        ({"max_length": None}, "config key 'max_length' must be set; got null"),
        ({"beta": float("nan")}, "config key 'beta' must be a finite number; got nan"),
        ({"beta": -1}, "config key 'beta' must be > 0.0; got -1.0"),
        ({"beta": 0}, "config key 'beta' must be > 0.0; got 0.0"),
        ({"max_prompt_length": -30}, "config key 'max_prompt_length' must be >= 1; got -30"),
        ({"lora_dropout": 1.0}, "config key 'lora_dropout' must be < 1.0; got 1.0"),
        ({"top_p": 0}, "config key 'top_p' must be > 0.0; got 0.0"),
        ({"per_device_train_batch_size": 0}, "config key 'per_device_train_batch_size' must be >= 1; got 0"),
        ({"num_train_epochs": 0}, "config key 'num_train_epochs' is 0 and max_steps is not set: the run would train 0"),
        ({"score_range": [0, "high"]}, r"config key 'score_range\[1\]' must be a number; got 'high'"),
    ],
)
def test_a_value_of_the_wrong_type_or_out_of_range_names_key_and_value(values, message):
    with pytest.raises(ValueError, match="^" + message):
        load_config(None, {"use_cpu": True, **values})


def test_boolean_spellings_are_parsed_not_taken_as_truthy_strings():
    assert load_config(None, {"use_peft": "false", "use_cpu": True}).use_peft is False
    assert load_config(None, {"use_peft": "True", "use_cpu": True}).use_peft is True


def test_a_bad_value_names_the_file_it_came_from_or_the_command_line(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("beta: -1\nuse_cpu: true\n")
    with pytest.raises(ValueError, match=rf"^{path}: config key 'beta' must be > 0.0; got -1.0"):
        load_config(path)
    with pytest.raises(ValueError, match="^command line: config key 'max_length' must be a whole number; got 'x'"):
        load_config(path, ["beta=0.1", "max_length=x"])
