"""Completions scored per second by the offline judge on this machine (CPU).

Scores bundled prompts with short answers (about 20 words) and long ones (about 150 words), after
one warm-up call that loads MiniLM. Run: ``python benchmarks/judge_speed.py [--n 512]``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from unialign.rewards.offline_judge import BUNDLED_PROMPTS, OfflineJudge

SHORT = "The answer is simple: it depends on the question, and here it is {i}, which I checked twice."
LONG = ("Here is a careful answer to your request number {i}. " + "First, think about what you need and why. "
        "Then gather what you have, compare the options, and choose the one that fits best. ") * 5


def rate(judge: OfflineJudge, prompts: list[str], template: str, n: int) -> float:
    """Completions per second for n fresh completions (no cache hits on completions)."""
    completions = [template.format(i=i) for i in range(n)]
    batch = [prompts[i % len(prompts)] for i in range(n)]
    start = time.perf_counter()
    judge(batch, completions)
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the embedding forward")
    args = parser.parse_args()
    lines = BUNDLED_PROMPTS.read_text(encoding="utf-8").splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    judge = OfflineJudge(num_threads=args.threads)
    judge(prompts[:2], ["warm up.", "warm up."])
    print(f"{judge.version}, {args.threads} thread(s), torch {torch.__version__}")
    print(f"short completions (~20 words):  {rate(judge, prompts, SHORT, args.n):7.1f} completions/s")
    print(f"long completions (~150 words):  {rate(judge, prompts, LONG, args.n // 4):7.1f} completions/s")


if __name__ == "__main__":
    main()
