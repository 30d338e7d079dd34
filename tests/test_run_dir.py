"""The run directory: refused folders, one run at a time, full disks, damaged checkpoints, changed settings."""

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import unialign
from tests.conftest import tiny_dpo_config
from unialign import cli, rundir
from unialign.checkpoints import (
    MARKER,
    latest_complete_checkpoint,
    resolve_resume,
    resume_differences,
    verify_checkpoint,
)
from unialign.config import load_config
from unialign.rundir import LOCK_FILE, RUN_MARKER, RunDirError, StorageError, check_output_dir, claim_run_dir

TOPICS = ["cats", "tea", "rain", "maps", "bread", "music", "chess", "snow"]

# Runs `unialign train ...` (the CLI, in a fresh process) and holds its first training step until the file
# argv[1] exists, so the test can start a second run while this one holds the run directory.
HOLDING_DRIVER = """
import os, sys, time
import torch
torch.set_num_threads(1)
from unialign import cli
from unialign.trainer import UnialignTrainer

go, step = sys.argv[1], UnialignTrainer.training_step

def wait_then_step(self, *args, **kwargs):
    while not os.path.exists(go):
        time.sleep(0.05)
    return step(self, *args, **kwargs)

UnialignTrainer.training_step = wait_then_step
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> str:
    rows = [
        {
            "prompt": [{"role": "user", "content": f"Say something about {t}."}],
            "chosen": f"{t.capitalize()} are lovely.",
            "rejected": f"I will not talk about {t}.",
        }
        for t in TOPICS
    ]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def config_file(tiny_model_dir, data_path, tmp_path_factory) -> Path:
    """A YAML config for `unialign train`: DPO, 6 steps of 2 rows, checkpoints every 2 steps, constant LR."""
    values = tiny_dpo_config(
        tiny_model_dir, data_path, None, max_steps=6, per_device_train_batch_size=2,
        lr_scheduler_type="constant",  # a checkpoint's weights then do not depend on max_steps
        beta=0.1, save_strategy="steps", save_steps=2,
    )
    del values["output_dir"]  # each test names its own on the command line
    path = tmp_path_factory.mktemp("config") / "dpo.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def plain_run(config_file, tmp_path_factory) -> Path:
    """An uninterrupted 6-step run: checkpoints 2, 4 and 6, and the final model."""
    out = tmp_path_factory.mktemp("plain") / "run"
    assert cli.main(["train", str(config_file), f"output_dir={out}"]) == 0
    return out


def _train(config_file, out, *overrides) -> int:
    return cli.main(["train", str(config_file), f"output_dir={out}", *overrides])


def _copy_run(plain_run, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(plain_run, out)
    return out


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in "\n".join(err)
    return lines[0]


def _loss_steps(out: Path) -> list[int]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [line["step"] for line in lines if "loss" in line]


# ----------------------------------------------------------------------------- which folders may be used
def test_a_model_folder_is_refused_and_left_byte_identical(tiny_model_dir, config_file, tmp_path, capsys):
    folder = tmp_path / "base-model"
    shutil.copytree(tiny_model_dir, folder)
    before = _snapshot(folder)

    assert _train(config_file, folder) == 3
    line = _error_line(capsys)
    listing = ", ".join(sorted(before)[:5]) + f", … ({len(before)} in all)"
    assert listing.startswith("chat_template.jinja, config.json, generation_config.json, model.safetensors")
    assert line.startswith(f"error: output_dir {folder} already holds a model ({listing}) ")
    assert f"and is not a unialign run folder (it has no {RUN_MARKER}); choose a new or empty folder" in line

    assert _train(config_file, folder, "overwrite_output_dir=true") == 3  # config.json would be overwritten
    assert _error_line(capsys) == (
        f"error: output_dir {folder} holds a model that unialign did not write, and the run would overwrite "
        "config.json; even with overwrite_output_dir: true unialign never replaces files it did not write: choose "
        "a new or empty folder"
    )
    assert _snapshot(folder) == before
    assert sorted(p.name for p in folder.iterdir()) == sorted(before)  # no lock file, no marker either


def test_folder_rules(tmp_path):
    check_output_dir(tmp_path / "new")  # missing
    (tmp_path / "empty").mkdir()
    check_output_dir(tmp_path / "empty")
    (tmp_path / "empty" / LOCK_FILE).write_text("")  # a left-over lock counts as nothing
    check_output_dir(tmp_path / "empty")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match=r"already holds files unialign did not write \(notes.txt\)"):
        check_output_dir(notes)
    check_output_dir(notes, overwrite=True)  # nothing of the user's would be overwritten
    (notes / "metrics.jsonl").write_text("theirs")
    with pytest.raises(RunDirError, match="the run would overwrite metrics.jsonl"):
        check_output_dir(notes, overwrite=True)
    (notes / RUN_MARKER).write_text("{}")  # a unialign run folder: unialign wrote its files
    check_output_dir(notes)
    earlier = tmp_path / "earlier"  # a run folder from before unialign_run.json existed
    earlier.mkdir()
    (earlier / "config.json").write_text(json.dumps({"loss_type": "dpo", "output_dir": str(earlier)}))
    (earlier / "metrics.jsonl").write_text("")
    check_output_dir(earlier)
    (earlier / "model.safetensors").write_text("")  # weights beside it: not a run folder
    with pytest.raises(RunDirError, match="already holds a model"):
        check_output_dir(earlier)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "file")


def test_overwrite_output_dir_writes_beside_foreign_files(config_file, tmp_path):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _train(config_file, out, "overwrite_output_dir=true", "max_steps=1", "save_strategy='no'") == 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert (out / "model" / "model.safetensors").is_file() and (out / RUN_MARKER).is_file()
    assert not (out / rundir.PARTIAL_MODEL_DIR).exists()


# ----------------------------------------------------------------------------- one run at a time
def test_a_second_run_on_a_held_folder_stops_naming_the_first(config_file, tmp_path, capsys):
    out, go = tmp_path / "shared", tmp_path / "go"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-c", HOLDING_DRIVER, str(go), "train", str(config_file), f"output_dir={out}",
         "max_steps=2", "save_strategy='no'", "beta=0.1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:  # until the first run holds the folder
            try:
                if json.loads((out / LOCK_FILE).read_text())["pid"] == first.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.1)

        assert _train(config_file, out, "max_steps=2", "save_strategy='no'", "beta=0.5") == 3
        line = _error_line(capsys)
        assert line.startswith(
            f"error: output_dir {out} is in use by another unialign run (pid {first.pid} on {socket.gethostname()}, "
            "started "
        )
        assert line.endswith("); wait for it to finish or choose another output_dir")
    finally:
        go.write_text("")
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-3000:]
    assert f"model saved to {out / 'model'}" in stdout
    assert _loss_steps(out) == [1, 2]
    assert json.loads((out / "config.json").read_text())["beta"] == 0.1  # the first run's, untouched by the second
    assert (out / "model" / "model.safetensors").is_file()
    with claim_run_dir(out):  # released when the first run ended
        pass


def test_a_dead_holders_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    (out / RUN_MARKER).write_text("{}")
    with claim_run_dir(out):
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
        other = rundir.RunLock(out)  # a second holder, as another process would be (flock locks per open file)
        with pytest.raises(RunDirError, match=f"is in use by another unialign run \\(pid {os.getpid()} on "):
            other.acquire()
    other.acquire()
    other.release()


def test_a_failed_start_leaves_no_folder_behind(config_file, tmp_path, capsys):
    out = tmp_path / "never"
    assert _train(config_file, out, "dataset=" + str(tmp_path / "missing.jsonl")) == 1
    capsys.readouterr()
    assert not out.exists()


def test_a_model_moved_aside_by_a_killed_save_is_put_back(tmp_path):
    out = tmp_path / "run"
    (out / rundir.PREVIOUS_MODEL_DIR).mkdir(parents=True)
    (out / rundir.PREVIOUS_MODEL_DIR / "model.safetensors").write_text("old")
    (out / rundir.PARTIAL_MODEL_DIR).mkdir()
    (out / rundir.PARTIAL_MODEL_DIR / "tokenizer.json").write_text("half")
    (out / RUN_MARKER).write_text("{}")
    with claim_run_dir(out):
        pass
    assert (out / "model" / "model.safetensors").read_text() == "old"
    assert not (out / rundir.PARTIAL_MODEL_DIR).exists() and not (out / rundir.PREVIOUS_MODEL_DIR).exists()


# ----------------------------------------------------------------------------- full disks
def _enospc_writer(write, should_fail):
    """``write(obj, path, ...)`` that, for the paths ``should_fail`` picks, writes half and fails like a full disk."""

    def writer(obj, path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)) and should_fail(str(path)):
            write(obj, path, *args, **kwargs)
            size = os.path.getsize(path)
            os.truncate(path, size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return write(obj, path, *args, **kwargs)

    return writer


def test_disk_full_during_a_checkpoint(config_file, plain_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    target = out / "checkpoint-4" / "optimizer.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", _enospc_writer(torch.save, lambda p: p == str(target)))
        assert _train(config_file, out) == 4
    assert _error_line(capsys) == (
        f"error: no space left on device: could not write {target} while saving checkpoint checkpoint-4 (step 4); "
        f"the partial checkpoint was removed, and {out / 'checkpoint-2'} (step 2) is the last complete checkpoint: "
        "fix the cause, then resume=true continues"
    )
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert not (out / "model").exists() and not (out / rundir.PARTIAL_MODEL_DIR).exists()

    assert _train(config_file, out, "resume=true") == 0
    _assert_same_weights(_weights(out / "model"), _weights(plain_run / "model"))
    assert _loss_steps(out) == [1, 2, 3, 4, 5, 6]


def test_disk_full_during_the_final_save(config_file, plain_run, tmp_path, monkeypatch, capsys):
    import transformers.modeling_utils

    out = _copy_run(plain_run, tmp_path)
    shutil.rmtree(out / "model")
    partial = out / rundir.PARTIAL_MODEL_DIR
    failing = _enospc_writer(transformers.modeling_utils.safe_save_file, lambda p: p.startswith(str(partial)))
    with monkeypatch.context() as patch:  # checkpoint-6 is the last step: resuming trains nothing, then saves
        patch.setattr(transformers.modeling_utils, "safe_save_file", failing)
        assert _train(config_file, out, "resume=true") == 4
    assert _error_line(capsys) == (
        f"error: no space left on device: could not write {partial / 'model.safetensors'} while saving the final "
        f"model; {out / 'model'} was left as it was, and {out / 'checkpoint-6'} (step 6) is the last complete "
        "checkpoint: fix the cause, then resume=true continues"
    )
    assert not (out / "model").exists() and not partial.exists()

    assert _train(config_file, out, "resume=true") == 0
    _assert_same_weights(_weights(out / "model"), _weights(plain_run / "model"))

    # A model already in place stays, byte for byte, when the next save fails.
    before = _snapshot(out / "model")
    with monkeypatch.context() as patch:
        patch.setattr(transformers.modeling_utils, "safe_save_file", failing)
        assert _train(config_file, out, "resume=true") == 4
    capsys.readouterr()
    assert _snapshot(out / "model") == before and not partial.exists()


def test_write_errors_without_an_errno_count_as_a_full_disk_only_when_it_is(tmp_path, monkeypatch):
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    monkeypatch.setattr(rundir, "free_bytes", lambda where: 4096)
    with pytest.raises(StorageError, match=r"^no space left on device: could not write into .+ while saving x "
                       r"\(RuntimeError: \[enforce fail at inline_container.cc:672\] . unexpected pos 64 vs 0\); s$"):
        with rundir.storage_errors("saving x", tmp_path, "s"):
            raise torch_error
    monkeypatch.setattr(rundir, "free_bytes", lambda where: 10 * 2**30)
    with pytest.raises(RuntimeError, match="enforce fail"):  # space left: some other problem, passed on as it is
        with rundir.storage_errors("saving x", tmp_path, "s"):
            raise torch_error
    with pytest.raises(StorageError, match=r"^permission denied: could not write /r/f while saving x; s$") as caught:
        with rundir.storage_errors("saving x", tmp_path, "s"):
            raise PermissionError(errno.EACCES, "Permission denied", "/r/f")
    assert caught.value.exit_code == 4 and isinstance(caught.value, OSError)


# ----------------------------------------------------------------------------- damaged checkpoints
def test_a_truncated_checkpoint_is_named_and_resume_falls_back(config_file, plain_run, tmp_path, caplog):
    out = _copy_run(plain_run, tmp_path)
    weights = out / "checkpoint-6" / "model.safetensors"
    size = weights.stat().st_size
    os.truncate(weights, size // 2)
    shutil.rmtree(out / "model")
    with caplog.at_level(logging.WARNING, logger="unialign"):
        assert _train(config_file, out, "resume=true") == 0
    assert f"skipping {out / 'checkpoint-6'}: {weights} is {size // 2} bytes but was saved with {size} " \
           "(truncated or overwritten)" in caplog.text
    assert f"resuming from {out / 'checkpoint-4'}, the newest intact checkpoint" in caplog.text
    _assert_same_weights(_weights(out / "model"), _weights(plain_run / "model"))
    assert verify_checkpoint(out / "checkpoint-6") is None  # saved again at step 6
    assert _loss_steps(out) == [1, 2, 3, 4, 5, 6]


def test_corrupt_trainer_state_and_bad_markers_are_named_and_skipped(config_file, plain_run, tmp_path, caplog,
                                                                      capsys):
    out = _copy_run(plain_run, tmp_path)
    state = out / "checkpoint-6" / "trainer_state.json"
    state.write_bytes(b"{" * state.stat().st_size)  # same size, other bytes
    assert _train(config_file, out, f"resume_from_checkpoint={out / 'checkpoint-6'}") == 1
    assert _error_line(capsys) == (
        f"error: resume_from_checkpoint: {out / 'checkpoint-6'} cannot be trusted: {state} does not match the "
        "sha256 recorded when it was saved (corrupted). Pick another checkpoint, or use resume=true to take the "
        "newest intact one"
    )
    marker = out / "checkpoint-4" / MARKER
    marker.write_text(json.dumps({k: v for k, v in json.loads(marker.read_text()).items() if k != "step"}))
    (out / "checkpoint-2" / MARKER).write_text('{"step": 2, "fil')
    with caplog.at_level(logging.WARNING, logger="unialign"):
        assert latest_complete_checkpoint(out) is None
    assert f"skipping {out / 'checkpoint-6'}: {state} does not match the sha256" in caplog.text
    assert f"skipping {out / 'checkpoint-4'}: its {MARKER} records no step, so the save may not have finished" \
           in caplog.text
    assert f"skipping {out / 'checkpoint-2'}: its {MARKER} is unreadable (" in caplog.text
    assert resolve_resume(out, True, None) is None


# ----------------------------------------------------------------------------- changed settings on resume
def test_resume_with_changed_settings_is_refused_unless_forced(config_file, plain_run, tmp_path, capsys, caplog):
    out = _copy_run(plain_run, tmp_path)
    before = _snapshot(out)
    changed = ["resume=true", "max_steps=8", "loss_type=ipo", "beta=0.2", "learning_rate=1e-3", "logging_steps=1",
               "save_steps=4"]  # max_steps may grow; logging and saving may change
    assert _train(config_file, out, *changed) == 1
    assert _error_line(capsys) == (
        f"error: resume: {out / 'checkpoint-6'} was trained with other settings: beta 0.1 → 0.2; learning_rate "
        "0.01 → 0.001; loss_type 'dpo' → 'ipo'. Set resume_force: true to continue from it with the new settings, "
        "or start a new run in another output_dir"
    )
    after = _snapshot(out)
    assert after.pop(LOCK_FILE) != before.pop(LOCK_FILE)  # only the lock names its latest holder
    assert after == before  # metrics.jsonl, config.json, the checkpoints and the model untouched

    with caplog.at_level(logging.WARNING, logger="unialign"):
        assert _train(config_file, out, *changed, "resume_force=true") == 0
    assert f"resume_force: continuing from {out / 'checkpoint-6'} with changed settings: beta 0.1 → 0.2; " \
           "learning_rate 0.01 → 0.001; loss_type 'dpo' → 'ipo'. The steps up to 6 were trained with the old " \
           "settings and metrics.jsonl holds both" in caplog.text
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [(line["step"], line["learning_rate"]) for line in lines] == [(s, 1e-2) for s in range(1, 7)] + [
        (7, 1e-3),
        (8, 1e-3),
    ]  # the new learning rate applies from the checkpoint on
    assert json.loads((out / "config.json").read_text())["loss_type"] == "ipo"


def test_changed_training_data_is_a_difference(config_file, plain_run, tmp_path):
    marker = json.loads((plain_run / "checkpoint-6" / MARKER).read_text())
    cfg = load_config(config_file, {"output_dir": str(tmp_path), "resume": True, "max_steps": 9, "report_to": "all"})
    assert resume_differences(marker, cfg, marker["data_fingerprint"]) == []
    fingerprint = marker["data_fingerprint"]
    assert resume_differences(marker, cfg, "0123") == [f"training data (tokenized rows) {fingerprint} → 0123"]
    shorter = load_config(config_file, {"output_dir": str(tmp_path), "max_steps": 5})
    assert resume_differences(marker, shorter, None) == ["max_steps 6 → 5"]


def test_unialign_train_is_protected_too(config_file, tmp_path):
    folder = tmp_path / "foreign"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    with pytest.raises(RunDirError, match="already holds a model"):
        unialign.train(str(config_file), output_dir=str(folder))
