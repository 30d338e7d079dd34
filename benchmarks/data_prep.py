"""Data preparation at scale: unialign's prepare_data against TRL's DPOTrainer preprocessing.

Writes ``--rows`` synthetic conversational preference pairs (a one- or two-turn prompt, assistant
chosen/rejected messages, about 100-300 tokens per row with SmolLM2's chat template; fixed seed) to a
jsonl file, then times, each in a fresh process and at each ``--num-proc``:

* unialign: ``prepare_data`` for DPO from the jsonl file, with an empty cache (cold) and again on the
  cache the cold run wrote (cached);
* TRL: ``datasets.load_dataset("json")`` of the same file plus ``DPOTrainer._prepare_dataset`` with the
  same tokenizer and ``dataset_num_proc``, cold and cached the same way.

Reported per run: the preparation's wall time (imports and tokenizer loading excluded), the whole
process's wall time, the main process's peak RSS and the largest worker's peak RSS (``ru_maxrss``).
A table is printed and a JSON file written under ``benchmarks/results/``.

    python benchmarks/data_prep.py                      # 100,000 rows, num_proc 1 and 2
    python benchmarks/data_prep.py --rows 5000 --num-proc 1
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import machine_info

HERE = Path(__file__).resolve().parent
TOKENIZER = Path.home() / ".cache" / "unialign" / "smollm2-tokenizer"
MAX_LENGTH = 1024  # above every generated row, so neither library truncates or drops any

WORDS = (
    "the of and to in is that it for on with as was be by this are or at from his have an they which one you had "
    "not but what all were when we there can more if out so up said about other into than its time only could new "
    "them man some these then two first may any like now my such make over our even most me state after also made "
    "many did must before back see through way where get much go well your know should down work year because come "
    "people just say each those take day good how long very little world use still own men last here thought life "
    "great home under another might public while both same country school number water place between always given "
    "system left around small part without city government large every until during point above second program "
    "model data train reward answer question explain simple careful example result number value function learn"
).split()
TOPICS = ("history", "cooking", "physics", "travel", "music", "gardening", "finance", "health", "chess", "python")


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _paragraph(rng: random.Random, low: int, high: int) -> str:
    total, parts = rng.randint(low, high), []
    while total > 0:
        size = min(total, rng.randint(6, 16))
        parts.append(_sentence(rng, size))
        total -= size
    return " ".join(parts)


def synthetic_row(rng: random.Random) -> dict:
    """One conversational pairwise row: a one- or two-turn prompt, assistant chosen and rejected."""
    topic = rng.choice(TOPICS)
    prompt = [{"role": "user", "content": f"About {topic}: " + _paragraph(rng, 8, 40) + " What do you think?"}]
    if rng.random() < 0.4:
        prompt += [
            {"role": "assistant", "content": _paragraph(rng, 8, 30)},
            {"role": "user", "content": _paragraph(rng, 4, 16) + " Can you say more?"},
        ]
    return {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": _paragraph(rng, 15, 70)}],
        "rejected": [{"role": "assistant", "content": _paragraph(rng, 10, 60)}],
    }


def write_rows(path: Path, count: int, seed: int) -> None:
    """``count`` synthetic rows as jsonl (the same file for the same count and seed)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            handle.write(json.dumps(synthetic_row(rng)) + "\n")


# ----------------------------------------------------------------------------- child processes
def _peaks() -> dict:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"peak_rss_mb": round(own, 1), "worker_peak_rss_mb": round(workers, 1)}


def run_unialign(data: str, num_proc: int) -> dict:
    """prepare_data for DPO from the jsonl file (HF_DATASETS_CACHE chooses the cache)."""
    from transformers import AutoTokenizer

    from unialign.config import UnialignConfig
    from unialign.losses.registry import get_method
    from unialign.pipeline import prepare_data

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    cfg = UnialignConfig(loss_type="dpo", output_dir=tempfile.mkdtemp(), report_to=[], max_length=MAX_LENGTH,
                         dataset_num_proc=num_proc)
    start = time.perf_counter()
    prepared = prepare_data(data, cfg, get_method("dpo"), tokenizer)
    seconds = time.perf_counter() - start
    peaks = _peaks()  # before counting tokens, which reads every row once more
    tokens = sum(prepared.examples.example_lengths(packed=True))  # prompt once plus both completions
    return {"prep_s": round(seconds, 2), "rows": len(prepared.examples), "from_cache": prepared.examples.from_cache,
            "tokens": tokens, **peaks}


