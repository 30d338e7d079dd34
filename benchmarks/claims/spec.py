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
RESULT_VERSION = 3  # 3: per-prompt arrays, checkable signals, val/eval prompt split, grids (2: seeded adapters)

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
    grid: dict[str, list[Any]] = field(default_factory=dict)  # the main entry of a grid: the values searched
    select_from: str | None = None  # takes the grid choice of this entry (itself when it has a grid)
    grid_point: dict[str, Any] | None = None  # a grid point: these values, evaluated on the selection prompts
    grid_of: str | None = None
    selection_points: list[str] = field(default_factory=list)  # grid points (at the selection seed) it waits for

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
    selection: dict[str, Any] = field(default_factory=dict)
    plan: dict[str, Any] = field(default_factory=dict)

    def eval_for(self, name: str) -> dict[str, Any]:
        """The eval setting of run ``name``: the selection (validation) prompts for a grid point, else ``eval``."""
        if self.runs[name].grid_point is not None:
            return {**self.eval, **(self.selection.get("eval") or {})}
        return dict(self.eval)

    def order(self) -> list[str]:
        """Entry names with every dependency before its dependents (spec order otherwise)."""
        done: list[str] = []

        def visit(name: str, trail: tuple[str, ...]) -> None:
            if name in done:
                return
            if name in trail:
                raise SpecError(f"{self.path}: dependency cycle {' -> '.join(trail + (name,))}")
            for dep in self.runs[name].dependencies() + self.runs[name].selection_points:
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
    if "base" in raw:
        raw = _with_base(path, raw)
    known = {"root", "workdir", "results_dir", "results_page", "figures_dir", "seeds", "budget", "eval", "datasets",
             "runs", "claims", "title", "notes", "selection", "plan"}
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
        extra = sorted(set(definition) - {"source", "split", "keep", "sample", "sample_seed", "prompts"})
        if extra:
            raise SpecError(f"{path}: dataset {name!r}: unknown key {extra[0]!r} (source, split, keep, sample)")
    selection = dict(raw.get("selection") or {})
    bad_selection = sorted(set(selection) - {"seed", "metric", "eval"})
    if bad_selection:
        raise SpecError(f"{path}: unknown selection key {bad_selection[0]!r}; known: seed, metric, eval")
    bad_eval = sorted(set(selection.get("eval") or {}) - set(EVAL_DEFAULTS))
    if bad_eval:
        raise SpecError(f"{path}: unknown selection.eval key {bad_eval[0]!r}; known: {', '.join(EVAL_DEFAULTS)}")
    runs = _entries(raw.get("runs") or [], budget, seeds, path, int(selection.get("seed", seeds[0])))
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
        selection=selection,
        plan=dict(raw.get("plan") or {}),
    )
    for claim in spec.claims:
        for check in claim.get("checks", []):
            if check.get("kind") in ("equal", "not_worse", "not_falling") and not (
                    isinstance(check.get("margin"), (int, float)) and check["margin"] > 0):
                raise SpecError(f"{path}: claim {claim.get('id')}: a {check['kind']!r} check needs a positive "
                                f"`margin`, stated before the run ({check})")
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


MERGED_KEYS = ("budget", "eval", "plan", "selection", "datasets")


def _with_base(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """``base: OTHER.yaml`` (relative to this spec): OTHER's keys, with this spec's keys replacing them, except
    that ``budget``, ``eval``, ``plan``, ``selection`` and ``datasets`` are merged key by key (so a variant
    changes sizes, not the runs or claims)."""
    base_path = path.parent / str(raw["base"])
    try:
        base = yaml.safe_load(base_path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise SpecError(f"{path}: cannot read its base spec {base_path}: {' '.join(str(err).split())}") from None
    if "base" in base:
        raise SpecError(f"{path}: its base spec {base_path} has a base itself; one level only")
    merged = {**base, **{k: v for k, v in raw.items() if k != "base"}}
    for key in MERGED_KEYS:
        if isinstance(base.get(key), dict) and isinstance(raw.get(key), dict):
            merged[key] = {**base[key], **raw[key]}
    return merged


def _seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, int):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(s, int) for s in value):
        raise SpecError(f"{where} must be a non-empty list of integers, got {value!r}")
    return list(value)


GRID_KEYS = ("learning_rate", "beta", "z0", "kl_coef", "alpha", "gamma", "simpo_gamma", "temperature")


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a grid's values, the first key varying slowest."""
    points: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        points = [{**p, key: v} for p in points for v in values]
    return points


