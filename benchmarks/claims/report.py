"""The results page: claim tables with verdicts computed from cached results, figures, commands, caveats.

Claims come from the spec's ``claims`` list; each has checks of these kinds (metric names below):

- ``beats`` (``a``, ``b``, ``metric``, optional ``better: lower``): A's mean beats B's by more than the pooled seed std.
- ``equal`` (``a``, ``b``, ``metric``): the means differ by at most the pooled seed std.
- ``not_worse`` (``a``, ``b``, ``metric``): A is not behind B by more than the pooled seed std.
- ``not_falling`` / ``falling`` (``a``, ``metric``): the mean over seeds is ≥ −std / < −std
  (for a change, e.g. ``chosen_change``).
- ``decreasing`` (``runs``, ``x``, ``metric``, ``seed``): the metric strictly decreases as setting ``x``
  grows (one seed).
- ``no_reference`` (``a``): the run's method computes no reference log-probs (read from the method registry).

Nothing here trains or evaluates: the page is a pure function of the result records.
"""

from __future__ import annotations

import math
import os
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.claims.runner import DONE, read_record
from benchmarks.claims.spec import Spec

REPRODUCED, NOT_REPRODUCED, MIXED, NOT_RUN = "reproduced", "not reproduced", "mixed", "not run"
MIN_SEEDS = 2  # seeds each side needs before a between-run comparison gets a verdict

METRICS: dict[str, str] = {
    "reward": "held-out mean judge reward",
    "win_rate": "win rate vs the untouched model",
    "kl": "KL to the untouched model (nats)",
    "mean_length": "mean completion length (tokens)",
    "eos_rate": "EOS rate",
    "pair_accuracy": "implicit-reward accuracy on held-out pairs",
    "train_seconds": "training time (s)",
    "train_cpu_seconds": "training CPU time (s)",
    "peak_rss_mb": "peak memory, RSS (MiB)",
    "chosen_change": "change of the chosen implicit reward (last − first quarter of steps)",
    "implicit_mean": "mean implicit reward, last quarter of steps",
    "logratio_gap": "chosen − rejected log-ratio gap, last quarter of steps",
    "rm_accuracy": "reward-model accuracy on held-out pairs",
}

VERDICT_RULES = f"""\
Every verdict on this page is computed by `python -m benchmarks.claims report` from the cached results with
these rules (nothing is typed by hand):

- A number is the mean over seeds ± the sample standard deviation over seeds (n = seeds finished).
- **A beats B** when mean(A) − mean(B) > pooled std, where pooled std = √((std_A² + std_B²) / 2);
  for time and memory, lower is better and the difference is taken the other way.
- **A equals B** when |mean(A) − mean(B)| ≤ pooled std. **A is not worse than B** when
  mean(A) − mean(B) ≥ −pooled std.
- **A curve does not fall** when its change (mean of the last quarter of logged steps minus mean of
  the first quarter), averaged over seeds, is ≥ −(its std over seeds); it **falls** when it is below that.
- **A metric decreases in a setting** when, over a single-seed sweep, it is strictly lower at every
  larger value of the setting.
- A comparison between runs needs at least {MIN_SEEDS} finished seeds on each side, a sweep needs every
  point; otherwise the check is *not run*.
- A claim is **reproduced** when every check that could be run is reproduced, **not reproduced** when
  none is, **mixed** otherwise, and **not run** when no check could be run.
"""

CAVEATS = """\
What this scale can say:

- Whether each method, implemented once in unialign, moves a 135M instruct model in the direction
  its paper describes under an identical small budget, on the same prompts and completions.
- Structural claims (UNA-pair is the DPO loss; TPO computes no reference log-probs; RAO's `z0` shifts
  and β scales its targets) and training-dynamics claims (whether the chosen completion's implicit
  reward falls) are visible at any scale and are the most trustworthy rows here.
- Relative cost (time, peak memory) of methods on the same machine.

What it cannot say:

- The papers' benchmark numbers (AlpacaEval, MT-Bench, Open LLM Leaderboard) were measured on 7B+
  models trained for thousands of steps with tuned hyperparameters; a few dozen LoRA steps on a 135M
  model with one shared learning rate is a smoke test of direction, not a replication of size.
- The judge is unialign's offline judge, itself the source of the training scores: a method that
  exploits the judge's preferences wins here without being better for people. Read the reward next
  to the length and EOS columns: a policy that only got shorter can gain judge reward.
- Three seeds give a coarse spread; "not reproduced" often means "no difference detectable at this
  size", not "the claim is false". Differences smaller than the seed spread are reported as ties.
- Greedy decoding makes the KL column an indicator of drift rather than an unbiased estimate.
"""


