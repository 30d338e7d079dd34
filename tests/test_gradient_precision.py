"""The float64 yardstick of the gradient check: it really runs in float64, and float32 layouts sit near it."""

from __future__ import annotations

import pytest
import torch

import benchmarks.bench as bench
from benchmarks.bench import BenchConfig
from benchmarks.gradient_precision import EXACT, fingerprints, float64_models, gaps, main

pytest.importorskip("trl")


def _cfg(model):
    return BenchConfig(model=model, methods=["dpo"], batch_size=1, steps=1, warmup=0, memory_steps=1, threads=1,
                       output_dir="", synthetic=True, prompt_length=40, completion_length=24, max_length=64)


def test_models_are_cast_to_float64_only_inside_the_block(tiny_model_dir):
    load = bench._models
    with float64_models():
        policy, reference = bench._models(_cfg(tiny_model_dir), True)
        assert {p.dtype for p in [*policy.parameters(), *reference.parameters()]} == {torch.float64}
    assert bench._models is load
    assert next(bench._models(_cfg(tiny_model_dir), False)[0].parameters()).dtype == torch.float32


def test_float32_layouts_are_within_rounding_of_the_float64_gradient(tiny_model_dir):
    prints = fingerprints("dpo", ["unialign", "unialign-prefix"], _cfg(tiny_model_dir))
    rows = {(a, b): gap for a, b, gap in gaps(prints)}
    assert list(rows) == [("unialign", EXACT), ("unialign-prefix", EXACT), ("unialign", "unialign-prefix")]
    assert all(0 < rows[(name, EXACT)] < 1e-5 for name in ("unialign", "unialign-prefix"))  # not float64 itself


def test_the_command_prints_every_pair(tiny_model_dir, capsys):
    assert main(["--model", tiny_model_dir, "--libraries", "unialign-prefix", "--prompt-length", "20",
                 "--completion-length", "12", "--threads", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"unialign-prefix against {EXACT}: ")
