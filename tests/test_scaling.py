"""The scaling sweep's bookkeeping: exact exponent fits, resumption, and that a loss mismatch still blocks a
speed-up at every length. Runs the real bench on the tiny model for one short point; no timings asserted."""

from __future__ import annotations

import copy
import json
import subprocess

import pytest

from benchmarks.bench import BenchConfig, summarize
from benchmarks.scaling import (
    Point,
    completion_cost_ratios,
    curve_rows,
    default_points,
    draw_figure,
    exponents,
    finished_reports,
    fit_exponent,
    main,
    measured_at,
    point_config,
    run_points,
    scaling_table,
)

pytest.importorskip("trl")


def test_exponent_of_a_power_law_is_its_power():
    xs = [1024, 2048, 4096]
    assert fit_exponent(xs, [3.0 * x**1.5 for x in xs]) == pytest.approx(1.5, abs=1e-12)
    assert fit_exponent(xs, [7.0 / x for x in xs]) == pytest.approx(-1.0, abs=1e-12)
    assert fit_exponent([2, 8], [5.0, 5.0]) == 0.0
    # least squares through log 1, log 2, log 4 of 1, 2, 8: slope (0·0 + ... ) = 1.5 exactly
    assert fit_exponent([1, 2, 4], [1.0, 2.0, 8.0]) == pytest.approx(1.5, abs=1e-12)
    assert fit_exponent([1024], [5.0]) is None and fit_exponent([1, 2], [0.0, 3.0]) is None


def _row(point, library, x, tps, mem, method="dpo"):
    return {"point": point, "method": method, "library": library, "x": x, "useful_tokens_per_s": tps,
            "peak_step_mem_mb": mem}


def test_exponents_fit_dpo_over_1024_to_4096_and_rao_over_every_k():
    rows = [_row(f"dpo_len{n}", "trl", n, 1e6 / n**0.5, 0.01 * n**2) for n in (256, 1024, 2048, 4096)]
    rows[0]["useful_tokens_per_s"] = 1.0  # outside the fit range: must not bend the slope
    rows += [_row(f"rao_k{k}", "unialign-prefix", k, 10.0 * k**0.25, 100.0 * k, method="rao") for k in (2, 4, 8, 16)]
    rows.append({"point": "dpo_len4096", "method": "dpo", "library": "unialign-prefix", "x": 4096, "error": "OOM"})
    fitted = exponents(rows)
    assert fitted["dpo trl tokens/s vs length"] == pytest.approx(-0.5, abs=1e-12)
    assert fitted["dpo trl step memory vs length"] == pytest.approx(2.0, abs=1e-12)
    assert fitted["rao unialign-prefix tokens/s vs K"] == pytest.approx(0.25, abs=1e-12)
    assert fitted["rao unialign-prefix step memory vs K"] == pytest.approx(1.0, abs=1e-12)
    assert "dpo unialign-prefix tokens/s vs length" not in fitted  # its only point failed
    rows += [_row(f"tpo_len{n}", "unialign-prefix", n, 5.0, 3.0 * n**1.5, method="tpo") for n in (1024, 2048)]
    assert exponents(rows)["tpo unialign-prefix step memory vs length"] == pytest.approx(1.5, abs=1e-12)
    assert "rao unialign-prefix step memory vs length" not in exponents(rows)  # rao_k points are the K axis only
    # checkpointed DPO is a curve of its own, over the same range; it does not bend the plain one
    rows += [_row(f"dpo_ckpt{n}", "trl", n, 1.0, 0.5 * n**0.75) for n in (256, 1024, 2048, 4096)]
    rows[-4]["peak_step_mem_mb"] = 1e9  # the 256 point lies outside the fit range
    fitted = exponents(rows)
    assert fitted["dpo trl step memory vs length, checkpointed"] == pytest.approx(0.75, abs=1e-12)
    assert fitted["dpo trl step memory vs length"] == pytest.approx(2.0, abs=1e-12)
    rows += [_row(f"rao_ckpt{n}", "unialign-prefix", n, 1.0, 2.0 * n**0.5, method="rao") for n in (1024, 4096)]
    assert exponents(rows)["rao unialign-prefix step memory vs length, checkpointed"] == pytest.approx(0.5, abs=1e-12)
    rows += [_row(f"dpo_savedattn{n}", "trl", n, 1.0, 0.7 * n**0.6) for n in (2048, 4096)]
    fitted = exponents(rows)
    assert fitted["dpo trl step memory vs length, checkpointed, attention saved"] == pytest.approx(0.6, abs=1e-12)
    assert fitted["dpo trl step memory vs length, checkpointed"] == pytest.approx(0.75, abs=1e-12)


