"""How the command line ends: one line for what the user can fix, a traceback for bugs, 130 for Ctrl-C."""

from __future__ import annotations

import pytest
import torch

from unialign import cli


def _run(monkeypatch, capsys, failure, env=None):
    def fake_methods(args):
        failure()

    monkeypatch.setattr(cli, "_methods", fake_methods)
    for key, value in (env or {}).items():
        monkeypatch.setenv(key, value)
    code = cli.main(["methods"])
    return code, capsys.readouterr().err


def test_a_bad_config_value_is_one_line_and_exit_1(tmp_path, capsys):
    path = tmp_path / "cfg.yaml"
    path.write_text("beta: -1\nuse_cpu: true\ndataset: x.jsonl\n")
    assert cli.main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {path}: config key 'beta' must be > 0.0; got -1.0\n"


def test_a_missing_data_file_is_one_line(tmp_path, capsys, tiny_model_dir):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"model_name_or_path: {tiny_model_dir}\ndataset: {tmp_path}/nope.jsonl\nuse_cpu: true\n"
                    f"output_dir: {tmp_path}/run\nreport_to: none\n")
    assert cli.main(["train", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "nope.jsonl" in err and "not found" in err


def test_ctrl_c_ends_with_one_line_and_exit_130(monkeypatch, capsys):
    def interrupt():
        raise KeyboardInterrupt

    code, err = _run(monkeypatch, capsys, interrupt)
    assert code == 130
    assert err.startswith("interrupted: stopped by Ctrl-C") and err.count("\n") == 1


def test_a_bug_keeps_its_traceback_and_exits_70(monkeypatch, capsys):
    def bug():
        return {}["missing"]

    code, err = _run(monkeypatch, capsys, bug)
    assert code == 70
    assert "Traceback (most recent call last)" in err and "KeyError: 'missing'" in err
    assert err.rstrip().splitlines()[-1].startswith("error: unexpected KeyError (a bug in unialign")


def test_a_value_error_from_inside_a_library_is_a_bug_not_a_user_error(monkeypatch, capsys):
    def library_failure():
        torch.nn.functional.linear(torch.zeros(2, 3), torch.zeros(4, 5))  # shapes: torch raises RuntimeError

    code, err = _run(monkeypatch, capsys, library_failure)
    assert code == 70 and "Traceback" in err


@pytest.mark.parametrize("env", [{"UNIALIGN_DEBUG": "1"}])
def test_debug_shows_the_traceback_of_a_user_error_too(monkeypatch, capsys, tmp_path, env):
    path = tmp_path / "cfg.yaml"
    path.write_text("beta: -1\nuse_cpu: true\n")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match="config key 'beta' must be > 0.0"):
        cli.main(["train", str(path)])
    with pytest.raises(ValueError, match="config key 'beta' must be > 0.0"):
        monkeypatch.delenv("UNIALIGN_DEBUG")
        cli.main(["--debug", "train", str(path)])
