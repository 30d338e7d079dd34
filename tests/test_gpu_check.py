"""``python -m benchmarks.gpu --dry``: the prepared GPU check runs here on CPU, everything but the CUDA steps.

The GPU run itself needs a CUDA device (benchmarks/gpu/README.md); these tests make sure every
check's code path, the report files and the time-budget skipping work before that run is spent.
"""

from __future__ import annotations

import json

import pytest

from benchmarks.gpu.checks import main, run_checks
from unialign.losses.registry import all_methods

FAST = ["method:dpo", "method:kto", "qlora", "prefix_sharing_sdpa", "gradient_checkpointing", "attention"]


def _report(out):
    report = json.loads((out / "gpu_check.json").read_text())
    table = (out / "gpu_check.md").read_text()
    return report, {c["name"]: c for c in report["checks"]}, table


def test_dry_run_of_the_memory_checks_passes_and_writes_both_reports(tmp_path):
    pytest.importorskip("bitsandbytes", reason="the QLoRA check needs bitsandbytes (make setup installs it)")
    run_checks(tmp_path, dry=True, budget_s=600, only=FAST)
    report, checks, table = _report(tmp_path)
    assert list(checks) == FAST
    assert report["ok"] is True and all(c["ok"] is True for c in checks.values()), table
    assert report["environment"]["dry"] is True and report["environment"]["device"] == "cpu"
    assert checks["qlora"]["values"]["linear4bit_layers"] == 14  # 2 layers × 7 projections
    attention = checks["attention"]["values"]
    assert attention["eager"] == {"max_seq_logp_gap_vs_eager": 0.0}
    assert attention["flex_attention"]["refused"].startswith("config key 'attn_implementation' is flex_attention")
    assert attention["flash_attention_2"]["refused"].startswith("config key 'attn_implementation' is flash_attention_2")
    gc = checks["gradient_checkpointing"]["values"]
    assert gc["full"]["loss_gap"] == gc["full"]["grad_gap_rel"] == gc["lora"]["grad_gap_rel"] == 0.0
    assert gc["full, attention kept (against checkpointed)"]["grad_gap_rel"] <= 1e-6
    dpo = checks["method:dpo"]["values"]
    assert dpo["loss_fp32"][0] == pytest.approx(0.6931471805599453, abs=1e-6)  # step 0: policy = reference
    assert dpo["loss_gap_step0"] <= 1e-3
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| check")]
    assert [r.split(" | ")[0][2:] for r in rows] == FAST
    assert all(r.split(" | ")[1] == "ok" for r in rows)


def test_checks_past_the_budget_are_skipped_and_say_so(tmp_path):
    code = main(["--dry", "--out", str(tmp_path), "--budget-s", "0", "--only", "qlora", "attention"])
    report, checks, table = _report(tmp_path)
    assert code == 0 and report["ok"] is True  # skipped is not failed
    assert [c["ok"] for c in checks.values()] == [None, None]
    assert "| qlora | skipped | skipped: the time budget was spent |" in table


def test_a_failing_check_is_recorded_and_the_exit_code_says_so(tmp_path, monkeypatch):
    from benchmarks.gpu import checks as gpu

    def broken(setup):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(gpu, "check_attention", broken)
    code = main(["--dry", "--out", str(tmp_path), "--only", "attention"])
    report, checks, table = _report(tmp_path)
    assert code == 1 and report["ok"] is False
    assert checks["attention"]["summary"] == "RuntimeError: kernel exploded"
    assert "kernel exploded" in checks["attention"]["error"]
    assert "| attention | FAILED | RuntimeError: kernel exploded |" in table


@pytest.mark.slow
def test_full_dry_run_covers_every_method_and_the_bench(tmp_path):
    pytest.importorskip("trl", reason="the bench check compares against TRL (the test extra installs it)")
    run_checks(tmp_path, dry=True, budget_s=3600)
    report, checks, table = _report(tmp_path)
    expected = [f"method:{m.name}" for m in all_methods()]
    expected += ["qlora", "prefix_sharing_sdpa", "gradient_checkpointing", "attention", "bench_dpo_vs_trl"]
    assert list(checks) == expected
    assert report["ok"] is True, table
    bench = checks["bench_dpo_vs_trl"]["values"]
    assert [r["library"] for r in bench["rows"]] == ["trl", "unialign"]
    assert bench["rows"][1]["vs_trl"] == "ok"  # step-0 losses agree with TRL's
    assert "## bench: DPO against TRL" in table
