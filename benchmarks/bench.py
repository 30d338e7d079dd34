"""Side-by-side speed and memory benchmark: unialign against TRL on the same work.

Each (method, library) runs in its own process (clean peak memory, no monkey-patching shared
between libraries) on the same model, the same token ids (tokenized once by unialign, then handed
to each library's own collator), the same batches in the same order, batch size, dtype, thread
count, optimizer (fused ``torch.optim.AdamW``, the ``adamw_torch_fused`` both libraries'
``TrainingArguments`` default to, same learning rate) and number of steps. One step is:
collate → the trainer's ``training_step`` (forward, loss, backward) → optimizer step.

Reported per row: the loss at step 0 and a fingerprint of the step-0 gradients (unialign and TRL
must agree to ``tolerance`` and ``gradient_tolerance``; a row that disagrees gets no speed-up, only a
mark), seconds per step after warm-up, useful tokens per
second (non-padding prompt + completion tokens of the plain layout, the same count for every
library) by wall clock and by the process's CPU time (less disturbed by other jobs on a shared
machine), the peak memory of a step, the process's peak RSS, and achieved FLOP/s,
``(6·T_trained + 2·T_no_grad)·P / s`` (4 instead of 6 with LoRA: no weight gradients for the base)
with ``P`` parameters, ``T_trained`` the tokens the policy's pass with gradients was actually fed and
``T_no_grad`` those of passes without (the reference, KTO's KL sequences), as a fraction of the
measured fp32 matmul peak at the same thread count (measured in the parent and again in each
worker; the best value is the peak).

A step's peak memory is measured over ``memory_steps`` further steps after the timed ones, because
the sampling thread would slow the timed steps: on GPU the CUDA allocator's peak above what was
allocated before; on CPU the C heap's bytes in use (glibc ``mallinfo2``) above their value before,
so that an allocator which keeps freed memory (unialign's ``cpu_keep_freed_memory``) is not mistaken
for a lean library. With ``profile``, ``torch.profiler`` records the timed steps and the row gets a
breakdown by op category; phase shares (collate, forward + backward, optimizer) are always kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import add_debug_argument, machine_info, run_cli, worker_env
from unialign import jsonfile

# method → (bundled data, hyperparameters shared by both libraries, how TRL runs it or None)
METHODS: dict[str, dict[str, Any]] = {
    "dpo": {"data": "bundled:pairwise", "params": {"beta": 0.1}, "trl": "DPOTrainer"},
    "kto": {"data": "bundled:binary", "params": {"beta": 0.1}, "trl": "KTOTrainer"},
    "simpo": {"data": "bundled:pairwise", "params": {"beta": 2.0, "gamma": 0.5}, "trl": "CPOTrainer(loss_type=simpo)"},
    "tpo": {"data": "bundled:triple", "params": {"beta": 0.01, "alpha": 1.0}, "trl": "experimental TPOTrainer"},
    "rao": {"data": "bundled:listwise", "params": {"beta": 0.1}, "trl": None},
}
# library variant → unialign config keys (None: TRL)
LIBRARIES: dict[str, dict[str, Any] | None] = {
    "trl": None,
    "trl-kept-memory": None,  # TRL with unialign's CPU allocator setting (cpu_keep_freed_memory), like for like
    "unialign": {"prefix_sharing": False, "logprob_impl": "chunked"},
    "unialign-prefix": {"prefix_sharing": True, "logprob_impl": "chunked"},
    "unialign-full": {"prefix_sharing": False, "logprob_impl": "full"},
    # compile_layers: each transformer block compiled (the first warm-up step pays the compilation)
    "unialign-compiled": {"prefix_sharing": True, "logprob_impl": "chunked", "compile_layers": True},
    # padding_free: the micro-batch's packed rows end to end in one row (docs/benchmarks.md, "Layouts at length")
    "unialign-padding-free": {"prefix_sharing": True, "logprob_impl": "chunked", "padding_free": True},
}
DEFAULT_LIBRARIES = ("trl", "unialign", "unialign-prefix")


@dataclass
class BenchConfig:
    """What one benchmark invocation runs; every library gets exactly these settings."""

    model: str = "smollm2-135m-instruct"
    methods: list[str] = field(default_factory=lambda: ["dpo", "kto", "simpo", "tpo", "rao"])
    libraries: list[str] = field(default_factory=lambda: list(DEFAULT_LIBRARIES))
    batch_size: int = 4
    max_length: int = 256
    steps: int = 8
    warmup: int = 2
    threads: int = 2
    dtype: str = "float32"
    learning_rate: float = 1e-6
    lora: bool = False
    gradient_checkpointing: bool = False  # both libraries recompute each layer's activations in backward
    save_attention: bool = False  # with it: both keep the attention kernels' outputs (selective checkpointing)
    device: str = "auto"
    tolerance: float = 1e-4
    gradient_tolerance: float = 1e-3  # relative gap of the step-0 gradient fingerprints (gradient_fingerprint)
    isolate: bool = True
    output_dir: str = "benchmarks/results"
    profile: bool = False
    memory_steps: int = 2
    repeat: int = 1
    data: str = ""  # a dataset the loader accepts instead of the method's bundled one ("" = bundled)
    synthetic: bool = False  # generated rows of exactly prompt_length / completion_length tokens instead
    prompt_length: int = 0
    completion_length: int = 0
    completions: int = 0  # completions per synthetic row; 0 = the method's own number (RAO: 4)
    seed: int = 0
    worker_timeout: float = 0.0  # seconds a (method, library) worker may run; 0 = no limit


# --------------------------------------------------------------------------- measurements


class PeakMemory:
    """Peak memory above a baseline during a ``with`` block.

    GPU: the CUDA allocator's peak. CPU: the C heap's bytes in use (glibc ``mallinfo2``), sampled by a
    thread; resident memory where that is unavailable. In-use bytes, not RSS, because RSS also counts
    freed memory an allocator keeps for reuse, so it would compare allocator settings, not libraries.
    A thread alone can miss the peak of a step shorter than its interval, so :meth:`watch` also samples
    at the end of each forward pass of a model and as each of its decoder layers' gradients arrive.
    """

    def __init__(self, device: str, interval: float = 0.005):
        from unialign.allocator import malloc_in_use_bytes

        self._in_use = malloc_in_use_bytes
        self.device, self.interval = device, interval
        self.baseline = self.peak = 0
        self._stop = threading.Event()
        self.measure = "cuda allocated" if device == "cuda" else (
            "malloc in use" if malloc_in_use_bytes() is not None else "rss")

    def _current(self) -> int:
        if self.measure == "malloc in use":
            return self._in_use()
        import psutil

        return psutil.Process().memory_info().rss

    def sample(self, *_ignored) -> None:
        """Take one reading now (CPU; the CUDA allocator tracks its own peak)."""
        if self.device != "cuda":
            self.peak = max(self.peak, self._current())

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def watch(self, model) -> list:
        """Sample after ``model``'s forward pass and during its backward pass; the hook handles to remove.

        Forward hooks sit on the model and on its repeated blocks (the ``_no_split_modules`` classes, the
        same for both libraries); each block's output gets a gradient hook, which fires as backward
        reaches that block. Hooks go on the outside of a block, so compiled blocks are not broken up.
        """
        from unialign.models import repeated_blocks

        def on_output(_module, _inputs, output):
            self.sample()
            first = output[0] if isinstance(output, tuple) else output
            if getattr(first, "requires_grad", False):
                first.register_hook(lambda grad: self.sample())

        handles = [model.register_forward_hook(self.sample)]
        handles += [block.register_forward_hook(on_output) for block in repeated_blocks(model)]
        return handles

    def __enter__(self) -> PeakMemory:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.baseline = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.baseline = self.peak = self._current()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._current())

    @property
    def delta_mb(self) -> float:
        """Peak above the baseline, in MiB."""
        return (self.peak - self.baseline) / 2**20


def matmul_peak_flops(device: str, threads: int, size: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of a large fp32 matmul at ``threads`` threads: the machine's practical peak."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = 0.0
    for _ in range(repeats + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * size**3 / (time.perf_counter() - start))
    return best


# --------------------------------------------------------------------------- data


# completions per row each method's format has (None: any number from 2 up, RAO's listwise rows)
COMPLETIONS = {"dpo": 2, "simpo": 2, "kto": 1, "tpo": 3, "rao": None}
RAO_DEFAULT_COMPLETIONS = 4


def completions_for(method: str, cfg: BenchConfig) -> int:
    """Completions per synthetic row of ``method``: ``cfg.completions`` when given and valid, else its own number."""
    fixed = COMPLETIONS[method]
    if cfg.completions == 0:
        return fixed or RAO_DEFAULT_COMPLETIONS
    if fixed is not None and cfg.completions != fixed:
        raise ValueError(f"--completions {cfg.completions}: {method} rows have exactly {fixed} completion"
                         f"{'s' if fixed > 1 else ''} (pairs for dpo/simpo, 1 for kto, triples for tpo; "
                         f"only rao takes any K >= 2)")
    if cfg.completions < 2:
        raise ValueError(f"--completions {cfg.completions}: rao needs at least 2 completions per row")
    return cfg.completions


def check_data_options(cfg: BenchConfig) -> None:
    """One clear line for options that cannot go together or are out of range (before anything runs)."""
    if cfg.synthetic and cfg.data:
        raise ValueError(f"--data {cfg.data!r} and --synthetic exclude each other: give a dataset or generate one")
    if not cfg.synthetic:
        given = [name for name in ("prompt_length", "completion_length", "completions") if getattr(cfg, name)]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to generated rows only: add --synthetic")
        return
    for name in ("prompt_length", "completion_length"):
        if getattr(cfg, name) < 1:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag} must be at least 1 with --synthetic (got {getattr(cfg, name)})")
    if cfg.completions < 0:
        raise ValueError(f"--completions must be at least 1 (got {cfg.completions})")
    for method in cfg.methods:
        completions_for(method, cfg)
    total = cfg.prompt_length + cfg.completion_length
    if cfg.max_length < total:
        raise ValueError(f"--max-length {cfg.max_length} is below --prompt-length + --completion-length = {total}: "
                         "rows would be truncated (leave --max-length out to use their length)")


def ordinary_token_ids(tokenizer) -> list[int]:
    """The tokenizer's ids that are neither special nor added tokens (chat markers, padding, BOS/EOS)."""
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return [i for i in range(len(tokenizer)) if i not in special]


