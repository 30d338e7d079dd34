"""Statistics of the claims sweep: paired bootstrap intervals and the verdict rules that can say "we don't know".

Every comparison on the results page is a difference of means over (seed, prompt) cells. Its
uncertainty comes from two sources, the choice of prompts and the training seed, so the interval
resamples both at once (a two-way bootstrap): one replicate draws ``S`` seeds with replacement from
the seeds both arms finished and ``P`` prompt indices with replacement from the prompts both arms
were scored on, and averages ``A[s, p] − B[s, p]`` over the drawn cells. The same seeds and the same
prompt indices are used for both arms (paired), so per-prompt difficulty cancels. The interval is the
percentile interval of the replicates (Efron & Tibshirani, *An Introduction to the Bootstrap*, 1993,
ch. 13). Run-level numbers (time, memory) have one cell per seed and are resampled over seeds only.

Verdicts (:func:`decide`):

- ``beats``: the 95% interval of A − B (in the better direction) lies above 0.
- ``equal``: the interval lies inside ``(−margin, +margin)`` (an equivalence test: two one-sided
  tests at 2.5% each, in interval form; Schuirmann 1987).
- ``not_worse``: the interval lies above ``−margin`` (a non-inferiority test).
- A check whose interval shows the opposite (``beats``: the interval is below 0; ``equal``: it lies
  outside the margin; ``not_worse``: it lies below ``−margin``) is *not reproduced*; every other
  outcome is *inconclusive*: the data cannot tell.

The margin of ``equal`` and ``not_worse`` is part of the spec (written before the runs), never
chosen after seeing the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE, NOT_RUN = "reproduced", "not reproduced", "inconclusive", "not run"
LEVEL = 0.95
REPLICATES = 4000


@dataclass(frozen=True)
class Interval:
    """A point estimate with its bootstrap interval, and how many seeds and prompts it rests on."""

    estimate: float
    low: float
    high: float
    seeds: int
    prompts: int

    def text(self, digits: int = 3) -> str:
        """``+0.012 [−0.004, +0.030]``."""
        return f"{self.estimate:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def bootstrap_counts(rng: np.random.Generator, replicates: int, size: int) -> np.ndarray:
    """How often each of ``size`` items is drawn in each replicate of a with-replacement resample."""
    draws = rng.integers(0, size, size=(replicates, size))
    counts = np.zeros((replicates, size))
    np.add.at(counts, (np.arange(replicates)[:, None], draws), 1.0)
    return counts


def paired_bootstrap(a: np.ndarray, b: np.ndarray | None = None, *, replicates: int = REPLICATES,
                     level: float = LEVEL, seed: int = 0) -> Interval:
    """Two-way (seed × prompt) paired bootstrap interval of ``mean(a − b)``; ``b=None`` gives ``mean(a)``.

    ``a`` and ``b`` have shape (seeds, prompts): row ``s`` is one training seed, column ``p`` one
    prompt, the same seed and prompt in both arms. Each replicate draws seeds and prompts with
    replacement and averages the drawn cells; the interval is the ``level`` percentile interval.
    Deterministic for a given ``seed``.

    Raises:
        ValueError: when the shapes differ, or a table is empty or holds a non-finite value.
    """
    a = np.asarray(a, dtype=float)
    if a.ndim == 1:
        a = a[:, None]
    diff = a if b is None else a - _matrix(b, a.shape)
    if diff.ndim != 2 or diff.size == 0:
        raise ValueError(f"paired_bootstrap needs a non-empty (seeds, prompts) table, got shape {diff.shape}")
    if not np.all(np.isfinite(diff)):
        raise ValueError("paired_bootstrap: the table holds NaN or infinite values; drop those cells first")
    seeds, prompts = diff.shape
    rng = np.random.default_rng(seed)
    seed_counts = bootstrap_counts(rng, replicates, seeds)
    prompt_counts = bootstrap_counts(rng, replicates, prompts)
    # mean over drawn cells = Σ_s Σ_p c_s · c_p · D[s, p] / (S · P)
    stats = np.einsum("rs,sp,rp->r", seed_counts, diff, prompt_counts) / (seeds * prompts)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return Interval(float(diff.mean()), float(low), float(high), seeds, prompts)


def _matrix(b, shape: tuple[int, ...]) -> np.ndarray:
    b = np.asarray(b, dtype=float)
    if b.ndim == 1:
        b = b[:, None]
    if b.shape != shape:
        raise ValueError(f"paired_bootstrap: the arms have different shapes {shape} and {b.shape}")
    return b


def decide(kind: str, interval: Interval, margin: float | None = None) -> str:
    """The verdict of a check of ``kind`` (module docstring) from the interval of A − B (better direction).

    ``kind``: ``beats``, ``equal``, ``not_worse`` (between runs) or ``above`` / ``below`` (one run's
    value against 0, e.g. a training curve's change: ``above`` = does not fall by more than ``margin``,
    ``below`` = falls).

    Raises:
        ValueError: for an unknown kind, or ``equal`` / ``not_worse`` / ``above`` without a positive margin.
    """
    low, high = interval.low, interval.high
    if kind in ("equal", "not_worse", "above") and (margin is None or not margin > 0):
        raise ValueError(f"a {kind!r} check needs a positive margin, stated in the spec before the run")
    if kind == "beats":
        return REPRODUCED if low > 0 else NOT_REPRODUCED if high < 0 else INCONCLUSIVE
    if kind == "below":
        return REPRODUCED if high < 0 else NOT_REPRODUCED if low > 0 else INCONCLUSIVE
    if kind == "equal":
        if -margin < low and high < margin:
            return REPRODUCED
        return NOT_REPRODUCED if low >= margin or high <= -margin else INCONCLUSIVE
    if kind in ("not_worse", "above"):
        return REPRODUCED if low > -margin else NOT_REPRODUCED if high <= -margin else INCONCLUSIVE
    raise ValueError(f"unknown check kind {kind!r}; use beats, equal, not_worse, above or below")


def pearson(x: list[float], y: list[float]) -> float:
    """Pearson correlation of two equally long lists (NaN with fewer than 3 points or no spread)."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    if len(xs) < 3 or xs.std() == 0 or ys.std() == 0:
        return math.nan
    return float(np.corrcoef(xs, ys)[0, 1])


