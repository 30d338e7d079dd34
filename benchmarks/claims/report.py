"""The results page: claim tables with verdicts computed from cached results, figures, commands, caveats.

Claims come from the spec's ``claims`` list; each has checks of these kinds (metric names below):

- ``beats`` (``a``, ``b``, ``metric``, optional ``better: lower``): the 95% paired bootstrap interval of
  A − B (in the better direction) excludes 0 on the right side.
- ``equal`` (``a``, ``b``, ``metric``, ``margin``): the interval lies inside ±margin.
- ``not_worse`` (``a``, ``b``, ``metric``, ``margin``): the interval lies above −margin.
- ``not_falling`` (``a``, ``metric``, ``margin``) / ``falling`` (``a``, ``metric``): one run's per-seed
  change (e.g. ``chosen_change``), its seed-bootstrap interval above −margin / below 0.
- ``decreasing`` (``runs``, ``x``, ``metric``, ``seed``): the metric strictly decreases as setting ``x``
  grows (one seed, a deterministic sweep).
- ``no_reference`` (``a``): the run's method computes no reference log-probs (read from the method registry).

Anything a rule cannot establish is *inconclusive*; see :mod:`benchmarks.claims.stats`. Prompt-level
metrics are compared raw and length-controlled (:func:`benchmarks.claims.stats.length_adjustment`);
a check is reproduced only when both are. Nothing here trains or evaluates: the page is a pure
function of the result records.
"""

from __future__ import annotations

import math
import os
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.claims.runner import DONE, read_record
from benchmarks.claims.spec import Spec, grid_results, selected_point, selection_metric
from benchmarks.claims.stats import (
    INCONCLUSIVE,
    NOT_REPRODUCED,
    NOT_RUN,
    REPRODUCED,
    Interval,
    decide,
    length_adjustment,
    paired_bootstrap,
    pearson,
)

MIXED = "mixed"
MIN_SEEDS = 2  # seeds both sides need before a comparison gets a verdict

METRICS: dict[str, str] = {
    "reward": "held-out judge reward (training signal)",
    "win_rate": "win rate vs the untouched model (judge)",
    "correct": "answer correctness (checkable)",
    "format": "format compliance (checkable)",
    "kl": "KL to the untouched model (nats)",
    "mean_length": "mean completion length (tokens)",
    "eos_rate": "EOS rate (ended on its own)",
    "pair_accuracy": "implicit-reward accuracy on held-out pairs",
    "train_seconds": "training wall time (s)",
    "train_cpu_seconds": "training CPU time (s)",
    "peak_rss_mb": "peak memory, RSS (MiB)",
    "chosen_change": "change of the chosen implicit reward (last − first quarter of steps)",
    "implicit_mean": "mean implicit reward, last quarter of steps",
    "logratio_gap": "chosen − rejected log-ratio gap, last quarter of steps",
    "rm_accuracy": "reward-model accuracy on held-out pairs",
}
# Prompt-level metrics: stored per prompt in each record (``eval.per_prompt``), compared over seeds × prompts.
PER_PROMPT = {"reward": "reward", "win_rate": "win", "correct": "correct", "format": "format"}
INDEPENDENT = ("correct", "format")  # the signals no method trains on

