"""The benchmark harness on the tiny model: it runs both libraries, writes the JSON, and refuses to claim a
speed-up when the step-0 losses or the step-0 gradients disagree. No timings are asserted (speed is printed by
benchmarks)."""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from types import SimpleNamespace

import pytest

from benchmarks import cpu_model, machine_info
from benchmarks.bench import (
    BenchConfig,
    FedTokens,
    PeakMemory,
    build_parser,
    fed_tokens,
    fingerprint_gap,
    format_profile,
    format_table,
    kernel_cell,
    kernel_usage,
    median_runs,
    op_category,
    ordinary_token_ids,
    prepare_examples,
    run_bench,
    step_flops,
    summarize,
)

pytest.importorskip("trl")

ROW_FIELDS = {
    "method", "library", "loss_step0", "losses", "s_per_step", "cpu_s_per_step", "useful_tokens_per_s",
    "useful_tokens_per_cpu_s", "matmul_peak_flops", "useful_tokens_per_step",
    "fed_tokens_per_step", "s_per_completion", "peak_step_mem_mb", "peak_rss_mb", "params", "flops_per_s", "mfu",
    "gradient_fingerprint",
}


@pytest.fixture(scope="module")
def report(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(
        model=tiny_model_dir, methods=["simpo"], libraries=["trl", "unialign", "unialign-prefix"], batch_size=2,
        max_length=48, steps=1, warmup=1, memory_steps=1, threads=1, isolate=False, output_dir=str(out),
    )
    return run_bench(cfg)


def test_harness_writes_json_with_every_field(report):
    saved = json.loads(open(report["path"], encoding="utf-8").read())
    assert saved["config"]["batch_size"] == 2 and saved["matmul_peak_flops"] > 0
    assert saved["trl_trainers"] == {"simpo": "CPOTrainer(loss_type=simpo)"}
    rows = {r["library"]: r for r in saved["rows"]}
    assert set(rows) == {"trl", "unialign", "unialign-prefix"}
    for row in rows.values():
        assert "error" not in row, row.get("error")
        assert ROW_FIELDS <= set(row), ROW_FIELDS - set(row)
        assert len(row["losses"]) == 3 and row["s_per_step"] > 0 and 0 < row["mfu"]  # warm-up, timed, memory
        assert len(row["warmup_s"]) == 1 and row["warmup_s"][0] > 0  # kept out of s_per_step
        assert row["step_mem_measure"] == "malloc in use" and row["peak_step_mem_mb"] > 0
    # same token ids and batches: the useful work is identical, prefix sharing feeds fewer tokens
    assert rows["trl"]["useful_tokens_per_step"] == rows["unialign"]["useful_tokens_per_step"]
    assert rows["unialign-prefix"]["fed_tokens_per_step"] < rows["unialign"]["fed_tokens_per_step"]
    for library in ("unialign", "unialign-prefix"):
        assert rows[library]["loss_step0"] == pytest.approx(rows["trl"]["loss_step0"], abs=1e-4)
        assert rows[library]["vs_trl"] == "ok" and rows[library]["speedup_tokens"] > 0
    assert "| simpo | trl |" in saved["table"]


def test_no_speedup_claimed_when_step0_losses_disagree(report):
    rows = copy.deepcopy(report["rows"])
    for row in rows:
        row.pop("vs_trl", None)
        if row["library"] == "unialign":
            row["loss_step0"] += 0.01  # injected mismatch
    summarize(rows, report["matmul_peak_flops"], tolerance=1e-4)
    bad = next(r for r in rows if r["library"] == "unialign")
    good = next(r for r in rows if r["library"] == "unialign-prefix")
    assert bad["vs_trl"] == "loss_mismatch"
    assert bad["speedup_tokens"] is None and bad["memory_ratio"] is None
    assert good["vs_trl"] == "ok" and good["speedup_tokens"] is not None
    table = format_table(rows)
    line = next(line for line in table.splitlines() if "| simpo | unialign |" in line)
    assert "LOSS MISMATCH" in line and "no speed-up claimed" in line


def test_records_without_gradient_fingerprints_compare_the_loss_after_the_first_update(report):
    rows = copy.deepcopy(report["rows"])
    for row in rows:
        row.pop("gradient_fingerprint")
        if row["library"] == "unialign-prefix":
            row["losses"][1] += 0.5
    summarize(rows, report["matmul_peak_flops"], tolerance=1e-4)
    assert next(r for r in rows if r["library"] == "unialign-prefix")["vs_trl"] == "loss_mismatch"
    assert next(r for r in rows if r["library"] == "unialign")["vs_trl"] == "ok"


def test_gradient_fingerprints_are_per_parameter_and_agree_across_layouts(report):
    rows = {r["library"]: r for r in report["rows"]}
    trl, prefix = rows["trl"]["gradient_fingerprint"], rows["unialign-prefix"]["gradient_fingerprint"]
    # the tiny Llama's 2 layers x 9 tensors + final norm + (tied) embedding, under the same names in both
    assert len(trl) == 20 and set(trl) == set(prefix) and "model.embed_tokens.weight" in trl
    assert all(v != 0.0 for v in trl.values())
    for library in ("unialign", "unialign-prefix"):
        assert rows[library]["gradient_gap"] < 1e-5
        assert "gradient gap" in format_table(report["rows"])


def test_fingerprint_gap_is_relative_and_infinite_for_other_parameters():
    assert fingerprint_gap({"a": 3.0, "b": 4.0}, {"a": 3.0, "b": 4.0}) == 0.0
    assert fingerprint_gap({"a": 3.0, "b": 4.5}, {"a": 3.0, "b": 4.0}) == pytest.approx(0.5 / 5.0)
    assert fingerprint_gap({"a": 3.0}, {"a": 3.0, "b": 4.0}) == float("inf")


@pytest.fixture(scope="module")
def dpo_setting(tiny_model_dir, tmp_path_factory):
    return BenchConfig(model=tiny_model_dir, methods=["dpo"], batch_size=2, steps=1, warmup=1, memory_steps=1,
                       threads=1, isolate=False, output_dir=str(tmp_path_factory.mktemp("bench-dpo")),
                       synthetic=True, prompt_length=24, completion_length=24, learning_rate=1e-3)


def _with_trl(cfg: BenchConfig, rows: list[dict]) -> list[dict]:
    trl = run_bench(BenchConfig(**{**asdict(cfg), "libraries": ["trl"]}))["rows"]
    return summarize(trl + [{k: v for k, v in r.items() if k != "vs_trl"} for r in rows], 1.0, 1e-4)


def test_a_wrong_beta_passes_the_step0_loss_but_not_the_gradient_check(dpo_setting, monkeypatch):
    import benchmarks.bench as bench

    monkeypatch.setitem(bench.METHODS, "dpo", {**bench.METHODS["dpo"], "params": {"beta": 0.2}})
    ours = run_bench(BenchConfig(**{**asdict(dpo_setting), "libraries": ["unialign-prefix"]}))["rows"]
    monkeypatch.undo()
    rows = _with_trl(dpo_setting, ours)
    row = rows[-1]
    assert row["loss_gap"] == 0.0  # log 2 whatever beta is: the step-0 loss cannot see it
    assert row["gradient_gap"] == pytest.approx(1.0, rel=1e-3)  # twice the gradient
    assert row["vs_trl"] == "gradient_mismatch" and row["speedup_tokens"] is None
    line = next(x for x in format_table(rows).splitlines() if "| unialign-prefix |" in x)
    assert "GRADIENT MISMATCH" in line and "no speed-up claimed" in line


def test_a_completion_that_sees_its_own_future_fails_the_gradient_check(dpo_setting, monkeypatch):
    import unialign.attention as attention

    parts = attention._key_parts

    def leaky(seg):  # a completion after the shared prompt attends its own completion whole: not causal
        return [(cols, causal and not seg.has_prefix) for cols, causal in parts(seg)]

    monkeypatch.setattr(attention, "_key_parts", leaky)
    ours = run_bench(BenchConfig(**{**asdict(dpo_setting), "libraries": ["unialign-prefix"]}))["rows"]
    monkeypatch.undo()
    row = _with_trl(dpo_setting, ours)[-1]
    assert row["loss_gap"] < 1e-6 and row["vs_trl"] == "gradient_mismatch" and row["gradient_gap"] > 1e-2


def test_dpo_gradients_agree_with_trl_at_length(tiny_model_dir, tokenizer, tmp_path):
    """At 1024 + 1024 tokens the summed log-probs are near -11,000, whose float32 rounding depends on the order
    of the sum, so the loss after one update is no longer a gradient check; the fingerprints still agree."""
    from tests.conftest import save_tiny_llama

    model = save_tiny_llama(tmp_path / "long", tokenizer, max_position_embeddings=2048)
    cfg = BenchConfig(model=model, methods=["dpo"], libraries=["trl", "unialign-prefix"], batch_size=1,
                      steps=1, warmup=1, memory_steps=1, threads=1, isolate=False, output_dir=str(tmp_path),
                      synthetic=True, prompt_length=1024, completion_length=1024, max_length=2048, learning_rate=1e-3)
    row = run_bench(cfg)["rows"][-1]
    assert row["library"] == "unialign-prefix" and row["loss_gap"] == 0.0
    assert row["gradient_gap"] < 1e-5 and row["vs_trl"] == "ok"


def test_activation_checkpointing_runs_in_both_libraries_and_leaves_the_gradients_alone(dpo_setting):
    checkpointed = BenchConfig(**{**asdict(dpo_setting), "libraries": ["trl", "unialign-prefix"],
                                  "gradient_checkpointing": True})
    rows = {r["library"]: r for r in run_bench(checkpointed)["rows"]}
    plain = run_bench(BenchConfig(**{**asdict(dpo_setting), "libraries": ["unialign-prefix"]}))["rows"][0]
    assert [rows[lib]["activation_checkpointing"] for lib in ("trl", "unialign-prefix")] == [True, True]
    assert plain["activation_checkpointing"] is False
    assert rows["unialign-prefix"]["vs_trl"] == "ok" and rows["unialign-prefix"]["gradient_gap"] < 1e-5
    # recomputing each layer in backward gives the gradients of the run that kept its activations
    assert fingerprint_gap(rows["unialign-prefix"]["gradient_fingerprint"], plain["gradient_fingerprint"]) < 1e-6


def test_saved_attention_runs_in_both_libraries_and_leaves_the_gradients_alone(dpo_setting):
    checkpointed = {**asdict(dpo_setting), "libraries": ["trl", "unialign-prefix"], "gradient_checkpointing": True}
    rows = {r["library"]: r for r in run_bench(BenchConfig(**(checkpointed | {"save_attention": True})))["rows"]}
    recomputed = {r["library"]: r for r in run_bench(BenchConfig(**checkpointed))["rows"]}
    assert [rows[lib]["saves_attention"] for lib in ("trl", "unialign-prefix")] == [True, True]
    assert [recomputed[lib]["saves_attention"] for lib in ("trl", "unialign-prefix")] == [False, False]
    assert rows["unialign-prefix"]["vs_trl"] == "ok" and rows["unialign-prefix"]["gradient_gap"] < 1e-5
    for lib in ("trl", "unialign-prefix"):  # keeping the attention outputs gives the recomputed run's gradients
        assert fingerprint_gap(rows[lib]["gradient_fingerprint"], recomputed[lib]["gradient_fingerprint"]) < 1e-6


def test_methods_without_trl_say_so(tiny_model_dir, tmp_path):
    cfg = BenchConfig(model=tiny_model_dir, methods=["rao"], libraries=["trl"], steps=1, warmup=0, isolate=False,
                      output_dir=str(tmp_path))
    rows = run_bench(cfg)["rows"]
    assert rows == [{"method": "rao", "library": "trl", "error": "TRL 1.16 has no rao trainer"}]


def test_the_bench_command_keeps_its_options():
    args = build_parser().parse_args(["--methods", "dpo,tpo", "--steps", "3", "--in-process",
                                      "--gradient-checkpointing"])
    assert args.methods == "dpo,tpo" and args.steps == 3 and args.in_process and args.gradient_checkpointing
    assert not build_parser().parse_args([]).gradient_checkpointing
    assert build_parser().parse_args(["--gradient-checkpointing", "--save-attention"]).save_attention
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])


