"""Scaling curves: the side-by-side bench (:mod:`benchmarks.bench`) at growing length and K, resumable.

``python -m benchmarks.scaling`` runs a fixed list of points on synthetic rows (exact token counts):

- DPO at prompt + completion = 256, 1024, 2048, 4096 tokens (half prompt, half completion), unialign
  against TRL and TRL with unialign's allocator setting (``trl-kept-memory``);
- RAO at K = 2, 4, 8, 16 completions of a 1024-token prompt, with unialign's DPO on the same prompts (its
  cost per completion is RAO's yardstick, as in the bench; TRL has no RAO);
- TPO triples on the same prompts, unialign against TRL;
- the issue's ≈1,000-token pairs (600 + 400, batch 2), unialign against TRL;
- RAO (K = 4), TPO and KTO at 1024, 2048 and 4096 tokens, unialign only;
- with activation checkpointing in both libraries, DPO against TRL and RAO (K = 4) at 1024, 2048 and 4096.

Each point is written to ``<out>/<name>.json`` as soon as it finishes, and a point whose file exists is
skipped, so an interrupted sweep continues where it stopped. Every point holds ``--lock`` (default
``/tmp/unialign-cpu.lock``, the same ``flock`` other timing runs on a shared machine take) while it runs.
Then the growth exponents (least-squares log-log slopes) of useful tokens/s and step peak memory are
fitted over lengths 1024–4096 (and over K for RAO), printed, and the table (Markdown) and figure (PNG)
are written.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import add_debug_argument, run_cli
from benchmarks.bench import BenchConfig, check_cell, num, run_bench
from unialign import jsonfile

DPO_LENGTHS = (256, 1024, 2048, 4096)
RAO_KS = (2, 4, 8, 16)
OTHER_LENGTHS = (1024, 2048, 4096)  # RAO, TPO and KTO against length (half prompt, half completion)
CHECKPOINTED_LENGTHS = (1024, 2048, 4096)  # DPO (both libraries) and RAO under activation checkpointing
SAVED_ATTENTION_LENGTHS = (2048, 4096)  # DPO, checkpointed with each layer's attention output kept
# point-name prefix → the curve's axis (the method's own ``<method>_len`` points are "length")
AXES = {"rao_k": "K", "dpo_ckpt": "length, checkpointed", "rao_ckpt": "length, checkpointed",
        "dpo_savedattn": "length, checkpointed, attention saved"}
FIT_RANGE = (1024, 4096)


@dataclass
class Point:
    """One measurement of the sweep: a bench invocation on synthetic rows."""

    name: str
    method: str
    libraries: list[str]
    prompt_length: int
    completion_length: int
    completions: int = 0  # 0: the method's own number
    x: float = 0.0  # the curve's abscissa: total length for DPO, K for RAO
    overrides: dict[str, Any] = field(default_factory=dict)  # BenchConfig fields for this point only


def default_points(quick: bool = False) -> list[Point]:
    """The sweep, most informative points first (a run cut short still has the 2048-token comparison).

    ``quick`` (the tests) keeps every kind of point at tiny lengths.
    """
    dpo_libraries = ["trl", "trl-kept-memory", "unialign-prefix"]
    lengths = (32, 64) if quick else DPO_LENGTHS
    ks = (2, 4) if quick else RAO_KS
    prompt = 16 if quick else 1024
    completion = 8 if quick else 256
    longest = max(lengths)
    half = 64 if quick else 2048
    # Most informative first, since a shared machine may cut a sweep short: the issue's headline length, the
    # rest of the DPO curve (the longest step is capped at one timed step: TRL's takes minutes on 2 cores),
    # RAO at the K the issue's goal names, the profile, then the other Ks, TPO and the issue's ~1000-token pairs.
    order = [half, *sorted(n for n in lengths if n != half)]
    dpo = [Point(f"dpo_len{n}", "dpo", dpo_libraries, n // 2, n // 2, x=n,
                 overrides={"steps": 1} if n == longest and not quick else {}) for n in order]
    rao = {k: Point(f"rao_k{k}", "rao", ["unialign-prefix"], prompt, completion, k, x=k) for k in ks}
    goal_k = 8 if 8 in rao else ks[-1]
    points = [*dpo, Point(f"dpo_prompt{prompt}", "dpo", ["unialign-prefix"], prompt, completion, x=2), rao[goal_k]]
    # where the time goes at 2048 tokens: torch.profiler over the timed step (which it slows, hence a point apart)
    points.append(Point(f"profile_dpo{half}", "dpo", ["trl", "unialign-prefix"], half // 2, half // 2, x=half,
                        overrides={"profile": True, "steps": 1}))
    points += [rao[k] for k in ks if k != goal_k]
    points.append(Point(f"tpo_prompt{prompt}", "tpo", ["trl", "unialign-prefix"], prompt, completion, x=3))
    # the issue's "≈1,000-token conversational pairs, batch 2, 4 steps": 600-token prompts, 400-token completions
    pair = (24, 16) if quick else (600, 400)
    points.append(Point(f"pairs_dpo{sum(pair)}", "dpo", ["trl", "unialign-prefix"], *pair, x=sum(pair),
                        overrides={"batch_size": 2, "warmup": 1, "steps": 3}))
    # step memory against length for the other layouts (listwise K = 4, triples, KTO's pairs with KL completions):
    # unialign only, since the question is how its memory grows, and TRL has no RAO
    for method in ("rao", "tpo", "kto"):
        points += [Point(f"{method}_len{n}", method, ["unialign-prefix"], n // 2, n // 2, x=n,
                         overrides={"steps": 1} if n == longest and not quick else {})
                   for n in ((32, 64) if quick else OTHER_LENGTHS)]
    # activation checkpointing, as users train at 4k tokens: DPO in both libraries (TRL's 4096-token step outgrows
    # this machine without it) and RAO (K = 4; its 4096-token step does too)
    for method, libraries in (("dpo", ["trl", "unialign-prefix"]), ("rao", ["unialign-prefix"])):
        points += [Point(f"{method}_ckpt{n}", method, libraries, n // 2, n // 2, x=n,
                         overrides={"gradient_checkpointing": True} | (
                             {"steps": 1} if n == longest and not quick else {}))
                   for n in ((32, 64) if quick else CHECKPOINTED_LENGTHS)]
    # the same, keeping each layer's attention output instead of recomputing it
    # (activation_checkpointing_save_attention), where attention is the costliest part of the recompute
    points += [Point(f"dpo_savedattn{n}", "dpo", ["trl", "unialign-prefix"], n // 2, n // 2, x=n,
                     overrides={"gradient_checkpointing": True, "save_attention": True} | (
                         {"steps": 1} if n == longest and not quick else {}))
               for n in ((64,) if quick else SAVED_ATTENTION_LENGTHS)]
    return points


def point_config(point: Point, base: BenchConfig) -> BenchConfig:
    """The bench settings of one point: ``base`` with the point's method, libraries and synthetic lengths."""
    values = asdict(base) | {
        "methods": [point.method], "libraries": list(point.libraries), "synthetic": True, "data": "",
        "prompt_length": point.prompt_length, "completion_length": point.completion_length,
        "completions": point.completions, "max_length": point.prompt_length + point.completion_length,
        "output_dir": "",
    } | point.overrides
    return BenchConfig(**values)


