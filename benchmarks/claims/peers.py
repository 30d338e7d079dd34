"""Peers: runs of a sweep trained by another library under the sweep's budget, then evaluated like any run.

A peer is named by ``loss_type`` in a spec entry (``trl_rloo``). Its config is checked with the
unialign method it shares keys with (``validate_as``), so a misspelt key still fails at load time,
and its result looks like :func:`unialign.pipeline.train`'s: a merged model in ``<run dir>/model``,
``metrics.jsonl`` with one line per logged step, and ``config.json`` with the settings it used.

``trl_rloo`` is the RL peer of online UNA (claim 2): TRL 1.16 ships no ``PPOTrainer``, so it is
TRL's ``RLOOTrainer`` (REINFORCE with a leave-one-out baseline and a KL penalty of weight β),
given the same model, LoRA settings, prompts, reward source, prompts per step, completions per
prompt, completion length, temperature, learning rate, schedule, steps and seed.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unialign import jsonfile


@dataclass
class PeerResult:
    """What a peer's training leaves, shaped like :class:`unialign.run.TrainResult`.

    ``trainer`` holds the trained policy in memory; ``model_dir`` has it merged and saved.
    """

    metrics: dict[str, Any]
    model_dir: Path
    trainer: Any = None


@dataclass(frozen=True)
class Peer:
    """A training method of another library, usable as a sweep run."""

    name: str
    validate_as: str  # the registered unialign loss_type whose config keys this peer reads
    requires: tuple[str, ...]  # importable modules it needs
    train: Callable[[dict[str, Any]], PeerResult]
    model_kind: str = "causal_lm"

    def unavailable_reason(self) -> str | None:
        """Why this peer cannot run here (a missing package), or None."""
        missing = [m for m in self.requires if importlib.util.find_spec(m) is None]
        return f"{self.name} needs the package(s) {', '.join(missing)}" if missing else None


def train_trl_rloo(config: dict[str, Any]) -> PeerResult:
    """Train with TRL's ``RLOOTrainer`` under the run's unialign config; save the merged model like unialign."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    from unialign.config import load_config
    from unialign.losses.registry import get_method
    from unialign.models import load_model, load_tokenizer
    from unialign.online.rollout import prepare_prompts
    from unialign.rewards.sources import load_reward

    cfg = load_config(None, {**config, "loss_type": PEERS["trl_rloo"].validate_as})
    output_dir = Path(cfg.output_dir)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    # The prompts online UNA would train on: the same validation, and the same overlong prompts dropped.
    records = prepare_prompts(str(cfg.dataset), cfg, get_method(cfg.loss_type), tokenizer).records
    reward = load_reward(cfg.reward)

    def reward_func(prompts, completions, **_unused):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return [float(x) for x in reward(prompts, texts)]

    reward_func.__name__ = getattr(reward, "name", "reward")  # TRL names the reward metric after the function
    peft_config = None
    if cfg.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                 target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM", bias="none")
    args = RLOOConfig(
        output_dir=str(output_dir / "trl_rloo"),
        # TRL counts completions per device batch; unialign counts prompts (each sampled num_generations times).
        per_device_train_batch_size=cfg.per_device_train_batch_size * cfg.num_generations,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        num_generations=cfg.num_generations,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        beta=cfg.beta,
        num_iterations=cfg.num_iterations,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        max_steps=cfg.max_steps,
        shuffle_dataset=cfg.train_sampling_strategy != "sequential",
        seed=cfg.seed,
        bf16=False,  # float32 on both sides, as unialign trains by default on CPU
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    trainer = RLOOTrainer(
        model=load_model(cfg.model_name_or_path),
        reward_funcs=reward_func,
        args=args,
        train_dataset=Dataset.from_list([{"prompt": record.prompt} for record in records]),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    output = trainer.train()
    with open(output_dir / "metrics.jsonl", "w", encoding="utf-8") as handle:
        for entry in trainer.state.log_history:
            handle.write(jsonfile.dumps(entry) + "\n")
    used = {"loss_type": "trl_rloo", "beta": cfg.beta, "learning_rate": cfg.learning_rate, "max_steps": cfg.max_steps,
            "per_device_train_batch_size": cfg.per_device_train_batch_size, "num_generations": cfg.num_generations,
            "max_completion_length": cfg.max_completion_length, "temperature": cfg.temperature,
            "reward": cfg.reward, "seed": cfg.seed}
    (output_dir / "config.json").write_text(jsonfile.dumps(used, indent=1) + "\n", encoding="utf-8")
    model = trainer.accelerator.unwrap_model(trainer.model)
    if peft_config is not None:
        model = model.merge_and_unload()
    model_dir = output_dir / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return PeerResult(metrics=dict(output.metrics), model_dir=model_dir, trainer=trainer)


PEERS: dict[str, Peer] = {
    "trl_rloo": Peer("trl_rloo", validate_as="una_online", requires=("trl",), train=train_trl_rloo),
}


def get_peer(loss_type: str) -> Peer | None:
    """The peer named ``loss_type``, or None when it names no peer."""
    return PEERS.get(loss_type)
