"""``unialign demo`` end to end on the tiny model: trains, evaluates with paired samples, writes its files."""

from __future__ import annotations

import json

from unialign.demo import run_demo


def test_demo_trains_evaluates_and_writes_its_report(tiny_model_dir, tmp_path, capsys):
    overrides = {"model_name_or_path": tiny_model_dir, "max_steps": 1, "max_length": 64, "max_prompt_length": 32,
                 "per_device_train_batch_size": 2}
    numbers = run_demo(str(tmp_path / "demo"), eval_prompts=2, max_new_tokens=4, overrides=overrides)
    assert numbers["num_prompts"] == 2 and numbers["samples_per_prompt"] == 2
    assert numbers["wins"] + numbers["ties"] + numbers["losses"] == 4
    assert numbers["settings"]["temperature"] == 0.7
    saved = json.loads((tmp_path / "demo" / "eval.json").read_text())
    assert saved["mean_difference"] == numbers["mean_difference"]
    assert (tmp_path / "demo" / "model" / "config.json").exists()
    out = capsys.readouterr().out
    assert "2 prompts × 2 samples" in out and "reward difference (policy − reference)" in out
