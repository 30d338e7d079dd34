"""The resumable sweep runner: train, evaluate and cache every (run, seed) of a spec.

Layout under the spec's ``workdir``::

    results/<run id>.json       one record per run (status done | failed | unavailable), written atomically;
                                elsewhere when the spec sets ``results_dir`` (a folder kept in version control)
    runs/<name>-s<seed>-<id>/   the run directory: job.json, log.txt, metrics.jsonl, model/, eval/
    cache/reference-<id>.json   the untouched model's generations and judge rewards, once per eval setting
    data/<name>-<id>.jsonl      derived datasets

A run whose record says ``done`` is never redone; anything else (no record, failed, unavailable) is
tried again on the next ``run``. The one exception: a finished run whose saved model a pending run
needs (``{model:NAME}``, a ``rescore`` reward model) but whose run directory is gone (the records
travelled to another machine, the models did not) is trained again first.
A run interrupted half-way leaves no record, so its directory is wiped and the run starts over. By
default each run trains in a fresh Python process, so peak memory (RSS) is that run's own and a crash
cannot take the sweep down.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from benchmarks import source_commit, worker_env
from benchmarks.claims.spec import (
    PLACEHOLDER,
    RESULT_VERSION,
    Spec,
    dataset_id,
    digest,
    eval_id,
    planned_runs,
    resolved_settings,
    run_id,
    selected_point,
)
from unialign import jsonfile

logger = logging.getLogger(__name__)

DONE, FAILED, UNAVAILABLE = "done", "failed", "unavailable"
# Training-curve keys kept in a result (the rest stay in the run's metrics.jsonl).
CURVE_PREFIXES = ("rewards/", "logratios/", "logps/", "targets/")
CURVE_KEYS = ("loss", "nll_loss", "prompt_delta")


# ----------------------------------------------------------------------------- paths and records
def results_dir(spec: Spec) -> Path:
    """Folder of the per-run result records (the spec's ``results_dir``)."""
    return spec.results_dir


def result_path(spec: Spec, name: str, seed: int) -> Path:
    """Where the record of run ``name`` at ``seed`` lives (named by its run id)."""
    return results_dir(spec) / f"{run_id(spec, name, seed)}.json"


def run_dir(spec: Spec, name: str, seed: int) -> Path:
    """The run directory of run ``name`` at ``seed``."""
    return spec.workdir / "runs" / f"{name}-s{seed}-{run_id(spec, name, seed)[:10]}"


def reference_cache_path(spec: Spec, settings: dict[str, Any] | None = None) -> Path:
    """The reference-generation cache file of an eval setting (default: the spec's)."""
    return spec.workdir / "cache" / f"reference-{eval_id(spec, settings)}.json"


def write_json_atomic(path: Path, value: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(jsonfile.dumps(value, ensure_ascii=False, indent=1, default=_json_default))
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def read_record(spec: Spec, name: str, seed: int) -> dict[str, Any] | None:
    """The cached record of a run under its current settings, or None (also for an unreadable file)."""
    path = result_path(spec, name, seed)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, OSError):
        return None


def is_done(record: dict[str, Any] | None) -> bool:
    """Whether ``record`` (from :func:`read_record`) is a finished run."""
    return record is not None and record.get("status") == DONE


# ----------------------------------------------------------------------------- the sweep
@dataclass
class SweepSummary:
    """What one ``run`` call did, by (name, seed)."""

    cached: list[tuple[str, int]] = field(default_factory=list)
    done: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)
    unavailable: list[tuple[str, int]] = field(default_factory=list)

    def line(self) -> str:
        """One-line summary."""
        return (f"{len(self.done)} trained, {len(self.cached)} cached, {len(self.failed)} failed, "
                f"{len(self.unavailable)} unavailable")