@contextmanager
def held(lock: str):
    """Hold an exclusive ``flock`` on ``lock`` (nothing when empty): what ``flock <file> command`` takes."""
    if not lock:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_points(points: list[Point], base: BenchConfig, out: Path, lock: str = "", run=run_bench,
               log=print) -> dict[str, dict[str, Any]]:
    """Run each point not yet in ``out`` (one ``<name>.json`` each, written as it finishes); every report by name."""
    out.mkdir(parents=True, exist_ok=True)
    reports = {}
    for point in points:
        path = out / f"{point.name}.json"
        if path.exists():
            reports[point.name] = json.loads(path.read_text(encoding="utf-8"))
            log(f"{point.name}: found {path}, skipped")
            continue
        cfg = point_config(point, base)
        asked = time.perf_counter()
        with held(lock):
            start = time.perf_counter()
            report = run(cfg)
            wall = time.perf_counter() - start
        report = {k: v for k, v in report.items() if k != "path"} | {
            "point": asdict(point), "wall_s": wall, "waited_for_lock_s": start - asked}
        path.write_text(jsonfile.dumps(report, indent=1) + "\n", encoding="utf-8")
        reports[point.name] = report
        log(f"{point.name}: {wall:.0f} s (after {start - asked:.0f} s waiting for the lock), wrote {path}")
    return reports


def finished_reports(points: list[Point], out: Path) -> dict[str, dict[str, Any]]:
    """The report of every point in ``points`` that ``out`` holds, by name (whichever run wrote it)."""
    paths = {point.name: out / f"{point.name}.json" for point in points}
    return {name: json.loads(path.read_text(encoding="utf-8")) for name, path in paths.items() if path.exists()}


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x: the ``a`` of ``y ∝ x^a``; None with fewer than two usable points."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({lx for lx, _ in pairs}) < 2:
        return None
    mx = sum(lx for lx, _ in pairs) / len(pairs)
    my = sum(ly for _, ly in pairs) / len(pairs)
    return sum((lx - mx) * (ly - my) for lx, ly in pairs) / sum((lx - mx) ** 2 for lx, _ in pairs)


