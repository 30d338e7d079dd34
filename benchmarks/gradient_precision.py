"""Which side of a gradient gap is float32 rounding: each library's step-0 gradient against a float64 run.

The bench's gradient check (``benchmarks/bench.py::gradient_fingerprint``) compares unialign's step-0
gradients with TRL's. When the gap grows at some shape, this tells rounding from a defect: the same rows
and settings run once more with unialign's plain layout in float64 (both models cast after loading), and
every float32 library's fingerprint is compared with that one, and with each other.

    python -m benchmarks.gradient_precision --prompt-length 600 --completion-length 400

prints one line per pair of runs (``‖a − b‖ / ‖b‖`` over the per-parameter fingerprints).
"""

from __future__ import annotations

import argparse
from contextlib import contextmanager
from itertools import combinations

import benchmarks.bench as bench
from benchmarks.bench import BenchConfig, fingerprint_gap, run_one

EXACT = "unialign, float64"


@contextmanager
def float64_models():
    """Within the block the bench loads its policy and reference as usual, then casts both to float64."""
    load = bench._models

    def cast(cfg, needs_reference):
        policy, reference = load(cfg, needs_reference)
        return policy.double(), None if reference is None else reference.double()

    bench._models = cast
    try:
        yield
    finally:
        bench._models = load


def fingerprints(method: str, libraries: list[str], cfg: BenchConfig) -> dict[str, dict[str, float]]:
    """Step-0 gradient fingerprints of each library in float32, and of unialign's plain layout in float64."""
    prints = {library: run_one(method, library, cfg)["gradient_fingerprint"] for library in libraries}
    with float64_models():
        prints[EXACT] = run_one(method, "unialign", cfg)["gradient_fingerprint"]
    return prints


def gaps(prints: dict[str, dict[str, float]]) -> list[tuple[str, str, float]]:
    """``(a, b, gap of a against b)``: every float32 run against the float64 one, then every float32 pair."""
    float32 = [name for name in prints if name != EXACT]
    rows = [(name, EXACT, fingerprint_gap(prints[name], prints[EXACT])) for name in float32]
    return rows + [(a, b, fingerprint_gap(prints[a], prints[b])) for a, b in combinations(float32, 2)]


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.gradient_precision``: one step of each run, then the gaps."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=BenchConfig.model)
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--libraries", default="trl,unialign,unialign-prefix")
    parser.add_argument("--prompt-length", type=int, required=True)
    parser.add_argument("--completion-length", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    cfg = BenchConfig(model=args.model, methods=[args.method], batch_size=args.batch_size, steps=1, warmup=0,
                      memory_steps=1, threads=args.threads, output_dir="", synthetic=True,
                      prompt_length=args.prompt_length, completion_length=args.completion_length,
                      max_length=args.prompt_length + args.completion_length)
    for a, b, gap in gaps(fingerprints(args.method, [x for x in args.libraries.split(",") if x], cfg)):
        print(f"{a} against {b}: {gap:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
