"""Per-process peak memory of DPO with a separate reference on the embedded 135M model: ZeRO-3 vs DDP.

    python -m benchmarks.dist_memory [--steps 3] [--out benchmarks/results/dist_memory.json]

Two CPU processes each way, float32, the bundled pairs, 4 rows per process and step: DDP through
``torchrun`` (``use_cpu``), ZeRO-3 through ``accelerate launch --config_file
examples/accelerate/deepspeed_zero3.yaml`` with the CPU engine switch of ``tests/dist/cpu_engines.py``.
Each process reports its peak resident memory over the setup (loading, the engines' wrapping) and,
separately, over the training steps (tests/dist/driver.py resets the kernel's high-water mark at the first
step), and the policy and reference elements it holds after training; the table in docs/distributed.md
comes from this script.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "dist" / "driver.py"


# DeepSpeed keeps gathered weights until more than stage3_max_live_parameters (default 1e9) are live, or until they
# are not reused within stage3_max_reuse_distance (default 1e9) parameters: a 135M model then stays gathered whole
# through the step. These limits make it release each layer after use, as a 7B model's would be by the defaults.
RELEASE = {"stage3_max_live_parameters": 30_000_000, "stage3_max_reuse_distance": 0}


def release_config(folder: Path) -> Path:
    """An accelerate config for ZeRO-3 with a DeepSpeed JSON that sets :data:`RELEASE` (else as the example)."""
    deepspeed = {
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0,
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True, **RELEASE},
    }
    (folder / "zero3_release.json").write_text(json.dumps(deepspeed))
    (folder / "zero3_release.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: DEEPSPEED\ndeepspeed_config:\n"
        f"  deepspeed_config_file: {folder / 'zero3_release.json'}\n  zero3_init_flag: true\n"
        "num_machines: 1\nnum_processes: 2\nmachine_rank: 0\nrdzv_backend: static\nsame_network: true\n"
        "main_training_function: main\nuse_cpu: false\n")
    return folder / "zero3_release.yaml"


def run(mode: str, steps: int, folder: Path) -> list[dict]:
    """Train ``steps`` DPO steps under ``mode`` (``ddp`` or ``zero3``) and return each process's report."""
    output = folder / mode
    config = {
        "model_name_or_path": "smollm2-135m-instruct",
        "dataset": "bundled:pairwise",
        "loss_type": "dpo",
        "output_dir": str(output),
        "max_steps": steps,
        "per_device_train_batch_size": 4,
        "max_length": 256,
        "max_prompt_length": 128,
        "learning_rate": 1e-6,
        "report_to": "none",
        "disable_tqdm": True,
        "save_strategy": "no",
        "seed": 0,
        # The engines compute log-probs from full logits (the chunked head needs the whole LM-head weight); the
        # "ddp" mode uses the default (chunked), "ddp-full" the same full logits as the engines.
        "logprob_impl": "full" if mode != "ddp" else "auto",
    }
    path = folder / f"{mode}.json"
    path.write_text(json.dumps(config))
    Path(str(output) + ".report").mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    if mode.startswith("ddp"):
        env["UNIALIGN_TEST_NO_SWITCH"] = "1"
        command = [shutil.which("torchrun", path=str(bin_dir)), "--nproc_per_node", "2", "--master_port", "29731",
                   "--no-python", sys.executable, str(DRIVER), str(path)]
    else:
        accelerate_config = ROOT / "examples" / "accelerate" / "deepspeed_zero3.yaml"
        if mode == "zero3-release":
            accelerate_config = release_config(folder)
        command = [shutil.which("accelerate", path=str(bin_dir)), "launch", "--config_file",
                   str(accelerate_config), "--num_processes", "2",
                   "--mixed_precision", "no", "--main_process_port", "29732", str(DRIVER), str(path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-4000:]}")
    report = Path(str(output) + ".report")
    return [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    """Run both modes and print (and write) per-process peak memory and the ZeRO-3 / DDP ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--modes", default="ddp,zero3,zero3-release",
                        help="ddp, ddp-full (full logits, as the engines), zero3 (examples/accelerate/"
                             "deepspeed_zero3.yaml), zero3-release (RELEASE set)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dist_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run(mode, args.steps, Path(tmp)) for mode in args.modes.split(",")}
    summary = {"steps": args.steps, "processes": 2, "release_settings": RELEASE, "per_process": results}
    columns = [("peak_rss_mib", "peak RSS, whole run"), ("setup_peak_rss_mib", "peak RSS, setup (load, engine)"),
               ("rss_at_first_step_mib", "RSS at the first step"), ("steps_peak_rss_mib", "peak RSS, steps and save"),
               ("end_rss_mib", "RSS after training"), ("in_use_at_first_step_mib", "heap in use at the first step"),
               ("steps_peak_in_use_mib", "peak heap in use, steps"), ("end_in_use_mib", "heap in use after training")]
    print("| mode | " + " | ".join(f"{title}, process 0 / 1 (MiB)" for _, title in columns)
          + " | policy elements held | reference elements held |")
    print("|---" * (len(columns) + 3) + "|")
    for mode, reports in results.items():
        cells = [" / ".join(f"{r[key]:.0f}" for r in reports) for key, _ in columns]
        print(f"| {mode} | " + " | ".join(cells) + f" | {reports[0]['policy_local_numel']:,} | "
              f"{reports[0]['reference_local_numel']:,} |")
    for base in (b for b in ("ddp", "ddp-full") if b in results):
        for mode in (m for m in results if not m.startswith("ddp")):
            for key, title in columns:
                ratio = max(r[key] for r in results[mode]) / max(r[key] for r in results[base])
                summary.setdefault("ratios", {}).setdefault(f"{mode} / {base}", {})[key] = ratio
                print(f"ratio {mode} / {base}, {title} (max over processes): {ratio:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