VERDICT_RULES = f"""\
Every verdict on this page is computed by `python -m benchmarks.claims report` from the committed records
with these rules (nothing is typed by hand; `benchmarks/claims/stats.py`):

- **Intervals.** Every difference A − B comes with a 95% paired bootstrap interval over prompts *and* seeds:
  each of 4000 replicates draws the seeds both runs finished and the held-out prompts with replacement (the
  same draws for both arms) and averages A − B over the drawn (seed, prompt) cells; the interval is the
  2.5–97.5 percentile range. Run-level numbers (time, memory) and training-curve changes are resampled over
  seeds only.
- **A beats B** when the interval lies above 0 (for time and memory: lower is better, so B − A).
- **A equals B** when the interval lies inside ±margin; **A is not worse than B** when it lies above −margin.
  Each margin is written on its check in the spec, fixed before the runs.
- **A curve does not fall** when the interval of its change (last quarter of logged steps minus the first)
  lies above −margin; it **falls** when the interval lies below 0.
- **A metric decreases in a setting** when, over a single-seed sweep, it is strictly lower at every larger
  value (a deterministic, structural check: no interval).
- The opposite finding (a "beats" interval below 0, an "equal" interval wholly outside the margin, a
  "not worse" interval below −margin, a "does not fall" interval below −margin) is **not reproduced**.
  Everything else is **inconclusive**: these data cannot tell.
- Prompt-level comparisons are made twice, raw and **length-controlled** (below); a check is reproduced
  (or not reproduced) only when both agree, and inconclusive otherwise.
- A comparison needs at least {MIN_SEEDS} seeds finished by both runs, a sweep every point; otherwise *not run*.
- A claim is **reproduced** when every one of its checks ran and is reproduced, **not reproduced** when
  every check that ran is not reproduced, **mixed** when some are and some are not, **inconclusive**
  otherwise, and **not run** when no check could run.
"""

INDEPENDENCE = """\
The judge reward is the **training signal**: the offline judge made the scores UNA-score and RAO regress
on, ranked the completions that became every pair's chosen and rejected side, and is the reward of the
online methods. Beside it the page reports two held-out signals that no method trains on:

- **Answer correctness** (arithmetic and factual prompts): whether the completion states the known
  answer (the arithmetic answer as its final number, each required fact as whole words), from the
  answers written with the bundled prompts. No training target is this check: the judge folds it into
  one of its five attributes, mixed with relevance, coherence and a verbosity penalty, so a method can
  gain judge reward by style and length without gaining here, and the reverse.
- **Format compliance** (format prompts: "in one sentence", "reply with only a number", "start with
  ..."): whether the completion meets the prompt's machine-checkable constraint, pass or fail. It is
  scored on its own, without the judge's relevance scaling, so it measures instruction following
  rather than the judge's taste.

Both are computed on the {prompts} evaluation prompts (`{source}`) only ({answers} with a checkable answer,
{formats} with a format constraint), which no run trained on and no setting was chosen on.
"""

CAVEATS = """\
- A 135M instruct model, LoRA, one epoch of 40 prompts per method: a test of direction under equal,
  small, tuned budgets, not a replication of the papers' 7B+ benchmark numbers (AlpacaEval, MT-Bench).
- The judge reward is the training signal (see above); read it beside the checkable columns and the
  length-controlled columns.
- {prompts} held-out prompts and {seeds} seeds give wide intervals: *inconclusive* usually means "no difference
  detectable at this size", not "the claim is false".
- Greedy decoding makes the KL column an indicator of drift rather than an unbiased estimate.
- Hyperparameters were chosen on one seed of the validation prompts; that choice is itself noisy.
- Resampling 3 seeds with replacement understates the seed-to-seed variance (the bootstrap variance of a
  mean of n draws is (n − 1)/n of the usual s²/n: two thirds at n = 3), so an interval that barely
  excludes 0 or barely fits the margin is weaker evidence than it looks.
"""


def signal_counts(source: str, limit: int | None = None) -> dict[str, Any]:
    """The number of evaluation prompts (the first ``limit`` of ``source``) and how many each checkable signal fits."""
    from unialign.evaluate import checkable_scores, load_prompts

    prompts = load_prompts(source, limit)
    correct, formatted = checkable_scores(prompts, [""] * len(prompts))
    return {"source": source, "prompts": len(prompts), "answers": sum(v is not None for v in correct),
            "formats": sum(v is not None for v in formatted)}


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
    elif metric == "correct":
        value = ev.get("correct_rate")
    elif metric == "format":
        value = ev.get("format_rate")
    elif metric in ("win_rate", "kl", "mean_length", "eos_rate", "pair_accuracy"):
        value = ev.get(metric)
        if metric == "win_rate" and (ev.get("per_prompt") or {}).get("win"):
            value = statistics.fmean(ev["per_prompt"]["win"])  # ties count half, as in the intervals
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
        """``mean ± std``, ``mean (n=1)``, or ``—`` when there is nothing."""
        if not self.n:
            return "—"
        if self.n == 1:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