def run_sweep(spec: Spec, only: list[str] | None = None, seeds: list[int] | None = None, *,
              isolate: bool = True, log: Callable[[str], None] = print, lock: str | None = None) -> SweepSummary:
    """Run every planned (run, seed) that has no finished record; see the module docstring.

    ``only`` restricts to those entries (their dependencies are added); ``seeds`` to those seeds.
    ``isolate`` trains each run in a fresh process (peak memory per run); ``False`` runs in this process.
    A run that raises is recorded as failed and the sweep goes on; KeyboardInterrupt stops it.
    ``lock``: a file every run holds an exclusive ``flock`` on while it trains and evaluates (and
    releases between runs), so runs take turns with other jobs timed on the same machine.
    """
    summary = SweepSummary()
    plan = planned_runs(spec, only, seeds)
    rebuild = models_to_rebuild(spec, plan)
    for index, (name, seed) in enumerate(plan, 1):
        tag = f"[{index}/{len(plan)}] {name} seed {seed}"
        record = read_record(spec, name, seed)
        if is_done(record) and (name, seed) not in rebuild:
            summary.cached.append((name, seed))
            log(f"{tag}: cached ({record.get('run_id')})")
            continue
        if (name, seed) in rebuild:
            log(f"{tag}: finished before, but its model is not here and {rebuild[(name, seed)]} needs it")
        why = unavailable_reason(spec, name, seed)
        if why:
            write_json_atomic(result_path(spec, name, seed), _record(spec, name, seed, UNAVAILABLE, reason=why))
            summary.unavailable.append((name, seed))
            log(f"{tag}: unavailable: {why}")
            continue
        log(f"{tag}: running in {run_dir(spec, name, seed)}")
        started = time.perf_counter()
        try:
            with cpu_lock(lock):
                job = prepare_job(spec, name, seed)
                outcome = _run_isolated(job) if isolate else execute_job(job)
        except KeyboardInterrupt:
            log(f"{tag}: interrupted; rerun the same command to continue")
            raise
        except Exception as err:  # a failed run is recorded and the sweep goes on
            logger.debug("run %s seed %s failed", name, seed, exc_info=True)
            reason = f"{type(err).__name__}: {err}"
            write_json_atomic(result_path(spec, name, seed), _record(
                spec, name, seed, FAILED, reason=reason, traceback=traceback.format_exc()[-4000:]))
            summary.failed.append((name, seed))
            log(f"{tag}: failed after {time.perf_counter() - started:.0f}s: {reason}")
            continue
        write_json_atomic(result_path(spec, name, seed), _record(spec, name, seed, DONE, **outcome))
        summary.done.append((name, seed))
        log(f"{tag}: done in {time.perf_counter() - started:.0f}s{_headline(outcome)}")
    log(summary.line())
    return summary


