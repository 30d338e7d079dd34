"""``train(config)``: data → model → trainer → saved model, the path every method takes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from unialign import jsonfile
from unialign.checkpoints import (
    REF_LOGPS_FILE,
    list_checkpoints,
    load_ref_logps,
    prepare_metrics_file,
    read_marker,
    resolve_resume,
    save_ref_logps,
)
from unialign.config import UnialignConfig, load_config
from unialign.data.collate import PreferenceCollator
from unialign.data.errors import DataError
from unialign.data.formats import detect_format
from unialign.data.sources import open_table
from unialign.data.tokenize import DropReport
from unialign.data.tokenized import TokenizedDataset, max_completions, tokenize_table
from unialign.losses.registry import Method, check_format, get_method
from unialign.models import apply_lora, disable_dropout, load_model, load_tokenizer
from unialign.trainer import UnialignTrainer

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """A tokenized dataset ready for the trainer (``source`` is its name as messages show it)."""

    examples: TokenizedDataset
    format: str
    report: DropReport
    source: str


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    model_dir: Path
    metrics: dict[str, float]
    dropped: DropReport = field(default_factory=DropReport)
    trainer: Any = None


def prepare_data(source, cfg: UnialignConfig, method: Method, tokenizer, split: str = "train") -> PreparedData:
    """Read, validate, check the format against the method, tokenize and attach method extras.

    ``source`` is anything :func:`unialign.data.sources.resolve_source` accepts; the bare word
    ``bundled`` is the shipped dataset in the method's preferred format. Tokenized rows are cached in
    Arrow (``unialign.data.tokenized``) and tokenized by ``cfg.dataset_num_proc`` processes.
    """
    table = open_table(source, split, bundled_default=method.formats[0])
    if not len(table):
        raise DataError("has no rows", source=table.name)
    fmt = cfg.dataset_format if cfg.dataset_format != "auto" else detect_format(_columns(table.head(50)), table.name)
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


def _columns(rows: list[dict]) -> set[str]:
    # The union, so that one row missing a column is validated against the format the others
    # show and reported by row and field, rather than changing the detected format.
    columns: set[str] = set()
    for row in rows[:50]:
        columns |= set(row)
    return columns


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


def build_models(cfg: UnialignConfig, method: Method):
    """Policy (with LoRA when asked) and, when needed and not provided by adapters, a frozen reference.

    With ``cfg.disable_dropout`` (the default) every dropout of both is switched off, after LoRA is
    applied so that the adapters' dropout is included (:func:`unialign.models.disable_dropout`).

    Seeds every RNG with ``cfg.seed`` first: fresh LoRA adapters and a reward model's new score head
    are random, and without this their values would depend on whatever ran before in the process.
    """
    from transformers import set_seed

    set_seed(cfg.seed)
    kind = method.model_kind
    policy = load_model(
        cfg.model_name_or_path,
        dtype=cfg.torch_dtype,
        kind=kind,
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle=cfg.allow_pickle,
    )
    if cfg.use_peft:
        policy = apply_lora(
            policy,
            cfg.lora_r,
            cfg.lora_alpha,
            cfg.lora_dropout,
            cfg.lora_target_modules,
            task_type="SEQ_CLS" if kind == "sequence_classifier" else "CAUSAL_LM",
        )
    reference = None
    if method.needs_reference and (cfg.ref_model_name_or_path or not cfg.use_peft):
        reference = load_model(
            cfg.ref_model_name_or_path or cfg.model_name_or_path,
            dtype=cfg.torch_dtype,
            trust_remote_code=cfg.trust_remote_code,
            allow_pickle=cfg.allow_pickle,
        )
    if cfg.disable_dropout:
        for model in (policy, reference):
            if model is not None:
                disable_dropout(model)
    return policy, reference


class MetricsFileCallback(TrainerCallback):
    """Append every log line to ``<output_dir>/metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(jsonfile.dumps({"step": state.global_step, **logs}) + "\n")


def train(config: UnialignConfig | dict | str | Path, **overrides: Any) -> TrainResult:
    """Train with any registered method and save the model in the standard Hugging Face format.

    Args:
        config: a :class:`UnialignConfig`, a dict of config keys, or the path of a YAML file.
        overrides: config keys that replace the file's values.
    """
    cfg = _as_config(config, overrides)
    method = get_method(cfg.loss_type).for_config(cfg)
    if method.online:  # sample-score-update methods (docs/online.md) run their own loop
        from unialign.online import train_online

        return train_online(cfg)
    if cfg.dataset is None:
        raise ValueError(
            "config key 'dataset' is not set: give a file, a datasets folder, bundled:<format> (or bundled), "
            "a hub name, a list of rows or a datasets.Dataset"
        )
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
        callbacks=[MetricsFileCallback(output_dir / "metrics.jsonl")],
    )

    def precompute(resumed: bool) -> None:
        if method.needs_reference and cfg.precompute_ref_log_probs:
            reference_log_probs(trainer, cfg, method, output_dir, train_data, eval_data, resumed=resumed)

    return run_training(trainer, cfg, method, train_data, output_dir, before_train=precompute)