@dataclass
class Results:
    """Finished records by run name (over seeds), records that did not finish, and length-controlled cells."""

    spec: Spec
    done: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    other: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    # (run, seed) -> metric -> per-prompt values with the length/EOS effect removed; metric -> coefficients
    adjusted: dict[tuple[str, int], dict[str, list[float | None]]] = field(default_factory=dict)
    coefficients: dict[str, dict[str, float]] = field(default_factory=dict)

    def stat(self, name: str, metric: str, controlled: bool = False) -> Stat:
        """The metric over the finished seeds of run ``name`` (length-controlled when asked and available)."""
        if controlled and metric in PER_PROMPT:
            values = []
            for record in self.done.get(name, []):
                cells = [v for v in self.adjusted.get((name, record["seed"]), {}).get(metric, []) if v is not None]
                if cells:
                    values.append(statistics.fmean(cells))
            return Stat(values)
        values = [record_metric(r, metric) for r in self.done.get(name, [])]
        return Stat([v for v in values if math.isfinite(v)])

    def at_seed(self, name: str, seed: int) -> dict[str, Any] | None:
        """The finished record of ``name`` at ``seed``, if any."""
        return next((r for r in self.done.get(name, []) if r["seed"] == seed), None)

    def status_note(self, name: str) -> str:
        """Why a run has no (or few) finished seeds, from its other records."""
        notes = sorted({f"{r['status']}: {r.get('reason', '')}".strip() for r in self.other.get(name, [])})
        return "; ".join(notes)

    def table(self, name: str, metric: str, seeds: list[int], controlled: bool = False
              ) -> tuple[np.ndarray, list[str]] | None:
        """(seeds × prompts) per-prompt values of ``metric`` for ``name`` at ``seeds``, with the prompt keys;
        prompts where the metric does not apply (no checkable answer) are left out. None when missing."""
        rows, keys = [], None
        for seed in seeds:
            record = self.at_seed(name, seed)
            per_prompt = ((record or {}).get("eval") or {}).get("per_prompt")
            if not per_prompt:
                return None
            values = (self.adjusted.get((name, seed), {}).get(metric) if controlled
                      else per_prompt.get(PER_PROMPT[metric]))
            if values is None:
                return None
            these = per_prompt["prompt_key"]
            if keys is not None and these != keys:
                return None
            keys = these
            rows.append(values)
        if not rows:
            return None
        keep = [j for j in range(len(keys)) if all(row[j] is not None for row in rows)]
        return np.array([[row[j] for j in keep] for row in rows], dtype=float), [keys[j] for j in keep]


def final_runs(spec: Spec) -> list[str]:
    """The spec's runs that are not grid points (the ones the claims and tables are about)."""
    return [n for n, e in spec.runs.items() if e.grid_point is None]


def collect(spec: Spec) -> Results:
    """Read every record of the spec's runs under their current settings; fit the length control."""
    results = Results(spec)
    for name, entry in spec.runs.items():
        for seed in entry.seeds:
            record = read_record(spec, name, seed)
            if record is None:
                continue
            bucket = results.done if record.get("status") == DONE else results.other
            bucket.setdefault(name, []).append(record)
    _fit_length_control(results)
    return results


def _fit_length_control(results: Results) -> None:
    """Fit :func:`length_adjustment` for every prompt-level metric over the final runs' (seed, prompt) cells."""
    cells = []
    for name in final_runs(results.spec):
        for record in results.done.get(name, []):
            per_prompt = (record.get("eval") or {}).get("per_prompt")
            if per_prompt:
                cells.append((name, record["seed"], per_prompt))
    for metric, key in PER_PROMPT.items():
        where, values, lengths, ended, runs, prompts = [], [], [], [], [], []
        for name, seed, per_prompt in cells:
            for j, value in enumerate(per_prompt.get(key) or []):
                if value is None:
                    continue
                where.append((name, seed, j))
                values.append(float(value))
                lengths.append(per_prompt["length"][j])
                ended.append(per_prompt["ended"][j])
                runs.append(name)
                prompts.append(per_prompt["prompt_key"][j])
        if len(set(runs)) < 2:
            continue
        adjusted, coef = length_adjustment(np.array(values), np.array(lengths), np.array(ended), np.array(runs),
                                           np.array(prompts))
        results.coefficients[metric] = coef
        for (name, seed, j), value in zip(where, adjusted.tolist()):
            slot = results.adjusted.setdefault((name, seed), {})
            if metric not in slot:
                size = len(next(p for n, s, p in cells if (n, s) == (name, seed))["prompt_key"])
                slot[metric] = [None] * size
            slot[metric][j] = value


