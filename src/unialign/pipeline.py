"""``train(config)``: data → model → trainer → saved model, the path every method takes."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.training_args import ParallelMode

from unialign.checkpoints import (
    load_ref_logps,
    save_ref_logps,
)
from unialign.config import UnialignConfig, load_config
from unialign.data.collate import PreferenceCollator
from unialign.data.errors import DataError
from unialign.data.formats import columns_of, detect_format
from unialign.data.sources import open_table
from unialign.data.tokenize import DropReport
from unialign.data.tokenized import TokenizedDataset, max_completions, tokenize_table
from unialign.distributed import AfterEngineStarts, check_combination, check_engine, engine_of, requested_engine
from unialign.losses.registry import Method, check_format, get_method
from unialign.models import load_tokenizer
from unialign.online import train_online
from unialign.run import MetricsFileCallback, TrainResult, build_models, run_training
from unialign.rundir import (
    METRICS_FILE,
    REF_LOGPS_FILE,
    claim_run_dir,
)
from unialign.trainer import UnialignTrainer

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """A tokenized dataset ready for the trainer (``source`` is its name as messages show it)."""

    examples: TokenizedDataset
    format: str
    report: DropReport
    source: str


def prepare_data(source, cfg: UnialignConfig, method: Method, tokenizer, split: str = "train") -> PreparedData:
    """Read, validate, check the format against the method, tokenize and attach method extras.

    ``source`` is anything :func:`unialign.data.sources.resolve_source` accepts; the bare word
    ``bundled`` is the shipped dataset in the method's preferred format. Tokenized rows are cached in
    Arrow (``unialign.data.tokenized``) and tokenized by ``cfg.dataset_num_proc`` processes.
    """
    table = open_table(source, split, bundled_default=method.formats[0])
    if not len(table):
        raise DataError("has no rows", source=table.name)
    fmt = cfg.dataset_format if cfg.dataset_format != "auto" else detect_format(columns_of(table.head(50)), table.name)
    check_format(method, fmt)
    examples, report = tokenize_table(
        table,
        fmt,
        tokenizer,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        on_bad_row=cfg.on_bad_row,
        score_range=cfg.score_range,
        split_special_tokens=cfg.split_special_tokens,
        num_proc=cfg.dataset_num_proc,
    )
    if method.needs_shared_first_token:
        check_shared_first_token(examples, table.name, tokenizer)
    if method.targets_from == "scores":
        check_scores(examples, fmt, table.name, method)
    if method.needs_kl_pairs:
        examples.attach_kl_pairs(cfg.max_length)
    return PreparedData(examples, fmt, report, table.name)


def check_scores(examples, fmt: str, source: str, method: Method) -> None:
    """Score-target methods need a score for every completion (binary labels count as 0/1 scores)."""
    missing = _none_field(examples, "scores")
    if not missing.any() or (fmt == "binary" and missing.all()):
        return
    how = {
        "pairwise": "chosen_score and rejected_score in [0, 1] (or set score_range)",
        "listwise": "rewards normalized by score_range: set score_range: [low, high]",
    }.get(fmt, "a score")
    raise DataError(
        f"{method.name} needs a score for every completion: {how}",
        source=source,
        row=examples[int(missing.argmax())].row,
        field="score_range" if fmt == "listwise" else "chosen_score",
    )


def _none_field(examples, name: str) -> np.ndarray:
    if isinstance(examples, TokenizedDataset):
        return examples.is_none(name)
    return np.array([getattr(e, name) is None for e in examples], dtype=bool)


def check_shared_first_token(examples, source: str, tokenizer) -> None:
    """RAO's prefix consistency needs every prompt to start with the same token ``t0``.

    ``examples`` is a :class:`TokenizedDataset` or a list of :class:`TokenizedExample`.
    """
    if isinstance(examples, TokenizedDataset):
        firsts = examples.first_tokens().tolist()
    else:
        firsts = [e.prompt_ids[0] for e in examples]
    first = firsts[0]
    odd = next((i for i, token in enumerate(firsts) if token != first), None)
    if odd is None:
        return
    example = examples[odd]
    raise DataError(
        f"prompt starts with token {tokenizer.decode([example.prompt_ids[0]])!r} but earlier prompts start "
        f"with {tokenizer.decode([first])!r}; RAO's prefix consistency needs one shared first token "
        "(use conversational prompts so the chat template supplies it, "
        "or check truncation by max_prompt_length)",
        source=source,
        row=example.row,
        field="prompt",
    )


def train(config: UnialignConfig | dict | str | Path, **overrides: Any) -> TrainResult:
    """Train with any registered method and save the model in the standard Hugging Face format.

    Args:
        config: a :class:`UnialignConfig`, a dict of config keys, or the path of a YAML file.
        overrides: config keys that replace the file's values.

    The run holds ``output_dir`` from the start (docs/reliability.md, "The run directory"): a folder
    another run holds, or one with files unialign did not write, raises
    :class:`~unialign.rundir.RunDirError`; a full disk or a refused permission while writing raises
    :class:`~unialign.rundir.StorageError`.
    """
    cfg = _as_config(config, overrides)
    method = get_method(cfg.loss_type).for_config(cfg)
    check_combination(cfg, method)
    if not method.online and cfg.dataset is None:
        raise ValueError(
            "config key 'dataset' is not set: give a file, a datasets folder, bundled:<format> (or bundled), "
            "a hub name, a list of rows or a datasets.Dataset"
        )
    # Claimed before anything loads, so that a second run on the same folder stops at once.
    with claim_run_dir(cfg.output_dir, cfg.overwrite_output_dir, main_process=cfg.should_save):
        if method.online:  # sample-score-update methods (docs/online.md) run their own loop

            return train_online(cfg)
        return _train_offline(cfg, method)


def _train_offline(cfg: UnialignConfig, method: Method) -> TrainResult:
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    # Under several processes the first one tokenizes and writes the cache; the others then read it.
    with cfg.main_process_first(desc="tokenizing the dataset"):
        train_data = prepare_data(cfg.dataset, cfg, method, tokenizer)
        eval_data = None
        if cfg.eval_dataset is not None:
            eval_data = prepare_data(cfg.eval_dataset, cfg, method, tokenizer, split="test")
    policy, reference = build_models(cfg, method)
    num_slots = max(max_completions(d.examples) for d in (train_data, eval_data) if d is not None)
    collator = PreferenceCollator(
        tokenizer.pad_token_id,
        num_slots,
        with_prompt_logps=method.needs_prompt_logps,
        with_kl_pairs=method.needs_kl_pairs,
    )
    output_dir = Path(cfg.output_dir)
    trainer = UnialignTrainer(
        model=policy,
        args=cfg,
        method=method,
        ref_model=reference,
        train_dataset=train_data.examples,
        eval_dataset=eval_data.examples if eval_data else None,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(output_dir / METRICS_FILE)],
    )

    def precompute(resumed: bool) -> None:
        if method.needs_reference and cfg.precompute_ref_log_probs:
            def compute() -> None:
                reference_log_probs(trainer, cfg, method, output_dir, train_data, eval_data, resumed=resumed)

            if engine_of(trainer.accelerator):  # the policy must be inside the engine first
                trainer.add_callback(AfterEngineStarts(compute))
            else:
                compute()

    return run_training(trainer, cfg, method, train_data, output_dir, before_train=precompute)


def reference_log_probs(
    trainer: UnialignTrainer,
    cfg: UnialignConfig,
    method: Method,
    output_dir: Path,
    train_data: PreparedData,
    eval_data: PreparedData | None,
    resumed: bool,
) -> None:
    """Fill precomputed reference log-probs into the data, then free the separate reference model.

    A fresh run computes them once and saves them to ``<output_dir>/ref_logps.safetensors`` (main
    process, atomically); a resumed run loads that file instead, after checking it matches the data.
    """
    splits = {"train": train_data.examples}
    if eval_data:
        splits["eval"] = eval_data.examples
    path = output_dir / REF_LOGPS_FILE
    reference = cfg.ref_model_name_or_path or cfg.model_name_or_path
    if resumed and path.exists():
        needs = {"ref_prompt_logps": method.needs_prompt_logps, "ref_kl_logps": method.needs_kl_pairs}
        required = [name for name, needed in needs.items() if needed]
        load_ref_logps(path, splits, reference, required)
        logger.info("loaded the precomputed reference log-probs from %s", path)
    else:
        for examples in splits.values():
            trainer.precompute_reference(examples, cfg.per_device_eval_batch_size)
        if trainer.is_world_process_zero():
            save_ref_logps(path, splits, reference)
    trainer.release_reference_model()


def _as_config(config, overrides) -> UnialignConfig:
    if isinstance(config, UnialignConfig):
        if overrides:
            raise TypeError("pass overrides with a YAML path or a dict, not with a built UnialignConfig")
        return check_processes(config)
    prefer_cpu_processes()
    if isinstance(config, (str, Path)):
        return check_processes(load_config(config, overrides))
    return check_processes(load_config(None, {**config, **overrides}))


def _launched_processes() -> int:

    return int(os.environ.get("WORLD_SIZE", "1"))


def prefer_cpu_processes() -> None:
    """Under ``torchrun`` on a machine without an accelerator, make the CPU processes train together.

    Otherwise accelerate treats each process as a separate single-process run. This sets what
    ``accelerate launch --cpu`` sets, ``ACCELERATE_USE_CPU``; it must happen before a config is built.
    Not when the launch asks for DeepSpeed or FSDP: that would turn it into plain DDP, and
    :func:`unialign.distributed.check_engine` refuses such a launch instead.
    """


    if _launched_processes() > 1 and not torch.accelerator.is_available() and requested_engine() is None:
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def check_processes(cfg: UnialignConfig) -> UnialignConfig:
    """Refuse a launch of several processes that would each train alone and write the same run folder."""

    check_engine(cfg)
    if _launched_processes() > 1 and cfg.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(
            f"{_launched_processes()} processes were launched, but this config sets up {cfg.parallel_mode.value} "
            "training, so each process would train alone and all would write the same run folder. On a machine "
            "without GPUs, build the config with use_cpu=true"
        )
    return cfg