def test_profile_breaks_a_step_down_by_phase_and_op(tiny_model_dir, tmp_path):
    cfg = BenchConfig(model=tiny_model_dir, methods=["dpo"], libraries=["unialign-prefix"], batch_size=2,
                      max_length=48, steps=1, warmup=1, threads=1, isolate=False, output_dir="", profile=True)
    row = run_bench(cfg)["rows"][0]
    assert set(row["phase_shares"]) == {"collate", "forward + backward", "optimizer"}
    assert sum(row["phase_shares"].values()) == pytest.approx(1.0, abs=1e-6)
    profile = row["profile"]
    assert sum(profile["categories"].values()) == pytest.approx(1.0, abs=1e-6)
    assert profile["categories"]["matmul"] > 0 and profile["self_seconds"] > 0
    assert sum(o["seconds"] for o in profile["top_ops"]) <= profile["self_seconds"] + 1e-9
    text = format_profile([row])
    assert text.startswith("dpo / unialign-prefix: collate ") and "by op category (self time): " in text


@pytest.mark.parametrize(("op", "category"), [
    ("aten::mm", "matmul"), ("aten::addmm_", "matmul"), ("aten::add_", "elementwise"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::_foreach_mul_", "optimizer"),
    ("aten::_softmax", "softmax / log-softmax"), ("ChunkedTokenLogpsBackward", "other"),
])
def test_ops_fall_into_the_right_category(op, category):
    assert op_category(op) == category


def test_trl_with_unialigns_allocator_setting_is_a_second_baseline(report):
    rows = copy.deepcopy(report["rows"])
    trl = next(r for r in rows if r["library"] == "trl")
    rows.append(trl | {"library": "trl-kept-memory", "useful_tokens_per_s": 2 * trl["useful_tokens_per_s"]})
    summarize(rows, report["matmul_peak_flops"], tolerance=1e-4)
    ours = next(r for r in rows if r["library"] == "unialign-prefix")
    assert ours["speedup_tokens_vs_trl_kept_memory"] == pytest.approx(ours["speedup_tokens"] / 2)
    assert "speedup_tokens" not in rows[-1]  # a baseline, not compared with itself
    args = build_parser().parse_args(["--libraries", "trl-kept-memory,unialign-prefix", "--repeat", "3"])
    assert args.repeat == 3 and args.libraries == "trl-kept-memory,unialign-prefix"


def test_repeated_runs_report_the_median_run_and_keep_every_figure():
    runs = [{"useful_tokens_per_s": v, "s_per_step": 100 / v, "peak_step_mem_mb": m}
            for v, m in ((90.0, 10.0), (70.0, 12.0), (80.0, 11.0))]
    chosen = median_runs(runs + [{"error": "worker died"}])
    assert chosen["useful_tokens_per_s"] == 80.0 and chosen["peak_step_mem_mb"] == 11.0  # one real run's fields
    assert chosen["repeats"]["useful_tokens_per_s"] == [90.0, 70.0, 80.0] and chosen["repeats"]["failed"] == 1
    assert median_runs([{"error": "x"}]) == {"error": "x"}


def test_fed_tokens_follow_the_layout_each_pass_uses():
    pair = SimpleNamespace(prompt_ids=[1] * 10, completion_ids=[[2] * 5, [3] * 7], kl_completion_ids=None)
    plain_pair = 10 + 5 + 10 + 7
    assert fed_tokens([pair], plain_pair, "trl") == FedTokens(32, 0, 32)
    assert fed_tokens([pair], plain_pair, "unialign") == FedTokens(32, 0, 32)
    assert fed_tokens([pair], plain_pair, "unialign-prefix") == FedTokens(22, 0, 22)  # the prompt once
    binary = SimpleNamespace(prompt_ids=[1] * 10, completion_ids=[[2] * 5], kl_completion_ids=[4] * 6)
    plain_binary = 10 + 5 + 10 + 6  # the KL sequence is a plain row of its own
    # in training the KL sequence gets a no-grad pass of its own, in both libraries
    assert fed_tokens([binary], plain_binary, "trl") == FedTokens(15, 16, 31)
    # only the reference's joint pass packs it with the prompt
    assert fed_tokens([binary], plain_binary, "unialign-prefix") == FedTokens(15, 16, 21)


def test_step_flops_count_weight_gradients_only_when_the_base_trains():
    assert step_flops(10, 3, 2, lora=False) == 6 * 10 * 3 + 2 * 10 * 2
    assert step_flops(10, 3, 2, lora=True) == 4 * 10 * 3 + 2 * 10 * 2
    assert step_flops(10, 3, 0, lora=False) == 180  # no forward-only pass (SimPO, TPO)


def test_a_row_without_trl_says_why():
    mine = {"method": "dpo", "library": "unialign-prefix", "loss_step0": 0.69, "losses": [0.69]}
    assert summarize([dict(mine)], 1.0, 1e-4)[0]["vs_trl"] == "TRL not run"
    failed = {"method": "dpo", "library": "trl", "error": "boom"}
    assert summarize([dict(mine), failed], 1.0, 1e-4)[0]["vs_trl"] == "TRL run failed"
    assert summarize([dict(mine, method="rao")], 1.0, 1e-4)[0]["vs_trl"] == "no TRL trainer"


@pytest.mark.parametrize("field", ["steps", "memory_steps", "repeat"])
def test_counts_below_one_are_refused_before_anything_runs(tiny_model_dir, field):
    with pytest.raises(ValueError, match="must each be at least 1"):
        run_bench(BenchConfig(model=tiny_model_dir, methods=["dpo"], libraries=["unialign"], output_dir="",
                              isolate=False, **{field: 0}))


def test_watched_model_records_the_step_peak_that_a_slow_sampler_misses(tiny_model_dir):
    import torch

    from unialign.models import load_model

    model = load_model(tiny_model_dir)
    ids = torch.randint(0, model.config.vocab_size, (4, 64))
    memory = PeakMemory("cpu", interval=3600.0)  # the thread samples once at the start, then sleeps
    if memory.measure != "malloc in use":
        pytest.skip("needs glibc mallinfo2")
    with memory:
        handles = memory.watch(model)
        logits = model(ids).logits
        logits_mb = logits.numel() * logits.element_size() / 2**20
        logits.float().logsumexp(-1).sum().backward()
        del logits
    for handle in handles:
        handle.remove()
    assert len(handles) == 1 + model.config.num_hidden_layers
    assert memory.delta_mb >= logits_mb  # the forward hook saw the logits (and more) alive


# --------------------------------------------------------------------------- any length: --data and --synthetic


def _synthetic_cfg(model, method, **extra):
    values = dict(model=model, methods=[method], libraries=["unialign"], batch_size=2, steps=1, warmup=1,
                  memory_steps=1, synthetic=True, prompt_length=12, completion_length=7, max_length=19,
                  isolate=False, output_dir="")
    return BenchConfig(**(values | extra))


@pytest.mark.parametrize(("method", "k"), [("dpo", 2), ("simpo", 2), ("kto", 1), ("tpo", 3), ("rao", 4), ("rao", 16)])
def test_synthetic_rows_have_exact_lengths_and_only_ordinary_tokens(tiny_model_dir, tokenizer, method, k):
    cfg = _synthetic_cfg(tiny_model_dir, method, completions=k if method == "rao" else 0)
    rows = prepare_examples(method, cfg, tokenizer)
    assert len(rows) == 2 * 3  # batch × (warm-up + timed + memory steps)
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    assert special and {0, 1, 2} <= special  # <|endoftext|>, <|im_start|>, <|im_end|> of the real vocabulary
    for row in rows:
        assert len(row.prompt_ids) == 12
        assert [len(c) for c in row.completion_ids] == [7] * k
        ids = row.prompt_ids + [t for c in row.completion_ids for t in c] + (row.kl_completion_ids or [])
        assert not special & set(ids) and all(0 <= t < len(tokenizer) for t in ids)
    assert len({row.prompt_ids[0] for row in rows}) == 1  # RAO's shared first token
    assert len({tuple(row.prompt_ids) for row in rows}) == len(rows)  # otherwise distinct rows
    again = prepare_examples(method, cfg, tokenizer)
    assert [r.prompt_ids for r in again] == [r.prompt_ids for r in rows]  # seeded: deterministic
    other = prepare_examples(method, BenchConfig(**(asdict(cfg) | {"seed": 1})), tokenizer)
    assert [r.prompt_ids for r in other] != [r.prompt_ids for r in rows]
    if method == "kto":
        assert [r.labels for r in rows[:2]] == [[1.0], [0.0]]
        assert all(len(r.kl_completion_ids) == 7 and r.kl_completion_ids != r.completion_ids[0] for r in rows)
    if method == "rao":
        assert all(sorted(r.scores) == pytest.approx([i / (k - 1) for i in range(k)]) for r in rows)
    if method == "tpo":
        assert rows[0].labels == [1.0, 1.0, 0.0]


def test_ordinary_vocabulary_leaves_out_special_and_added_tokens(tokenizer):
    ids = ordinary_token_ids(tokenizer)
    assert len(ids) == len(tokenizer) - len(set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder))
    assert 0 not in ids and 1 not in ids and 2 not in ids and ids[-1] == len(tokenizer) - 1