# ----------------------------------------------------------------------------- checks and claims
@dataclass
class CheckResult:
    """A check's verdict and the numbers behind it (raw and, for prompt-level metrics, length-controlled)."""

    text: str
    verdict: str
    detail: str
    raw: Interval | None = None
    controlled: Interval | None = None
    raw_verdict: str = ""
    controlled_verdict: str = ""
    check: dict[str, Any] = field(default_factory=dict)


def _label(results: Results, name: str) -> str:
    entry = results.spec.runs.get(name)
    return entry.label if entry else name


def evaluate_check(results: Results, check: dict[str, Any], metric: str | None = None) -> CheckResult:
    """Apply one check's rule (module docstring) to the results; ``metric`` overrides the check's."""
    kind = check.get("kind")
    metric = metric or check.get("metric", "reward")
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


def _seeds_of(results: Results, name: str) -> list[int]:
    return sorted(r["seed"] for r in results.done.get(name, []))


def _missing(results: Results, names: list[str]) -> str:
    parts = []
    for name in names:
        n = len(results.done.get(name, []))
        note = results.status_note(name)
        parts.append(f"{_label(results, name)} has {n} seed(s)" + (f" ({note})" if note else ""))
    return "; ".join(parts)


def _combine(raw: str, controlled: str | None) -> str:
    if controlled is None or raw == controlled:
        return raw
    return INCONCLUSIVE


def _pairwise_check(results: Results, check: dict[str, Any], kind: str, metric: str) -> CheckResult:
    a, b = check["a"], check["b"]
    lower = check.get("better") == "lower"
    margin = check.get("margin")
    relation = {"beats": "beats", "equal": "equals", "not_worse": "is not worse than"}[kind]
    what = f"{METRICS[metric]}, lower is better" if lower else METRICS[metric]
    text = check.get("text") if metric == check.get("metric", "reward") and check.get("text") else (
        f"{_label(results, a)} {relation} {_label(results, b)} ({what})")
    if margin is not None:
        text += f", margin {margin:g}"
    seeds = sorted(set(_seeds_of(results, a)) & set(_seeds_of(results, b)))
    if len(seeds) < MIN_SEEDS:
        return CheckResult(text, NOT_RUN, _missing(results, [a, b]), check=check)
    digits = DIGITS.get(metric, 3)
    if metric in PER_PROMPT:
        raw_tables = results.table(a, metric, seeds), results.table(b, metric, seeds)
        lc_tables = results.table(a, metric, seeds, True), results.table(b, metric, seeds, True)
        if None in raw_tables or raw_tables[0][1] != raw_tables[1][1] or not raw_tables[0][1]:
            return CheckResult(text, NOT_RUN, "no per-prompt values on the same prompts", check=check)
        raw = paired_bootstrap(raw_tables[0][0], raw_tables[1][0])
        controlled = (paired_bootstrap(lc_tables[0][0], lc_tables[1][0])
                      if None not in lc_tables and lc_tables[0][1] == lc_tables[1][1] else None)
    else:
        va = np.array([record_metric(results.at_seed(a, s), metric) for s in seeds])
        vb = np.array([record_metric(results.at_seed(b, s), metric) for s in seeds])
        if not (np.all(np.isfinite(va)) and np.all(np.isfinite(vb))):
            return CheckResult(text, NOT_RUN, f"{METRICS[metric]} was not measured", check=check)
        raw = paired_bootstrap(vb, va) if lower else paired_bootstrap(va, vb)
        controlled = None
    raw_verdict = decide(kind, raw, margin)
    lc_verdict = decide(kind, controlled, margin) if controlled is not None else None
    detail = f"A − B {raw.text(digits)} ({raw.seeds} seeds × {raw.prompts} prompts)"
    if lower:
        detail = f"B − A {raw.text(digits)} ({raw.seeds} seeds)"
    return CheckResult(text, _combine(raw_verdict, lc_verdict), detail, raw, controlled, raw_verdict,
                       lc_verdict or "", check)


