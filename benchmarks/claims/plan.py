"""The planned cost of a sweep: ``python -m benchmarks.claims plan SPEC`` prices every run before it runs.

A run's CPU time is its training (start-up + steps × seconds per step of its method) plus its
evaluation (start-up + prompts × new tokens × seconds per prompt-token). Seconds per step come
from the spec's finished runs of the same method when there are any (their measured training CPU
time, less the start-up, over their steps), else from the spec's ``plan.seconds_per_step`` table;
evaluation likewise from finished runs' measured ``eval.cpu_seconds`` (else ``eval.seconds``), leaving out
runs that also made the reference generations every later run reads from the cache. Steps are one
epoch of the run's training rows at the budget's batch size (``max_steps`` when set).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from benchmarks.claims.spec import Spec, planned_runs


@dataclass
class PlannedRun:
    """One (run, seed) with its priced cost and where the price came from."""

    name: str
    seed: int
    steps: int
    train_seconds: float
    eval_seconds: float
    source: str
    done: bool


def _family(loss_type: str) -> str:
    return "una_binary" if loss_type.startswith("una_binary") else loss_type


def training_rows(spec: Spec, name: str) -> int:
    """Rows one epoch of run ``name`` trains on (its derived dataset's rows; a rescore keeps its prompts)."""
    from benchmarks.claims.runner import materialize_dataset
    from unialign.data.io import read_jsonl

    entry = spec.runs[name]
    if entry.rescore:
        count = entry.rescore.get("prompts")
        return int(count) if count is not None else 338
    value = entry.config.get("dataset", "")
    if isinstance(value, str) and value.startswith("{data:"):
        return len(read_jsonl(materialize_dataset(spec, value[6:-1])))
    from unialign.data.sources import read_rows

    return len(read_rows(str(value), split="train"))


def plan(spec: Spec) -> list[PlannedRun]:
    """Every planned (run, seed), priced (module docstring)."""
    from benchmarks.claims.runner import is_done, read_record

    table = dict(spec.plan.get("seconds_per_step") or {})
    startup = float(spec.plan.get("startup_seconds", 30))
    per_token = float(spec.plan.get("eval_seconds_per_prompt_token", 0.018))
    eval_startup = float(spec.plan.get("eval_startup_seconds", 20))
    batch = int(spec.budget.get("per_device_train_batch_size", 4))
    batch *= int(spec.budget.get("gradient_accumulation_steps", 1))
    measured: dict[str, list[float]] = {}
    eval_rate: list[float] = []
    runs = planned_runs(spec)
    records = {(n, s): read_record(spec, n, s) for n, s in runs}
    for (name, _seed), record in records.items():
        if not is_done(record):
            continue
        train = record.get("train") or {}
        steps = (train.get("final_metrics") or {}).get("step") or (record.get("effective") or {}).get("max_steps")
        if isinstance(steps, (int, float)) and steps > 0 and train.get("cpu_seconds"):
            family = _family(spec.runs[name].config["loss_type"])
            measured.setdefault(family, []).append(max(0.0, train["cpu_seconds"] - startup) / steps)
        ev = record.get("eval") or {}
        # CPU time where recorded, else wall time; not a run that also made the cached reference generations
        spent = ev.get("cpu_seconds") or ev.get("seconds")
        if spent and ev.get("num_prompts") and ev.get("made_reference", True) is False:
            tokens = ev["num_prompts"] * int(spec.eval_for(name)["max_new_tokens"])
            eval_rate.append(max(0.0, spent - eval_startup) / tokens)
    if eval_rate:
        per_token = statistics.median(eval_rate)
    rows_cache: dict[str, int] = {}
    out = []
    for name, seed in runs:
        entry = spec.runs[name]
        family = _family(entry.config["loss_type"])
        if name not in rows_cache:
            rows_cache[name] = training_rows(spec, name)
        max_steps = int(entry.config.get("max_steps", spec.budget.get("max_steps", -1)) or -1)
        epochs = float(spec.budget.get("num_train_epochs", 1))
        steps = max_steps if max_steps > 0 else math.ceil(rows_cache[name] / batch * epochs)
        if family in measured:
            rate, source = statistics.median(measured[family]), "measured"
        elif family in table:
            rate, source = float(table[family]), "table"
        else:
            rate, source = max(table.values(), default=10.0), "unknown method: the table's maximum"
        settings = spec.eval_for(name)
        prompts = _prompt_count(settings)
        evaluation = eval_startup + prompts * int(settings["max_new_tokens"]) * per_token if entry.evaluate else 0.0
        if family == "reward_model" and entry.evaluate:
            evaluation = eval_startup  # a reward model is scored on held-out pairs, nothing is generated
        out.append(PlannedRun(name, seed, steps, startup + steps * rate, evaluation, source,
                              is_done(records[(name, seed)])))
    return out


def _prompt_count(settings: dict[str, Any]) -> int:
    from unialign.evaluate import load_prompts

    return len(load_prompts(settings["prompts"], settings.get("limit")))


def render_plan(spec: Spec, rows: list[PlannedRun]) -> str:
    """The plan as text: one line per entry (all its seeds), then the total against the spec's CPU-hour budget."""
    by_name: dict[str, list[PlannedRun]] = {}
    for row in rows:
        by_name.setdefault(row.name, []).append(row)
    lines = [f"{'run':<20} {'seeds':>5} {'steps':>5} {'train s':>8} {'eval s':>7} {'total s':>8}  price"]
    for name, group in by_name.items():
        total = sum(r.train_seconds + r.eval_seconds for r in group)
        lines.append(f"{name:<20} {len(group):>5} {group[0].steps:>5} {group[0].train_seconds:>8.0f} "
                     f"{group[0].eval_seconds:>7.0f} {total:>8.0f}  {group[0].source}")
    total = sum(r.train_seconds + r.eval_seconds for r in rows)
    left = sum(r.train_seconds + r.eval_seconds for r in rows if not r.done)
    budget = float(spec.plan.get("cpu_hours", 8))
    lines.append(f"planned: {len(rows)} runs, {total / 3600:.2f} CPU-hours (budget {budget:g}); "
                 f"{sum(r.done for r in rows)} done, {left / 3600:.2f} CPU-hours left"
                 + ("" if total <= budget * 3600 else "  -- OVER BUDGET"))
    return "\n".join(lines)