def curve_rows(reports: dict[str, dict[str, Any]], points: list[Point]) -> list[dict[str, Any]]:
    """Every (point, library) row of the finished reports, with the point's abscissa and lengths attached."""
    rows = []
    for point in points:
        report = reports.get(point.name)
        if report is None:
            continue
        for row in report["rows"]:
            rows.append(row | {"point": point.name, "x": point.x, "prompt_length": point.prompt_length,
                               "completion_length": point.completion_length,
                               "total_length": point.prompt_length + point.completion_length})
    return rows


def exponents(rows: list[dict[str, Any]], fit_range: tuple[float, float] = FIT_RANGE) -> dict[str, float | None]:
    """Growth exponents of useful tokens/s and step peak memory: each method and library vs total length
    (``<method>_len<n>`` points; ``<method>_ckpt<n>`` with activation checkpointing) in ``fit_range``, and RAO
    vs K (every ``rao_k`` point), keyed ``"<method> <library> <quantity> vs <axis>"``."""
    out: dict[str, float | None] = {}
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if "error" in row:
            continue
        axis = "length" if row["point"].startswith(f"{row['method']}_len") else next(
            (name for prefix, name in AXES.items() if row["point"].startswith(prefix)), None)
        if axis:
            groups.setdefault((row["method"], row["library"], axis), []).append(row)
    for (method, library, axis), found in sorted(groups.items()):
        if axis != "K":
            found = [r for r in found if fit_range[0] <= r["x"] <= fit_range[1]]
        xs = [r["x"] for r in found]
        out[f"{method} {library} tokens/s vs {axis}"] = fit_exponent(xs, [r["useful_tokens_per_s"] for r in found])
        out[f"{method} {library} step memory vs {axis}"] = fit_exponent(xs, [r["peak_step_mem_mb"] for r in found])
    return out


def scaling_table(rows: list[dict[str, Any]]) -> str:
    """One Markdown table of every measured (point, library), errors included as the result they are."""
    head = ("| point | method | library | prompt + completion × K | loss@0 | s/step | useful tok/s | s/completion "
            "| step peak MiB | peak RSS MiB | of peak | tok/s × TRL | mem × TRL | × TRL kept-memory | check |")
    lines = [head, "|" + "---|" * 15]

    for r in rows:
        k = r.get("completions_per_step")
        shape = f"{r['prompt_length']} + {r['completion_length']}" + (f" × {k:g}" if k else "")
        if "error" in r:
            lines.append(f"| {r['point']} | {r['method']} | {r['library']} | {shape} | " + " | ".join(["–"] * 10)
                         + f" | not measured: {r['error'].split(' (RuntimeError')[0]} |")
            continue
        check = check_cell(r)
        lines.append(
            f"| {r['point']} | {r['method']} | {r['library']} | {shape} | {r['loss_step0']:.6f} | "
            f"{r['s_per_step']:.1f} | {r['useful_tokens_per_s']:.1f} | {r['s_per_completion']:.2f} | "
            f"{r['peak_step_mem_mb']:.0f} | {r['peak_rss_mb']:.0f} | {num(r.get('mfu'), '.1%')} | "
            f"{num(r.get('speedup_tokens'), '.2f')} | {num(r.get('memory_ratio'), '.2f')} | "
            f"{num(r.get('speedup_tokens_vs_trl_kept_memory'), '.2f')} | {check} |")
    return "\n".join(lines)


def completion_cost_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per completion of each RAO K (and TPO) relative to unialign DPO's on the same prompts."""
    ok = [r for r in rows if "error" not in r and r["library"] == "unialign-prefix"]
    dpo = next((r for r in ok if r["point"].startswith("dpo_prompt")), None)
    if dpo is None:
        return {}
    return {r["point"]: r["s_per_completion"] / dpo["s_per_completion"]
            for r in ok if r["point"].startswith(("rao_k", "tpo_prompt"))}