def synthetic_examples(method: str, cfg: BenchConfig, tokenizer, rows: int) -> list:
    """``rows`` generated rows for ``method``: prompts of exactly ``prompt_length`` ids and completions of exactly
    ``completion_length``, drawn uniformly (seeded by ``cfg.seed``) from the tokenizer's ordinary vocabulary.

    Every prompt starts with the same id (RAO's prefix consistency needs one shared first token). Feedback
    follows the method's format: DPO/SimPO pairs labelled (1, 0); TPO triples (reference, chosen, rejected)
    labelled (1, 1, 0); KTO single completions labelled alternately desirable and undesirable, with the
    mismatched KL completions the loader would attach; RAO K-listwise rows with K distinct scores in [0, 1].
    """
    import numpy as np

    from unialign.data.tokenize import TokenizedExample, attach_kl_pairs

    vocab = np.asarray(ordinary_token_ids(tokenizer))
    rng = np.random.default_rng(cfg.seed)
    k = completions_for(method, cfg)
    first = int(vocab[rng.integers(len(vocab))])

    def draw(n: int) -> list[int]:
        return [int(i) for i in vocab[rng.integers(len(vocab), size=n)]]

    examples = []
    for row in range(rows):
        prompt = [first, *draw(cfg.prompt_length - 1)]
        completions = [draw(cfg.completion_length) for _ in range(k)]
        example = TokenizedExample(prompt_ids=prompt, completion_ids=completions, row=row)
        if method in ("dpo", "simpo"):
            example.labels, example.scores, example.rewards = [1.0, 0.0], [1.0, 0.0], [1.0, 0.0]
        elif method == "tpo":
            example.labels = [1.0, 1.0, 0.0]
        elif method == "kto":
            example.labels = [1.0 if row % 2 == 0 else 0.0]
        else:  # rao: K distinct scores, in a random order
            scores = [float(s) for s in rng.permutation(np.linspace(0.0, 1.0, k))]
            example.scores, example.rewards = scores, list(scores)
        examples.append(example)
    if method == "kto":
        attach_kl_pairs(examples, cfg.prompt_length + cfg.completion_length)
    return examples