def test_a_users_dataset_replaces_the_bundled_one(tiny_model_dir, tokenizer, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Name the colour number {i}.", "chosen": f"Colour {i} is blue.", "rejected": "No."}
            for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    cfg = BenchConfig(model=tiny_model_dir, methods=["dpo"], batch_size=2, steps=1, warmup=1, memory_steps=1,
                      data=str(path))
    examples = prepare_examples("dpo", cfg, tokenizer)
    assert len(examples) == 6 and [e.row for e in examples] == [0, 1, 2, 0, 1, 2]  # cycled
    assert "Colour 1 is blue." in tokenizer.decode(examples[1].completion_ids[0])
    report = run_bench(BenchConfig(**(asdict(cfg) | {"libraries": ["trl", "unialign-prefix"], "isolate": False,
                                                       "output_dir": "", "threads": 1})))
    ours = next(r for r in report["rows"] if r["library"] == "unialign-prefix")
    assert ours["vs_trl"] == "ok", ours.get("error")


@pytest.mark.parametrize(("argv", "message"), [
    (["--synthetic", "--prompt-length", "0", "--completion-length", "8"],
     "--prompt-length must be at least 1 with --synthetic (got 0)"),
    (["--synthetic", "--prompt-length", "8"], "--completion-length must be at least 1 with --synthetic (got 0)"),
    (["--prompt-length", "8", "--completion-length", "8"],
     "--prompt-length applies to generated rows only: add --synthetic"),
    (["--synthetic", "--prompt-length", "8", "--completion-length", "8", "--max-length", "12"],
     "--max-length 12 is below --prompt-length + --completion-length = 16: rows would be truncated"),
    (["--synthetic", "--data", "x.jsonl", "--prompt-length", "8", "--completion-length", "8"],
     "--data 'x.jsonl' and --synthetic exclude each other"),
    (["--methods", "dpo", "--synthetic", "--prompt-length", "8", "--completion-length", "8", "--completions", "3"],
     "--completions 3: dpo rows have exactly 2 completions"),
    (["--methods", "rao", "--synthetic", "--prompt-length", "8", "--completion-length", "8", "--completions", "1"],
     "--completions 1: rao needs at least 2 completions per row"),
    (["--methods", "dpo", "--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
])
def test_bad_length_options_end_in_one_line_and_exit_1(argv, message, capsys, tmp_path):
    from benchmarks.bench import main

    assert main(["--libraries", "unialign", "--output-dir", str(tmp_path), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_synthetic_max_length_defaults_to_the_rows_length():
    from benchmarks.bench import build_parser as parser

    args = parser().parse_args(["--synthetic", "--prompt-length", "100", "--completion-length", "28"])
    assert args.max_length is None and args.prompt_length + args.completion_length == 128


def test_synthetic_rows_train_both_libraries_on_the_same_token_counts(tiny_model_dir):
    report = run_bench(_synthetic_cfg(tiny_model_dir, "dpo", libraries=["trl", "unialign-prefix"], threads=1))
    rows = {r["library"]: r for r in report["rows"]}
    assert rows["trl"]["useful_tokens_per_step"] == rows["unialign-prefix"]["useful_tokens_per_step"] == 2 * 2 * 19
    assert rows["unialign-prefix"]["fed_tokens_per_step"] == 2 * (12 + 7 + 7)  # the prompt once per row
    assert rows["unialign-prefix"]["vs_trl"] == "ok"


def test_a_worker_past_its_time_limit_is_recorded_not_lost(tiny_model_dir):
    from benchmarks.bench import _run_isolated

    cfg = _synthetic_cfg(tiny_model_dir, "dpo", worker_timeout=0.01)
    assert _run_isolated("dpo", "unialign", cfg) == {
        "method": "dpo", "library": "unialign", "error": "did not finish within the worker limit of 0.01 s"}


def test_a_worker_that_outgrows_memory_fails_in_its_own_allocation():
    import subprocess
    import sys

    from benchmarks import worker_env
    from benchmarks.bench import _out_of_memory

    script = ("import torch; from benchmarks.bench import limit_cpu_memory; cap = limit_cpu_memory()\n"
              "try:\n    torch.empty(2 * cap // 4)\nexcept RuntimeError as err:\n    print('REFUSED', cap > 0, err)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=worker_env(),
                          timeout=120)
    assert proc.stdout.startswith("REFUSED True"), proc.stderr[-2000:]
    assert _out_of_memory(proc.stdout) and not _out_of_memory("ValueError: bad row")


def test_the_machine_record_names_the_cpu_model_and_the_kernels_instruction_set(tmp_path):
    import torch

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx2\n"
                       "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert cpu_model(cpuinfo) == "AMD EPYC 7B13"
    assert cpu_model(tmp_path / "absent") is None
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu\n")
    assert cpu_model(cpuinfo) is None

    info = machine_info("cpu", 2)
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_model"] == cpu_model()


def test_kernel_usage_counts_the_page_faults_of_memory_touched_for_the_first_time(report):
    import mmap

    size = 64 * 2**20
    region = mmap.mmap(-1, size)
    region.madvise(mmap.MADV_NOHUGEPAGE)  # one fault per 4 KiB page, not one per 2 MiB huge page
    before = kernel_usage()
    for offset in range(0, size, mmap.PAGESIZE):
        region[offset] = 1
    touched = kernel_usage() - before
    again = kernel_usage()
    for offset in range(0, size, mmap.PAGESIZE):
        region[offset] = 2
    retouched = kernel_usage() - again
    region.close()
    pages = size // mmap.PAGESIZE
    assert pages <= touched.minor_faults < pages + 2000
    assert retouched.minor_faults < 2000  # the pages are resident now: no fault for them

    for row in report["rows"]:
        assert row["page_faults_per_step"] >= 0 and row["kernel_s_per_step"] >= 0
    assert kernel_cell({"kernel_s_per_step": 1.234, "page_faults_per_step": 2.5e6}) == "1.23 (2.50 M)"
    assert kernel_cell({"s_per_step": 3.0}) == "–"  # a record from before the column
    head, _, *lines = format_table(report["rows"]).splitlines()
    assert head.count("|") == lines[0].count("|") == 17