# ----------------------------------------------------------------------------- per-run numbers
def _last_quarter(points: list[list[float]]) -> float:
    values = [v for _, v in points]
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k if values else math.nan


def curve_change(points: list[list[float]]) -> float:
    """Mean of the last quarter of a curve's values minus the mean of its first quarter (NaN when empty)."""
    values = [v for _, v in points]
    if not values:
        return math.nan
    k = max(1, len(values) // 4)
    return sum(values[-k:]) / k - sum(values[:k]) / k


def record_metric(record: dict[str, Any], metric: str) -> float:
    """One number of a finished run (NaN when the run did not measure it)."""
    ev = record.get("eval") or {}
    train = record.get("train") or {}
    curves = train.get("curves") or {}
    beta = (record.get("effective") or {}).get("beta") or ev.get("beta")
    if metric == "reward":
        value = ev.get("mean_reward")
    elif metric in ("win_rate", "kl", "mean_length", "eos_rate", "pair_accuracy"):
        value = ev.get(metric)
    elif metric == "train_seconds":
        value = train.get("seconds")
    elif metric == "train_cpu_seconds":
        value = train.get("cpu_seconds")
    elif metric == "peak_rss_mb":
        value = train.get("peak_rss_mb")
    elif metric == "chosen_change":
        value = curve_change(curves.get("rewards/chosen", []))
    elif metric == "implicit_mean":
        value = _last_quarter(curves.get("rewards/implicit") or _midpoints(curves))
    elif metric == "logratio_gap":
        value = _last_quarter(curves.get("rewards/margins", [])) / beta if beta else math.nan
    elif metric == "rm_accuracy":
        value = (record.get("rm_eval") or {}).get("accuracy")
    else:
        raise ValueError(f"unknown metric {metric!r}; known: {', '.join(METRICS)}")
    return float(value) if isinstance(value, (int, float)) else math.nan


def _midpoints(curves: dict[str, list[list[float]]]) -> list[list[float]]:
    chosen, rejected = curves.get("rewards/chosen", []), curves.get("rewards/rejected", [])
    return [[s, (c + r) / 2] for (s, c), (_, r) in zip(chosen, rejected)]


@dataclass
class Stat:
    """Mean and sample std of one metric over a run's finished seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        """Number of finite values."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean (NaN when empty)."""
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (NaN below two values)."""
        return statistics.stdev(self.values) if self.n >= 2 else math.nan

    def text(self, digits: int = 3) -> str:
        """``mean ± std (n)``, or ``—`` when there is nothing."""
        if not self.n:
            return "—"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class Results:
    """Finished records by run name (over seeds), and the records of runs that did not finish."""

    spec: Spec
    done: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    other: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def stat(self, name: str, metric: str) -> Stat:
        """The metric over the finished seeds of run ``name``."""
        values = [record_metric(r, metric) for r in self.done.get(name, [])]
        return Stat([v for v in values if math.isfinite(v)])

    def at_seed(self, name: str, seed: int) -> dict[str, Any] | None:
        """The finished record of ``name`` at ``seed``, if any."""
        return next((r for r in self.done.get(name, []) if r["seed"] == seed), None)

    def status_note(self, name: str) -> str:
        """Why a run has no (or few) finished seeds, from its other records."""
        notes = sorted({f"{r['status']}: {r.get('reason', '')}".strip() for r in self.other.get(name, [])})
        return "; ".join(notes)


def collect(spec: Spec) -> Results:
    """Read every record of the spec's runs under their current settings."""
    results = Results(spec)
    for name, entry in spec.runs.items():
        for seed in entry.seeds:
            record = read_record(spec, name, seed)
            if record is None:
                continue
            bucket = results.done if record.get("status") == DONE else results.other
            bucket.setdefault(name, []).append(record)
    return results


# ----------------------------------------------------------------------------- checks and claims
@dataclass
class CheckResult:
    """A check's verdict and the numbers behind it."""

    text: str
    verdict: str
    detail: str


def _label(results: Results, name: str) -> str:
    entry = results.spec.runs.get(name)
    return entry.label if entry else name


def evaluate_check(results: Results, check: dict[str, Any]) -> CheckResult:
    """Apply one check's rule (module docstring) to the results."""
    kind = check.get("kind")
    metric = check.get("metric", "reward")
    if metric not in METRICS:
        raise ValueError(f"check {check}: unknown metric {metric!r}; known: {', '.join(METRICS)}")
    if kind in ("beats", "equal", "not_worse"):
        return _pairwise_check(results, check, kind, metric)
    if kind in ("not_falling", "falling"):
        return _trend_check(results, check, kind, metric)
    if kind == "decreasing":
        return _sweep_check(results, check, metric)
    if kind == "no_reference":
        return _no_reference_check(results, check)
    raise ValueError(f"check {check}: unknown kind {kind!r}; use beats, equal, not_worse, not_falling, falling, "
                     "decreasing or no_reference")


def _missing(results: Results, names: list[str], stats: list[Stat]) -> str:
    short = [f"{_label(results, n)} has {s.n} seed(s)" + (f" ({results.status_note(n)})" if results.status_note(n)
                                                          else "")
             for n, s in zip(names, stats) if s.n < MIN_SEEDS]
    return "; ".join(short)


def _pairwise_check(results: Results, check: dict[str, Any], kind: str, metric: str) -> CheckResult:
    a, b = check["a"], check["b"]
    lower = check.get("better") == "lower"
    relation = {"beats": "beats", "equal": "equals", "not_worse": "is not worse than"}[kind]
    what = f"{METRICS[metric]}, lower is better" if lower else METRICS[metric]
    text = check.get("text") or f"{_label(results, a)} {relation} {_label(results, b)} ({what})"
    sa, sb = results.stat(a, metric), results.stat(b, metric)
    if sa.n < MIN_SEEDS or sb.n < MIN_SEEDS:
        return CheckResult(text, NOT_RUN, _missing(results, [a, b], [sa, sb]))
    diff = (sb.mean - sa.mean) if lower else (sa.mean - sb.mean)
    pooled = math.sqrt((sa.std ** 2 + sb.std ** 2) / 2)
    ok = {"beats": diff > pooled, "equal": abs(diff) <= pooled, "not_worse": diff >= -pooled}[kind]
    digits = DIGITS.get(metric, 3)
    detail = f"{sa.text(digits)} vs {sb.text(digits)}; difference {diff:+.{digits}f}, pooled std {pooled:.{digits}f}"
    return CheckResult(text, REPRODUCED if ok else NOT_REPRODUCED, detail)


def _trend_check(results: Results, check: dict[str, Any], kind: str, metric: str) -> CheckResult:
    a = check["a"]
    subject = TREND_SUBJECTS.get(metric, METRICS[metric])
    text = check.get("text") or f"{_label(results, a)}: {subject} " + (
        "does not fall" if kind == "not_falling" else "falls")
    stat = results.stat(a, metric)
    if stat.n < MIN_SEEDS:
        return CheckResult(text, NOT_RUN, _missing(results, [a], [stat]))
    falls = stat.mean < -stat.std
    ok = falls if kind == "falling" else not falls
    return CheckResult(text, REPRODUCED if ok else NOT_REPRODUCED, f"change {stat.text()}")


def sweep_points(results: Results, check: dict[str, Any], metric: str) -> list[tuple[float, float, str]]:
    """(setting value, metric, run name) at the check's seed for every run of a ``decreasing`` check."""
    points = []
    for name in check["runs"]:
        record = results.at_seed(name, int(check.get("seed", 0)))
        if record is None:
            continue
        x = (record.get("effective") or {}).get(check["x"], record["settings"]["config"].get(check["x"]))
        points.append((float(x), record_metric(record, metric), name))
    return sorted(points)


def _sweep_check(results: Results, check: dict[str, Any], metric: str) -> CheckResult:
    setting = check["x"]
    text = check.get("text") or f"{METRICS[metric]} decreases as {setting} grows"
    points = sweep_points(results, check, metric)
    if len(points) < len(check["runs"]) or any(not math.isfinite(p[1]) for p in points):
        missing = [n for n in check["runs"] if n not in {p[2] for p in points}]
        return CheckResult(text, NOT_RUN, "missing: " + ", ".join(
            f"{_label(results, n)}" + (f" ({results.status_note(n)})" if results.status_note(n) else "")
            for n in missing) if missing else "a point has no value")
    ok = all(later[1] < earlier[1] for earlier, later in zip(points, points[1:]))
    detail = ", ".join(f"{setting}={x:g}: {y:.4g}" for x, y, _ in points) + f" (seed {check.get('seed', 0)})"
    return CheckResult(text, REPRODUCED if ok else NOT_REPRODUCED, detail)


def _no_reference_check(results: Results, check: dict[str, Any]) -> CheckResult:
    from unialign.losses.registry import get_method

    a = check["a"]
    loss_type = results.spec.runs[a].config["loss_type"]
    text = check.get("text") or f"{_label(results, a)} needs no reference model"
    try:
        method = get_method(loss_type)
    except ValueError:
        return CheckResult(text, NOT_RUN, f"{loss_type} is not registered")
    if not results.done.get(a):  # a structural fact, but reported only once the run itself exists
        return CheckResult(text, NOT_RUN, f"{_label(results, a)} has no finished run")
    verdict = NOT_REPRODUCED if method.needs_reference else REPRODUCED
    return CheckResult(text, verdict, f"method registry: {loss_type} needs_reference={method.needs_reference}")


def claim_verdict(checks: list[CheckResult]) -> str:
    """Reproduced if every run check is, not reproduced if none is, mixed otherwise; not run if none ran."""
    ran = [c.verdict for c in checks if c.verdict != NOT_RUN]
    if not ran:
        return NOT_RUN
    if all(v == REPRODUCED for v in ran):
        return REPRODUCED
    if all(v == NOT_REPRODUCED for v in ran):
        return NOT_REPRODUCED
    return MIXED


def claim_runs(claim: dict[str, Any]) -> list[str]:
    """Runs a claim's table shows: those its checks name, then its ``show`` list."""
    names: list[str] = []
    for check in claim.get("checks", []):
        names += [check[k] for k in ("a", "b") if k in check] + list(check.get("runs", []))
    names += list(claim.get("show", []))
    return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------- page
DIGITS = {"train_seconds": 0, "train_cpu_seconds": 0, "peak_rss_mb": 0, "mean_length": 1}
TREND_SUBJECTS = {"chosen_change": "the chosen completion's implicit reward"}
TABLE_METRICS = ("reward", "win_rate", "kl", "mean_length", "eos_rate", "pair_accuracy", "train_seconds",
                 "train_cpu_seconds", "peak_rss_mb")


def run_table(results: Results, names: list[str]) -> list[str]:
    """Markdown rows: one per run with every table metric as mean ± std over seeds."""
    header = ["run", "method", "seeds"] + [METRICS[m] for m in TABLE_METRICS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        entry = results.spec.runs.get(name)
        if entry is None:
            continue
        done = results.done.get(name, [])
        if not done:
            note = results.status_note(name) or "not run yet"
            lines.append(f"| {entry.label} | {entry.config['loss_type']} | 0/{len(entry.seeds)} | "
                         f"{note} |" + " |" * (len(TABLE_METRICS) - 1))
            continue
        cells = [results.stat(name, m).text(DIGITS.get(m, 3)) for m in TABLE_METRICS]
        lines.append(f"| {entry.label} | {entry.config['loss_type']} | {len(done)}/{len(entry.seeds)} | "
                     + " | ".join(cells) + " |")
    return lines


def write_report(spec: Spec, out: Path | None = None, figures_dir: Path | None = None) -> Path:
    """Write the results page (and its figures) from the cached results only; returns the page's path."""
    out = Path(out) if out else spec.results_page
    figures_dir = Path(figures_dir) if figures_dir else spec.figures_dir
    results = collect(spec)
    claims = [(claim, [evaluate_check(results, c) for c in claim.get("checks", [])]) for claim in spec.claims]
    figures = draw_figures(results, figures_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_page(results, claims, {k: _rel(p, out.parent) for k, p in figures.items()}),
                   encoding="utf-8")
    return out


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def render_page(results: Results, claims: list[tuple[dict[str, Any], list[CheckResult]]],
                figures: dict[str, str]) -> str:
    """The markdown of the results page."""
    spec = results.spec
    finished = sum(len(v) for v in results.done.values())
    planned = sum(len(e.seeds) for e in spec.runs.values())
    lines = [f"# {spec.title}", "",
             "<!-- generated by `python -m benchmarks.claims report`; edit the spec or the generator, "
             "not this file -->", "",
             f"{finished} of {planned} planned runs have finished results "
             f"(spec: `{_rel(spec.path, spec.root)}`, model: `{spec.base_model()}`).", ""]
    if spec.notes:
        lines += [spec.notes.strip(), ""]
    lines += ["## Summary", "", "| claim | verdict | checks run |", "|---|---|---|"]
    for claim, checks in claims:
        ran = sum(c.verdict != NOT_RUN for c in checks)
        lines.append(f"| {claim.get('id', '')}. {claim.get('title', '')} | **{claim_verdict(checks)}** | "
                     f"{ran}/{len(checks)} |")
    lines += ["", "## How verdicts are decided", "", VERDICT_RULES]
    lines += _budget_section(spec)
    for claim, checks in claims:
        lines += ["", f"## Claim {claim.get('id', '')}: {claim.get('title', '')}", ""]
        if claim.get("paper"):
            lines += [f"Paper: {claim['paper']}", ""]
        lines += [f"Verdict: **{claim_verdict(checks)}**", "", "| check | verdict | numbers |", "|---|---|---|"]
        lines += [f"| {c.text} | {c.verdict} | {c.detail} |" for c in checks]
        lines += [""] + run_table(results, claim_runs(claim))
        for key in claim.get("figures", []):
            if key in figures:
                lines += ["", f"![{key}]({figures[key]})"]
        if claim.get("note"):
            lines += ["", str(claim["note"]).strip()]
    lines += ["", "## All runs", ""] + run_table(results, list(spec.runs))
    if "reward_vs_kl" in figures:
        lines += ["", f"![judge reward vs KL]({figures['reward_vs_kl']})"]
    rm = [n for n, recs in results.done.items() if any("rm_eval" in r for r in recs)]
    if rm:
        lines += ["", "Reward models (trained by unialign, used to rescore data): " + "; ".join(
            f"{_label(results, n)}: held-out pair accuracy {results.stat(n, 'rm_accuracy').text()}" for n in rm)]
    unfinished = [(n, r) for n, recs in results.other.items() for r in recs]
    if unfinished:
        lines += ["", "### Runs without a finished result", "", "| run | seed | status | why |", "|---|---|---|---|"]
        lines += [f"| {_label(results, n)} | {r['seed']} | {r['status']} | {r.get('reason', '')} |"
                  for n, r in sorted(unfinished, key=lambda item: (item[0], item[1]["seed"]))]
    spec_arg = _rel(spec.path, spec.root)
    lines += ["", "## Reproduce", "", "From the repository root (each command resumes; finished runs are cached):", "",
              "```bash", f"python -m benchmarks.claims run {spec_arg}     # the whole sweep (resumable)",
              f"python -m benchmarks.claims status {spec_arg}  # what is done, failed, unavailable",
              f"python -m benchmarks.claims report {spec_arg}  # rewrite this page from the cached results",
              f"python -m benchmarks.claims run {spec_arg} --only dpo --seeds 0   # one run", "```", "",
              "## What small scale can and cannot say", "", CAVEATS]
    return "\n".join(lines).rstrip() + "\n"


def _budget_section(spec: Spec) -> list[str]:
    lines = ["## Budget (identical for every run)", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in spec.budget.items()]
    lines += ["", "Evaluation: " + ", ".join(f"{k}={v}" for k, v in spec.eval.items()) + ". Win rate, mean reward "
              "and KL are against the untouched model; its generations are made once and cached. Implicit-reward "
              "accuracy is against each run's own starting model."]
    return lines


# ----------------------------------------------------------------------------- figures
FIGURE_FILES = {"reward_vs_kl": "reward_vs_kl.png", "chosen_curves": "chosen_reward_curves.png",
                "sweep": "rao_sweep.png"}

def draw_figures(results: Results, folder: Path) -> dict[str, Path]:
    """Reward-vs-KL scatter, chosen-reward curves and sweep plots; returns the ones drawn, by key."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for name in FIGURE_FILES.values():  # a figure with no data this time must not survive from an earlier report
        (folder / name).unlink(missing_ok=True)
    drawn: dict[str, Path] = {}
    evaluated = [n for n in results.spec.runs if any(r.get("eval") for r in results.done.get(n, []))]
    if evaluated:
        fig, ax = plt.subplots(figsize=(7, 5))
        for i, name in enumerate(evaluated):
            xs = [record_metric(r, "kl") for r in results.done[name]]
            ys = [record_metric(r, "reward") for r in results.done[name]]
            color = plt.cm.tab20(i % 20)
            ax.scatter(xs, ys, s=14, alpha=0.5, color=color)
            ax.scatter([statistics.fmean(xs)], [statistics.fmean(ys)], s=60, color=color, edgecolor="black",
                       label=_label(results, name))
        ref = [r["eval"].get("reference_mean_reward") for recs in results.done.values() for r in recs if r.get("eval")]
        if ref and ref[0] is not None:
            ax.axhline(ref[0], color="gray", linestyle="--", linewidth=1, label="untouched model")
        ax.set_xlabel("KL to the untouched model (nats per completion, greedy)")
        ax.set_ylabel("held-out mean judge reward")
        ax.legend(fontsize=7, ncol=2)
        ax.grid(alpha=0.3)
        drawn["reward_vs_kl"] = _save(fig, folder / FIGURE_FILES["reward_vs_kl"])
    trend = [c for claim in results.spec.claims for c in claim.get("checks", [])
             if c.get("kind") in ("not_falling", "falling")]
    curve_runs = list(dict.fromkeys(c["a"] for c in trend if results.done.get(c["a"])))
    if curve_runs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name in curve_runs:
            steps, mean, low, high = _mean_curve(results.done[name], "rewards/chosen")
            ax.plot(steps, mean, label=_label(results, name))
            ax.fill_between(steps, low, high, alpha=0.2)
        ax.axhline(0, color="gray", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("implicit reward of the chosen completion")
        ax.set_title("chosen implicit reward during training (mean over seeds, band: min–max)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        drawn["chosen_curves"] = _save(fig, folder / FIGURE_FILES["chosen_curves"])
    sweeps = [c for claim in results.spec.claims for c in claim.get("checks", []) if c.get("kind") == "decreasing"]
    sweeps = [c for c in sweeps if sweep_points(results, c, c.get("metric", "reward"))]
    if sweeps:
        fig, axes = plt.subplots(1, len(sweeps), figsize=(4.5 * len(sweeps), 4), squeeze=False)
        for ax, check in zip(axes[0], sweeps):
            metric = check.get("metric", "reward")
            points = sweep_points(results, check, metric)
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o")
            ax.set_xlabel(check["x"])
            ax.set_ylabel(textwrap.fill(METRICS[metric], 32))
            ax.set_title(textwrap.fill(check.get("text", ""), 45), fontsize=9)
            ax.grid(alpha=0.3)
        drawn["sweep"] = _save(fig, folder / FIGURE_FILES["sweep"])
    return drawn


def _mean_curve(records: list[dict[str, Any]], key: str):
    by_step: dict[float, list[float]] = {}
    for record in records:
        for step, value in ((record.get("train") or {}).get("curves") or {}).get(key, []):
            by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (steps, [statistics.fmean(by_step[s]) for s in steps], [min(by_step[s]) for s in steps],
            [max(by_step[s]) for s in steps])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