def draw_figure(rows: list[dict[str, Any]], path: Path) -> Path:
    """Three panels: DPO useful tokens/s and step peak memory vs length per library, RAO vs K (log-log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    ok = [r for r in rows if "error" not in r]
    for prefix, suffix, style in (("dpo_len", "", "-"), ("dpo_ckpt", ", checkpointed", "--")):
        for library in sorted({r["library"] for r in ok if r["point"].startswith(prefix)}):
            found = sorted((r for r in ok if r["point"].startswith(prefix) and r["library"] == library),
                           key=lambda r: r["x"])
            xs = [r["x"] for r in found]
            for ax, key in ((axes[0], "useful_tokens_per_s"), (axes[1], "peak_step_mem_mb")):
                ax.plot(xs, [r[key] for r in found], marker="o", linestyle=style, label=library + suffix)
    rao = sorted((r for r in ok if r["point"].startswith("rao_k")), key=lambda r: r["x"])
    if rao:
        axes[2].plot([r["x"] for r in rao], [r["s_per_completion"] for r in rao], marker="o",
                     label="RAO s/completion")
        axes[2].plot([r["x"] for r in rao], [r["peak_step_mem_mb"] / 1000 for r in rao], marker="s",
                     label="RAO step peak (GB)")
    else:
        axes[2].text(0.5, 0.5, "not measured", ha="center", va="center", transform=axes[2].transAxes)
    dpo = [r for r in ok if r["point"].startswith("dpo_prompt")]
    if dpo:
        axes[2].axhline(dpo[0]["s_per_completion"], color="grey", linestyle="--", label="DPO s/completion")
    titles = ("DPO: useful tokens/s vs length", "DPO: step peak memory (MiB) vs length",
              "RAO vs K (1024-token prompt)")
    for ax, title, xlabel in zip(axes, titles, ("prompt + completion tokens",) * 2 + ("completions per prompt K",)):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_text(rows: list[dict[str, Any]]) -> str:
    """The exponents and completion-cost ratios as printed lines."""
    lines = [f"growth exponent {key}: {'–' if value is None else format(value, '.2f')}"
             for key, value in exponents(rows).items()]
    lines += [f"cost per completion {key} / unialign dpo: {value:.2f}"
              for key, value in completion_cost_ratios(rows).items()]
    return "\n".join(lines)


def measured_at(reports: dict[str, dict[str, Any]]) -> str:
    """Which commit measured which points (records from before commits were written read "not recorded")."""
    by_commit: dict[str, list[str]] = {}
    for name, report in reports.items():
        by_commit.setdefault(report.get("machine", {}).get("commit") or "not recorded", []).append(name)
    return "measured at: " + "; ".join(f"{commit}: {', '.join(names)}" for commit, names in by_commit.items())


def run_scaling_cli(args: argparse.Namespace) -> int:
    """``python -m benchmarks.scaling``: run (or resume) the sweep, then print and write its results."""
    points = default_points(quick=args.quick)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {p.name for p in points}
        if unknown:
            raise ValueError(f"--only: unknown point(s) {sorted(unknown)}; points: {[p.name for p in points]}")
        points = [p for p in points if p.name in wanted]
    base = BenchConfig(model=args.model, batch_size=args.batch_size, warmup=args.warmup, steps=args.steps,
                       memory_steps=args.memory_steps, threads=args.threads, dtype=args.dtype,
                       worker_timeout=args.worker_timeout, profile=args.profile)
    out = Path(args.output_dir)
    run_points(points, base, out, lock=args.lock, log=lambda m: print(m, file=sys.stderr, flush=True))
    # The table, exponents and figure cover every finished point, not only those this call ran (--only).
    every = default_points(quick=args.quick)
    reports = finished_reports(every, out)
    rows = curve_rows(reports, every)
    table = scaling_table(rows)
    text = summary_text(rows) + "\n" + measured_at(reports)
    (out / "scaling_table.md").write_text(table + "\n\n" + text + "\n", encoding="utf-8")
    print(table)
    print(text)
    if args.figure:
        print(f"figure: {draw_figure(rows, Path(args.figure))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m benchmarks.scaling`` options."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaling",
        description="DPO at 256-4096 tokens (unialign vs TRL), RAO at K = 2-16 and TPO on 1024-token prompts, "
        "on synthetic rows; resumable (one JSON per point under --output-dir); prints growth exponents, "
        "writes the Markdown table and the figure.")
    add_debug_argument(parser)
    d = BenchConfig()
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=d.threads)
    parser.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--worker-timeout", type=float, default=1800.0,
                        help="seconds one library may take at one point before it is recorded as not finished")
    parser.add_argument("--profile", action="store_true", help="torch.profiler over the timed steps (slows them)")
    parser.add_argument("--output-dir", default="benchmarks/results/scaling")
    parser.add_argument("--figure", default="docs/figures/scaling.png", help="PNG path ('' for none)")
    parser.add_argument("--lock", default="/tmp/unialign-cpu.lock", help="flock held during each point ('' for none)")
    parser.add_argument("--only", default="", help="comma-separated point names (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny lengths (for tests and dry runs)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.scaling``."""
    return run_cli(run_scaling_cli, build_parser().parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
