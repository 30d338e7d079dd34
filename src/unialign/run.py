"""The run lifecycle shared by offline and online training: models, the run folder, resume, final save.

``unialign.pipeline`` (offline methods) and ``unialign.online`` (sample-score-update methods) both
build their models and trainer here and hand them to :func:`run_training`, so neither imports the other.
"""

# Deferred imports: unialign.plots (matplotlib loads only when a finished run draws its curves).

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import TrainerState

from unialign import jsonfile
from unialign.checkpoints import (
    ResumeMismatchError,
    atomic_write_text,
    last_checkpoint_hint,
    list_checkpoints,
    prepare_metrics_file,
    read_marker,
    resolve_resume,
    resume_differences,
)
from unialign.config import UnialignConfig
from unialign.data.tokenize import DropReport
from unialign.losses.registry import Method
from unialign.models import apply_lora, disable_dropout, four_bit_config, load_model, prepare_four_bit
from unialign.rundir import (
    DATA_REPORT,
    METRICS_FILE,
    MODEL_DIR,
    PARTIAL_MODEL_DIR,
    RUN_CONFIG,
    claim_run_dir,
    publish_model_dir,
    storage_errors,
)
from unialign.trainer import UnialignTrainer

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a run produced."""

    output_dir: Path
    model_dir: Path
    metrics: dict[str, float]
    dropped: DropReport = field(default_factory=DropReport)
    trainer: Any = None


def build_models(cfg: UnialignConfig, method: Method):
    """Policy (with LoRA when asked) and, when needed and not provided by adapters, a frozen reference.

    Both load with ``attn_implementation`` and, with ``load_in_4bit``, in 4 bits (QLoRA; the reference of
    a QLoRA run is the policy with its adapters disabled, or a separate model, 4-bit as well).

    With ``cfg.disable_dropout`` (the default) every dropout of both is switched off, after LoRA is
    applied so that the adapters' dropout is included (:func:`unialign.models.disable_dropout`).

    Seeds every RNG with ``cfg.seed`` first: fresh LoRA adapters and a reward model's new score head
    are random, and without this their values would depend on whatever ran before in the process.
    """

    set_seed(cfg.seed)
    kind = method.model_kind
    quantization = (
        four_bit_config(cfg.bnb_4bit_quant_type, cfg.bnb_4bit_compute_dtype, cfg.bnb_4bit_use_double_quant)
        if cfg.load_in_4bit
        else None
    )
    loading = {
        "dtype": cfg.torch_dtype,
        "trust_remote_code": cfg.trust_remote_code,
        "allow_pickle": cfg.allow_pickle,
        "attn_implementation": cfg.attn_implementation,
        "quantization_config": quantization,
    }
    policy = load_model(cfg.model_name_or_path, kind=kind, **loading)
    if quantization is not None:
        policy = prepare_four_bit(policy)
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
        reference = load_model(cfg.ref_model_name_or_path or cfg.model_name_or_path, **loading)
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


def run_training(trainer, cfg: UnialignConfig, method: Method, train_data, output_dir: Path,
                 before_train=None) -> TrainResult:
    """The run-directory lifecycle shared by offline and online training.

    Claims ``output_dir`` (:func:`unialign.rundir.claim_run_dir`; a no-op when :func:`train` already
    has), finds the checkpoint to resume from, writes ``config.json``, ``data_report.txt`` and a fresh
    or trimmed ``metrics.jsonl`` (main process), calls ``before_train(resumed)`` when given, trains,
    then saves the model with its card (atomically: :func:`save_model_atomically`) and the plots.
    ``train_data`` needs ``report``, ``source`` and ``format`` (for the card).
    """
    with claim_run_dir(output_dir, cfg.overwrite_output_dir, main_process=trainer.args.should_save):
        resume_from = resume_checkpoint(trainer, cfg, output_dir)
        main = trainer.is_world_process_zero()
        if main:
            with storage_errors("writing the run's config and reports", output_dir, "nothing was trained"):
                output_dir.mkdir(parents=True, exist_ok=True)
                atomic_write_text(output_dir / RUN_CONFIG, jsonfile.dumps(cfg.to_dict(), indent=2) + "\n")
                atomic_write_text(output_dir / DATA_REPORT, train_data.report.summary() + "\n")
                resume_step = read_marker(resume_from)["step"] if resume_from else None
                prepare_metrics_file(output_dir / METRICS_FILE, resume_step)
        if before_train is not None:
            before_train(resume_from is not None)
        if resume_from is not None and finished_at(trainer, cfg, resume_from):
            restore_checkpoint(trainer, resume_from)
        else:
            trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        metrics = final_metrics(trainer.state.log_history)
        model_dir = save_model_atomically(trainer, cfg, method, train_data, metrics, output_dir)
        # The other processes return only once the main one has published the model: a process that leaves
        # while another still works beside a live process group can abort in its C++ teardown (seen under ZeRO-3).
        trainer.accelerator.wait_for_everyone()
        if main:
            from unialign.plots import plot_run

            with storage_errors("drawing the plots", output_dir, f"the model is saved in {model_dir}"):
                plot_run(output_dir)
        return TrainResult(output_dir, model_dir, metrics, train_data.report, trainer)


def finished_at(trainer: UnialignTrainer, cfg: UnialignConfig, checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is already at the run's last step (``max_steps``), so nothing is left to train.

    transformers 5 trains one step more when it resumes from the last step, so such a resume, the one a
    failed final save asks for, must not go through ``Trainer.train``. Sharded runs (DeepSpeed, FSDP)
    restore their state only inside ``Trainer.train``, so they take that path.
    """
    sharded = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    return not sharded and 0 < cfg.max_steps <= read_marker(checkpoint)["step"]