def run_training(trainer, cfg: UnialignConfig, method: Method, train_data, output_dir: Path,
                 before_train=None) -> TrainResult:
    """The run-directory lifecycle shared by offline and online training.

    Finds the checkpoint to resume from, writes ``config.json``, ``data_report.txt`` and a fresh or
    trimmed ``metrics.jsonl`` (main process), calls ``before_train(resumed)`` when given, trains,
    then saves the model, its card and the plots. ``train_data`` needs ``report``, ``source`` and
    ``format`` (for the card).
    """
    resume_from = resume_checkpoint(trainer, cfg, output_dir)
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(jsonfile.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
        (output_dir / "data_report.txt").write_text(train_data.report.summary() + "\n", encoding="utf-8")
        prepare_metrics_file(output_dir / "metrics.jsonl", read_marker(resume_from)["step"] if resume_from else None)
    if before_train is not None:
        before_train(resume_from is not None)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    model_dir = save_final_model(trainer, cfg, output_dir / "model")
    metrics = final_metrics(trainer.state.log_history)
    if trainer.is_world_process_zero():
        write_model_card(model_dir, cfg, method, train_data, metrics)
        from unialign.plots import plot_run

        plot_run(output_dir)
    return TrainResult(output_dir, model_dir, metrics, train_data.report, trainer)


def resume_checkpoint(trainer: UnialignTrainer, cfg: UnialignConfig, output_dir: Path) -> Path | None:
    """The complete checkpoint to continue from (``resume`` / ``resume_from_checkpoint``), or ``None``.

    Warns when the training data differs from the data the checkpoint was trained on, and when a fresh
    run finds checkpoints of an earlier run in ``output_dir``.
    """
    resume_from = resolve_resume(output_dir, cfg.resume, cfg.resume_from_checkpoint)
    if resume_from is None:
        earlier = list_checkpoints(output_dir)
        if earlier and trainer.is_world_process_zero():
            logger.warning(
                "%s already holds %s from an earlier run; this run starts from scratch and replaces them only "
                "where it saves at the same step (resume=true continues from the newest complete one instead)",
                output_dir,
                ", ".join(p.name for p in earlier),
            )
        return None
    saved = read_marker(resume_from).get("data_fingerprint")
    if saved is not None and saved != trainer.data_fingerprint:
        logger.warning(
            "the training data differs from the data %s was trained on: training continues on the new data, "
            "so the batches after step %d are not the ones the original run would have seen",
            resume_from,
            read_marker(resume_from)["step"],
        )
    return resume_from


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


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of every metric (training summary keys included)."""
    merged: dict[str, float] = {}
    for entry in log_history:
        merged.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return merged


def write_model_card(
    model_dir: Path, cfg: UnialignConfig, method: Method, data: PreparedData, metrics: dict[str, float]
) -> None:
    """A README.md beside the weights: method, data, the settings that matter, final metrics."""
    keys = [
        "model_name_or_path",
        "loss_type",
        "beta",
        "learning_rate",
        "max_steps",
        "num_train_epochs",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_length",
        "max_prompt_length",
        "use_peft",
        "lora_r",
        "lora_alpha",
        "precompute_ref_log_probs",
        "seed",
    ]
    settings = "\n".join(f"| `{k}` | {getattr(cfg, k)} |" for k in keys)
    shown = {k: v for k, v in metrics.items() if k in ("loss", "train_loss", "train_runtime") or "/" in k}
    results = "\n".join(f"| `{k}` | {v:.4g} |" for k, v in sorted(shown.items()))
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "README.md").write_text(
        f"---\nlibrary_name: transformers\ntags: [unialign, {method.name}]\n---\n\n"
        f"# {Path(cfg.output_dir).name}\n\nAligned with **{method.name}** ({method.summary}; {method.paper}) "
        f"by [unialign](https://pypi.org/project/unialign/).\n\n"
        f"Data: `{data.source}` ({data.format}, {len(data.examples)} rows; {data.report.summary()}).\n\n"
        f"| setting | value |\n|---|---|\n{settings}\n\n| final metric | value |\n|---|---|\n{results}\n",
        encoding="utf-8",
    )


def save_final_model(trainer: UnialignTrainer, cfg: UnialignConfig, model_dir: Path) -> Path:
    """Save weights and tokenizer so ``AutoModelForCausalLM.from_pretrained(model_dir)`` loads them.

    LoRA runs are merged into full weights unless ``save_merged`` is false (then the adapter is saved,
    loadable with peft or, with peft installed, by ``from_pretrained`` directly).
    """
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        # Sharded weights: Trainer.save_model gathers them (every process takes part). Merging LoRA would need
        # the gathered base weights in one process, so the adapter is saved as it is.
        if cfg.use_peft and cfg.save_merged and trainer.is_world_process_zero():
            logger.warning("LoRA adapters are saved unmerged under DeepSpeed/FSDP; merge them with peft afterwards")
        trainer.save_model(str(model_dir))
        return model_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.is_world_process_zero():
        return model_dir
    if cfg.use_peft and cfg.save_merged:
        model = model.merge_and_unload()
    model.save_pretrained(model_dir, safe_serialization=True)
    trainer.processing_class.save_pretrained(model_dir)
    return model_dir


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
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def prefer_cpu_processes() -> None:
    """Under ``torchrun`` on a machine without an accelerator, make the CPU processes train together.

    Otherwise accelerate treats each process as a separate single-process run. This sets what
    ``accelerate launch --cpu`` sets, ``ACCELERATE_USE_CPU``; it must happen before a config is built.
    """
    import os

    import torch

    if _launched_processes() > 1 and not torch.accelerator.is_available():
        os.environ.setdefault("ACCELERATE_USE_CPU", "true")


def check_processes(cfg: UnialignConfig) -> UnialignConfig:
    """Refuse a launch of several processes that would each train alone and write the same run folder."""
    from transformers.training_args import ParallelMode

    if _launched_processes() > 1 and cfg.parallel_mode != ParallelMode.DISTRIBUTED:
        raise ValueError(
            f"{_launched_processes()} processes were launched, but this config sets up {cfg.parallel_mode.value} "
            "training, so each process would train alone and all would write the same run folder. On a machine "
            "without GPUs, build the config with use_cpu=true"
        )
    return cfg