def prepare_examples(method: str, cfg: BenchConfig, tokenizer) -> list:
    """The rows of one run, cycled to ``batch_size × (warmup + steps + memory_steps)``: the method's bundled rows
    (or ``cfg.data``) tokenized by unialign, or with ``cfg.synthetic`` generated ones (:func:`synthetic_examples`)."""
    from unialign.config import UnialignConfig
    from unialign.losses.registry import get_method
    from unialign.pipeline import prepare_data

    need = cfg.batch_size * (cfg.warmup + cfg.steps + cfg.memory_steps)
    if cfg.synthetic:
        return synthetic_examples(method, cfg, tokenizer, need)
    ucfg = UnialignConfig(loss_type=method, output_dir=tempfile.mkdtemp(), max_length=cfg.max_length, report_to=[])
    data = prepare_data(cfg.data or METHODS[method]["data"], ucfg, get_method(method).for_config(ucfg), tokenizer)
    return [data.examples[i % len(data.examples)] for i in range(need)]


def trl_records(method: str, examples: list) -> list[dict]:
    """The same token ids in the layout each TRL trainer's collator reads."""
    records = []
    for e in examples:
        p, c = e.prompt_ids, e.completion_ids
        if method == "dpo":
            records.append({"prompt_ids": p, "chosen_ids": c[0], "rejected_ids": c[1]})
        elif method == "tpo":  # unialign's triple slots: reference, chosen, rejected
            records.append({"prompt_ids": p, "chosen_ids": c[1], "rejected_ids": c[2], "reference_ids": c[0]})
        elif method == "kto":
            records.append(
                {"prompt_ids": p, "completion_ids": c[0], "KL_completion_ids": e.kl_completion_ids,
                 "label": bool(e.labels[0] >= 0.5)}
            )
        elif method == "simpo":
            record = {}
            for name, ids in (("chosen", c[0]), ("rejected", c[1])):
                record[f"{name}_input_ids"] = p + ids
                record[f"{name}_attention_mask"] = [1] * (len(p) + len(ids))
                record[f"{name}_labels"] = [-100] * len(p) + ids
            records.append(record)
        else:
            raise ValueError(f"TRL has no {method}")
    return records


# --------------------------------------------------------------------------- one run (in a worker process)


def _device(cfg: BenchConfig) -> str:
    import torch

    if cfg.device != "auto":
        return cfg.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _models(cfg: BenchConfig, needs_reference: bool):
    from unialign.models import apply_lora, load_model

    policy = load_model(cfg.model, dtype=cfg.dtype)
    reference = None
    if cfg.lora:
        policy = apply_lora(policy)  # the reference is the base with adapters disabled, in both libraries
    elif needs_reference:
        reference = load_model(cfg.model, dtype=cfg.dtype)
    return policy, reference


def _unialign_trainer(method: str, cfg: BenchConfig, library: str, policy, reference, tokenizer, examples):
    from unialign.config import UnialignConfig
    from unialign.data.collate import PreferenceCollator
    from unialign.losses.registry import get_method
    from unialign.trainer import UnialignTrainer

    options = LIBRARIES[library]
    args = UnialignConfig(
        loss_type=method,
        output_dir=tempfile.mkdtemp(prefix="bench-"),
        max_length=cfg.max_length,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        torch_dtype=cfg.dtype,
        report_to=[],
        use_cpu=_device(cfg) == "cpu",
        gradient_checkpointing=cfg.gradient_checkpointing,
        activation_checkpointing_save_attention=cfg.save_attention,
        cpu_keep_freed_memory=True,  # as under the unialign command
        **METHODS[method]["params"],
        **options,
    )
    spec = get_method(method).for_config(args)
    collator = PreferenceCollator(
        tokenizer.pad_token_id,
        max(len(e.completion_ids) for e in examples),
        with_prompt_logps=spec.needs_prompt_logps,
        with_kl_pairs=spec.needs_kl_pairs,
    )
    trainer = UnialignTrainer(
        model=policy, args=args, method=spec, ref_model=reference, train_dataset=examples,
        data_collator=collator, processing_class=tokenizer,
    )

    def collate(rows):
        # The trainer builds its packed layout (segments, or the dense mask where it falls back) on first use;
        # built here, it is timed as collation, the phase where TRL's collators do their padding.
        return trainer.build_layout(collator(rows))

    return trainer, collate


def _trl_text_rows(method: str) -> list[dict]:
    """A few plain-text rows: TRL's constructors want a dataset; the measured batches come from our token ids."""
    base = [{"prompt": f"Question {i}?", "chosen": f"Answer {i}.", "rejected": f"No {i}.", "reference": f"Gold {i}."}
            for i in range(4)]
    if method == "kto":
        return [{"prompt": r["prompt"], "completion": r["chosen"], "label": i % 2 == 0} for i, r in enumerate(base)]
    return base


def _trl_trainer(method: str, cfg: BenchConfig, policy, reference, tokenizer):
    from datasets import Dataset

    common = dict(
        output_dir=tempfile.mkdtemp(prefix="bench-trl-"),
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        report_to=[],
        use_cpu=_device(cfg) == "cpu",
        max_length=cfg.max_length,
        bf16=cfg.dtype == "bfloat16",
        gradient_checkpointing=cfg.gradient_checkpointing,
    )
    rows = _trl_text_rows(method)
    params = METHODS[method]["params"]
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=params["beta"], loss_type=["sigmoid"], **common)
        return DPOTrainer(policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        args = KTOConfig(beta=params["beta"], **common)
        return KTOTrainer(policy, ref_model=reference, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer)
    if method == "simpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        args = CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=params["beta"], simpo_gamma=params["gamma"],
                         remove_unused_columns=False, **common)
        return CPOTrainer(policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if method == "tpo":
        from trl.experimental.tpo import TPOConfig, TPOTrainer

        args = TPOConfig(beta=params["beta"], tpo_alpha=params["alpha"], loss_type="sigmoid", **common)
        return TPOTrainer(policy, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    raise ValueError(f"TRL has no {method}")

# op name (torch.profiler, self time) → category of the breakdown; anything unmatched is "other"
OP_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_addmm_activation")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("softmax / log-softmax", ("softmax", "logsumexp")),
    ("optimizer", ("_foreach_", "aten::lerp", "aten::addcdiv", "aten::addcmul", "aten::sqrt")),
    ("copies / layout", ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::index",
                         "aten::gather", "aten::scatter", "aten::fill_", "aten::zero_", "aten::empty")),
    ("elementwise", ("aten::mul", "aten::add", "aten::sub", "aten::div", "aten::silu", "aten::pow",
                     "aten::rsqrt", "aten::mean", "aten::neg", "aten::sum", "aten::exp", "aten::where",
                     "aten::threshold", "aten::sigmoid")),
)


def op_category(name: str) -> str:
    """The breakdown category of a profiled op: the first group with a name fragment it contains, else ``other``."""
    for category, needles in OP_CATEGORIES:
        if any(needle in name for needle in needles):
            return category
    return "other"


