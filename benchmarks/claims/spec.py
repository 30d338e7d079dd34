"""The sweep specification: which runs, under which shared budget, evaluated how, checked against which claims.

A spec is one YAML file (see ``benchmarks/claims/claims.yaml``)::

    root: ../..                      # folder the relative paths below are resolved against (default: the spec's)
    workdir: runs/claims             # run directories (models), reference cache, derived data
    results_dir: benchmarks/claims/results   # one small JSON record per finished run (default: <workdir>/results);
                                     # keep it in version control so a sweep spans machines and sessions
    results_page: docs/results.md
    figures_dir: docs/figures
    seeds: [0, 1, 2]
    budget: {max_steps: 30, ...}     # config keys shared by every run (an entry may not override them)
    eval: {prompts: bundled:prompts:test, limit: 48, max_new_tokens: 64, ...}
    datasets:                        # derived data files, referenced as "{data:NAME}"
      triple_pairs: {source: bundled:triple, keep: [prompt, chosen, rejected]}
    runs:
      - name: dpo
        config: {loss_type: dpo, dataset: bundled:pairwise, beta: 0.1}
      - name: tpo_sft
        config: {loss_type: tpo, model_name_or_path: "{model:sft}", dataset: bundled:triple}
      - name: rao_rm
        rescore: {run: rm, source: bundled:listwise, to_range: [0, 1]}   # dataset = listwise scored by rm's model
        config: {loss_type: rao, score_range: [0, 1]}
      - name: rao_z0_0
        extends: rao_judge            # inherit its config, then override
        seeds: [0]
        config: {z0: 0}
    claims: [...]                     # see benchmarks.claims.report

``{model:NAME}`` is the saved model of run NAME with the same seed; ``{data:NAME}`` a derived dataset.
Both make the run depend on what they name. A run's id is a hash of its resolved settings (with
dependencies replaced by their run ids), so changing anything that matters gives a new run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# Bump when the meaning of a cached result changes (what is measured or how), to invalidate old results.
RESULT_VERSION = 2  # 2: adapters initialized from the run's seed (they depended on the process before)

PLACEHOLDER = re.compile(r"^\{(model|data):([A-Za-z0-9_.\-]+)\}$")

EVAL_DEFAULTS: dict[str, Any] = {
    "prompts": "bundled:prompts:test",
    "limit": 48,
    "max_new_tokens": 64,
    "temperature": 0.0,
    "batch_size": 16,
    "judge": "offline",
    "pairs": "bundled:pairwise:test",
    "pairs_limit": 48,
}

# Keys the runner sets itself; a spec may not set them.
RUNNER_KEYS = ("output_dir", "seed")


class SpecError(ValueError):
    """A problem in the spec file, with the file and the entry named."""


@dataclass
class RunEntry:
    """One named run of the spec (trained once per seed)."""

    name: str
    config: dict[str, Any]
    seeds: list[int]
    evaluate: bool = True
    rescore: dict[str, Any] | None = None
    label: str = ""
    needs: list[str] = field(default_factory=list)

    def dependencies(self) -> list[str]:
        """Runs this entry needs finished first: ``{model:…}`` placeholders, ``rescore.run`` and ``needs``."""
        return list(dict.fromkeys(self.needs + self.model_dependencies()))

    def model_dependencies(self) -> list[str]:
        """Runs whose saved model this entry reads: ``{model:…}`` placeholders and ``rescore.run``."""
        deps = []
        for value in self.config.values():
            match = PLACEHOLDER.match(value) if isinstance(value, str) else None
            if match and match.group(1) == "model":
                deps.append(match.group(2))
        if self.rescore:
            deps.append(self.rescore["run"])
        return list(dict.fromkeys(deps))

    def datasets(self) -> list[str]:
        """Derived datasets this entry reads through ``{data:…}``."""
        names = []
        for value in self.config.values():
            match = PLACEHOLDER.match(value) if isinstance(value, str) else None
            if match and match.group(1) == "data":
                names.append(match.group(2))
        return names


@dataclass
class Spec:
    """A loaded, checked sweep specification."""

    path: Path
    root: Path
    workdir: Path
    results_dir: Path
    results_page: Path
    figures_dir: Path
    seeds: list[int]
    budget: dict[str, Any]
    eval: dict[str, Any]
    datasets: dict[str, dict[str, Any]]
    runs: dict[str, RunEntry]
    claims: list[dict[str, Any]]
    title: str = "Claims checked at small scale"
    notes: str = ""

    def order(self) -> list[str]:
        """Entry names with every dependency before its dependents (spec order otherwise)."""
        done: list[str] = []

        def visit(name: str, trail: tuple[str, ...]) -> None:
            if name in done:
                return
            if name in trail:
                raise SpecError(f"{self.path}: dependency cycle {' -> '.join(trail + (name,))}")
            for dep in self.runs[name].dependencies():
                visit(dep, trail + (name,))
            done.append(name)

        for name in self.runs:
            visit(name, ())
        return done

    def base_model(self) -> str:
        """The untouched model every run is evaluated against."""
        return str(self.budget.get("model_name_or_path", "smollm2-135m-instruct"))


def load_spec(path: str | Path) -> Spec:
    """Read and check a sweep spec; raises :class:`SpecError` naming the file and entry on any problem."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except OSError as err:
        raise SpecError(f"{path}: cannot read the spec ({err.strerror or err})") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{path}: a spec must be a mapping")
    known = {"root", "workdir", "results_dir", "results_page", "figures_dir", "seeds", "budget", "eval", "datasets",
             "runs", "claims", "title", "notes"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise SpecError(f"{path}: unknown top-level key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
    root = (path.parent / str(raw.get("root", "."))).resolve()
    seeds = _seeds(raw.get("seeds", [0, 1, 2]), f"{path}: seeds")
    budget = dict(raw.get("budget") or {})
    for key in RUNNER_KEYS:
        if key in budget:
            raise SpecError(f"{path}: budget sets {key!r}, which the runner sets per run")
    evaluation = {**EVAL_DEFAULTS, **(raw.get("eval") or {})}
    bad_eval = sorted(set(evaluation) - set(EVAL_DEFAULTS))
    if bad_eval:
        raise SpecError(f"{path}: unknown eval key {bad_eval[0]!r}; known: {', '.join(EVAL_DEFAULTS)}")
    datasets = {str(k): dict(v or {}) for k, v in (raw.get("datasets") or {}).items()}
    for name, definition in datasets.items():
        if "source" not in definition:
            raise SpecError(f"{path}: dataset {name!r} needs a `source`")
        extra = sorted(set(definition) - {"source", "split", "keep", "sample", "sample_seed"})
        if extra:
            raise SpecError(f"{path}: dataset {name!r}: unknown key {extra[0]!r} (source, split, keep, sample)")
    runs = _entries(raw.get("runs") or [], budget, seeds, path)
    workdir = root / str(raw.get("workdir", "runs/experiment"))
    spec = Spec(
        path=path,
        root=root,
        workdir=workdir,
        results_dir=root / str(raw["results_dir"]) if raw.get("results_dir") else workdir / "results",
        results_page=root / str(raw.get("results_page", "docs/results.md")),
        figures_dir=root / str(raw.get("figures_dir", "docs/figures")),
        seeds=seeds,
        budget=budget,
        eval=evaluation,
        datasets=datasets,
        runs=runs,
        claims=list(raw.get("claims") or []),
        title=str(raw.get("title", "Claims checked at small scale")),
        notes=str(raw.get("notes", "")),
    )
    for entry in runs.values():
        for dep in entry.dependencies():
            if dep not in runs:
                raise SpecError(f"{path}: run {entry.name!r} depends on {dep!r}, which is not a run of the spec")
            missing = sorted(set(entry.seeds) - set(runs[dep].seeds))
            if missing:
                raise SpecError(f"{path}: run {entry.name!r} needs {dep!r} for seeds {missing}, which it does not run")
        for data in entry.datasets():
            if data not in datasets:
                raise SpecError(f"{path}: run {entry.name!r} reads dataset {data!r}, which `datasets` does not define")
    spec.order()  # raises on cycles
    return spec


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value):
        raise SpecError(f"{where} must be a non-empty list of integers, got {value!r}")
    return list(value)


def _entries(items: list, budget: dict, seeds: list[int], path: Path) -> dict[str, RunEntry]:
    runs: dict[str, RunEntry] = {}
    for index, item in enumerate(items):
        where = f"{path}: runs[{index}]"
        if not isinstance(item, dict) or "name" not in item:
            raise SpecError(f"{where} must be a mapping with a `name`")
        name = str(item["name"])
        where = f"{path}: run {name!r}"
        if name in runs:
            raise SpecError(f"{where} is defined twice")
        extra = sorted(set(item) - {"name", "config", "seeds", "evaluate", "rescore", "label", "extends", "needs"})
        if extra:
            raise SpecError(f"{where}: unknown key {extra[0]!r}")
        own = dict(item.get("config") or {})
        for key, value in own.items():
            if key in RUNNER_KEYS:
                raise SpecError(f"{where} sets {key!r}, which the runner sets per run")
            starts_from_run = key == "model_name_or_path" and isinstance(value, str) and PLACEHOLDER.match(value)
            if key in budget and not starts_from_run:
                raise SpecError(f"{where} overrides budget key {key!r}: every run shares the budget "
                                "(only model_name_or_path may name another run's model, as {model:NAME})")
        base = runs.get(item["extends"]) if "extends" in item else None
        if "extends" in item and base is None:
            raise SpecError(f"{where} extends {item['extends']!r}, which is not defined above it")
        config = {**base.config, **own} if base is not None else own
        if "loss_type" not in config:
            raise SpecError(f"{where} needs config.loss_type")
        rescore = item.get("rescore", base.rescore if base else None)
        if rescore is not None:
            if not isinstance(rescore, dict) or "run" not in rescore or "source" not in rescore:
                raise SpecError(f"{where}: rescore needs `run` (a reward-model run) and `source` (listwise rows)")
            if "dataset" in config:
                raise SpecError(f"{where}: rescore writes the dataset; do not also set config.dataset")
        elif "dataset" not in config:
            raise SpecError(f"{where} needs config.dataset (or rescore)")
        runs[name] = RunEntry(
            name=name,
            config=config,
            seeds=_seeds(item.get("seeds", base.seeds if base else seeds), f"{where}: seeds"),
            evaluate=bool(item.get("evaluate", base.evaluate if base else True)),
            rescore=copy.deepcopy(rescore),
            label=str(item.get("label", name)),
            needs=[str(n) for n in item.get("needs", [])],
        )
    return runs


# ----------------------------------------------------------------------------- resolution and ids
def digest(value: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-serializable value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def dataset_id(spec: Spec, name: str) -> str:
    """Id of a derived dataset: a hash of its definition."""
    return digest({"dataset": spec.datasets[name], "version": RESULT_VERSION})


def eval_id(spec: Spec) -> str:
    """Id of the evaluation setting (base model + eval keys): names the reference-generation cache."""
    return digest({"model": spec.base_model(), "eval": spec.eval, "version": RESULT_VERSION})


def resolved_settings(spec: Spec, name: str, seed: int, _memo: dict | None = None) -> dict[str, Any]:
    """Everything that determines run ``name`` at ``seed``, with dependencies and datasets replaced by their ids."""
    entry = spec.runs[name]
    memo = {} if _memo is None else _memo
    config = {**spec.budget, **entry.config, "seed": seed}
    for key, value in list(config.items()):
        match = PLACEHOLDER.match(value) if isinstance(value, str) else None
        if match and match.group(1) == "model":
            config[key] = f"{{model:{match.group(2)}@{run_id(spec, match.group(2), seed, memo)}}}"
        elif match:
            config[key] = f"{{data:{match.group(2)}@{dataset_id(spec, match.group(2))}}}"
    # The name is part of the settings: two entries never share a record, even with equal configs.
    settings: dict[str, Any] = {"name": name, "config": config, "version": RESULT_VERSION}
    if entry.rescore:
        settings["rescore"] = {**entry.rescore, "run": f"{entry.rescore['run']}@"
                               f"{run_id(spec, entry.rescore['run'], seed, memo)}"}
    if entry.evaluate:
        settings["eval"] = {"model": spec.base_model(), **spec.eval}
    return settings


def run_id(spec: Spec, name: str, seed: int, _memo: dict | None = None) -> str:
    """The cache key of run ``name`` at ``seed``: a hash of :func:`resolved_settings`."""
    memo = {} if _memo is None else _memo
    key = (name, seed)
    if key not in memo:
        memo[key] = digest(resolved_settings(spec, name, seed, memo))
    return memo[key]


def planned_runs(spec: Spec, only: list[str] | None = None, seeds: list[int] | None = None,
                 with_dependencies: bool = True) -> list[tuple[str, int]]:
    """(name, seed) pairs to run, seed-major so every entry gets a first seed early; dependencies included."""
    if only:
        unknown = [n for n in only if n not in spec.runs]
        if unknown:
            raise SpecError(f"{spec.path}: no run named {unknown[0]!r}; runs: {', '.join(spec.runs)}")
    wanted: set[tuple[str, int]] = set()

    def add(name: str, seed: int) -> None:
        if (name, seed) in wanted:
            return
        wanted.add((name, seed))
        if with_dependencies:
            for dep in spec.runs[name].dependencies():
                add(dep, seed)

    for name in only or list(spec.runs):
        for seed in spec.runs[name].seeds:
            if seeds is None or seed in seeds:
                add(name, seed)
    all_seeds = sorted({s for _, s in wanted})
    return [(n, s) for s in all_seeds for n in spec.order() if (n, s) in wanted]


def validate_spec(spec: Spec) -> list[str]:
    """Load every entry's config with :func:`unialign.config.load_config`; returns notes for unregistered methods.

    Placeholders are replaced by stand-in paths. An entry whose ``loss_type`` is not registered (yet)
    is checked with a registered method in its place, so its other keys are still validated; the
    returned notes name those entries. A peer (:mod:`benchmarks.claims.peers`) is checked as the
    unialign method it shares its keys with. Any other problem raises :class:`SpecError`.
    """
    from benchmarks.claims.peers import get_peer
    from unialign.config import load_config
    from unialign.losses.registry import get_method

    notes = []
    for name, entry in spec.runs.items():
        config = {**spec.budget, **entry.config, "seed": entry.seeds[0], "output_dir": "unused"}
        for key, value in list(config.items()):
            if isinstance(value, str) and PLACEHOLDER.match(value):
                config[key] = str(spec.workdir / "placeholder")
        if entry.rescore:
            config["dataset"] = "scored.jsonl"
        peer = get_peer(config["loss_type"])
        if peer is not None:
            config["loss_type"] = peer.validate_as
        try:
            get_method(config["loss_type"])
        except ValueError:
            notes.append(f"{name}: loss_type {config['loss_type']!r} is not registered yet (the run is skipped as "
                         "unavailable until it is)")
            config["loss_type"] = "dpo"
        try:
            load_config(None, config)
        except (ValueError, TypeError) as err:
            raise SpecError(f"{spec.path}: run {name!r}: {err}") from None
    return notes
