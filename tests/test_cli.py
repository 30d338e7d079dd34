"""Command line: happy paths on the tiny model and clear errors."""

import json

from unialign.cli import main


def test_methods_lists_every_method_with_formats(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in ("dpo", "una_score", "rao", "tpo", "kto", "simpo"):
        assert name in out
    assert "pairwise" in out and "listwise" in out


def test_train_from_yaml_with_overrides(tmp_path, tiny_model_dir, pairwise_rows, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in pairwise_rows))
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {tiny_model_dir}\ndataset: pairs.jsonl\nloss_type: dpo\n"
        f"max_steps: 5\nper_device_train_batch_size: 4\nreport_to: none\ndisable_tqdm: true\n"
        f"output_dir: {tmp_path / 'run'}\nmax_length: 64\n"
    )
    assert main(["train", str(config), "max_steps=1", "learning_rate=0.001"]) == 0
    assert "model saved to" in capsys.readouterr().out
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 1


def test_config_error_is_one_clear_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("loss_type: dpo\nbetaa: 0.1\n")
    assert main(["train", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: unknown config key 'betaa'; did you mean beta")


def test_moved_harness_commands_say_where_they_went_without_importing_them(capsys):
    import subprocess
    import sys

    for argv, where in ((["bench", "--methods", "dpo", "--help"], "python -m benchmarks.bench"),
                        (["experiment", "run", "benchmarks/claims/claims.yaml"], "python -m benchmarks.claims"),
                        (["data", "card"], "python -m tools.bundled_card")):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and where in err[0] and "moved out of the package" in err[0]
    code = ("import sys; from unialign.cli import main; main(['bench']); main(['experiment', 'run', 'x'])\n"
            "heavy = ('benchmarks', 'tools', 'trl', 'psutil', 'torch', 'transformers')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