def _entries(items: list, budget: dict, seeds: list[int], path: Path, grid_seed: int = 0) -> dict[str, RunEntry]:
    runs: dict[str, RunEntry] = {}
    for index, item in enumerate(items):
        where = f"{path}: runs[{index}]"
        if not isinstance(item, dict) or "name" not in item:
            raise SpecError(f"{where} must be a mapping with a `name`")
        name = str(item["name"])
        where = f"{path}: run {name!r}"
        if name in runs:
            raise SpecError(f"{where} is defined twice")
        extra = sorted(set(item) - {"name", "config", "seeds", "evaluate", "rescore", "label", "extends", "needs",
                                    "grid", "select_from"})
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
        grid = item.get("grid") or {}
        if not isinstance(grid, dict) or any(not isinstance(v, list) or not v for v in grid.values()):
            raise SpecError(f"{where}: grid must map setting names to non-empty lists of values")
        bad = sorted(set(grid) - set(GRID_KEYS))
        if bad:
            raise SpecError(f"{where}: grid key {bad[0]!r} is not searchable; searchable: {', '.join(GRID_KEYS)}")
        select_from = item.get("select_from")
        if select_from is not None and (select_from not in runs or not runs[select_from].grid):
            raise SpecError(f"{where}: select_from {select_from!r} names no grid entry defined above it")
        if grid and select_from:
            raise SpecError(f"{where}: an entry has its own grid or takes another's choice (select_from), not both")
        entry = RunEntry(
            name=name,
            config=config,
            seeds=_seeds(item.get("seeds", base.seeds if base else seeds), f"{where}: seeds"),
            evaluate=bool(item.get("evaluate", base.evaluate if base else True)),
            rescore=copy.deepcopy(rescore),
            label=str(item.get("label", name)),
            needs=[str(n) for n in item.get("needs", [])],
            grid={str(k): list(v) for k, v in grid.items()},
            select_from=name if grid else select_from,
        )
        if entry.select_from:
            source_grid = entry.grid if grid else runs[entry.select_from].grid
            entry.selection_points = [point_name(entry.select_from, i) for i in range(len(grid_points(source_grid)))]
        for index, point in enumerate(grid_points(entry.grid) if entry.grid else []):
            point_entry = RunEntry(
                name=point_name(name, index), config={**config, **point}, seeds=[grid_seed], evaluate=True,
                rescore=copy.deepcopy(rescore), label=f"{entry.label} [" + ", ".join(
                    f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()) + "]",
                needs=[str(n) for n in item.get("needs", [])], grid_point=point, grid_of=name)
            runs[point_entry.name] = point_entry
        runs[name] = entry
    return runs


def point_name(name: str, index: int) -> str:
    """The run name of grid point ``index`` of entry ``name``."""
    return f"{name}.g{index}"


# ----------------------------------------------------------------------------- resolution and ids
def digest(value: Any, length: int = 16) -> str:
    """A short stable hash of a JSON-serializable value (keys sorted)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:length]


def dataset_id(spec: Spec, name: str) -> str:
    """Id of a derived dataset: a hash of its definition."""
    return digest({"dataset": spec.datasets[name], "version": RESULT_VERSION})


def eval_id(spec: Spec, settings: dict[str, Any] | None = None) -> str:
    """Id of an evaluation setting (base model + eval keys; default the spec's): names the reference cache."""
    return digest({"model": spec.base_model(), "eval": spec.eval if settings is None else settings,
                   "version": RESULT_VERSION})


def resolved_settings(spec: Spec, name: str, seed: int, _memo: dict | None = None) -> dict[str, Any]:
    """Everything that determines run ``name`` at ``seed``, with dependencies and datasets replaced by their ids."""
    entry = spec.runs[name]
    memo = {} if _memo is None else _memo
    config = {**spec.budget, **entry.config, "seed": seed}
    if entry.select_from:
        choice = selected_point(spec, entry.select_from, memo)
        config.update(choice if choice is not None else {"grid_choice": "pending"})
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
        settings["eval"] = {"model": spec.base_model(), **spec.eval_for(name)}
    return settings


def selection_metric(spec: Spec) -> str:
    """The eval field grid points are ranked by (higher is better): ``selection.metric``, default ``mean_reward``."""
    return str(spec.selection.get("metric", "mean_reward"))


def grid_results(spec: Spec, name: str, _memo: dict | None = None) -> list[tuple[dict[str, Any], float | None]]:
    """(grid point, its validation score or None when not finished) for every point of entry ``name``'s grid."""
    entry = spec.runs[name]
    out = []
    for index, point in enumerate(grid_points(entry.grid)):
        pname = point_name(name, index)
        seed = spec.runs[pname].seeds[0]
        path = spec.results_dir / f"{run_id(spec, pname, seed, _memo)}.json"
        score = None
        if path.is_file():
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, OSError):
                record = {}
            value = (record.get("eval") or {}).get(selection_metric(spec))
            if record.get("status") == "done" and isinstance(value, (int, float)):
                score = float(value)
        out.append((point, score))
    return out


def selected_point(spec: Spec, name: str, _memo: dict | None = None) -> dict[str, Any] | None:
    """The grid point of entry ``name`` with the best validation score (the first on ties); None until all finished."""
    scored = grid_results(spec, name, _memo)
    if not scored or any(score is None for _, score in scored):
        return None
    best = max(range(len(scored)), key=lambda i: (scored[i][1], -i))
    return dict(scored[best][0])


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
            for point in spec.runs[name].selection_points:
                add(point, spec.runs[point].seeds[0])

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
