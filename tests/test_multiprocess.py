"""Two CPU processes (torchrun, gloo) train like one with the same global batch; only process 0 writes the run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

# Trains with unialign.train(config) and writes <report_dir>/rank<R>.json: the files this process wrote under the
# run folder (Python opens for writing, mkdir/rename/remove, torch.save and transformers' safetensors writes), the
# dataset rows whose reference log-probs it computed, and per training batch its rows and their reference log-probs.
DRIVER = """
import json, os, sys
import torch
torch.set_num_threads(1)
import transformers.modeling_utils
import unialign
from unialign.trainer import UnialignTrainer

config, report_dir = json.loads(sys.argv[1]), sys.argv[2]
rank = int(os.environ.get("RANK", "0"))
run_dir = os.path.realpath(config["output_dir"])
writes, computed, batches = [], [], []

def note(path, what=""):
    try:
        path = os.path.realpath(os.fsdecode(path))
    except TypeError:
        return
    if path.startswith(run_dir):
        writes.append(what + os.path.relpath(path, run_dir))

def audit(event, args):
    if event == "open":
        path, mode, flags = args
        if isinstance(mode, str):
            writing = any(c in mode for c in "wax+")
        else:
            writing = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            note(path)
    elif event == "os.rename":  # also os.replace; the destination is the file that appears
        note(args[1], event + " ")
    elif event in ("os.remove", "os.mkdir", "os.rmdir", "os.truncate", "shutil.rmtree"):
        note(args[0], event + " ")

def recording(save):
    def wrapper(obj, path, *args, **kwargs):
        if isinstance(path, (str, os.PathLike)):
            note(path)
        return save(obj, path, *args, **kwargs)
    return wrapper

sys.addaudithook(audit)
torch.save = recording(torch.save)
transformers.modeling_utils.safe_save_file = recording(transformers.modeling_utils.safe_save_file)
reference_logps, compute_loss = UnialignTrainer.reference_logps, UnialignTrainer.compute_loss

def record_reference(self, batch):
    computed.extend(batch.row_index.tolist())
    return reference_logps(self, batch)

def record_batch(self, model, inputs, *args, **kwargs):
    if model.training:
        batches.append({"rows": inputs.row_index.tolist(), "ref_logps": inputs.ref_logps.tolist()})
    return compute_loss(self, model, inputs, *args, **kwargs)

UnialignTrainer.reference_logps, UnialignTrainer.compute_loss = record_reference, record_batch
unialign.train(config)
with open(os.path.join(report_dir, f"rank{rank}.json"), "w") as handle:
    json.dump({"writes": writes, "computed": computed, "batches": batches}, handle)
