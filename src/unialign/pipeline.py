"""``train(config)``: data → model → trainer → saved model, the path every method takes."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from unialign.config import UnialignConfig, load_config
from unialign.data.collate import PreferenceCollator
from unialign.data.errors import DataError
from unialign.data.formats import detect_format
from unialign.data.io import read_rows
from unialign.data.tokenize import DropReport, TokenizedExample, attach_kl_pairs, tokenize_rows
from unialign.losses.registry import Method, check_format, get_method
from unialign.models import apply_lora, load_model, load_tokenizer
from unialign.trainer import UnialignTrainer

logger = logging.getLogger(__name__)


@dataclass
class PreparedData:
    """A tokenized dataset ready for the trainer."""

    examples: list[TokenizedExample]
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


def prepare_data(source: str, cfg: UnialignConfig, method: Method, tokenizer, split: str = "train") -> PreparedData:
    """Read, validate, check the format against the method, tokenize and attach method extras."""
    if source == "bundled":  # the shipped dataset, in the method's preferred format
        source = f"bundled:{method.formats[0]}"
    rows = read_rows(source, split=split)
    if not rows:
        raise DataError("has no rows", source=source)
    fmt = cfg.dataset_format if cfg.dataset_format != "auto" else detect_format(_columns(rows), source)
    check_format(method, fmt)
    examples, report = tokenize_rows(
        rows,
        fmt,
        tokenizer,
        max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length,
        source=source,
        on_bad_row=cfg.on_bad_row,
        score_range=cfg.score_range,
    )
    if method.needs_prompt_logps:
        check_shared_first_token(examples, source, tokenizer)
    if method.targets_from == "scores":
        check_scores(examples, fmt, source, method)
    if method.needs_kl_pairs:
        attach_kl_pairs(examples, cfg.max_length)
    return PreparedData(examples, fmt, report, source)


def _columns(rows: list[dict]) -> set[str]:
    # The union, so that one row missing a column is validated against the format the others
    # show and reported by row and field, rather than changing the detected format.
    columns: set[str] = set()
    for row in rows[:50]:
        columns |= set(row)
    return columns


def check_scores(examples: list[TokenizedExample], fmt: str, source: str, method: Method) -> None:
    """Score-target methods need a score for every completion (binary labels count as 0/1 scores)."""
    missing = next((e for e in examples if e.scores is None), None)
    if missing is None or (fmt == "binary" and all(e.scores is None for e in examples)):
        return
    how = {
        "pairwise": "chosen_score and rejected_score in [0, 1] (or set score_range)",
        "listwise": "rewards normalized by score_range: set score_range: [low, high]",
    }.get(fmt, "a score")
    raise DataError(
        f"{method.name} needs a score for every completion: {how}",
        source=source,
        row=missing.row,
        field="score_range" if fmt == "listwise" else "chosen_score",
    )


def check_shared_first_token(examples: list[TokenizedExample], source: str, tokenizer) -> None:
    """RAO's prefix consistency needs every prompt to start with the same token ``t0``."""
    first = examples[0].prompt_ids[0]
    for example in examples:
        if example.prompt_ids[0] != first:
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
    """Policy (with LoRA when asked) and, when needed and not provided by adapters, a frozen reference."""
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
    return policy, reference


class MetricsFileCallback(TrainerCallback):
    """Append every log line to ``<output_dir>/metrics.jsonl`` (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def train(config: UnialignConfig | dict | str | Path, **overrides: Any) -> TrainResult:
    """Train with any registered method and save the model in the standard Hugging Face format.

    Args:
        config: a :class:`UnialignConfig`, a dict of config keys, or the path of a YAML file.
        overrides: config keys that replace the file's values.
    """
    cfg = _as_config(config, overrides)
    method = get_method(cfg.loss_type)
    if cfg.dataset is None:
        raise ValueError("config key 'dataset' is not set: give a file, a datasets folder or 'bundled'")
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    train_data = prepare_data(cfg.dataset, cfg, method, tokenizer)
    eval_data = prepare_data(cfg.eval_dataset, cfg, method, tokenizer, split="test") if cfg.eval_dataset else None
    policy, reference = build_models(cfg, method)
    num_slots = max(len(e.completion_ids) for e in train_data.examples + (eval_data.examples if eval_data else []))
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
    if trainer.is_world_process_zero():
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.json").write_text(cfg.to_json_string(), encoding="utf-8")
        (output_dir / "data_report.txt").write_text(train_data.report.summary() + "\n", encoding="utf-8")
    if method.needs_reference and cfg.precompute_ref_log_probs:
        batch = cfg.per_device_eval_batch_size
        trainer.precompute_reference(train_data.examples, batch)
        if eval_data:
            trainer.precompute_reference(eval_data.examples, batch)
        trainer.release_reference_model()
    trainer.train(resume_from_checkpoint=cfg.resume_from_checkpoint)
    model_dir = save_final_model(trainer, cfg, output_dir / "model")
    metrics = final_metrics(trainer.state.log_history)
    if trainer.is_world_process_zero():
        write_model_card(model_dir, cfg, method, train_data, metrics)
        from unialign.plots import plot_run

        plot_run(output_dir)
    return TrainResult(output_dir, model_dir, metrics, train_data.report, trainer)


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
        return config
    if isinstance(config, (str, Path)):
        return load_config(config, overrides)
    return load_config(None, {**config, **overrides})
