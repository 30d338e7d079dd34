"""Training curves from a run's ``metrics.jsonl`` and bar charts comparing evaluation reports.

Every figure is drawn with matplotlib's Agg backend, so plotting works without a display. Eval
metrics (``eval_<key>``) are drawn on the same axes as their training counterpart, dashed with
markers; an eval-only key gets its own figure like any other.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)

# Figures with fixed names and the (eval-prefix-free) keys they show.
FIXED_FIGURES: dict[str, tuple[str, ...]] = {
    "loss": ("loss",),
    "rewards": ("rewards/chosen", "rewards/rejected"),
    "margins": ("rewards/margins",),
    "accuracies": ("rewards/accuracies",),
}
# Bookkeeping Trainer logs alongside the metrics; not worth a figure.
SKIPPED_KEYS = {
    "step", "epoch", "total_flos", "runtime", "samples_per_second", "steps_per_second",
    "train_runtime", "train_samples_per_second", "train_steps_per_second", "train_loss",
}
EVAL_PREFIX = "eval_"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Log lines of a ``metrics.jsonl`` file; blank or unreadable lines are skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            rows.append(value)
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the rows where ``key`` holds a finite number; the row index stands in for a missing step."""
    steps, values = [], []
    for index, row in enumerate(rows):
        value = row.get(key)
        if _is_number(value) and math.isfinite(value):
            steps.append(float(row.get("step", index)))
            values.append(float(value))
    return steps, values


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_keys(rows: list[dict[str, Any]]) -> list[str]:
    """Keys with at least one finite numeric value, in first-seen order, bookkeeping keys excluded."""
    seen: dict[str, None] = {}
    for row in rows:
        for key, value in row.items():
            if _is_number(value) and math.isfinite(value) and base_key(key) not in SKIPPED_KEYS:
                seen.setdefault(key, None)
    return list(seen)


def base_key(key: str) -> str:
    """The metric name without the ``eval_`` prefix."""
    return key[len(EVAL_PREFIX):] if key.startswith(EVAL_PREFIX) else key


def group_keys(keys: list[str]) -> dict[str, list[str]]:
    """Figure name → base keys: the fixed figures first, then one per ``/``-prefix or plain key.

    Leftover ``rewards/*`` keys (e.g. rewards/mean) go to ``rewards_other`` so they do not clash
    with the chosen/rejected figure.
    """
    bases = list(dict.fromkeys(base_key(k) for k in keys))
    groups: dict[str, list[str]] = {}
    for name, members in FIXED_FIGURES.items():
        present = [m for m in members if m in bases]
        if present:
            groups[name] = present
    fixed = {m for members in FIXED_FIGURES.values() for m in members}
    for base in bases:
        if base in fixed:
            continue
        name = base.split("/", 1)[0]
        if name in FIXED_FIGURES:
            name += "_other"
        groups.setdefault(name, []).append(base)
    return groups


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw ``<run_dir>/metrics.jsonl`` into PNGs under ``<run_dir>/plots/``; returns the files written.

    Writes loss, rewards (chosen & rejected), margins and accuracies when their keys are logged, and
    one figure per other metric group (``logps``, ``kl``, method terms, …). Absent keys are skipped.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found; is {run_dir} a training run directory?")
    rows = read_metrics(metrics)
    keys = numeric_keys(rows)
    out_dir = run_dir / "plots"
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, bases in group_keys(keys).items():
        path = out_dir / f"{_safe_name(name)}.png"
        _plot_group(rows, [k for k in keys if base_key(k) in bases], name, path)
        written.append(path)
    return written


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "metric"


def _plot_group(rows: list[dict[str, Any]], keys: list[str], title: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    try:
        for key in keys:
            steps, values = series(rows, key)
            if key.startswith(EVAL_PREFIX):
                ax.plot(steps, values, linestyle="--", marker="o", markersize=3, label=key)
            else:
                ax.plot(steps, values, label=key)
        ax.set_xlabel("step")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)


def plot_comparison(reports: dict[str, dict[str, Any]], out_path: str | Path) -> Path:
    """Bar chart of mean reward (policy vs reference) and win/tie/loss rate across runs.

    ``reports`` maps a run name to an evaluation report dict (``EvalReport.to_dict()`` or a read
    ``eval.json``).
    """
    if not reports:
        raise ValueError("plot_comparison needs at least one report")
    names = list(reports)
    x = list(range(len(names)))
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(6.4, 1.6 * len(names) + 3), 4.0))
    try:
        _reward_bars(left, reports, names, x)
        _outcome_bars(right, reports, names, x)
        fig.tight_layout()
        out_path = Path(out_path)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out_path, dpi=100)
    finally:
        plt.close(fig)
    return out_path


def _reward_bars(ax, reports: dict[str, dict], names: list[str], x: list[int]) -> None:
    width = 0.38
    for offset, side in ((-width / 2, "policy"), (width / 2, "reference")):
        means = [reports[n].get(side, {}).get("mean_reward", math.nan) for n in names]
        stds = [reports[n].get(side, {}).get("std_reward", 0.0) for n in names]
        ax.bar([i + offset for i in x], means, width, yerr=stds, capsize=3, label=side)
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_title("mean reward")
    ax.legend(fontsize="small")


def _outcome_bars(ax, reports: dict[str, dict], names: list[str], x: list[int]) -> None:
    bottom = [0.0] * len(names)
    for key, color in (("win_rate", "tab:green"), ("tie_rate", "tab:gray"), ("loss_rate", "tab:red")):
        values = [reports[n].get(key, 0.0) for n in names]
        ax.bar(x, values, 0.6, bottom=bottom, color=color, label=key.removesuffix("_rate"))
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(x, names, rotation=20, ha="right")
    ax.set_ylim(0, 1)
    ax.set_title("vs reference")
    ax.legend(fontsize="small")


def run_plot_cli(args: argparse.Namespace) -> int:
    """Run ``unialign plot`` from parsed arguments; prints the files written and returns 0."""
    for path in plot_run(args.run_dir):
        print(path)
    return 0


__all__ = ["plot_comparison", "plot_run", "run_plot_cli"]