"""


def _config(tiny_model_dir, data_file, output_dir, per_device_batch):
    return dict(
        model_name_or_path=tiny_model_dir,
        dataset=str(data_file),
        loss_type="dpo",
        output_dir=str(output_dir),
        max_steps=4,  # two epochs of 8 rows at a global batch of 4
        per_device_train_batch_size=per_device_batch,
        per_device_eval_batch_size=2,  # the precompute pass: two batches per process, four in one process
        learning_rate=1e-2,
        report_to="none",
        disable_tqdm=True,
        max_length=64,
        max_prompt_length=48,
        seed=0,
        precompute_ref_log_probs=True,
        save_strategy="steps",
        save_steps=2,
    )


def _launch(command: list[str], config: dict, report_dir: Path) -> None:
    report_dir.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*command, "-c", DRIVER, json.dumps(config), str(report_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def _losses(output_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if "loss" in line]


def test_two_processes_match_one_and_only_process_zero_writes(tiny_model_dir, tmp_path, pairwise_rows):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    data_file = tmp_path / "pairs.jsonl"
    data_file.write_text("\n".join(json.dumps(r) for r in pairwise_rows))
    one, two = tmp_path / "one", tmp_path / "two"
    _launch([sys.executable], _config(tiny_model_dir, data_file, one, 4), tmp_path / "report1")
    port = str(29500 + os.getpid() % 1000)
    launcher = [torchrun, "--nproc_per_node", "2", "--master_port", port, "--no-python", sys.executable]
    _launch(launcher, _config(tiny_model_dir, data_file, two, 2), tmp_path / "report2")
    single = json.loads((tmp_path / "report1" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "report2" / f"rank{r}.json").read_text()) for r in (0, 1)]

    # Same global batches: process 0 and 1 together see the rows the single process sees, step by step.
    assert [sorted(a["rows"] + b["rows"]) for a, b in zip(*(r["batches"] for r in ranks))] == [
        sorted(b["rows"]) for b in single["batches"]
    ]
    # The loss curve agrees to float32 round-off. Measured: identical losses (difference 0.0) and weights within
    # 2.4e-7 after 4 steps; the gradients differ only in summation order (mean of two 2-row means vs one 4-row
    # mean, ~1e-7 relative). 1e-5 allows for that drifting over the steps while staying far below the ~0.03-0.2
    # the loss moves per step, so a wrong batch split or a missing gradient all-reduce would fail.
    assert _losses(two) == pytest.approx(_losses(one), abs=1e-5)
    one_weights = load_file(one / "model" / "model.safetensors")
    two_weights = load_file(two / "model" / "model.safetensors")
    for name in one_weights:
        torch.testing.assert_close(two_weights[name], one_weights[name], atol=1e-5, rtol=0)

    # Reference log-probs: each row computed exactly once across the processes, and every process trains with the
    # single-process values of the rows it gets.
    assert sorted(single["computed"]) == list(range(8))
    assert sorted(ranks[0]["computed"] + ranks[1]["computed"]) == list(range(8))
    assert not set(ranks[0]["computed"]) & set(ranks[1]["computed"])
    expected = {row: ref for b in single["batches"] for row, ref in zip(b["rows"], b["ref_logps"])}
    for rank in ranks:
        for batch in rank["batches"]:
            for row, ref in zip(batch["rows"], batch["ref_logps"]):
                assert ref == pytest.approx(expected[row], abs=1e-5)

    # Process 0 writes the run folder; process 1 writes only its own RNG state into each checkpoint.
    written = set(ranks[0]["writes"])
    for name in ("config.json", "data_report.txt", "metrics.jsonl", "ref_logps.safetensors",
                 ".model.partial/model.safetensors"):
        assert any(w.endswith(name) and "checkpoint" not in w for w in written), name
    assert "os.rename model" in written  # the final model is written aside, then renamed into place
    assert any(w.endswith("checkpoint-2/unialign_checkpoint.json") for w in written)
    others = sorted(set(ranks[1]["writes"]))
    assert others == [
        "checkpoint-2/rng_state_1.pth",
        "checkpoint-4/rng_state_1.pth",
        "os.mkdir checkpoint-2",
        "os.mkdir checkpoint-4",
    ]
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())


def test_torchrun_on_cpu_asks_accelerate_for_cpu_processes(monkeypatch):
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    from unialign.pipeline import prefer_cpu_processes

    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    prefer_cpu_processes()
    assert "ACCELERATE_USE_CPU" not in os.environ  # one process: nothing to set up
    monkeypatch.setenv("WORLD_SIZE", "2")
    try:
        prefer_cpu_processes()
        assert os.environ["ACCELERATE_USE_CPU"] == "true"
    finally:
        os.environ.pop("ACCELERATE_USE_CPU", None)


def test_a_config_built_for_one_process_is_refused_under_several(monkeypatch, tmp_path):
    import unialign
    from unialign.config import load_config

    cfg = load_config(None, {"dataset": "pairs.jsonl", "output_dir": str(tmp_path / "run"), "report_to": "none"})
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="2 processes were launched, but this config sets up not_parallel training"):
        unialign.train(cfg)
    assert not (tmp_path / "run").exists()