def _trend_check(results: Results, check: dict[str, Any], kind: str, metric: str) -> CheckResult:
    a = check["a"]
    subject = TREND_SUBJECTS.get(metric, METRICS[metric])
    text = check.get("text") or f"{_label(results, a)}: {subject} " + (
        f"does not fall (margin {check.get('margin'):g})" if kind == "not_falling" else "falls")
    stat = results.stat(a, metric)
    if stat.n < MIN_SEEDS:
        return CheckResult(text, NOT_RUN, _missing(results, [a]), check=check)
    interval = paired_bootstrap(np.array(stat.values))
    verdict = decide("above" if kind == "not_falling" else "below", interval, check.get("margin"))
    return CheckResult(text, verdict, f"change {interval.text()} ({interval.seeds} seeds)", interval, None,
                       verdict, "", check)


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
            for n in missing) if missing else "a point has no value", check=check)
    ok = all(later[1] < earlier[1] for earlier, later in zip(points, points[1:]))
    detail = ", ".join(f"{setting}={x:g}: {y:.4g}" for x, y, _ in points) + f" (seed {check.get('seed', 0)})"
    verdict = REPRODUCED if ok else NOT_REPRODUCED
    return CheckResult(text, verdict, detail, raw_verdict=verdict, check=check)


def _no_reference_check(results: Results, check: dict[str, Any]) -> CheckResult:
    from unialign.losses.registry import get_method

    a = check["a"]
    loss_type = results.spec.runs[a].config["loss_type"]
    text = check.get("text") or f"{_label(results, a)} needs no reference model"
    try:
        method = get_method(loss_type)
    except ValueError:
        return CheckResult(text, NOT_RUN, f"{loss_type} is not registered", check=check)
    if not results.done.get(a):  # a structural fact, but reported only once the run itself exists
        return CheckResult(text, NOT_RUN, f"{_label(results, a)} has no finished run", check=check)
    verdict = NOT_REPRODUCED if method.needs_reference else REPRODUCED
    return CheckResult(text, verdict, f"method registry: {loss_type} needs_reference={method.needs_reference}",
                       raw_verdict=verdict, check=check)


def claim_verdict(checks: list[CheckResult]) -> str:
    """The claim's verdict from its checks' (rules on the page)."""
    ran = [c.verdict for c in checks if c.verdict != NOT_RUN]
    if not ran:
        return NOT_RUN
    if len(ran) == len(checks) and all(v == REPRODUCED for v in ran):
        return REPRODUCED
    if all(v == NOT_REPRODUCED for v in ran):
        return NOT_REPRODUCED
    if REPRODUCED in ran and NOT_REPRODUCED in ran:
        return MIXED
    return INCONCLUSIVE


def claim_runs(claim: dict[str, Any]) -> list[str]:
    """Runs a claim's table shows: those its checks name, then its ``show`` list."""
    names: list[str] = []
    for check in claim.get("checks", []):
        names += [check[k] for k in ("a", "b") if k in check] + list(check.get("runs", []))
    names += list(claim.get("show", []))
    return list(dict.fromkeys(names))


def independent_checks(results: Results, checks: list[CheckResult]) -> list[CheckResult]:
    """The claim's between-run judge-reward checks repeated on each independent signal (a ``beats`` stays
    ``beats``; an ``equal``/``not_worse`` keeps its margin)."""
    out = []
    for result in checks:
        check = result.check
        if check.get("kind") in ("beats", "equal", "not_worse") and check.get("metric", "reward") == "reward":
            out += [evaluate_check(results, check, metric) for metric in INDEPENDENT]
    return out


