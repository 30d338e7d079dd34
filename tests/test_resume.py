"""Resume after a kill: complete checkpoints only, the uninterrupted run's trajectory, cached reference log-probs."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import unialign
from tests.conftest import tiny_dpo_config
from unialign.checkpoints import MARKER, prepare_metrics_file, resolve_resume

# Runs unialign.train(config) and SIGKILLs itself at a chosen checkpoint: KILL_DURING_SAVE=N after checkpoint-N's
# weights are written but before its optimizer state (a kill mid-save), KILL_AFTER_SAVE=N once checkpoint-N is
# complete. Every run goes through this script, so all of them use the same thread count.
DRIVER = """
import json, os, signal, sys
import torch
torch.set_num_threads(1)
from transformers import Trainer
import unialign
from unialign.trainer import UnialignTrainer

after = int(os.environ.get("KILL_AFTER_SAVE", "0"))
during = int(os.environ.get("KILL_DURING_SAVE", "0"))
save_checkpoint = UnialignTrainer._save_checkpoint
save_optimizer = Trainer._save_optimizer_and_scheduler

def save_then_kill(self, model, trial):
    save_checkpoint(self, model, trial)
    if self.state.global_step == after:
        os.kill(os.getpid(), signal.SIGKILL)

def kill_mid_save(self, output_dir):
    if self.state.global_step == during:
        os.kill(os.getpid(), signal.SIGKILL)
    save_optimizer(self, output_dir)

UnialignTrainer._save_checkpoint = save_then_kill
Trainer._save_optimizer_and_scheduler = kill_mid_save
unialign.train(json.loads(sys.argv[1]))
"""


@pytest.fixture
def data_file(tmp_path, pairwise_rows):
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in pairwise_rows))
    return path


def _config(tiny_model_dir, data_file, output_dir, **extra):
    # 4 steps per epoch at batch 2: the run crosses an epoch boundary
    settings = {"max_steps": 6, "per_device_train_batch_size": 2, "save_strategy": "steps", "save_steps": 2}
    return tiny_dpo_config(tiny_model_dir, str(data_file), output_dir, **(settings | extra))


def _run(config: dict, **env) -> int:
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, json.dumps(config)], env=environ, capture_output=True, text=True
    )
    if done.returncode not in (0, -9):
        raise AssertionError(f"training failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.returncode


def _metrics(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_kill_mid_save_then_after_save_resumes_to_the_uninterrupted_weights(tiny_model_dir, data_file, tmp_path):
    plain, killed = tmp_path / "plain", tmp_path / "killed"
    assert _run(_config(tiny_model_dir, data_file, plain)) == 0

    # 1. killed while writing checkpoint-4: its weights are on disk, its optimizer state and marker are not
    assert _run(_config(tiny_model_dir, data_file, killed), KILL_DURING_SAVE="4") == -9
    assert (killed / "checkpoint-4" / "model.safetensors").exists()
    assert not (killed / "checkpoint-4" / MARKER).exists()
    assert (killed / "checkpoint-2" / MARKER).exists()
    assert resolve_resume(killed, True, None) == killed / "checkpoint-2"

    # 2. resume skips the incomplete checkpoint-4, continues from step 2, and is killed right after saving step 4
    assert _run(_config(tiny_model_dir, data_file, killed, resume=True), KILL_AFTER_SAVE="4") == -9
    assert json.loads((killed / "checkpoint-4" / MARKER).read_text())["step"] == 4
    assert (killed / "checkpoint-4" / "optimizer.pt").exists()

    # 3. resume from checkpoint-4 to the end
    assert _run(_config(tiny_model_dir, data_file, killed, resume=True)) == 0

    expected, got = load_file(plain / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    initial = load_file(os.path.join(tiny_model_dir, "model.safetensors"))
    assert not torch.equal(initial["model.norm.weight"], got["model.norm.weight"])  # training did move the weights

    lines = _metrics(killed)
    assert [line["step"] for line in lines if "loss" in line] == [1, 2, 3, 4, 5, 6]
    assert [line["step"] for line in lines if "train_runtime" in line] == [6]
    reference_losses = [line["loss"] for line in _metrics(plain) if "loss" in line]
    assert [line["loss"] for line in lines if "loss" in line] == pytest.approx(reference_losses, abs=1e-6)


def test_resume_without_a_checkpoint_starts_fresh_and_caches_reference_logps(
    tiny_model_dir, data_file, tmp_path, caplog, pairwise_rows
):
    out = tmp_path / "run"
    config = _config(tiny_model_dir, data_file, out, precompute_ref_log_probs=True, max_steps=2, save_steps=1)
    with caplog.at_level(logging.WARNING, logger="unialign"):
        first = unialign.train(config, resume=True)
    assert "holds no complete checkpoint: starting from scratch" in caplog.text
    assert first.trainer.reference_forwards == 1  # 8 rows, one batch of per_device_eval_batch_size=8
    assert (out / "ref_logps.safetensors").exists()
    computed = [e.ref_logps for e in first.trainer.train_dataset]

    second = unialign.train({**config, "max_steps": 3}, resume=True)
    assert second.trainer.reference_forwards == 0  # loaded from ref_logps.safetensors
    assert [e.ref_logps for e in second.trainer.train_dataset] == computed
    assert [line["step"] for line in _metrics(out) if "loss" in line] == [1, 2, 3]

    # Changed data is refused on resume (tests/test_run_dir.py); forced, the cached reference log-probs still are.
    data_file.write_text("\n".join(json.dumps(r) for r in pairwise_rows[:7]))
    with pytest.raises(ValueError, match="holds reference log-probs for 8 train rows, but the train data now has 7"):
        unialign.train({**config, "max_steps": 4}, resume=True, resume_force=True)

    changed = [dict(r, chosen=r["chosen"] + " Truly.") if i == 3 else r for i, r in enumerate(pairwise_rows)]
    data_file.write_text("\n".join(json.dumps(r) for r in changed))
    with pytest.raises(ValueError, match="the train data changed since its reference log-probs were computed"):
        unialign.train({**config, "max_steps": 4}, resume=True, resume_force=True)


def test_explicit_checkpoint_must_be_complete(tmp_path):
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=f"checkpoint-3 has no {MARKER}: its save was interrupted"):
        resolve_resume(tmp_path, False, str(folder))
    with pytest.raises(ValueError, match="is not a folder"):
        resolve_resume(tmp_path, True, str(tmp_path / "checkpoint-9"))
    assert resolve_resume(tmp_path, True, None) is None  # the only checkpoint is incomplete
    assert resolve_resume(tmp_path, False, None) is None


def test_metrics_file_keeps_only_what_the_checkpoint_saw(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "eval_loss": 0.8}]
    lines.append({"step": 3, "loss": 0.7})
    path.write_text("\n".join(json.dumps(line) for line in lines) + '\n{"step": 4, "lo')  # a line cut by the kill
    prepare_metrics_file(path, 2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:3]
    path.write_text(json.dumps({"step": 2, "train_runtime": 1.0}) + "\n")
    prepare_metrics_file(path, 2)  # the earlier run's summary line goes: the resumed run writes its own
    assert path.read_text() == ""
    prepare_metrics_file(path, None)  # a fresh run starts an empty file
    assert not path.exists()