def profile_breakdown(events, top: int = 12) -> dict[str, Any]:
    """Self time of a torch.profiler run by category and by op, as shares of the total self time."""
    self_us: dict[str, float] = {}
    for event in events:
        self_us[event.key] = self_us.get(event.key, 0.0) + event.self_cpu_time_total
    total = sum(self_us.values()) or 1.0
    categories: dict[str, float] = {}
    for name, us in self_us.items():
        categories[op_category(name)] = categories.get(op_category(name), 0.0) + us / total
    ops = sorted(self_us.items(), key=lambda item: -item[1])[:top]
    return {
        "self_seconds": total / 1e6,
        "categories": dict(sorted(categories.items(), key=lambda item: -item[1])),
        "top_ops": [{"op": name, "share": us / total, "seconds": us / 1e6} for name, us in ops],
    }


def enable_checkpointing(trainer, save_attention: bool = False) -> None:
    """Switch on activation checkpointing as ``Trainer.train`` does from the trainer's own arguments (the bench
    drives ``training_step`` itself, so ``train`` never runs): the same call and kwargs for both libraries.

    ``save_attention``: both keep the attention kernels' outputs through the same ``context_fn``. unialign as its
    trainer does on ``on_train_begin``; TRL through its args' checkpoint kwargs, since TRL switches checkpointing
    off around each no-grad pass and back on from them.
    """
    from unialign.checkpointing import attention_saving_context, save_attention_in_checkpoints
    from unialign.trainer import UnialignTrainer

    kwargs = trainer.args.activation_checkpointing_kwargs or None
    ours = isinstance(trainer, UnialignTrainer)
    if save_attention and not ours:
        kwargs = (kwargs or {"use_reentrant": False}) | {"context_fn": attention_saving_context}
        trainer.args.activation_checkpointing_kwargs = trainer.args.gradient_checkpointing_kwargs = kwargs
    trainer.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    if save_attention and ours:
        save_attention_in_checkpoints(trainer.model)


def step_flops(params: int, trained_tokens: int, forward_only_tokens: int, lora: bool) -> float:
    """Matmul FLOPs of the work: a trained token costs forward 2·P + backward 4·P (2·P for input gradients
    only when the base weights are frozen, as with LoRA; the adapters' own FLOPs are negligible); a token
    fed to a pass without gradient (the reference, KTO's KL sequences) costs 2·P."""
    return (4 if lora else 6) * params * trained_tokens + 2 * params * forward_only_tokens


def is_trl(library: str) -> bool:
    """Whether a library variant is TRL's (stock or with unialign's allocator setting)."""
    return LIBRARIES[library] is None


@dataclass
class FedTokens:
    """Tokens (padding excluded) fed to each pass of one step."""

    trained: int  # the policy's pass with gradients
    policy_no_grad: int  # the policy's pass without gradients: KTO's mismatched (KL) sequences
    reference: int  # the reference's pass, when the method has one


def fed_tokens(examples: list, plain_tokens: int, library: str) -> FedTokens:
    """Tokens each pass is fed for ``examples``, in the layout each library uses for it.

    ``plain_tokens`` is the plain layout's count (one row per sequence, KTO's KL sequences included).
    In training both libraries score KTO's KL sequences in a pass of their own without gradient, one
    row each. With prefix sharing a row's prompt is fed once for all its completions when the row has
    two or more; the reference's joint pass also packs KTO's completion with its KL sequence.
    """
    kl_plain = sum(len(e.prompt_ids) + len(e.kl_completion_ids) for e in examples if e.kl_completion_ids)
    main_plain = plain_tokens - kl_plain
    if is_trl(library) or not LIBRARIES[library]["prefix_sharing"]:
        return FedTokens(main_plain, kl_plain, plain_tokens)
    main_packed = sum(len(e.prompt_ids) + sum(map(len, e.completion_ids)) for e in examples)
    policy_packs = any(len(e.completion_ids) > 1 for e in examples)
    reference_packs = policy_packs or kl_plain > 0
    return FedTokens(
        trained=main_packed if policy_packs else main_plain,
        policy_no_grad=kl_plain,
        reference=main_packed + kl_plain - sum(len(e.prompt_ids) for e in examples if e.kl_completion_ids)
        if reference_packs else plain_tokens,
    )


