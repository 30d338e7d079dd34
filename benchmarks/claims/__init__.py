"""The claims sweep: check the papers' claims at small scale with a resumable, cached sweep.

Run ``python -m benchmarks.claims run|status|report SPEC`` from the repository root.

- :mod:`benchmarks.claims.spec` reads the sweep spec (runs, shared budget, eval setting, claims)
  and gives every (run, seed) an id that hashes its resolved settings.
- :mod:`benchmarks.claims.runner` trains and evaluates what is not cached yet.
- :mod:`benchmarks.claims.report` writes the results page from the cached results only.

The sweep of the three papers' claims is ``benchmarks/claims/claims.yaml``.
"""

from __future__ import annotations

import argparse

from benchmarks import add_debug_argument, run_cli
from benchmarks.claims.report import claim_verdict, collect, evaluate_check, write_report
from benchmarks.claims.runner import SweepSummary, execute_job, read_record, run_sweep
from benchmarks.claims.spec import Spec, SpecError, load_spec, planned_runs, run_id, validate_spec


def add_experiment_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``run``, ``report``, ``plan`` and ``status`` subcommands to the sweep's parser."""
    sub = parser.add_subparsers(title="experiment commands")
    run = sub.add_parser("run", help="train and evaluate every run of the spec that is not cached yet",
                         description="Resumable: finished runs are never redone; rerun the same command after "
                         "an interruption to continue.")
    run.add_argument("spec", help="sweep spec YAML, e.g. benchmarks/claims/claims.yaml")
    run.add_argument("--only", nargs="+", default=None, metavar="NAME",
                     help="only these runs (their dependencies are added)")
    run.add_argument("--seeds", nargs="+", type=int, default=None, help="only these seeds")
    run.add_argument("--in-process", action="store_true",
                     help="train in this process instead of one fresh process per run (peak memory is then shared)")
    run.add_argument("--no-report", action="store_true", help="do not rewrite the results page afterwards")
    run.add_argument("--lock", default=None, metavar="FILE",
                     help="hold an exclusive flock on FILE during each run (e.g. /tmp/unialign-cpu.lock on a "
                     "machine shared with timed jobs); released between runs")
    run.set_defaults(func=_run)
    report = sub.add_parser("report", help="write the results page and figures from the cached results")
    report.add_argument("spec")
    report.add_argument("--out", default=None, help="page path (default: the spec's results_page)")
    report.set_defaults(func=_report)
    plan = sub.add_parser("plan", help="price every planned run (CPU seconds) and compare with the spec's budget")
    plan.add_argument("spec")
    plan.set_defaults(func=_plan)
    status = sub.add_parser("status", help="list every run and seed with its state")
    status.add_argument("spec")
    status.set_defaults(func=_status)
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m benchmarks.claims`` parser with its ``run``, ``status`` and ``report`` commands."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.claims",
        description="Run a sweep spec (e.g. benchmarks/claims/claims.yaml), show its status, or write "
        "docs/results.md from the cached results.",
    )
    add_debug_argument(parser)
    return add_experiment_arguments(parser)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.claims``; prints the help without a command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_cli(args.func, args)


def _run(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    for note in validate_spec(spec):
        print(f"note: {note}")
    summary = run_sweep(spec, args.only, args.seeds, isolate=not args.in_process, lock=args.lock)
    if not args.no_report:
        print(f"wrote {write_report(spec)}")
    return 1 if summary.failed else 0


def _report(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    print(f"wrote {write_report(spec, args.out)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from benchmarks.claims.plan import plan, render_plan

    spec = load_spec(args.spec)
    rows = plan(spec)
    print(render_plan(spec, rows))
    budget = float(spec.plan.get("cpu_hours", 8)) * 3600
    return 0 if sum(r.train_seconds + r.eval_seconds for r in rows) <= budget else 1


def _status(args: argparse.Namespace) -> int:
    spec = load_spec(args.spec)
    for note in validate_spec(spec):
        print(f"note: {note}")
    counts: dict[str, int] = {}
    total_seconds = 0.0
    for name, seed in planned_runs(spec):
        record = read_record(spec, name, seed)
        state = record["status"] if record else "pending"
        counts[state] = counts.get(state, 0) + 1
        extra = ""
        if record and record.get("train"):
            total_seconds += record["train"]["seconds"]
            extra = f"train {record['train']['seconds']:.0f}s"
        if record and record.get("reason"):
            extra = record["reason"]
        print(f"{name:<18} seed {seed}  {run_id(spec, name, seed)}  {state:<11} {extra}")
    states = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
    print(f"{states}; training time so far {total_seconds / 60:.0f} min")
    return 0


__all__ = [
    "Spec",
    "SpecError",
    "SweepSummary",
    "add_experiment_arguments",
    "build_parser",
    "claim_verdict",
    "collect",
    "evaluate_check",
    "execute_job",
    "load_spec",
    "main",
    "planned_runs",
    "read_record",
    "run_id",
    "run_sweep",
    "validate_spec",
    "write_report",
]
