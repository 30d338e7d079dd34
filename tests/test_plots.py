"""Plots: training curves from metrics.jsonl and the evaluation comparison chart."""

from __future__ import annotations

import argparse
import json

import pytest

from unialign import plots
from unialign.cli import add_plot_arguments

PNG_MAGIC = b"\x89PNG"


def _write_metrics(run_dir, rows):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _train_row(step: int) -> dict:
    return {
        "step": step, "epoch": step / 10, "loss": 1.0 / step, "grad_norm": 0.5, "learning_rate": 1e-5,
        "rewards/chosen": 0.1 * step, "rewards/rejected": -0.1 * step, "rewards/margins": 0.2 * step,
        "rewards/accuracies": 0.5, "logps/chosen": -10.0, "logps/rejected": -12.0, "kl": 0.01 * step,
        "nll_loss": 2.0, "rewards/mean": 0.3,
    }


def _is_png(path) -> bool:
    return path.stat().st_size > 0 and path.read_bytes()[:4] == PNG_MAGIC


def test_plot_run_writes_one_png_per_group(tmp_path, monkeypatch):
    rows = [_train_row(s) for s in range(1, 6)]
    rows.append({"step": 5, "epoch": 0.5, "eval_loss": 0.4, "eval_rewards/chosen": 0.3, "eval_runtime": 1.2,
                 "eval_win_rate": 0.6})
    rows.append({"step": 5, "train_runtime": 3.0, "train_loss": 0.5, "total_flos": 1e9})
    _write_metrics(tmp_path, rows)
    drawn = {}
    original = plots._plot_group

    def recording(rows, keys, title, path):
        drawn[title] = keys
        original(rows, keys, title, path)

    monkeypatch.setattr(plots, "_plot_group", recording)
    written = plots.plot_run(tmp_path)

    names = {p.name for p in written}
    assert names == {
        "loss.png", "rewards.png", "margins.png", "accuracies.png", "logps.png", "kl.png", "nll_loss.png",
        "grad_norm.png", "learning_rate.png", "rewards_other.png", "win_rate.png",
    }
    assert all(p.parent == tmp_path / "plots" and _is_png(p) for p in written)
    assert set(drawn["loss"]) == {"loss", "eval_loss"}
    assert set(drawn["rewards"]) == {"rewards/chosen", "rewards/rejected", "eval_rewards/chosen"}
    assert drawn["win_rate"] == ["eval_win_rate"]
    assert not any("runtime" in k or "epoch" in k for keys in drawn.values() for k in keys)


def test_missing_keys_are_skipped(tmp_path):
    _write_metrics(tmp_path, [{"step": s, "loss": 1.0 / s, "nll_loss": None, "note": "text"} for s in (1, 2, 3)])
    written = plots.plot_run(tmp_path)
    assert [p.name for p in written] == ["loss.png"]
    assert _is_png(written[0])
    assert not (tmp_path / "plots" / "rewards.png").exists()


def test_plot_run_without_metrics_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plots.plot_run(tmp_path)


def test_plot_comparison_and_cli(tmp_path, capsys):
    side = {"mean_reward": 0.5, "std_reward": 0.1, "mean_length": 10.0, "eos_fraction": 1.0}
    reports = {
        "dpo": {"policy": side, "reference": {**side, "mean_reward": 0.4},
                "win_rate": 0.5, "tie_rate": 0.2, "loss_rate": 0.3},
        "una": {"policy": {**side, "mean_reward": 0.6}, "reference": side,
                "win_rate": 0.7, "tie_rate": 0.1, "loss_rate": 0.2},
    }
    out = plots.plot_comparison(reports, tmp_path / "cmp" / "comparison.png")
    assert _is_png(out)

    _write_metrics(tmp_path / "run", [_train_row(1), _train_row(2)])
    args = add_plot_arguments(argparse.ArgumentParser()).parse_args([str(tmp_path / "run")])
    assert plots.run_plot_cli(args) == 0
    assert "loss.png" in capsys.readouterr().out
