"""The claims sweep (`python -m benchmarks.claims`): spec loading, run ids, caching, resume, dependencies, and
verdicts on the results page."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from benchmarks import source_commit
from benchmarks.claims import (
    load_spec,
    main,
    planned_runs,
    read_record,
    run_id,
    run_sweep,
    validate_spec,
    write_report,
)
from benchmarks.claims import runner as runner_module
from benchmarks.claims.report import (
    MIXED,
    claim_verdict,
    collect,
    evaluate_check,
)
from benchmarks.claims.runner import DONE, _record, result_path, write_json_atomic
from benchmarks.claims.spec import SpecError
from benchmarks.claims.stats import INCONCLUSIVE, NOT_REPRODUCED, NOT_RUN, REPRODUCED
from tests.conftest import conversation

REAL_TRAIN = runner_module.train_model
CLAIMS_SPEC = Path(__file__).resolve().parents[1] / "benchmarks" / "claims" / "claims.yaml"


def length_reward(prompts, completions):
    """A deterministic stand-in judge: longer answers score higher (up to 1)."""
    return [min(len(c.split()), 10) / 10 for c in completions]


# ----------------------------------------------------------------------------- fixtures
def _write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def tiny_spec(tmp_path: Path, model: str, runs: list[dict], claims: list[dict] | None = None,
              seeds: list[int] | None = None) -> Path:
    """A spec over the tiny model and tiny data files; returns its path."""
    topics = ["cats", "tea", "rain", "maps"]
    pairs = [{"prompt": conversation(f"Tell me about {t}."), "chosen": f"{t.capitalize()} are nice and calm.",
              "rejected": f"No {t}."} for t in topics]
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    spec = {
        "root": ".",
        "workdir": "work",
        "results_page": "docs/results.md",
        "figures_dir": "docs/figures",
        "seeds": seeds or [0],
        "budget": {
            "model_name_or_path": model,
            "use_peft": True,
            "lora_r": 4,
            "lora_alpha": 8,
            "learning_rate": 1e-3,
            "max_steps": 2,
            "per_device_train_batch_size": 2,
            "max_length": 48,
            "max_prompt_length": 32,
            "logging_steps": 1,
            "report_to": "none",
            "disable_tqdm": True,
        },
        "eval": {
            "prompts": _write_jsonl(data / "prompts.jsonl", [{"prompt": p["prompt"]} for p in pairs]),
            "limit": 3,
            "max_new_tokens": 4,
            "batch_size": 2,
            "judge": "callable:tests.test_experiment:length_reward",
            "pairs": _write_jsonl(data / "test_pairs.jsonl", pairs[:2]),
            "pairs_limit": 2,
        },
        "datasets": {"pairs_subset": {"source": _write_jsonl(data / "pairs.jsonl", pairs), "sample": 3}},
        "runs": runs,
        "claims": claims or [],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    return path


def sweep_runs(tmp_path: Path) -> list[dict]:
    """SFT, DPO, DPO from the SFT model (a dependency on a derived dataset), and an unregistered method."""
    pairs = str(tmp_path / "data" / "pairs.jsonl")
    return [
        {"name": "sft", "config": {"loss_type": "sft", "dataset": pairs}},
        {"name": "dpo", "config": {"loss_type": "dpo", "dataset": pairs, "beta": 0.1}},
        {"name": "sft_dpo", "config": {"loss_type": "dpo", "model_name_or_path": "{model:sft}",
                                       "dataset": "{data:pairs_subset}", "beta": 0.1}},
        {"name": "future", "config": {"loss_type": "not_registered_yet", "dataset": pairs}},
    ]


class TrainCalls:
    """Wraps the real training seam: records each run it trains and can fail or interrupt one of them."""

    def __init__(self, monkeypatch, fail: dict[str, BaseException] | None = None):
        self.calls: list[str] = []
        self.fail = fail or {}

        def counted(config):
            name = Path(config["output_dir"]).name.split("-s")[0]
            self.calls.append(name)
            if name in self.fail:
                raise self.fail[name]
            return REAL_TRAIN(config)

        monkeypatch.setattr(runner_module, "train_model", counted)


def _quiet(_line: str) -> None:
    pass


class Killed(BaseException):
    """Stands in for the process being stopped mid-run (like KeyboardInterrupt, not caught as a failure)."""


# ----------------------------------------------------------------------------- the shipped spec
def test_claims_spec_validates_and_covers_every_claim():
    spec = load_spec(CLAIMS_SPEC)
    notes = validate_spec(spec)  # raises on any config that load_config refuses
    registered = {"sft", "dpo", "kto", "una_pair", "una_binary", "una_score", "rao", "reward_model", "tpo",
                  "una_online", "ppo", "grpo", "rloo"}
    assert registered <= {e.config["loss_type"] for e in spec.runs.values()}
    assert notes == []
    assert [c["id"] for c in spec.claims] == [1, 2, 3, 4]
    assert spec.runs["rao_rm"].dependencies() == ["rm"]
    assert spec.runs["sft_dpo"].dependencies() == ["sft"]
    order = [name for name, _ in planned_runs(spec, seeds=[0])]
    assert order.index("rm") < order.index("rao_rm") and order.index("sft") < order.index("sft_dpo")
    assert order.index("dpo.g3") < order.index("dpo")  # a grid is run before the setting it selects
    # seed 1 of RAO-RM waits for RAO's grid (seed 0, validation prompts) and for the reward model of seed 1
    assert planned_runs(spec, only=["rao_rm"], seeds=[1]) == [
        ("rao_judge.g0", 0), ("rao_judge.g1", 0), ("rao_judge.g2", 0), ("rao_judge.g3", 0), ("rm", 1), ("rao_rm", 1)]
    assert spec.eval_for("dpo.g0")["prompts"] == "bundled:prompts:val"
    assert spec.eval_for("dpo")["prompts"] == "bundled:prompts:eval"
    for entry in spec.runs.values():  # the budget is shared: only a grid point changes its searched settings
        overridden = set(entry.config) & set(spec.budget) - {"model_name_or_path"}
        assert overridden <= set(entry.grid_point or {}), entry.name
    # every training split is one full epoch of the same 40 prompts (or a subset of them)
    assert spec.budget["num_train_epochs"] == 1 and "max_steps" not in spec.budget
    for name, definition in spec.datasets.items():
        assert definition["prompts"] == 40, name
    # the GPU variant is the same runs and claims with larger sizes only
    gpu = load_spec(CLAIMS_SPEC.parents[1] / "gpu" / "claims.yaml")
    assert list(gpu.runs) == list(spec.runs) and gpu.claims == spec.claims
    assert gpu.results_dir != spec.results_dir and gpu.eval["max_new_tokens"] == 256
    assert gpu.datasets["pairs40"]["prompts"] == 338 and gpu.budget["lora_r"] == spec.budget["lora_r"]


def test_grid_selection_picks_the_best_validation_point_and_waits_for_all(tmp_path, tiny_model_dir):
    from benchmarks.claims.spec import resolved_settings, selected_point

    runs = [{"name": "dpo", "config": {"loss_type": "dpo", "dataset": "x.jsonl"},
             "grid": {"learning_rate": [1e-4, 1e-3], "beta": [0.05, 0.1]}},
            {"name": "dpo_small", "config": {"loss_type": "dpo", "dataset": "y.jsonl"}, "select_from": "dpo"}]
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir, runs, seeds=[0, 1]))
    # (tiny_spec writes the YAML with sorted keys, so beta varies slowest here)
    assert [spec.runs[f"dpo.g{i}"].grid_point for i in range(4)] == [
        {"beta": 0.05, "learning_rate": 1e-4}, {"beta": 0.05, "learning_rate": 1e-3},
        {"beta": 0.1, "learning_rate": 1e-4}, {"beta": 0.1, "learning_rate": 1e-3}]
    assert spec.runs["dpo.g0"].seeds == [0]
    assert selected_point(spec, "dpo") is None
    assert resolved_settings(spec, "dpo", 1)["config"]["grid_choice"] == "pending"
    for index, score in enumerate([0.4, 0.7, 0.6, 0.7]):  # a tie goes to the first point
        _fake(spec, f"dpo.g{index}", 0, score)
        spec_scores = selected_point(spec, "dpo")
        assert spec_scores is None if index < 3 else spec_scores == {"beta": 0.05, "learning_rate": 1e-3}
    for name in ("dpo", "dpo_small"):
        config = resolved_settings(spec, name, 1)["config"]
        assert (config["learning_rate"], config["beta"]) == (1e-3, 0.05) and "grid_choice" not in config
    runs[1]["select_from"] = "nothing"
    with pytest.raises(SpecError, match="select_from 'nothing' names no grid entry"):
        load_spec(tiny_spec(tmp_path, tiny_model_dir, runs))
    runs[1].pop("select_from")
    runs[0]["grid"] = {"lora_r": [4, 8]}
    with pytest.raises(SpecError, match="grid key 'lora_r' is not searchable"):
        load_spec(tiny_spec(tmp_path, tiny_model_dir, runs))


def test_equal_checks_need_a_margin_stated_in_the_spec(tmp_path, tiny_model_dir):
    runs = [{"name": n, "config": {"loss_type": "dpo", "dataset": "x.jsonl"}} for n in ("a", "b")]
    claims = [{"id": 1, "title": "t", "checks": [{"kind": "equal", "a": "a", "b": "b"}]}]
    with pytest.raises(SpecError, match="a 'equal' check needs a positive `margin`"):
        load_spec(tiny_spec(tmp_path, tiny_model_dir, runs, claims))


def test_run_ids_follow_settings_and_dependencies(tmp_path, tiny_model_dir):
    path = tiny_spec(tmp_path, tiny_model_dir, sweep_runs(tmp_path), seeds=[0, 1])
    spec = load_spec(path)
    assert run_id(spec, "dpo", 0) == run_id(load_spec(path), "dpo", 0)
    assert run_id(spec, "dpo", 0) != run_id(spec, "dpo", 1)
    before = {name: run_id(spec, name, 0) for name in ("sft", "dpo", "sft_dpo")}
    spec.runs["sft"].config["learning_rate_note"] = "changed"  # any change of sft's settings...
    assert run_id(spec, "sft", 0) != before["sft"]
    assert run_id(spec, "sft_dpo", 0) != before["sft_dpo"]  # ...reaches the run that starts from its model
    assert run_id(spec, "dpo", 0) == before["dpo"]


def test_spec_errors_name_the_problem(tmp_path, tiny_model_dir):
    runs = [{"name": "dpo", "config": {"loss_type": "dpo", "dataset": "x.jsonl", "max_steps": 5}}]
    with pytest.raises(SpecError, match="overrides budget key 'max_steps'"):
        load_spec(tiny_spec(tmp_path, tiny_model_dir, runs))
    runs = [{"name": "b", "config": {"loss_type": "dpo", "model_name_or_path": "{model:a}", "dataset": "x.jsonl"}}]
    with pytest.raises(SpecError, match="depends on 'a'"):
        load_spec(tiny_spec(tmp_path, tiny_model_dir, runs))
    runs = [{"name": "dpo", "config": {"loss_type": "dpo", "dataset": "x.jsonl", "betta": 0.1}}]
    with pytest.raises(SpecError, match="unknown config key 'betta'"):
        validate_spec(load_spec(tiny_spec(tmp_path, tiny_model_dir, runs)))


# ----------------------------------------------------------------------------- running
def test_sweep_caches_resumes_and_handles_dependencies(tmp_path, tiny_model_dir, monkeypatch):
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir, sweep_runs(tmp_path)))

    # 1. interrupted while training the second run: the first is cached, the second left no record
    first = TrainCalls(monkeypatch, fail={"dpo": Killed()})
    with pytest.raises(Killed):
        run_sweep(spec, isolate=False, log=_quiet)
    assert first.calls == ["sft", "dpo"]
    assert read_record(spec, "sft", 0)["status"] == DONE
    assert read_record(spec, "sft", 0)["commit"] == source_commit()  # which code made the record
    assert read_record(spec, "dpo", 0) is None
    cache = next((spec.workdir / "cache").glob("reference-*.json"))
    cache_stamp = cache.stat().st_mtime_ns
    (base_pairs,) = (spec.workdir / "cache").glob("pairs-reference-*.json")  # the base model's, from sft's eval
    base_pairs_stamp = base_pairs.stat().st_mtime_ns

    # 2. the rerun trains only what is missing; the unregistered method is marked and skipped
    second = TrainCalls(monkeypatch)
    summary = run_sweep(spec, isolate=False, log=_quiet)
    assert second.calls == ["dpo", "sft_dpo"]
    assert summary.cached == [("sft", 0)] and summary.unavailable == [("future", 0)]
    future = read_record(spec, "future", 0)
    assert future["status"] == "unavailable" and "'not_registered_yet' is not registered" in future["reason"]
    job = json.loads((spec.workdir / read_record(spec, "sft_dpo", 0)["run_dir"] / "job.json").read_text())
    assert job["config"]["model_name_or_path"] == str(spec.workdir / read_record(spec, "sft", 0)["run_dir"] / "model")
    assert len(Path(job["config"]["dataset"]).read_text().splitlines()) == 3  # the derived 3-row sample
    # dpo read the base model's pair log-probs from the cache; sft_dpo (reference: the SFT model) made its own
    assert base_pairs.stat().st_mtime_ns == base_pairs_stamp
    assert len(list((spec.workdir / "cache").glob("pairs-reference-*.json"))) == 2

    # 3. everything is cached now: no training at all, and the reference generations were made once
    third = TrainCalls(monkeypatch)
    summary = run_sweep(spec, isolate=False, log=_quiet)
    assert third.calls == [] and len(summary.cached) == 3
    assert cache.stat().st_mtime_ns == cache_stamp

    record = read_record(spec, "dpo", 0)
    assert record["run_id"] == run_id(spec, "dpo", 0)
    assert 0 <= record["eval"]["win_rate"] <= 1 and record["eval"]["num_prompts"] == 3
    assert record["eval"]["mean_reward"] >= 0 and record["eval"]["pair_accuracy"] is not None
    per_prompt = record["eval"]["per_prompt"]  # what the page's paired bootstrap resamples
    assert set(per_prompt) == {"prompt_key", "reward", "win", "length", "ended", "correct", "format"}
    assert all(len(v) == 3 for v in per_prompt.values())
    assert sum(per_prompt["reward"]) / 3 == pytest.approx(record["eval"]["mean_reward"])
    assert per_prompt["correct"] == [None] * 3  # the tiny prompts have no checkable answer
    assert record["eval"]["seconds"] > 0
    assert record["train"]["seconds"] > 0 and record["train"]["peak_rss_mb"] > 0
    assert 0 < record["train"]["cpu_seconds"] < 20 * record["train"]["seconds"]  # CPU time of a few threads
    assert [step for step, _ in record["train"]["curves"]["rewards/chosen"]] == [1.0, 2.0]
    assert record["effective"]["beta"] == 0.1
    assert record["eval"]["reference_mean_reward"] == read_record(spec, "sft", 0)["eval"]["reference_mean_reward"]


def test_failed_dependency_makes_dependent_unavailable_then_recovers(tmp_path, tiny_model_dir, monkeypatch):
    runs = [r for r in sweep_runs(tmp_path) if r["name"] in ("sft", "sft_dpo")]
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir, runs))
    TrainCalls(monkeypatch, fail={"sft": RuntimeError("out of disk")})
    summary = run_sweep(spec, isolate=False, log=_quiet)
    assert summary.failed == [("sft", 0)] and summary.unavailable == [("sft_dpo", 0)]
    assert "RuntimeError: out of disk" in read_record(spec, "sft", 0)["reason"]
    assert read_record(spec, "sft_dpo", 0)["reason"].startswith("dependency sft (seed 0) is failed")

    retry = TrainCalls(monkeypatch)
    summary = run_sweep(spec, only=["sft_dpo"], isolate=False, log=_quiet)  # --only adds the dependency
    assert retry.calls == ["sft", "sft_dpo"] and summary.done == [("sft", 0), ("sft_dpo", 0)]


def test_records_kept_apart_survive_a_lost_workdir_and_missing_models_are_rebuilt(tmp_path, tiny_model_dir,
                                                                                   monkeypatch):
    runs = [r for r in sweep_runs(tmp_path) if r["name"] in ("sft", "dpo", "sft_dpo")]
    path = tiny_spec(tmp_path, tiny_model_dir, runs)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["results_dir"] = "committed/results"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    spec = load_spec(path)
    assert spec.results_dir == tmp_path / "committed" / "results"

    TrainCalls(monkeypatch, fail={"sft_dpo": Killed()})
    with pytest.raises(Killed):
        run_sweep(spec, isolate=False, log=_quiet)
    assert result_path(spec, "sft", 0).parent == spec.results_dir and read_record(spec, "dpo", 0)["status"] == DONE
    assert not (spec.workdir / "results").exists()

    import shutil

    shutil.rmtree(spec.workdir)  # a fresh checkout: the records came along, the models did not
    lines: list[str] = []
    again = TrainCalls(monkeypatch)
    summary = run_sweep(spec, isolate=False, log=lines.append)
    assert again.calls == ["sft", "sft_dpo"]  # sft_dpo needs sft's model; dpo's record stands
    assert summary.cached == [("dpo", 0)] and summary.done == [("sft", 0), ("sft_dpo", 0)]
    assert any("sft seed 0: finished before, but its model is not here and sft_dpo needs it" in line
               for line in lines)

    shutil.rmtree(spec.workdir)  # nothing pending needs a model now: nothing is trained
    last = TrainCalls(monkeypatch)
    assert len(run_sweep(spec, isolate=False, log=_quiet).cached) == 3 and last.calls == []


# ----------------------------------------------------------------------------- report
def _curve(values: list[float]) -> list[list[float]]:
    return [[float(i + 1), v] for i, v in enumerate(values)]


PROMPTS = 20
DIFFICULTY = [0.2 + 0.6 * j / (PROMPTS - 1) for j in range(PROMPTS)]  # per-prompt offsets shared by every run


def _fake(spec, name: str, seed: int, reward: float, *, seconds: float = 100.0, chosen=None, margins=None,
          implicit=None, beta: float = 0.1, z0: float = 0.0, noise: float = 0.0, length: int = 30) -> None:
    """A finished record whose per-prompt rewards are ``reward`` + prompt offset + seeded noise."""
    import random

    rng = random.Random(f"{name}-{seed}")
    rewards = [reward + d - 0.5 + rng.gauss(0, noise) for d in DIFFICULTY]
    curves = {"rewards/chosen": _curve(chosen or [0.0, 0.0, 0.0, 0.0])}
    if margins is not None:
        curves["rewards/margins"] = _curve(margins)
    if implicit is not None:
        curves["rewards/implicit"] = _curve(implicit)
    per_prompt = {"prompt_key": [f"p{j}" for j in range(PROMPTS)], "reward": rewards,
                  "win": [float(r > 0.5) for r in rewards], "length": [length + j % 5 for j in range(PROMPTS)],
                  "ended": [int(j % 4 != 0) for j in range(PROMPTS)],
                  "correct": [float(r > 0.6) if j % 2 else None for j, r in enumerate(rewards)],
                  "format": [None] * PROMPTS}
    write_json_atomic(result_path(spec, name, seed), _record(
        spec, name, seed, DONE,
        train={"seconds": seconds, "cpu_seconds": seconds, "peak_rss_mb": 1000.0, "curves": curves,
               "final_metrics": {}},
        effective={"beta": beta, "z0": z0},
        eval={"mean_reward": sum(rewards) / PROMPTS, "reference_mean_reward": 0.5, "win_rate": 0.5, "tie_rate": 0.0,
              "loss_rate": 0.5, "kl": 1.0 + reward, "mean_length": float(length + 2), "eos_rate": 0.75,
              "pair_accuracy": 0.5, "beta": beta, "num_prompts": PROMPTS, "per_prompt": per_prompt},
    ))


REPORT_CLAIMS = [
    {"id": 1, "title": "strong beats weak; twin equals weak", "checks": [
        {"kind": "beats", "a": "strong", "b": "weak"},
        {"kind": "equal", "a": "twin", "b": "weak", "margin": 0.03}]},
    {"id": 2, "title": "mixed", "checks": [
        {"kind": "beats", "a": "strong", "b": "weak"},
        {"kind": "beats", "a": "weak", "b": "strong"},
        {"kind": "beats", "a": "strong", "b": "weak", "metric": "train_cpu_seconds", "better": "lower"}]},
    {"id": 3, "title": "curves and sweeps", "checks": [
        {"kind": "not_falling", "a": "strong", "metric": "chosen_change", "margin": 0.05},
        {"kind": "falling", "a": "weak", "metric": "chosen_change"},
        {"kind": "decreasing", "runs": ["strong", "z_high"], "x": "z0", "metric": "implicit_mean", "seed": 0},
        {"kind": "decreasing", "runs": ["strong", "b_high"], "x": "beta", "metric": "logratio_gap", "seed": 0}],
     "figures": ["chosen_curves", "sweep"]},
    {"id": 4, "title": "never run", "checks": [
        {"kind": "beats", "a": "missing", "b": "weak"},
        {"kind": "no_reference", "a": "online"},
        {"kind": "no_reference", "a": "missing"}]},
    {"id": 5, "title": "noise cannot tell", "checks": [
        {"kind": "beats", "a": "noisy", "b": "weak"},
        {"kind": "equal", "a": "noisy", "b": "weak", "margin": 0.03}]},
]


def test_report_verdicts_on_constructed_results(tmp_path, tiny_model_dir):
    names = ["strong", "weak", "twin", "missing", "noisy"]
    runs = [{"name": n, "label": n.capitalize(), "config": {"loss_type": "dpo", "dataset": "x.jsonl"}} for n in names]
    runs += [{"name": "z_high", "extends": "strong", "seeds": [0], "config": {"z0": 5.0}},
             {"name": "b_high", "extends": "strong", "seeds": [0], "config": {"beta": 0.2}},
             {"name": "online", "config": {"loss_type": "not_registered_yet", "dataset": "x.jsonl"}}]
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir, runs, REPORT_CLAIMS, seeds=[0, 1, 2]))
    for seed, jitter in zip([0, 1, 2], [-0.01, 0.0, 0.01]):
        _fake(spec, "strong", seed, 0.70 + jitter, seconds=50 + seed, chosen=[0.0, 0.1, 0.2, 0.3],
              margins=[0.0, 0.1, 0.2, 0.4], implicit=[0.0, 0.1, 0.1, 0.2], noise=0.02)
        _fake(spec, "weak", seed, 0.50 + jitter, seconds=100 + seed, chosen=[0.0, -0.2, -0.4, -0.6], noise=0.02)
        _fake(spec, "twin", seed, 0.505 - jitter, noise=0.02)
        _fake(spec, "noisy", seed, 0.52 + 3 * jitter, noise=0.4)
    _fake(spec, "z_high", 0, 0.6, implicit=[0.0, -0.3, -0.4, -0.5], z0=5.0, margins=[0.0, 0.1, 0.2, 0.4])
    _fake(spec, "b_high", 0, 0.6, beta=0.2, margins=[0.0, 0.1, 0.2, 0.4])  # same margin at twice β: half the gap
    write_json_atomic(result_path(spec, "missing", 0), _record(spec, "missing", 0, "failed", reason="boom"))

    results = collect(spec)
    checks = [[evaluate_check(results, c) for c in claim["checks"]] for claim in spec.claims]
    verdicts = [[c.verdict for c in claim] for claim in checks]
    assert verdicts[0] == [REPRODUCED, REPRODUCED]  # a clear win; a clear tie inside the margin
    assert verdicts[1] == [REPRODUCED, NOT_REPRODUCED, REPRODUCED]
    assert verdicts[2] == [REPRODUCED, REPRODUCED, REPRODUCED, REPRODUCED]
    # "missing" failed (so even its structural check waits for a run); "online" has an unregistered method
    assert verdicts[3] == [NOT_RUN, NOT_RUN, NOT_RUN]
    assert verdicts[4] == [INCONCLUSIVE, INCONCLUSIVE]  # noise 0.4 on 20 prompts: neither a win nor a tie
    win = checks[0][0]
    assert win.raw.seeds == 3 and win.raw.prompts == PROMPTS
    assert win.raw.estimate == pytest.approx(0.2, abs=0.01) and win.raw.low > 0.15
    assert win.controlled is not None and win.controlled_verdict == REPRODUCED  # equal lengths: LC agrees
    time_check = checks[1][2]
    assert time_check.raw.estimate == pytest.approx(50.0) and time_check.raw.prompts == 1  # B − A, lower is better
    assert [claim_verdict(c) for c in checks] == [REPRODUCED, MIXED, REPRODUCED, NOT_RUN, INCONCLUSIVE]

    page = write_report(spec).read_text(encoding="utf-8")
    assert "| 1. strong beats weak; twin equals weak | **reproduced** | 2/2 |" in page
    assert "| 2. mixed | **mixed** | 3/3 |" in page
    assert "| 4. never run | **not run** | 0/3 |" in page
    assert "| 5. noise cannot tell | **inconclusive** | 2/2 |" in page
    assert "| Strong beats Weak (held-out judge reward (training signal)) | **reproduced** | A − B +0.2" in page
    assert "Missing has 0 seed(s) (failed: boom)" in page
    assert "95% paired bootstrap interval over prompts *and* seeds" in page  # the rule is written on the page
    assert "r with length" in page and "answer correctness (checkable)" in page
    assert "computed on the 3 evaluation prompts" in page and "(0 with a checkable answer" in page  # eval limit 3
    assert "- 3 held-out prompts and 3 seeds give wide intervals" in page
    # 14 finished records (4 runs × 3 seeds + 2 sweep points), all made by this checkout's code
    assert f"`+changes`: uncommitted code): {source_commit()}: 14." in page
    assert "python -m benchmarks.claims run spec.yaml" in page
    for figure in ("reward_vs_kl.png", "chosen_reward_curves.png", "rao_sweep.png"):
        assert (spec.figures_dir / figure).is_file()
        assert f"](figures/{figure})" in page

    # a record written under other settings is not read: changing the budget orphans every result,
    # and the next report draws no figure rather than keeping stale ones
    spec.budget["max_steps"] = 3
    assert collect(spec).done == {}
    assert "**not run**" in write_report(spec).read_text(encoding="utf-8")
    assert not (spec.figures_dir / "reward_vs_kl.png").exists()


def test_one_seed_comparisons_are_not_judged(tmp_path, tiny_model_dir):
    runs = [{"name": n, "config": {"loss_type": "dpo", "dataset": "x.jsonl"}} for n in ("a", "b")]
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir, runs, seeds=[0, 1]))
    _fake(spec, "a", 0, 0.9)
    _fake(spec, "b", 0, 0.1)
    _fake(spec, "b", 1, 0.1)
    result = evaluate_check(collect(spec), {"kind": "beats", "a": "a", "b": "b"})
    assert result.verdict == NOT_RUN and "a has 1 seed(s)" in result.detail


def test_cli_status_and_report(tmp_path, tiny_model_dir, capsys):
    runs = [{"name": "dpo", "config": {"loss_type": "dpo", "dataset": "x.jsonl"}},
            {"name": "later", "config": {"loss_type": "not_registered_yet", "dataset": "x.jsonl"}}]
    path = tiny_spec(tmp_path, tiny_model_dir, runs, [{"id": 1, "title": "t", "checks": [
        {"kind": "beats", "a": "dpo", "b": "later"}]}])
    spec = load_spec(path)
    _fake(spec, "dpo", 0, 0.6)
    assert main(["status", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not registered yet" in out and "1 done, 1 pending" in out
    assert main(["report", str(path)]) == 0
    assert "**not run**" in (tmp_path / "docs" / "results.md").read_text(encoding="utf-8")
    assert main(["run", str(tmp_path / "nope.yaml")]) == 1
    assert "cannot read the spec" in capsys.readouterr().err


def test_runs_hold_the_lock_file_while_they_run(tmp_path, tiny_model_dir, monkeypatch):
    import fcntl

    lock = tmp_path / "cpu.lock"
    seen: list[bool] = []

    def probe(config):
        with open(lock, encoding="utf-8") as other:  # another open file: blocked while the sweep holds it
            try:
                fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                seen.append(False)
                fcntl.flock(other, fcntl.LOCK_UN)
            except BlockingIOError:
                seen.append(True)
        return REAL_TRAIN(config)

    monkeypatch.setattr(runner_module, "train_model", probe)
    runs = [r for r in sweep_runs(tmp_path) if r["name"] == "sft"]
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir, runs))
    assert run_sweep(spec, isolate=False, log=_quiet, lock=str(lock)).done == [("sft", 0)]
    assert seen == [True]
    with open(lock, encoding="utf-8") as after:  # released when the run ended
        fcntl.flock(after, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_isolated_worker_failure_is_recorded_with_its_log(tmp_path, tiny_model_dir):
    runs = [{"name": "broken", "config": {"loss_type": "dpo", "dataset": str(tmp_path / "absent.jsonl")}}]
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir, runs))
    summary = run_sweep(spec, log=_quiet)  # isolate=True: the run trains in a fresh process
    assert summary.failed == [("broken", 0)]
    record = read_record(spec, "broken", 0)
    assert "worker exited with code 1" in record["reason"] and "file not found" in record["reason"]
    assert (spec.workdir / record["run_dir"] / "log.txt").is_file()


# ----------------------------------------------------------------------------- peers
def test_trl_rloo_peer_trains_saves_and_is_evaluated_like_a_run(tmp_path, tiny_model_dir):
    import torch
    from safetensors.torch import load_file

    prompts = str(tmp_path / "data" / "prompts.jsonl")
    online = {"dataset": prompts, "reward": "callable:tests.test_experiment:length_reward", "beta": 0.1,
              "num_generations": 2, "max_completion_length": 6, "temperature": 1.0}
    runs = [{"name": "rloo", "config": {"loss_type": "trl_rloo", **online}}]
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir, runs))
    assert validate_spec(spec) == []  # checked as una_online: the online keys are known
    summary = run_sweep(spec, isolate=False, log=_quiet)
    assert summary.done == [("rloo", 0)], read_record(spec, "rloo", 0)
    record = read_record(spec, "rloo", 0)
    folder = spec.workdir / record["run_dir"]
    steps = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "reward" in s] == [1, 2]
    assert record["effective"] == {"beta": 0.1, "learning_rate": 1e-3, "max_steps": 2, "per_device_train_batch_size": 2}
    assert record["eval"]["num_prompts"] == 3 and 0 <= record["eval"]["win_rate"] <= 1
    trained = load_file(str(folder / "model" / "model.safetensors"))
    base = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    changed = [k for k in base if k in trained and not torch.equal(base[k], trained[k])]
    assert changed and not any("lora" in k for k in trained)  # merged LoRA, saved in the plain layout


def test_peer_config_typos_fail_and_missing_packages_make_it_unavailable(tmp_path, tiny_model_dir, monkeypatch):
    from benchmarks.claims import peers

    runs = [{"name": "rloo", "config": {"loss_type": "trl_rloo", "dataset": "x.jsonl", "num_generatoins": 2}}]
    with pytest.raises(SpecError, match="unknown config key 'num_generatoins'"):
        validate_spec(load_spec(tiny_spec(tmp_path, tiny_model_dir, runs)))
    monkeypatch.setitem(peers.PEERS, "trl_rloo", peers.Peer("trl_rloo", "una_online", ("no_such_package_xyz",),
                                                            peers.train_trl_rloo))
    runs = [{"name": "rloo", "config": {"loss_type": "trl_rloo", "dataset": "x.jsonl"}}]
    spec = load_spec(tiny_spec(tmp_path, tiny_model_dir, runs))
    summary = run_sweep(spec, isolate=False, log=_quiet)
    assert summary.unavailable == [("rloo", 0)]
    assert read_record(spec, "rloo", 0)["reason"] == "trl_rloo needs the package(s) no_such_package_xyz"


def test_trl_rloo_peer_reads_prompts_like_online_una(tmp_path, tiny_model_dir):
    from benchmarks.claims.peers import train_trl_rloo
    from unialign.data.errors import DataError

    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": conversation("Hi.")}, {"text": "no prompt here"}])
    with pytest.raises(DataError, match="bad.jsonl, row 2, field 'prompt': missing"):
        train_trl_rloo({"model_name_or_path": tiny_model_dir, "loss_type": "trl_rloo", "dataset": bad,
                        "reward": "callable:tests.test_experiment:length_reward", "output_dir": str(tmp_path / "run")})


def test_plan_prices_runs_from_the_table_then_from_measured_records(tmp_path, tiny_model_dir, capsys):
    from benchmarks.claims.plan import plan

    pairs = str(tmp_path / "data" / "pairs.jsonl")
    runs = [{"name": "dpo", "config": {"loss_type": "dpo", "dataset": pairs}}]
    path = tiny_spec(tmp_path, tiny_model_dir, runs, seeds=[0, 1])
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw["plan"] = {"cpu_hours": 0.02, "startup_seconds": 30, "eval_seconds_per_prompt_token": 0.5,
                   "eval_startup_seconds": 20, "seconds_per_step": {"dpo": 5.0}}
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    spec = load_spec(path)
    rows = plan(spec)
    # 2 steps (the tiny budget's max_steps) at 5 s + 30 s start-up; 3 prompts x 4 new tokens x 0.5 s + 20 s
    assert [(r.name, r.seed, r.steps, r.train_seconds, r.eval_seconds, r.source) for r in rows] == [
        ("dpo", 0, 2, 40.0, 26.0, "table"), ("dpo", 1, 2, 40.0, 26.0, "table")]
    write_json_atomic(result_path(spec, "dpo", 0), _record(
        spec, "dpo", 0, DONE, effective={"max_steps": 2}, train={"seconds": 80.0, "cpu_seconds": 50.0},
        eval={"num_prompts": 3, "cpu_seconds": 26.0 + 12.0, "made_reference": False}))  # 10 s/step, 1.5 s/token
    rows = plan(spec)
    assert [(r.train_seconds, r.eval_seconds, r.source, r.done) for r in rows] == [
        (50.0, 38.0, "measured", True), (50.0, 38.0, "measured", False)]
    assert main(["plan", str(path)]) == 1  # 176 s > 0.02 CPU-hours (72 s)
    out = capsys.readouterr().out
    assert "planned: 2 runs, 0.05 CPU-hours (budget 0.02); 1 done, 0.02 CPU-hours left  -- OVER BUDGET" in out