def run_one(method: str, library: str, cfg: BenchConfig) -> dict[str, Any]:
    """Train ``steps`` steps after ``warmup`` with one library; the measurements of that run."""
    import torch

    from unialign import allocator
    from unialign.losses.registry import get_method
    from unialign.models import load_tokenizer

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    device = _device(cfg)
    spec = get_method(method)
    row: dict[str, Any] = {"method": method, "library": library, "device": device}
    if is_trl(library) and METHODS[method]["trl"] is None:
        return row | {"error": f"TRL 1.16 has no {method} trainer"}
    tokenizer = load_tokenizer(cfg.model)
    examples = prepare_examples(method, cfg, tokenizer)
    policy, reference = _models(cfg, spec.needs_reference)
    if is_trl(library):
        if library == "trl-kept-memory" and device == "cpu":
            allocator.keep_freed_memory()  # what unialign's trainer does on CPU, for a like-for-like allocator
        trainer = _trl_trainer(method, cfg, policy, reference, tokenizer)
        records = trl_records(method, examples)
        collate, items = trainer.data_collator, records
    else:
        trainer, collate = _unialign_trainer(method, cfg, library, policy, reference, tokenizer, examples)
        items = examples
    model = trainer.model
    model.to(device)
    if cfg.gradient_checkpointing:
        enable_checkpointing(trainer, cfg.save_attention)
    if getattr(trainer, "ref_model", None) is not None:
        trainer.ref_model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, fused=True)
    trainer.optimizer = optimizer
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); we drive the steps ourselves

    from unialign.data.collate import PreferenceCollator

    plain = PreferenceCollator(tokenizer.pad_token_id, max(len(e.completion_ids) for e in examples),
                               with_kl_pairs=spec.needs_kl_pairs)
    b = cfg.batch_size
    peak_here = matmul_peak_flops(device, cfg.threads)  # under the same load as the steps that follow
    losses, times, cpu_times, useful, completions = [], [], [], 0, 0
    kernel_times, page_faults = [], []
    fingerprint: dict[str, float] = {}
    fed = FedTokens(0, 0, 0)
    warmup_times = []  # kept apart: they include one-off costs (compilation with compile_layers)
    phases = {"collate": 0.0, "forward + backward": 0.0, "optimizer": 0.0}
    memory = PeakMemory(device)
    profiler = None
    timed_end = cfg.warmup + cfg.steps
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for step in range(timed_end + cfg.memory_steps):
        chunk = slice(step * b, (step + 1) * b)
        if step == cfg.warmup and cfg.profile:
            profiler = torch.profiler.profile(activities=_profiler_activities(device))
            profiler.__enter__()
        if step == timed_end:
            if profiler is not None:
                profiler.__exit__(None, None, None)
            memory.__enter__()  # its sampling slows a step, so the timed steps are over before it starts
            hooks = memory.watch(model)
        sync()
        start, cpu_start, kernel_start = time.perf_counter(), time.process_time(), kernel_usage()
        batch = collate(items[chunk])
        collated = time.perf_counter()
        loss = trainer.training_step(model, batch)
        sync()
        stepped = time.perf_counter()
        if step == 0:  # kept out of the step's wall and CPU time
            cpu_before, kernel_before = time.process_time(), kernel_usage()
            fingerprint = gradient_fingerprint(model)
            spent = time.perf_counter() - stepped
            start, collated, stepped = start + spent, collated + spent, stepped + spent
            cpu_start += time.process_time() - cpu_before
            kernel_start = kernel_start + (kernel_usage() - kernel_before)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start
        kernel = kernel_usage() - kernel_start
        losses.append(float(loss))
        if step < cfg.warmup:
            warmup_times.append(elapsed)
        if not cfg.warmup <= step < timed_end:
            continue
        phases["collate"] += collated - start
        phases["forward + backward"] += stepped - collated
        phases["optimizer"] += start + elapsed - stepped
        times.append(elapsed)
        cpu_times.append(cpu_elapsed)
        kernel_times.append(kernel.system_s)
        page_faults.append(kernel.minor_faults)
        tokens = int(plain(examples[chunk])["attention_mask"].sum())
        useful += tokens
        step_fed = fed_tokens(examples[chunk], tokens, library)
        fed = FedTokens(*(a + b for a, b in zip(astuple(fed), astuple(step_fed))))
        completions += sum(len(e.completion_ids) for e in examples[chunk])
    memory.__exit__(None, None, None)
    for hook in hooks:
        hook.remove()
    if profiler is not None:
        row["profile"] = profile_breakdown(profiler.key_averages())
    import resource

    from unialign.checkpointing import attention_saving_layers

    seconds = sum(times)
    params = sum(p.numel() for p in model.parameters())
    reference_forward = spec.needs_reference
    flops = step_flops(params, fed.trained, fed.policy_no_grad + (fed.reference if reference_forward else 0), cfg.lora)
    return row | {
        "loss_step0": losses[0],
        "losses": losses,
        "gradient_fingerprint": fingerprint,
        "s_per_step": seconds / len(times),
        "warmup_s": warmup_times,
        "cpu_s_per_step": sum(cpu_times) / len(cpu_times),
        "useful_tokens_per_cpu_s": useful / sum(cpu_times),
        "kernel_s_per_step": sum(kernel_times) / len(kernel_times),
        "page_faults_per_step": sum(page_faults) / len(page_faults),
        "matmul_peak_flops": peak_here,
        "useful_tokens_per_s": useful / seconds,
        "useful_tokens_per_step": useful / len(times),
        "fed_tokens_per_step": (fed.trained + fed.policy_no_grad) / len(times),
        "trained_tokens_per_step": fed.trained / len(times),
        "reference_fed_tokens_per_step": fed.reference / len(times),
        "completions_per_step": completions / len(times),
        "s_per_completion": seconds / completions,
        "peak_step_mem_mb": memory.delta_mb,
        "step_mem_measure": memory.measure,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params": params,
        "flops_per_s": flops / seconds,
        "reference_forward": reference_forward,
        "phase_shares": {name: value / seconds for name, value in phases.items()},
        "keeps_freed_memory": allocator.is_applied(),
        "activation_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "saves_attention": attention_saving_layers(model) > 0,
    }


@dataclass(frozen=True)
class KernelUsage:
    """This process's CPU time spent in the kernel and its minor page faults (memory first touched), so far."""

    system_s: float
    minor_faults: int

    def __add__(self, other: KernelUsage) -> KernelUsage:
        return KernelUsage(self.system_s + other.system_s, self.minor_faults + other.minor_faults)

    def __sub__(self, other: KernelUsage) -> KernelUsage:
        return KernelUsage(self.system_s - other.system_s, self.minor_faults - other.minor_faults)


def kernel_usage() -> KernelUsage:
    """This process's system CPU time and minor page faults so far: a step that hands its memory back to the
    operating system and touches it again pays a page fault per page, in system time that ``process_time``
    counts as the step's own."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return KernelUsage(usage.ru_stime, usage.ru_minflt)


def gradient_fingerprint(model) -> dict[str, float]:
    """Each parameter's gradient projected on a fixed random ±1 vector, by parameter name.

    The vector is seeded by the name, so two processes (two libraries) that computed the same
    gradients get the same numbers, whatever layout, kernels or summation order produced them; a
    wrong mask, position, token or loss weight changes them far beyond float32 rounding. Names are
    taken without wrapper prefixes (``module.``, ``_orig_mod.``). Summed in float64.
    """
    import zlib

    import torch

    out = {}
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        key = name.replace("_orig_mod.", "").removeprefix("module.")
        signs = torch.randint(0, 2, param.shape, generator=torch.Generator().manual_seed(zlib.crc32(key.encode())))
        out[key] = float((param.grad.detach().cpu().double() * (2 * signs - 1)).sum())
    return out


def fingerprint_gap(mine: dict[str, float], theirs: dict[str, float]) -> float:
    """Relative distance of two gradient fingerprints, ``‖a − b‖ / ‖b‖``; infinite when their parameters differ."""
    if set(mine) != set(theirs):
        return float("inf")
    norm = sum(v * v for v in theirs.values()) ** 0.5
    diff = sum((mine[k] - theirs[k]) ** 2 for k in theirs) ** 0.5
    return diff / norm if norm else (0.0 if diff == 0 else float("inf"))


def _profiler_activities(device: str) -> list:
    import torch

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return activities


def format_profile(rows: list[dict[str, Any]]) -> str:
    """Where each profiled run's time went: phases by wall clock, then ops by self time."""
    lines = []
    for r in rows:
        if "phase_shares" not in r:
            continue
        phases = ", ".join(f"{name} {share:.0%}" for name, share in r["phase_shares"].items())
        lines.append(f"{r['method']} / {r['library']}: {phases}")
        if "profile" in r:
            cats = ", ".join(f"{name} {share:.0%}" for name, share in r["profile"]["categories"].items())
            ops = ", ".join(f"{o['op']} {o['share']:.0%}" for o in r["profile"]["top_ops"][:6])
            lines.append(f"  by op category (self time): {cats}")
            lines.append(f"  top ops: {ops}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver


def _run_isolated(method: str, library: str, cfg: BenchConfig) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench", "--worker", json.dumps([method, library, asdict(cfg)])]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=worker_env(),
                                timeout=cfg.worker_timeout or None)
    except subprocess.TimeoutExpired:
        return {"method": method, "library": library,
                "error": f"did not finish within the worker limit of {cfg.worker_timeout:g} s"}
    if result.returncode < 0:  # killed by a signal: on Linux SIGKILL is almost always the out-of-memory killer
        return {"method": method, "library": library,
                "error": f"worker killed by signal {-result.returncode}"
                         + (" (out of memory)" if result.returncode == -9 else "")}
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("BENCH-RESULT "):
            return json.loads(line[len("BENCH-RESULT ") :])
    tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
    return {"method": method, "library": library, "error": " | ".join(tail) or f"exit code {result.returncode}"}


