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
    }
    path = folder / f"{mode}.json"
    path.write_text(json.dumps(config))
    Path(str(output) + ".report").mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    if mode == "ddp":
        env["UNIALIGN_TEST_NO_SWITCH"] = "1"
        command = [shutil.which("torchrun", path=str(bin_dir)), "--nproc_per_node", "2", "--master_port", "29731",
                   "--no-python", sys.executable, str(DRIVER), str(path)]
    else:
        command = [shutil.which("accelerate", path=str(bin_dir)), "launch", "--config_file",
                   str(ROOT / "examples" / "accelerate" / "deepspeed_zero3.yaml"), "--num_processes", "2",
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
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dist_memory.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {mode: run(mode, args.steps, Path(tmp)) for mode in ("ddp", "zero3")}
    peak = {mode: max(r["peak_rss_mib"] for r in reports) for mode, reports in results.items()}
    end = {mode: max(r["end_rss_mib"] for r in reports) for mode, reports in results.items()}
    summary = {
        "steps": args.steps,
        "processes": 2,
        "per_process": results,
        "peak_rss_mib": peak,
        "ratio_zero3_over_ddp": peak["zero3"] / peak["ddp"],
        "end_rss_mib": end,
        "end_ratio_zero3_over_ddp": end["zero3"] / end["ddp"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    columns = [("peak_rss_mib", "peak RSS, whole run"), ("setup_peak_rss_mib", "peak RSS, setup (load, engine)"),
               ("rss_at_first_step_mib", "RSS at the first step"), ("steps_peak_rss_mib", "peak RSS, steps and save"),
               ("end_rss_mib", "RSS after training")]
    print("| mode | " + " | ".join(f"{title}, process 0 / 1 (MiB)" for _, title in columns)
          + " | policy elements held | reference elements held |")
    print("|---" * (len(columns) + 3) + "|")
    for mode, reports in results.items():
        cells = [" / ".join(f"{r[key]:.0f}" for r in reports) for key, _ in columns]
        print(f"| {mode} | " + " | ".join(cells) + f" | {reports[0]['policy_local_numel']:,} | "
              f"{reports[0]['reference_local_numel']:,} |")
    for key, title in columns:
        ratio = max(r[key] for r in results["zero3"]) / max(r[key] for r in results["ddp"])
        summary.setdefault("ratios_zero3_over_ddp", {})[key] = ratio
        print(f"ratio ZeRO-3 / DDP, {title} (max over processes): {ratio:.2f}")
    args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