# ----------------------------------------------------------------------------- page
DIGITS = {"train_seconds": 0, "train_cpu_seconds": 0, "peak_rss_mb": 0, "mean_length": 1}
TREND_SUBJECTS = {"chosen_change": "the chosen completion's implicit reward"}
TABLE_METRICS = ("reward", "win_rate", "correct", "format", "mean_length", "eos_rate", "kl", "pair_accuracy",
                 "train_cpu_seconds", "peak_rss_mb")
CONTROLLED = ("reward", "win_rate", "correct", "format")


def run_table(results: Results, names: list[str]) -> list[str]:
    """Markdown rows: one per run, every table metric as mean ± std over seeds; LC = length-controlled."""
    header = ["run", "method", "seeds"]
    for metric in TABLE_METRICS:
        header.append(METRICS[metric])
        if metric in CONTROLLED:
            header.append("LC")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        entry = results.spec.runs.get(name)
        if entry is None:
            continue
        done = results.done.get(name, [])
        if not done:
            note = (results.status_note(name) or "not run yet").replace("|", "/")
            lines.append(f"| {entry.label} | {entry.config['loss_type']} | 0/{len(entry.seeds)} | {note} |"
                         + " |" * (len(header) - 4))
            continue
        cells = []
        for metric in TABLE_METRICS:
            cells.append(results.stat(name, metric).text(DIGITS.get(metric, 3)))
            if metric in CONTROLLED:
                cells.append(results.stat(name, metric, controlled=True).text(DIGITS.get(metric, 3)))
        lines.append(f"| {entry.label} | {entry.config['loss_type']} | {len(done)}/{len(entry.seeds)} | "
                     + " | ".join(cells) + " |")
    return lines


def check_table(results: Results, checks: list[CheckResult]) -> list[str]:
    """The checks of one claim: verdict, raw and length-controlled intervals and verdicts."""
    lines = ["| check | verdict | raw: difference [95% CI] | raw verdict | length-controlled [95% CI] | LC verdict |",
             "|---|---|---|---|---|---|"]
    for c in checks:
        digits = DIGITS.get(c.check.get("metric", "reward"), 3)
        lc = c.controlled.text(digits) if c.controlled is not None else "—"
        lines.append(f"| {c.text} | **{c.verdict}** | {c.detail} | {c.raw_verdict or '—'} | {lc} | "
                     f"{c.controlled_verdict or '—'} |")
    return lines


def reference_line(results: Results) -> list[str]:
    """The untouched model's length and EOS rate at the eval budget (does the budget fit its completions?)."""
    for name in final_runs(results.spec):
        for record in results.done.get(name, []):
            ref = (record.get("eval") or {}).get("reference_per_prompt")
            if ref and ref.get("length"):
                n = len(ref["length"])
                return [f"At this budget the untouched model's greedy completions on the {n} eval prompts are "
                        f"{statistics.fmean(ref['length']):.1f} tokens long on average and "
                        f"{100 * statistics.fmean(ref['ended']):.0f}% of them end on their own (the rest are cut at "
                        f"{results.spec.eval['max_new_tokens']} tokens); judge reward "
                        f"{statistics.fmean(ref['reward']):.3f}, answer correctness "
                        + _share(ref.get("correct")) + ", format compliance " + _share(ref.get("format")) + "."]
    return ["(No finished eval-split run yet: the untouched model's length and EOS rate at this budget are not known.)"]


def _share(values: list | None) -> str:
    kept = [v for v in values or [] if v is not None]
    return f"{statistics.fmean(kept):.3f}" if kept else "—"