def summarize(rows: list[dict[str, Any]], peak_flops: float, tolerance: float,
              gradient_tolerance: float = 1e-3) -> list[dict[str, Any]]:
    """Add to each unialign row its comparison with TRL's row of the same method.

    A speed-up (``speedup_tokens``, ``memory_ratio``) is reported only when both step-0 losses agree
    to ``tolerance`` (relative to ``max(1, |loss|)``) and both step-0 gradients agree: their
    fingerprints (:func:`gradient_fingerprint`) to ``gradient_tolerance`` relative. Rows recorded
    before fingerprints existed compare the losses after the first update instead, to ``tolerance``.
    Otherwise the row is marked ``loss_mismatch`` / ``gradient_mismatch`` and the ratios are ``None``.
    """
    trl = {r["method"]: r for r in rows if r["library"] == "trl" and "error" not in r}
    kept = {r["method"]: r for r in rows if r["library"] == "trl-kept-memory" and "error" not in r}
    peak_flops = max([peak_flops, *(r.get("matmul_peak_flops", 0) for r in rows)])  # best seen: least disturbed
    for row in rows:
        if "flops_per_s" in row and peak_flops:
            row["mfu"] = row["flops_per_s"] / peak_flops
        if is_trl(row["library"]) or "error" in row:
            continue
        row["speedup_tokens"] = row["memory_ratio"] = None
        other = trl.get(row["method"])
        if other is None:
            trl_ran = any(r["library"] == "trl" and r["method"] == row["method"] for r in rows)
            row["vs_trl"] = ("no TRL trainer" if METHODS[row["method"]]["trl"] is None
                             else "TRL run failed" if trl_ran else "TRL not run")
            continue
        gap = abs(row["loss_step0"] - other["loss_step0"])
        row["loss_gap"] = gap
        limit = tolerance * max(1.0, abs(other["loss_step0"]))
        later = [abs(a - b) for a, b in zip(row["losses"][1:2], other["losses"][1:2])]
        row["loss_gap_step1"] = later[0] if later else None
        if gap > limit:
            row["vs_trl"] = "loss_mismatch"
            continue
        # With the reference equal to the policy, DPO's and KTO's step-0 losses are constants (log 2, 0.5)
        # whatever the mask, positions or beta, so the gradients are what shows a wrong computation. The
        # loss after one update is no substitute at length: a float32 sum of a thousand log-probs rounds
        # differently in another order by more than the tolerance (docs/benchmarks.md).
        if "gradient_fingerprint" in row and "gradient_fingerprint" in other:
            row["gradient_gap"] = fingerprint_gap(row["gradient_fingerprint"], other["gradient_fingerprint"])
            if row["gradient_gap"] > gradient_tolerance:
                row["vs_trl"] = "gradient_mismatch"
                continue
        elif later and later[0] > limit:
            row["vs_trl"] = "loss_mismatch"
            continue
        row["vs_trl"] = "ok"
        row["speedup_tokens"] = row["useful_tokens_per_s"] / other["useful_tokens_per_s"]
        if "useful_tokens_per_cpu_s" in row and "useful_tokens_per_cpu_s" in other:
            row["speedup_cpu"] = row["useful_tokens_per_cpu_s"] / other["useful_tokens_per_cpu_s"]
        if other["peak_step_mem_mb"] > 0:
            row["memory_ratio"] = row["peak_step_mem_mb"] / other["peak_step_mem_mb"]
        if row["method"] in kept:
            row["speedup_tokens_vs_trl_kept_memory"] = (
                row["useful_tokens_per_s"] / kept[row["method"]]["useful_tokens_per_s"])
    return rows