def run_trl(data: str, num_proc: int, cache: str) -> dict:
    """load_dataset("json") of the same file, then DPOTrainer._prepare_dataset (its whole preprocessing)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER)
    args = DPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], max_length=MAX_LENGTH, bf16=False,
                     dataset_num_proc=num_proc if num_proc > 1 else None)
    trainer = DPOTrainer.__new__(DPOTrainer)  # the preprocessing needs no model; building one would add its memory
    trainer._tokenizer = tokenizer
    start = time.perf_counter()
    dataset = load_dataset("json", data_files=data, split="train", cache_dir=cache)
    prepared = DPOTrainer._prepare_dataset(trainer, dataset, tokenizer, args, "train")
    seconds = time.perf_counter() - start
    peaks = _peaks()
    import pyarrow.compute as pc

    table = prepared.data.table
    tokens = sum(pc.sum(pc.list_value_length(table.column(c))).as_py() for c in ("prompt_ids", "chosen_ids",
                                                                                  "rejected_ids"))
    return {"prep_s": round(seconds, 2), "rows": len(prepared), "from_cache": None, "tokens": tokens, **peaks}


def child(args) -> None:
    if args.phase == "unialign":
        result = run_unialign(args.data, args.num_proc)
    else:
        result = run_trl(args.data, args.num_proc, args.cache)
    print("RESULT " + json.dumps(result), flush=True)


def measure(phase: str, data: Path, num_proc: int, cache: Path) -> dict:
    """One child process; its result plus the process's wall time."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
               [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, __file__, "--phase", phase, "--data", str(data), "--num-proc", str(num_proc),
               "--cache", str(cache)]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        raise RuntimeError(f"{phase} num_proc={num_proc} failed:\n{done.stderr[-4000:]}")
    return {**json.loads(line[len("RESULT "):]), "process_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", default="1,2", help="comma-separated process counts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where data and caches go (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--phase", choices=("unialign", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        args.num_proc = int(args.num_proc)
        child(args)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="data-prep-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / f"pairs-{args.rows}-{args.seed}.jsonl"
    if not data.exists():
        write_rows(data, args.rows, args.seed)
    print(f"{args.rows} rows, {data.stat().st_size / 2**20:.0f} MiB of jsonl at {data}")
    results = []
    try:
        for num_proc in [int(n) for n in args.num_proc.split(",")]:
            for library in ("unialign", "trl"):
                cache = work / f"cache-{library}-{num_proc}"
                shutil.rmtree(cache, ignore_errors=True)
                for run in ("cold", "cached"):
                    result = {"library": library, "num_proc": num_proc, "run": run,
                              **measure(library, data, num_proc, cache)}
                    results.append(result)
                    print(json.dumps(result), flush=True)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("\n| library | num_proc | run | rows | prepare (s) | process (s) | main peak RSS (MiB) "
          "| worker peak RSS (MiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['library']} | {r['num_proc']} | {r['run']} | {r['rows']} | {r['prep_s']} | {r['process_s']} | "
              f"{r['peak_rss_mb']:.0f} | {r['worker_peak_rss_mb']:.0f} |")
    out = HERE / "results" / f"data_prep_{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    # The preparation runs in worker processes (num_proc), not torch threads; the record's thread count is the CPUs.
    machine = machine_info("cpu", os.cpu_count() or 1)
    out.write_text(json.dumps({"rows": args.rows, "seed": args.seed, "max_length": MAX_LENGTH,
                               "machine": machine, "results": results}, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