def restore_checkpoint(trainer: UnialignTrainer, checkpoint: Path) -> None:
    """Load a checkpoint's weights and trainer state (step, log history) without training."""

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    if trainer.is_world_process_zero():
        logger.warning("%s is at the run's last step (max_steps %d): nothing is left to train; saving its weights",
                       checkpoint, trainer.state.global_step)


def save_model_atomically(trainer: UnialignTrainer, cfg: UnialignConfig, method: Method, train_data,
                          metrics: dict[str, float], output_dir: Path) -> Path:
    """Write the final model and its card to a temporary folder, then rename it to ``<output_dir>/model``.

    An earlier ``model/`` stays until the new one is complete. A full disk or a refused permission
    removes the temporary folder and raises :class:`unialign.rundir.StorageError` naming the file.
    """
    partial = output_dir / PARTIAL_MODEL_DIR
    main = trainer.is_world_process_zero()
    with storage_errors(
        "saving the final model",
        partial,
        lambda: f"{output_dir / MODEL_DIR} was left as it was, and {last_checkpoint_hint(output_dir)}",
        cleanup=partial if main else None,
    ):
        save_final_model(trainer, cfg, partial)
        if not main:
            return output_dir / MODEL_DIR
        write_model_card(partial, cfg, method, train_data, metrics)
        return publish_model_dir(output_dir)


def resume_checkpoint(trainer: UnialignTrainer, cfg: UnialignConfig, output_dir: Path) -> Path | None:
    """The intact checkpoint to continue from (``resume`` / ``resume_from_checkpoint``), or ``None``.

    Refuses (:class:`~unialign.checkpoints.ResumeMismatchError`, listing each key as ``old → new``) when
    the run's settings or training data differ from the checkpoint's in what is trained, unless
    ``resume_force`` is set: then it warns and continues. Warns when a fresh run finds checkpoints of an
    earlier run in ``output_dir``.
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
    changes = resume_differences(read_marker(resume_from), cfg, trainer.data_fingerprint)
    if changes and not cfg.resume_force:
        raise ResumeMismatchError(
            f"resume: {resume_from} was trained with other settings: {'; '.join(changes)}. Set resume_force: true "
            "to continue from it with the new settings, or start a new run in another output_dir"
        )
    if changes and trainer.is_world_process_zero():
        logger.warning(
            "resume_force: continuing from %s with changed settings: %s. The steps up to %d were trained with the "
            "old settings and metrics.jsonl holds both",
            resume_from,
            "; ".join(changes),
            read_marker(resume_from)["step"],
        )
    return resume_from


def final_metrics(log_history: list[dict]) -> dict[str, float]:
    """The last logged value of every metric (training summary keys included)."""
    merged: dict[str, float] = {}
    for entry in log_history:
        merged.update({k: v for k, v in entry.items() if isinstance(v, (int, float))})
    return merged


def write_model_card(
    model_dir: Path, cfg: UnialignConfig, method: Method, data, metrics: dict[str, float]
) -> None:
    """A README.md beside the weights: method, data, the settings that matter, final metrics.

    ``data`` is the run's prepared data (``source``, ``format``, ``examples``, ``report``).
    """
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

    LoRA runs are merged into full weights unless ``save_merged`` is false or the base is 4-bit (QLoRA): then
    the adapter is saved, loadable with peft or, with peft installed, by ``from_pretrained`` directly.
    """
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled:
        # Sharded weights: Trainer.save_model gathers them (every process takes part). Merging LoRA would need
        # the gathered base weights in one process, so the adapter is saved as it is.
        if cfg.use_peft and cfg.save_merged and trainer.is_world_process_zero():
            logger.warning("LoRA adapters are saved unmerged under DeepSpeed/FSDP; merge them with peft afterwards")
        trainer.save_model(str(model_dir))
        if trainer.is_world_process_zero():
            # Trainer.save_model pickles its arguments beside the weights; the run's config.json already holds them.
            (model_dir / "training_args.bin").unlink(missing_ok=True)
        return model_dir
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.is_world_process_zero():
        return model_dir
    if cfg.use_peft and cfg.save_merged and cfg.load_in_4bit:
        # Merging into 4-bit weights would round the update away again (and save a bitsandbytes checkpoint).
        logger.warning("QLoRA: the LoRA adapter is saved unmerged; merge it into the full-precision base with peft")
    elif cfg.use_peft and cfg.save_merged:
        model = model.merge_and_unload()
    model.save_pretrained(model_dir, safe_serialization=True)
    trainer.processing_class.save_pretrained(model_dir)
    trainer.save_companion_models(model_dir)
    return model_dir