def selection_section(results: Results) -> list[str]:
    """The grid of every searched entry: each point's validation score, and the chosen setting."""
    spec = results.spec
    grids = [n for n, e in spec.runs.items() if e.grid]
    if not grids:
        return []
    metric = selection_metric(spec)
    lines = ["## Selected hyperparameters", "",
             f"Each grid point trains once (seed {spec.selection.get('seed', 0)}) and is scored on the validation "
             f"prompts (`{(spec.selection.get('eval') or {}).get('prompts', spec.eval['prompts'])}`) by `{metric}`; "
             "the best point then runs every seed on the eval prompts. Entries that take another's choice: "
             + (", ".join(f"{spec.runs[n].label} ← {spec.runs[spec.runs[n].select_from].label}"
                          for n, e in spec.runs.items() if e.select_from and not e.grid) or "none") + ".", "",
             "| run | grid points: validation score | selected |", "|---|---|---|"]
    for name in grids:
        scored = grid_results(spec, name)
        cells = "; ".join(", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in p.items())
                          + f": {s:.3f}" if s is not None else
                          ", ".join(f"{k}={v}" for k, v in p.items()) + ": not run" for p, s in scored)
        choice = selected_point(spec, name)
        chosen = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in choice.items()) \
            if choice else "pending"
        lines.append(f"| {spec.runs[name].label} | {cells} | {chosen} |")
    return lines


def length_section(results: Results, claims: list[tuple[dict[str, Any], list[CheckResult]]]) -> list[str]:
    """Length control: the fitted effects, the across-run correlations, and the conclusions that change."""
    names = [n for n in final_runs(results.spec) if any(r.get("eval") for r in results.done.get(n, []))]
    lines = ["## Length control", "",
             "Every prompt-level metric is fitted over all finished (run, seed, prompt) cells of the final runs as "
             "`value = run + prompt + b·length + c·ended` (one intercept per run and per prompt; Dubois et al. "
             "2024, *Length-Controlled AlpacaEval*, arXiv:2404.04475). The length-controlled (LC) value of a cell "
             "is `value − b·(length − mean) − c·(ended − mean)`: what the run would score at the pooled mean "
             "length and EOS rate. Fitted effects:", ""]
    if results.coefficients:
        lines += ["| metric | b (per token) | c (ended) |", "|---|---|---|"]
        lines += [f"| {METRICS[m]} | {c['length']:+.5f} | {c['ended']:+.4f} |" for m, c in results.coefficients.items()]
    else:
        lines.append("(no fit yet: fewer than two finished evaluated runs)")
    lines += ["", f"Correlation across the {len(names)} evaluated final runs (run means over seeds) of each reported "
              "metric with mean completion length and with the EOS rate:", "",
              "| metric | r with length | r with EOS rate | r with length (LC) | r with EOS rate (LC) |",
              "|---|---|---|---|---|"]
    length = [results.stat(n, "mean_length").mean for n in names]
    eos = [results.stat(n, "eos_rate").mean for n in names]
    for metric in ("reward", "win_rate", "correct", "format", "kl", "pair_accuracy"):
        raw = [results.stat(n, metric).mean for n in names]
        cells = [pearson(raw, length), pearson(raw, eos)]
        if metric in CONTROLLED:
            lc = [results.stat(n, metric, controlled=True).mean for n in names]
            cells += [pearson(lc, length), pearson(lc, eos)]
        else:
            cells += [math.nan, math.nan]
        lines.append(f"| {METRICS[metric]} | " + " | ".join("—" if math.isnan(v) else f"{v:+.2f}" for v in cells)
                     + " |")
    lines += ["", "The fit takes out the effect of length and of ending *within* a run (b and c are estimated across "
              "each run's own prompts), not the correlation *across* runs. Where runs that stop short and early owe "
              "much of their raw score to ending (a large c), length control takes that credit back, and the LC "
              "columns can correlate with length more than the raw ones."]
    changed = [c for _, checks in claims for c in checks
               if c.controlled_verdict and c.raw_verdict and c.raw_verdict != c.controlled_verdict]
    lines += ["", "Conclusions that change under length control (such a check counts as inconclusive): "
              + ("; ".join(f"{c.text}: raw {c.raw_verdict}, LC {c.controlled_verdict}" for c in changed)
                 if changed else "none among the checks that ran") + "."]
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
    counts = signal_counts(spec.eval["prompts"], spec.eval.get("limit"))
    lines = [f"# {spec.title}", "",
             "<!-- generated by `python -m benchmarks.claims report`; edit the spec or the generator, "
             "not this file -->", "",
             f"{finished} of {planned} planned runs (grid points included) have finished results "
             f"(spec: `{_rel(spec.path, spec.root)}`, model: `{spec.base_model()}`). Claims whose runs have not "
             "finished show as *not run* or *inconclusive*.", ""]
    if spec.notes:
        lines += [spec.notes.strip(), ""]
    lines += ["## Summary", "", "| claim | verdict | checks run |", "|---|---|---|"]
    for claim, checks in claims:
        ran = sum(c.verdict != NOT_RUN for c in checks)
        lines.append(f"| {claim.get('id', '')}. {claim.get('title', '')} | **{claim_verdict(checks)}** | "
                     f"{ran}/{len(checks)} |")
    lines += ["", "## How verdicts are decided", "", VERDICT_RULES, "## Signals", "", INDEPENDENCE.format(**counts)]
    lines += _budget_section(spec)
    lines += [""] + reference_line(results)
    lines += [""] + selection_section(results)
    for claim, checks in claims:
        lines += ["", f"## Claim {claim.get('id', '')}: {claim.get('title', '')}", ""]
        if claim.get("paper"):
            lines += [f"Paper: {claim['paper']}", ""]
        lines += [f"Verdict: **{claim_verdict(checks)}**", ""] + check_table(results, checks)
        extra = independent_checks(results, checks)
        if extra:
            lines += ["", "The same comparisons on the independent signals (not part of the verdict above):", ""]
            lines += check_table(results, extra)
        lines += [""] + run_table(results, claim_runs(claim))
        for key in claim.get("figures", []):
            if key in figures:
                lines += ["", f"![{key}]({figures[key]})"]
        if claim.get("note"):
            lines += ["", str(claim["note"]).strip()]
    lines += [""] + length_section(results, claims)
    lines += ["", "## All runs", "", "LC = length-controlled (see above). Grid points are in the selection table.",
              ""] + run_table(results, final_runs(spec))
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
              "```bash", f"python -m benchmarks.claims plan {spec_arg}    # the priced plan (CPU-hours)",
              f"python -m benchmarks.claims run {spec_arg}     # the whole sweep (resumable)",
              f"python -m benchmarks.claims status {spec_arg}  # what is done, failed, unavailable",
              f"python -m benchmarks.claims report {spec_arg}  # rewrite this page from the committed records",
              f"python -m benchmarks.claims run {spec_arg} --only dpo --seeds 0   # one run (+ its grid)", "```", "",
              made_at(results), "",
              "## What small scale can and cannot say", "",
              CAVEATS.format(prompts=counts["prompts"], seeds=len(spec.seeds))]
    return "\n".join(lines).rstrip() + "\n"