def length_adjustment(values: np.ndarray, lengths: np.ndarray, ended: np.ndarray, runs: np.ndarray,
                      prompts: np.ndarray) -> tuple[np.ndarray, dict[str, float]]:
    """Length-controlled per-cell values: the metric with its length and EOS effect removed.

    One least-squares fit over every (run, seed, prompt) cell of every run::

        value = α_run + γ_prompt + b·length + c·ended + ε

    with one intercept per run (method × setting; seeds share it) and one per prompt, as AlpacaEval's
    length-controlled win rate fits a model term next to the length term (Dubois et al. 2024,
    "Length-Controlled AlpacaEval", arXiv:2404.04475). ``b`` and ``c`` are then the effect of length
    and of stopping on one's own *within* a run and a prompt. The adjusted value of a cell is
    ``value − b·(length − mean length) − c·(ended − mean ended)`` (means over all cells): what the run
    would have scored at the pooled mean length and EOS rate. Returns the adjusted values and
    ``{"length": b, "ended": c}``.
    """
    values = np.asarray(values, dtype=float)
    lengths = np.asarray(lengths, dtype=float)
    ended = np.asarray(ended, dtype=float)
    run_levels, run_index = np.unique(np.asarray(runs), return_inverse=True)
    prompt_levels, prompt_index = np.unique(np.asarray(prompts), return_inverse=True)
    n = len(values)
    # A covariate without spread (every completion ended, say) is collinear with the intercepts: leave it out.
    covariates = [x if x.std() > 0 else None for x in (lengths, ended)]
    extra = [x for x in covariates if x is not None]
    design = np.zeros((n, len(extra) + len(run_levels) + max(0, len(prompt_levels) - 1)))
    for j, x in enumerate(extra):
        design[:, j] = x
    design[np.arange(n), len(extra) + run_index] = 1.0
    keep = prompt_index > 0  # the first prompt is the baseline level (the run intercepts span the constant)
    design[np.arange(n)[keep], len(extra) + len(run_levels) + prompt_index[keep] - 1] = 1.0
    coef, *_ = np.linalg.lstsq(design, values, rcond=None)
    fitted = iter(coef[: len(extra)])
    b, c = (float(next(fitted)) if x is not None else 0.0 for x in covariates)
    adjusted = values - b * (lengths - lengths.mean()) - c * (ended - ended.mean())
    return adjusted, {"length": b, "ended": c}