def median_runs(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Of repeated runs of one (method, library), the one with the median tokens per second, plus every run's figures.

    A real run rather than field-wise medians, so that its fields stay consistent with each other.
    """
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    ranked = sorted(ok, key=lambda r: r["useful_tokens_per_s"])
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    chosen["repeats"] = {
        "useful_tokens_per_s": [r["useful_tokens_per_s"] for r in ok],
        "s_per_step": [r["s_per_step"] for r in ok],
        "peak_step_mem_mb": [r["peak_step_mem_mb"] for r in ok],
        "failed": len(runs) - len(ok),
    }
    return chosen


def completion_costs(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Seconds per completion of each method relative to DPO's, per unialign variant."""
    out = {}
    for library in {r["library"] for r in rows if not is_trl(r["library"])}:
        by_method = {r["method"]: r for r in rows if r["library"] == library and "s_per_completion" in r}
        if "dpo" not in by_method:
            continue
        for method, row in by_method.items():
            out[f"{library}:{method}"] = row["s_per_completion"] / by_method["dpo"]["s_per_completion"]
    return out


def num(value, fmt: str) -> str:
    """A table cell: ``value`` formatted with ``fmt``, or a dash when it was not measured."""
    return "–" if value is None else format(value, fmt)


MISMATCHES = ("loss_mismatch", "gradient_mismatch")  # the verdicts of summarize that withhold a ratio


def check_cell(row: dict[str, Any]) -> str:
    """The table's verdict on a row's agreement with TRL: what was compared, the gaps, whether a ratio is claimed."""
    check = row.get("vs_trl", "reference" if is_trl(row["library"]) else "")
    if check not in ("ok", *MISMATCHES):
        return check
    gaps = f"loss gap {row['loss_gap']:.1e}"
    if "gradient_gap" in row:
        gaps += f", gradient gap {row['gradient_gap']:.1e}"
    gaps += f", after 1 update {num(row.get('loss_gap_step1'), '.1e')}"
    if check == "ok":
        return f"ok ({gaps})"
    what = "LOSS" if check == "loss_mismatch" else "GRADIENT"
    return f"**{what} MISMATCH** ({gaps}): no speed-up claimed"


def kernel_cell(row: dict[str, Any]) -> str:
    """Kernel seconds and minor page faults per step (millions), or a dash in records made before they were."""
    if "kernel_s_per_step" not in row:
        return "–"
    return f"{row['kernel_s_per_step']:.2f} ({row['page_faults_per_step'] / 1e6:.2f} M)"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the rows."""
    head = ("| method | library | loss@0 | s/step | CPU s/step | in kernel (page faults) | useful tok/s | s/completion "
            "| step peak MiB | peak RSS MiB | FLOP/s | of peak | vs TRL: tok/s × | CPU-time × | mem × | check |")
    lines = [head, "|" + "---|" * 16]

    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['library']} | " + " | ".join(["–"] * 13) + f" | {r['error']} |")
            continue
        check = check_cell(r)
        lines.append(
            f"| {r['method']} | {r['library']} | {r['loss_step0']:.6f} | {r['s_per_step']:.2f} | "
            f"{num(r.get('cpu_s_per_step'), '.2f')} | {kernel_cell(r)} | {r['useful_tokens_per_s']:.1f} | "
            f"{r['s_per_completion']:.3f} | "
            f"{r['peak_step_mem_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['flops_per_s'] / 1e9:.1f} G | "
            f"{num(r.get('mfu'), '.1%')} | {num(r.get('speedup_tokens'), '.2f')} | "
            f"{num(r.get('speedup_cpu'), '.2f')} | {num(r.get('memory_ratio'), '.2f')} | {check} |"
        )
    return "\n".join(lines)


def run_bench(cfg: BenchConfig) -> dict[str, Any]:
    """Run every (method, library) pair and return (and append to ``output_dir``) the report."""
    import torch

    device = _device(cfg)
    unknown = [m for m in cfg.methods if m not in METHODS] + [x for x in cfg.libraries if x not in LIBRARIES]
    if unknown:
        raise ValueError(f"unknown method or library {unknown}; methods: {list(METHODS)}, libraries: {list(LIBRARIES)}")
    if cfg.steps < 1 or cfg.memory_steps < 1 or cfg.repeat < 1:
        raise ValueError(f"steps, memory_steps and repeat must each be at least 1 (got {cfg.steps}, "
                         f"{cfg.memory_steps}, {cfg.repeat})")
    if cfg.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1 (got {cfg.batch_size})")
    check_data_options(cfg)
    info = machine_info(device, cfg.threads)
    peak = matmul_peak_flops(device, cfg.threads)
    torch.set_num_threads(cfg.threads)
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {(m, x): [] for m in cfg.methods for x in cfg.libraries}
    for _ in range(cfg.repeat):  # libraries interleaved, so that a slow spell of a shared machine hits them alike
        for method in cfg.methods:
            for library in cfg.libraries:
                if is_trl(library) and METHODS[method]["trl"] is None:
                    runs[method, library] = [{"method": method, "library": library,
                                              "error": f"TRL 1.16 has no {method} trainer"}]
                    continue
                row = _run_isolated(method, library, cfg) if cfg.isolate else _safe_run(method, library, cfg)
                runs[method, library].append(row)
                print(_progress(row), file=sys.stderr, flush=True)
    rows = [median_runs(found) for found in runs.values()]
    summarize(rows, peak, cfg.tolerance, cfg.gradient_tolerance)
    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "config": asdict(cfg),
        "machine": info,
        "matmul_peak_flops": max([peak, *(r.get("matmul_peak_flops", 0) for r in rows)]),
        "trl_trainers": {m: METHODS[m]["trl"] for m in cfg.methods},
        "rows": rows,
        "completion_cost_vs_dpo": completion_costs(rows),
        "table": format_table(rows),
    }
    if cfg.output_dir:
        folder = Path(cfg.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"bench_{time.strftime('%Y%m%d-%H%M%S')}.json"
        path.write_text(jsonfile.dumps(report, indent=1) + "\n", encoding="utf-8")
        report["path"] = str(path)
    return report


def _safe_run(method: str, library: str, cfg: BenchConfig) -> dict[str, Any]:
    try:
        return run_one(method, library, cfg)
    except Exception as err:  # one failing library must not hide the others' numbers
        return {"method": method, "library": library, "error": f"{type(err).__name__}: {err}"}


def _progress(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['method']:<6} {row['library']:<16} error: {row['error']}"
    return (f"{row['method']:<6} {row['library']:<16} loss0={row['loss_step0']:.6f} "
            f"{row['s_per_step']:.3f} s/step {row['useful_tokens_per_s']:.0f} tok/s "
            f"step peak {row['peak_step_mem_mb']:.0f} MiB")


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``python -m benchmarks.bench`` options."""
    d = BenchConfig()
    parser.add_argument("--model", default=d.model, help="embedded default, a local folder or an HF model path")
    parser.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated, from {', '.join(METHODS)}")
    parser.add_argument(
        "--libraries", default=",".join(d.libraries), help=f"comma-separated, from {', '.join(LIBRARIES)}"
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="rows per step (each with K completions)")
    parser.add_argument("--max-length", type=int, default=None,
                        help=f"prompt + completion tokens (default {d.max_length}; with --synthetic the rows' length)")
    parser.add_argument("--data", default=d.data,
                        help="a dataset instead of the bundled one: a local jsonl/json/parquet/csv file or folder the "
                             "loader accepts, with the method's TRL-compatible columns")
    parser.add_argument("--synthetic", action="store_true",
                        help="generate rows from the tokenizer's ordinary vocabulary (seeded) of exactly "
                             "--prompt-length and --completion-length tokens")
    parser.add_argument("--prompt-length", type=int, default=d.prompt_length, help="tokens per synthetic prompt")
    parser.add_argument("--completion-length", type=int, default=d.completion_length,
                        help="tokens per synthetic completion")
    parser.add_argument("--completions", type=int, default=d.completions,
                        help="completions per synthetic row (K): 2 for dpo/simpo, 3 for tpo, 1 for kto, any K >= 2 "
                             f"for rao (default: the method's own; rao {RAO_DEFAULT_COMPLETIONS})")
    parser.add_argument("--seed", type=int, default=d.seed, help="seed of the synthetic rows")
    parser.add_argument("--worker-timeout", type=float, default=d.worker_timeout,
                        help="seconds one (method, library) worker may run before it is recorded as not finished")
    parser.add_argument("--steps", type=int, default=d.steps, help="timed steps")
    parser.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps first")
    parser.add_argument("--memory-steps", type=int, default=d.memory_steps,
                        help="untimed steps after the timed ones, over which the step's peak memory is sampled")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch.set_num_threads for every run")
    parser.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--lr", type=float, default=d.learning_rate, help="AdamW learning rate (both libraries)")
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights (both)")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="activation checkpointing in both libraries (each layer recomputed in backward)")
    parser.add_argument("--save-attention", action="store_true",
                        help="with --gradient-checkpointing: both libraries keep the attention kernels' outputs "
                        "instead of recomputing them (unialign's activation_checkpointing_save_attention)")
    parser.add_argument("--device", default=d.device, help="auto | cpu | cuda")
    parser.add_argument("--tolerance", type=float, default=d.tolerance, help="step-0 loss agreement required")
    parser.add_argument("--gradient-tolerance", type=float, default=d.gradient_tolerance,
                        help="step-0 gradient agreement required (relative gap of the gradient fingerprints)")
    parser.add_argument("--output-dir", default=d.output_dir, help="a bench_<time>.json is written here")
    parser.add_argument("--in-process", action="store_true", help="no worker processes (peak RSS is then shared)")
    parser.add_argument("--repeat", type=int, default=d.repeat,
                        help="run every (method, library) this many times, interleaved; the median run is reported")
    parser.add_argument("--profile", action="store_true",
                        help="run torch.profiler over the timed steps and print where the time goes (slows them)")


def run_bench_cli(args: argparse.Namespace) -> int:
    """``python -m benchmarks.bench``: run, print the table, say where the JSON went."""
    cfg = BenchConfig(
        model=args.model,
        methods=[m for m in args.methods.split(",") if m],
        libraries=[x for x in args.libraries.split(",") if x],
        batch_size=args.batch_size,
        max_length=args.max_length if args.max_length is not None else (
            args.prompt_length + args.completion_length if args.synthetic else BenchConfig.max_length),
        steps=args.steps,
        warmup=args.warmup,
        memory_steps=args.memory_steps,
        threads=args.threads,
        dtype=args.dtype,
        learning_rate=args.lr,
        lora=args.lora,
        gradient_checkpointing=args.gradient_checkpointing,
        save_attention=args.save_attention,
        device=args.device,
        tolerance=args.tolerance,
        gradient_tolerance=args.gradient_tolerance,
        isolate=not args.in_process,
        output_dir=args.output_dir,
        profile=args.profile,
        repeat=args.repeat,
        data=args.data,
        synthetic=args.synthetic,
        prompt_length=args.prompt_length,
        completion_length=args.completion_length,
        completions=args.completions,
        seed=args.seed,
        worker_timeout=args.worker_timeout,
    )
    report = run_bench(cfg)
    m = report["machine"]
    print(f"{m['device']} · {m['cpu_model'] or 'CPU'} ({m['cpu_capability']}) · {m['cpu_count']} CPUs · "
          f"{cfg.threads} threads · torch {m['torch']} · "
          f"matmul peak {report['matmul_peak_flops'] / 1e9:.1f} GFLOP/s")
    print(report["table"])
    breakdown = format_profile(report["rows"])
    if breakdown:
        print(breakdown)
    for r in report["rows"]:
        if r.get("speedup_tokens_vs_trl_kept_memory"):
            print(f"{r['method']} {r['library']} vs TRL with the same allocator setting: "
                  f"{r['speedup_tokens_vs_trl_kept_memory']:.2f}x useful tok/s")
        if len(r.get("repeats", {}).get("useful_tokens_per_s", [])) > 1:
            spread = ", ".join(f"{v:.1f}" for v in r["repeats"]["useful_tokens_per_s"])
            print(f"{r['method']} {r['library']} tok/s over {len(r['repeats']['useful_tokens_per_s'])} runs: {spread}")
    for key, ratio in sorted(report["completion_cost_vs_dpo"].items()):
        print(f"cost per completion {key} / dpo: {ratio:.2f}")
    if "path" in report:
        print(f"wrote {report['path']}")
    return 0


def limit_cpu_memory() -> int | None:
    """Cap this process's address space at what it has mapped now plus 90 % of the machine's available memory.

    On a shared CPU machine a run that outgrows memory (TRL's full-vocabulary logits at 4096 tokens) should
    fail in its own allocation, to be recorded as out of memory, rather than wake the kernel's OOM killer,
    which may pick another user's process. Linux only (``/proc``); the cap in bytes, or None where unset.
    """
    import resource

    try:
        meminfo = Path("/proc/meminfo").read_text(encoding="ascii")
        status = Path("/proc/self/status").read_text(encoding="ascii")
    except OSError:
        return None

    def kib(text: str, key: str) -> int:
        return int(next(line.split()[1] for line in text.splitlines() if line.startswith(key + ":")))

    cap = (kib(status, "VmSize") + int(0.9 * kib(meminfo, "MemAvailable"))) * 1024
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    return cap


def _out_of_memory(error: str) -> bool:
    return "can't allocate memory" in error or "MemoryError" in error or "std::bad_alloc" in error


def _worker(payload: str) -> None:
    method, library, values = json.loads(payload)
    cfg = BenchConfig(**values)
    cap = limit_cpu_memory() if _device(cfg) == "cpu" else None
    row = _safe_run(method, library, cfg)
    if cap is not None and _out_of_memory(row.get("error", "")):
        row["error"] = (f"out of memory: the step needed more than the {cap / 2**30:.1f} GiB of address space "
                        f"this machine had available ({row['error'][:200]})")
    print("BENCH-RESULT " + json.dumps(row), flush=True)


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m benchmarks.bench`` parser: every option of :func:`add_bench_arguments`."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench",
        description="Run DPO, KTO, SimPO, TPO (and RAO, unialign only) with unialign and TRL side by side; "
        "print seconds per step, useful tokens/s, peak memory and FLOP/s as a fraction of the matmul peak, "
        "and append the JSON to --output-dir. A speed-up is reported only where both step-0 losses agree.",
    )
    add_debug_argument(parser)
    add_bench_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point: a worker (``--worker PAYLOAD``, started by :func:`_run_isolated`) or the benchmark itself."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "--worker":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        _worker(argv[1])
        return 0
    return run_cli(run_bench_cli, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