def made_at(results: Results) -> str:
    """Which source commit made how many of the finished records (older records, made before it was written, say so)."""
    counts: dict[str, int] = {}
    for records in results.done.values():
        for record in records:
            commit = record.get("commit") or "not recorded (made before records named their commit)"
            counts[commit] = counts.get(commit, 0) + 1
    if not counts:
        return "No finished records yet."
    return ("Finished records by the checkout's commit when each was written (a later commit that adds only "
            "records changes no code; `+changes`: uncommitted code): ") + "; ".join(
        f"{commit}: {n}" for commit, n in sorted(counts.items(), key=lambda item: -item[1])) + "."


def _budget_section(spec: Spec) -> list[str]:
    lines = ["## Budget (identical for every run)", "", "| setting | value |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in spec.budget.items()]
    lines += ["", "Evaluation: " + ", ".join(f"{k}={v}" for k, v in spec.eval.items()) + ". Win rate (ties count "
              "half), mean reward and KL are against the untouched model; its generations are made once and cached. "
              "Implicit-reward accuracy (the share of held-out pairs whose chosen side gets the larger β·log-ratio) "
              "is against each run's own starting model; in most of those pairs the rejected side is the longer one "
              "and more often cut off, so the column also rewards a run for making long completions less likely, and "
              "no check uses it. Grid points are evaluated the same "
              "way on the validation prompts: " + ", ".join(f"{k}={v}" for k, v in (spec.selection.get("eval") or
                                                                                   {}).items()) + "."]
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
    evaluated = [n for n in final_runs(results.spec) if any(r.get("eval") for r in results.done.get(n, []))]
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