def test_the_sweep_covers_the_issues_lengths_and_ks():
    points = {p.name: p for p in default_points()}
    assert [points[f"dpo_len{n}"].prompt_length + points[f"dpo_len{n}"].completion_length
            for n in (256, 1024, 2048, 4096)] == [256, 1024, 2048, 4096]
    assert [points[f"rao_k{k}"].completions for k in (2, 4, 8, 16)] == [2, 4, 8, 16]
    assert points["dpo_len2048"].libraries == ["trl", "trl-kept-memory", "unialign-prefix"]
    assert list(points)[:4] == ["dpo_len2048", "dpo_len256", "dpo_len1024", "dpo_len4096"]
    assert points["dpo_len4096"].overrides == {"steps": 1} and points["profile_dpo2048"].overrides["profile"]
    others = [points[f"{m}_len{n}"] for m in ("rao", "tpo", "kto") for n in (1024, 2048, 4096)]
    assert [(p.prompt_length, p.libraries) for p in others] == [(n // 2, ["unialign-prefix"])
                                                                for _ in range(3) for n in (1024, 2048, 4096)]
    # the fit's 1024–4096 range is measured for every layout, the longest at one timed step as DPO's
    assert [p.overrides for p in others] == [{}, {}, {"steps": 1}] * 3
    checkpointed = [points[f"dpo_ckpt{n}"] for n in (1024, 2048, 4096)]
    assert [(p.libraries, p.overrides) for p in checkpointed] == [
        (["trl", "unialign-prefix"], {"gradient_checkpointing": True}),
        (["trl", "unialign-prefix"], {"gradient_checkpointing": True}),
        (["trl", "unialign-prefix"], {"gradient_checkpointing": True, "steps": 1})]
    assert point_config(checkpointed[0], BenchConfig()).gradient_checkpointing
    assert [(points[f"rao_ckpt{n}"].libraries, points[f"rao_ckpt{n}"].overrides) for n in (1024, 4096)] == [
        (["unialign-prefix"], {"gradient_checkpointing": True}),
        (["unialign-prefix"], {"gradient_checkpointing": True, "steps": 1})]
    saved = [points[f"dpo_savedattn{n}"] for n in (2048, 4096)]
    assert [p.overrides for p in saved] == [{"gradient_checkpointing": True, "save_attention": True},
                                            {"gradient_checkpointing": True, "save_attention": True, "steps": 1}]
    assert point_config(saved[0], BenchConfig()).save_attention
    cfg = point_config(points["rao_k8"], BenchConfig(batch_size=1))
    assert (cfg.synthetic, cfg.methods, cfg.completions, cfg.max_length) == (True, ["rao"], 8, 1280)


@pytest.fixture(scope="module")
def swept(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    point = Point("dpo_len32", "dpo", ["trl", "unialign-prefix"], 16, 16, x=32)
    base = BenchConfig(model=tiny_model_dir, batch_size=1, steps=1, warmup=1, memory_steps=1, threads=1,
                       isolate=False)
    return out, point, base, run_points([point], base, out, lock=str(out / "lock"), log=lambda m: None)


def test_each_point_is_written_as_it_finishes_and_skipped_when_found(swept):
    out, point, base, reports = swept
    saved = json.loads((out / "dpo_len32.json").read_text(encoding="utf-8"))
    assert saved["point"]["name"] == "dpo_len32" and saved["config"]["prompt_length"] == 16
    assert {r["library"] for r in saved["rows"]} == {"trl", "unialign-prefix"}

    def must_not_run(cfg):
        raise AssertionError("a finished point was run again")

    messages = []
    second = Point("dpo_len64", "dpo", ["unialign"], 32, 32, x=64)
    calls = []
    again = run_points([point, second], base, out, run=lambda cfg: calls.append(cfg) or {"rows": []},
                       log=messages.append)
    assert again["dpo_len32"]["rows"] == saved["rows"] and messages[0].startswith("dpo_len32: found")
    assert [c.prompt_length for c in calls] == [32]  # only the new point ran
    run_points([point, second], base, out, run=must_not_run, log=messages.append)


def test_a_loss_mismatch_still_blocks_the_speedup_in_the_sweep(swept):
    _, point, _, reports = swept
    rows = curve_rows(reports, [point])
    ours = next(r for r in rows if r["library"] == "unialign-prefix")
    assert ours["vs_trl"] == "ok" and ours["total_length"] == 32
    broken = copy.deepcopy(rows)
    for row in broken:
        row.pop("vs_trl", None)
        if row["library"] == "unialign-prefix":
            row["loss_step0"] += 0.01
    summarize(broken, 1.0, tolerance=1e-4)
    line = next(x for x in scaling_table(broken).splitlines() if "| unialign-prefix |" in x)
    assert "LOSS MISMATCH" in line and "no speed-up claimed" in line
    assert next(r for r in broken if r["library"] == "unialign-prefix")["speedup_tokens"] is None


def test_completion_costs_and_the_figure(tmp_path):
    rows = [{"point": "dpo_prompt1024", "library": "unialign-prefix", "s_per_completion": 2.0, "x": 2},
            {"point": "rao_k8", "library": "unialign-prefix", "s_per_completion": 0.5, "x": 8,
             "peak_step_mem_mb": 700.0},
            {"point": "tpo_prompt1024", "library": "trl", "s_per_completion": 9.0, "x": 3}]
    assert completion_cost_ratios(rows) == {"rao_k8": 0.25}
    figure = draw_figure(rows + [_row("dpo_len1024", "trl", 1024, 50.0, 900.0) | {"s_per_completion": 1.0}],
                         tmp_path / "f.png")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unknown_points_end_in_one_line(capsys, tmp_path):
    assert main(["--only", "dpo_len99", "--output-dir", str(tmp_path), "--lock", ""]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--only: unknown point(s) ['dpo_len99']" in err[0]


def test_the_report_covers_every_finished_point_not_only_those_just_run(swept):
    out, point, base, _ = swept
    other = Point("rao_k3", "rao", ["unialign-prefix"], 16, 8, completions=3, x=3)
    (out / "rao_k3.json").write_text(json.dumps({"rows": [], "point": {"name": "rao_k3"}}), encoding="utf-8")
    missing = Point("rao_k5", "rao", ["unialign-prefix"], 16, 8, completions=5, x=5)
    found = finished_reports([point, other, missing], out)
    assert sorted(found) == ["dpo_len32", "rao_k3"]
    assert found["dpo_len32"] == json.loads((out / "dpo_len32.json").read_text(encoding="utf-8"))


def test_each_point_records_the_commit_that_measured_it(swept):
    out, _, _, reports = swept
    commit = reports["dpo_len32"]["machine"]["commit"]
    head = subprocess.run(["git", "rev-parse", "--short=7", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert (commit is None) if not head else commit.split("+")[0] == head  # None outside a git checkout
    older = {"rows": [], "point": {"name": "rao_k3"}}  # a record from before commits were written
    assert measured_at({"dpo_len32": reports["dpo_len32"], "rao_k3": older}) == (
        f"measured at: {commit}: dpo_len32; not recorded: rao_k3")