@contextmanager
def cpu_lock(path: str | None):
    """Hold an exclusive ``flock`` on ``path`` for the block (waiting for it first); nothing when ``path`` is None."""
    if path is None:
        yield
        return
    import fcntl

    with open(path, "a", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def models_to_rebuild(spec: Spec, plan: list[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """Finished runs whose model a not-yet-finished run of ``plan`` needs but which is missing on disk.

    Maps (name, seed) to the run that needs it.
    """
    out: dict[tuple[str, int], str] = {}
    for name, seed in plan:
        if is_done(read_record(spec, name, seed)):
            continue
        for dep in spec.runs[name].model_dependencies():
            record = read_record(spec, dep, seed)
            if not is_done(record):
                continue
            if not (spec.workdir / record["run_dir"] / "model").is_dir():
                out.setdefault((dep, seed), name)
    return out


def _headline(outcome: dict[str, Any]) -> str:
    ev = outcome.get("eval") or {}
    if "mean_reward" not in ev:
        return ""
    return f" (judge reward {ev['mean_reward']:.4f}, win rate {ev['win_rate']:.3f}, KL {ev['kl']:.2f})"


def _record(spec: Spec, name: str, seed: int, status: str, **extra: Any) -> dict[str, Any]:
    entry = spec.runs[name]
    return {
        "run_id": run_id(spec, name, seed),
        "name": name,
        "label": entry.label,
        "seed": seed,
        "status": status,
        "method": entry.config["loss_type"],
        "run_dir": os.path.relpath(run_dir(spec, name, seed), spec.workdir),
        "settings": resolved_settings(spec, name, seed),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": source_commit(),
        **extra,
    }


def unavailable_reason(spec: Spec, name: str, seed: int) -> str | None:
    """Why run ``name`` cannot run now (its method is not registered, a dependency is not done), or None."""
    from benchmarks.claims.peers import get_peer
    from unialign.losses.registry import get_method

    loss_type = spec.runs[name].config["loss_type"]
    peer = get_peer(loss_type)
    if peer is not None:
        why = peer.unavailable_reason()
        if why:
            return why
    else:
        try:
            get_method(loss_type)
        except ValueError:
            return f"loss_type {loss_type!r} is not registered in this installation"
    entry = spec.runs[name]
    if entry.select_from and selected_point(spec, entry.select_from) is None:
        return f"the grid of {entry.select_from} (validation, seed {spec.selection.get('seed', 0)}) has not finished"
    for dep in spec.runs[name].dependencies():
        record = read_record(spec, dep, seed)
        if not is_done(record):
            status = "not run" if record is None else record.get("status")
            detail = f" ({record.get('reason')})" if record and record.get("reason") else ""
            return f"dependency {dep} (seed {seed}) is {status}{detail}"
    return None


# ----------------------------------------------------------------------------- jobs
def prepare_job(spec: Spec, name: str, seed: int) -> dict[str, Any]:
    """Everything one run needs, with placeholders replaced by real paths; wipes a leftover run directory."""
    entry = spec.runs[name]
    folder = run_dir(spec, name, seed)
    if folder.exists():  # left by an interrupted attempt: start over
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    config = {**spec.budget, **entry.config, "seed": seed, "output_dir": str(folder)}
    if entry.select_from:
        choice = selected_point(spec, entry.select_from)
        if choice is None:
            raise RuntimeError(f"the grid of {entry.select_from} has not finished; its choice is not known yet")
        config.update(choice)
    for key, value in list(config.items()):
        match = PLACEHOLDER.match(value) if isinstance(value, str) else None
        if match and match.group(1) == "model":
            config[key] = str(spec.workdir / read_record(spec, match.group(2), seed)["run_dir"] / "model")
        elif match:
            config[key] = str(materialize_dataset(spec, match.group(2)))
    job: dict[str, Any] = {"name": name, "seed": seed, "run_dir": str(folder), "config": config, "eval": None}
    if entry.rescore:
        rm_record = read_record(spec, entry.rescore["run"], seed)
        job["rescore"] = {**entry.rescore, "model": str(spec.workdir / rm_record["run_dir"] / "model"),
                          "out": str(folder / "data" / "rescored.jsonl")}
    if entry.evaluate:
        settings = spec.eval_for(name)
        job["eval"] = {**settings, "base_model": spec.base_model(),
                       "reference_cache": str(reference_cache_path(spec, settings)),
                       "pairs_reference": config.get("model_name_or_path", spec.base_model())}
    write_json_atomic(folder / "job.json", job)
    return job


def materialize_dataset(spec: Spec, name: str) -> Path:
    """Write derived dataset ``name`` (source rows, optional column subset and seeded sample) once; its path."""
    from unialign.data.io import write_rows
    from unialign.data.sources import read_rows

    definition = spec.datasets[name]
    path = spec.workdir / "data" / f"{name}-{dataset_id(spec, name)}.jsonl"
    if path.is_file():
        return path
    rows = read_rows(str(definition["source"]), split=str(definition.get("split", "train")))
    if definition.get("prompts") is not None:
        keep_prompts = training_prompts(int(definition["prompts"]), str(definition.get("split", "train")))
        rows = [row for row in rows if prompt_key(row["prompt"]) in keep_prompts]
    if definition.get("keep"):
        keep = list(definition["keep"])
        rows = [{k: row[k] for k in keep if k in row} for row in rows]
    if definition.get("sample") is not None:
        count = int(definition["sample"])
        if count > len(rows):
            raise ValueError(f"dataset {name!r}: sample {count} is larger than its {len(rows)} rows")
        picked = sorted(random.Random(int(definition.get("sample_seed", 0))).sample(range(len(rows)), count))
        rows = [rows[i] for i in picked]
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.jsonl")
    write_rows(rows, tmp)
    os.replace(tmp, path)
    return path


def prompt_key(prompt: Any) -> str:
    """A stable key of a prompt (text or conversation)."""
    return digest(prompt, 16)


def training_prompts(count: int, split: str = "train") -> set[str]:
    """Keys of ``count`` bundled prompts of ``split``: those with the smallest hash, the same set for every format.

    A derived dataset with ``prompts: N`` keeps the rows of these prompts, so the pairwise, triple,
    listwise and prompt-only training splits of a sweep share their prompts (a format that drops a
    prompt, e.g. pairwise where all four completions tie, has a row fewer).
    """
    from unialign.data.bundled import load_bundled

    keys = sorted({prompt_key(row["prompt"]) for row in load_bundled("listwise", split)},
                  key=lambda k: digest({"train-prompt": k}))
    if count > len(keys):
        raise ValueError(f"prompts: {count} is more than the {len(keys)} bundled {split} prompts")
    return set(keys[:count])


def _run_isolated(job: dict[str, Any]) -> dict[str, Any]:
    """Run :func:`execute_job` in a fresh Python process; its output goes to ``<run dir>/log.txt``."""
    folder = Path(job["run_dir"])
    outcome_path = folder / "outcome.json"
    env = worker_env(TOKENIZERS_PARALLELISM="false")
    with open(folder / "log.txt", "w", encoding="utf-8") as log_file:
        code = subprocess.call([sys.executable, "-m", "benchmarks.claims.worker", str(folder / "job.json")],
                               stdout=log_file, stderr=subprocess.STDOUT, env=env)
    if code != 0 or not outcome_path.is_file():
        tail = (folder / "log.txt").read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        raise RuntimeError(f"worker exited with code {code}: {' | '.join(tail) or 'no output'} "
                           f"(full log: {folder / 'log.txt'})")
    return json.loads(outcome_path.read_text(encoding="utf-8"))


def train_model(config: dict[str, Any]):
    """Train one run with :func:`unialign.pipeline.train`, or with its peer library (a seam the tests replace)."""
    from benchmarks.claims.peers import get_peer
    from unialign.pipeline import train

    peer = get_peer(config["loss_type"])
    if peer is not None:
        return peer.train(config)
    # The run folder already holds the runner's own job.json and log.txt: train beside them.
    return train({**config, "overwrite_output_dir": True})


def execute_job(job: dict[str, Any]) -> dict[str, Any]:
    """Rescore (when asked), train, measure and evaluate one run; returns the outcome fields of its record."""
    import torch

    from benchmarks.claims.peers import get_peer
    from unialign.allocator import keep_freed_memory
    from unialign.losses.registry import get_method

    config = dict(job["config"])
    outcome: dict[str, Any] = {}
    if config.get("cpu_keep_freed_memory", True) and not torch.cuda.is_available():
        keep_freed_memory()  # here, not only in unialign's trainer, so that peer libraries' runs get it too
    if job.get("rescore"):
        outcome["rescore"] = rescore_listwise(job["rescore"])
        config["dataset"] = job["rescore"]["out"]
    started, cpu_started = time.perf_counter(), process_cpu_seconds()
    result = train_model(config)
    seconds = time.perf_counter() - started
    outcome["train"] = {
        "seconds": seconds,
        # CPU time of all this process's threads: unlike wall time it barely moves when other work shares the machine
        "cpu_seconds": process_cpu_seconds() - cpu_started,
        "peak_rss_mb": peak_rss_mb(),
        "final_metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))},
        "curves": read_curves(Path(job["run_dir"]) / "metrics.jsonl"),
    }
    outcome["effective"] = effective_settings(Path(job["run_dir"]) / "config.json")
    model_dir = str(result.model_dir)
    result.trainer = None
    del result
    gc.collect()
    peer = get_peer(config["loss_type"])
    model_kind = peer.model_kind if peer is not None else get_method(config["loss_type"]).model_kind
    if model_kind == "sequence_classifier" and job.get("eval"):
        outcome["rm_eval"] = reward_model_accuracy(model_dir, job["eval"])
    elif job.get("eval"):
        beta = float(outcome["effective"].get("beta") or config.get("beta") or 0.1)
        eval_started, eval_cpu = time.perf_counter(), process_cpu_seconds()
        outcome["eval"] = evaluate_policy(model_dir, job["eval"], beta, Path(job["run_dir"]))
        outcome["eval"]["seconds"] = time.perf_counter() - eval_started
        outcome["eval"]["cpu_seconds"] = process_cpu_seconds() - eval_cpu  # what `plan` prices evaluation with
    outcome_path = Path(job["run_dir"]) / "outcome.json"
    write_json_atomic(outcome_path, outcome)
    return outcome


EFFECTIVE_KEYS = ("beta", "z0", "alpha", "gamma", "learning_rate", "max_steps", "per_device_train_batch_size",
                  "una_loss", "reward_scale", "reward_shift")


def effective_settings(config_json: Path) -> dict[str, Any]:
    """The hyperparameters a run actually used (method defaults filled in), from the ``config.json`` it wrote."""
    if not config_json.is_file():
        return {}
    values = json.loads(config_json.read_text(encoding="utf-8"))
    return {k: values[k] for k in EFFECTIVE_KEYS if k in values}


def process_cpu_seconds() -> float:
    """User + system CPU time of this process so far (all threads), in seconds."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux/macOS ``ru_maxrss``)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def read_curves(path: Path) -> dict[str, list[list[float]]]:
    """``{key: [[step, value], ...]}`` of the training curves kept in a result (see ``CURVE_PREFIXES``)."""
    from unialign.plots import read_metrics

    if not path.is_file():
        return {}
    curves: dict[str, list[list[float]]] = {}
    for row in read_metrics(path):
        for key, value in row.items():
            keep = key.startswith(CURVE_PREFIXES) or key in CURVE_KEYS
            if keep and isinstance(value, (int, float)) and math.isfinite(value):
                curves.setdefault(key, []).append([float(row.get("step", 0)), float(value)])
    return curves


# ----------------------------------------------------------------------------- rescoring with a reward model
def rescore_listwise(rescore: dict[str, Any]) -> dict[str, Any]:
    """Score every completion of the listwise ``source`` with the reward model; write the rows to ``out``.

    With ``to_range: [lo, hi]`` the scores are mapped linearly so the lowest becomes ``lo`` and the
    highest ``hi`` (one map over the whole dataset, so differences across prompts are kept). Returns
    how often the model orders a pair of completions of one prompt as the source rewards do.
    """
    from unialign.data.io import write_rows
    from unialign.data.sources import read_rows
    from unialign.rewards.sources import RewardModel

    rows = read_rows(str(rescore["source"]), split=str(rescore.get("split", "train")))
    if rescore.get("prompts") is not None:  # the same training prompts as the sweep's other runs
        keep_prompts = training_prompts(int(rescore["prompts"]), str(rescore.get("split", "train")))
        rows = [row for row in rows if prompt_key(row["prompt"]) in keep_prompts]
    model = RewardModel(rescore["model"], batch_size=int(rescore.get("batch_size", 16)))
    prompts = [row["prompt"] for row in rows for _ in row["completions"]]
    completions = [c for row in rows for c in row["completions"]]
    scores = [float(s) for s in model(prompts, completions)]
    low, high = min(scores), max(scores)
    if rescore.get("to_range") is not None:
        lo, hi = (float(v) for v in rescore["to_range"])
        span = (high - low) or 1.0
        scores = [lo + (s - low) / span * (hi - lo) for s in scores]
    out_rows, agree, pairs, cursor = [], 0, 0, 0
    for row in rows:
        mine = scores[cursor : cursor + len(row["completions"])]
        cursor += len(row["completions"])
        for i in range(len(mine)):
            for j in range(i + 1, len(mine)):
                if row["rewards"][i] != row["rewards"][j]:
                    pairs += 1
                    agree += (mine[i] - mine[j]) * (row["rewards"][i] - row["rewards"][j]) > 0
        out_rows.append({"prompt": row["prompt"], "completions": row["completions"], "rewards": mine})
    write_rows(out_rows, rescore["out"])
    return {"rows": len(out_rows), "raw_min": low, "raw_max": high,
            "pair_agreement_with_source": agree / pairs if pairs else math.nan}


def reward_model_accuracy(model_dir: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Held-out accuracy of a reward model: how often it scores the chosen completion above the rejected."""
    from unialign.evaluate import load_pairs
    from unialign.rewards.sources import RewardModel

    if not settings.get("pairs"):
        return {}
    pairs = load_pairs(settings["pairs"], settings.get("pairs_limit"))
    model = RewardModel(model_dir, batch_size=int(settings.get("batch_size", 16)))
    chosen = model([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = model([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    wins = sum(c > r for c, r in zip(chosen, rejected))
    return {"num_pairs": len(pairs), "accuracy": wins / len(pairs) if pairs else math.nan,
            "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / len(pairs) if pairs else math.nan}


# ----------------------------------------------------------------------------- evaluation
_LOADED: dict[tuple[str, str], Any] = {}


def _cached(kind: str, key: str, make: Callable[[], Any]) -> Any:
    """One loaded base model / tokenizer / judge per process (a sweep in one process reuses them)."""
    if (kind, key) not in _LOADED:
        _LOADED[(kind, key)] = make()
    return _LOADED[(kind, key)]


def reference_generations(base_model: str, prompts: list, settings: dict[str, Any], reward, cache: Path):
    """The untouched model's generations and judge rewards, read from ``cache`` or made once and written there."""
    from unialign.generation import Generation, GenerationConfig, generate
    from unialign.models import load_model, load_tokenizer

    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        # Caches written before generations recorded their stop token are made again.
        if stored.get("num_prompts") == len(prompts) and all("stop_id" in g for g in stored["generations"]):
            gens = [Generation(g["text"], list(g["token_ids"]), bool(g["ended"]), g["stop_id"])
                    for g in stored["generations"]]
            return gens, [float(g["reward"]) for g in stored["generations"]]
    model = _cached("model", base_model, lambda: load_model(base_model).eval())
    tokenizer = _cached("tokenizer", base_model, lambda: load_tokenizer(base_model))
    gens = [g[0] for g in generate(model, tokenizer, prompts, _generation_config(settings, GenerationConfig),
                                   progress=False, desc="reference")]
    rewards = [float(r) for r in reward(prompts, [g.text for g in gens])]
    write_json_atomic(cache, {
        "num_prompts": len(prompts),
        "settings": settings,
        "generations": [{"text": g.text, "token_ids": g.token_ids, "ended": g.ended, "stop_id": g.stop_id,
                         "reward": r}
                        for g, r in zip(gens, rewards)],
    })
    return gens, rewards


def pair_reference_logps(reference: str, pairs: list[dict], tokenizer, settings: dict[str, Any]) -> list[float]:
    """The starting model's log-probs of the held-out pair completions, read from the cache or made once.

    Every run that starts from the same model shares them (only the policy's side changes from run to
    run), so a sweep computes them once per starting model instead of once per run. The cache file is
    named by the model path and the pair setting, beside the reference-generation cache.
    """
    from unialign.evaluate import completion_logps, pair_sequences
    from unialign.models import load_model

    key = {"reference": reference, "pairs": settings["pairs"], "limit": settings.get("pairs_limit"),
           "batch_size": int(settings["batch_size"]), "version": RESULT_VERSION}
    cache = Path(settings["reference_cache"]).parent / f"pairs-reference-{digest(key)}.json"
    sequences = pair_sequences(pairs, tokenizer)
    if cache.is_file():
        stored = json.loads(cache.read_text(encoding="utf-8"))
        if len(stored.get("logps", [])) == len(sequences):
            return [float(v) for v in stored["logps"]]
    base = settings["base_model"]
    model = _cached("model", base, lambda: load_model(base).eval()) if reference == base else load_model(reference)
    values = completion_logps(model.eval(), sequences, tokenizer.pad_token_id, int(settings["batch_size"]))
    write_json_atomic(cache, {"key": key, "logps": values})
    return values


def _generation_config(settings: dict[str, Any], cls):
    return cls(temperature=float(settings["temperature"]), max_new_tokens=int(settings["max_new_tokens"]),
               batch_size=int(settings["batch_size"]), seed=0)


def evaluate_policy(model_dir: str, settings: dict[str, Any], beta: float, folder: Path) -> dict[str, Any]:
    """Evaluate a trained policy as :func:`unialign.evaluate.evaluate` does, with the reference side cached.

    Win/tie/loss, mean reward and KL are against the untouched base model (``settings['base_model']``),
    whose generations come from :func:`reference_generations`; implicit-reward accuracy on held-out
    pairs is against the run's own starting model (``pairs_reference``), the reference it trained with.
    Writes ``eval/eval.json`` and ``eval/eval.md`` into ``folder``; returns the summary numbers.
    """
    from unialign.evaluate import (
        EvalReport,
        checkable_scores,
        compare,
        completion_length,
        implicit_pair_stats,
        kl_estimate,
        load_pairs,
        load_prompts,
        per_prompt_outcomes,
        side_stats,
        write_report,
    )
    from unialign.generation import GenerationConfig, generate
    from unialign.models import load_model, load_tokenizer
    from unialign.rewards.sources import load_reward

    base = settings["base_model"]
    prompts = load_prompts(settings["prompts"], settings.get("limit"))
    reward = _cached("reward", settings["judge"], lambda: load_reward(settings["judge"]))
    made_reference = not Path(settings["reference_cache"]).is_file()  # this run pays for the cached side
    ref_gens, ref_rewards = reference_generations(base, prompts, settings, reward, Path(settings["reference_cache"]))
    tokenizer = load_tokenizer(model_dir)
    policy = load_model(model_dir).eval()
    config = _generation_config(settings, GenerationConfig)
    gens = [g[0] for g in generate(policy, tokenizer, prompts, config, progress=False, desc="policy")]
    rewards = [float(r) for r in reward(prompts, [g.text for g in gens])]
    base_model = _cached("model", base, lambda: load_model(base).eval())
    pairs = load_pairs(settings["pairs"], settings.get("pairs_limit")) if settings.get("pairs") else []
    pairs_reference = settings.get("pairs_reference") or base
    reference_pair_logps = pair_reference_logps(pairs_reference, pairs, tokenizer, settings) if pairs else None
    report = EvalReport(
        num_prompts=len(prompts),
        reward_name=getattr(reward, "name", type(reward).__name__),
        policy=side_stats(rewards, gens),
        reference=side_stats(ref_rewards, ref_gens),
        outcomes=compare(rewards, ref_rewards),
        kl=kl_estimate(policy, base_model, tokenizer, prompts, gens, config.batch_size),
        beta=beta,
        pairs=implicit_pair_stats(policy, None, tokenizer, pairs, beta, config.batch_size, reference_pair_logps),
        settings={"temperature": config.temperature, "max_new_tokens": config.max_new_tokens,
                  "model": model_dir, "reference": base, "prompts": settings["prompts"]},
        samples=[{"prompt": p, "policy": g.text, "reference": rg.text, "policy_reward": r, "reference_reward": rr}
                 for p, g, rg, r, rr in zip(prompts, gens, ref_gens, rewards, ref_rewards)],
    )
    write_report(report, folder / "eval")
    rates = report.outcomes.rates()
    correct, formatted = checkable_scores(prompts, [g.text for g in gens])
    ref_correct, ref_formatted = checkable_scores(prompts, [g.text for g in ref_gens])
    # Per prompt, in the order of the eval prompts: what the page's paired bootstrap resamples.
    per_prompt = {
        "prompt_key": [digest(p, 12) for p in prompts],
        "reward": rewards,
        "win": per_prompt_outcomes(rewards, ref_rewards),
        "length": [completion_length(g) for g in gens],
        "ended": [int(g.ended) for g in gens],
        "correct": correct,
        "format": formatted,
    }
    checked = [c for c in correct if c is not None]
    formats = [f for f in formatted if f is not None]
    return {
        "per_prompt": per_prompt,
        "reference_per_prompt": {"reward": ref_rewards, "length": [completion_length(g) for g in ref_gens],
                                 "ended": [int(g.ended) for g in ref_gens], "correct": ref_correct,
                                 "format": ref_formatted},
        "made_reference": made_reference,
        "correct_rate": sum(checked) / len(checked) if checked else None,
        "format_rate": sum(formats) / len(formats) if formats else None,
        "num_prompts": report.num_prompts,
        "mean_reward": report.policy.mean_reward,
        "reference_mean_reward": report.reference.mean_reward,
        "win_rate": rates["win_rate"],
        "tie_rate": rates["tie_rate"],
        "loss_rate": rates["loss_rate"],
        "kl": report.kl,
        "mean_length": report.policy.mean_length,
        "reference_mean_length": report.reference.mean_length,
        "eos_rate": report.policy.eos_fraction,
        "pair_accuracy": report.pairs.accuracy if report.pairs else None,
        "pair_margin": report.pairs.mean_margin if report.pairs else None,
        "beta": beta,
    }
