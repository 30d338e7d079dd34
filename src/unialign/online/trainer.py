"""The online UNA loop (docs/online.md): sample → score → implicit reward → UNA loss, inside ``transformers.Trainer``.

:class:`OnlineUnaTrainer` is a :class:`~unialign.trainer.UnialignTrainer` whose training dataset is a
list of prompt indices. Each micro-batch of prompts becomes a :class:`~unialign.online.rollout.Rollout`
before the usual forward/backward: the policy samples ``num_generations`` completions per prompt, the
reward source scores them, and the reference (or the sampling policy, ``ratio_base: rollout``) scores
them once without gradients. The rollout is then reused for ``num_iterations`` optimizer steps.
Everything else (optimizer, scheduler, gradient accumulation, LoRA, checkpoints, ``report_to``,
saving) is plain Trainer behaviour, so a run directory looks like an offline one.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from transformers import TrainerCallback

from unialign.data.collate import Batch
from unialign.generation import Generation, GenerationConfig, check_backend, completion_ids, generate_from_ids
from unialign.losses.base import masked_mean
from unialign.losses.registry import get_method
from unialign.losses.una_online import (
    RunningMoments,
    apply_missing_eos_penalty,
    explicit_targets,
    ratio_base_logps,
)
from unialign.online.rollout import (
    PreparedPrompts,
    PromptRecord,
    RepeatedChunkSampler,
    Rollout,
    collate_prompt_indices,
    prepare_prompts,
    rollout_sequences,
)
from unialign.rewards.base import RewardSource
from unialign.rewards.sources import load_reward
from unialign.run import MetricsFileCallback, build_models, run_training
from unialign.trainer import UnialignTrainer, gather_slots

logger = logging.getLogger(__name__)

MOMENTS_KEY = "una_online_reward_moments"
TIMERS = ("generation", "scoring", "reference")


class OnlineUnaTrainer(UnialignTrainer):
    """Online UNA on a prompt dataset.

    Args:
        reward: the explicit reward source (see :func:`unialign.rewards.sources.load_reward`).
        prompts: the training prompts; the train dataset holds their indices.
        eval_prompts: held-out prompts for :meth:`evaluate` (greedy completions, mean reward).
        Everything else goes to :class:`~unialign.trainer.UnialignTrainer`.
    """

    def __init__(self, *args, reward: RewardSource, prompts: list[PromptRecord],
                 eval_prompts: list[PromptRecord] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.args
        self.reward = reward
        self.prompts = prompts
        self.eval_prompts = eval_prompts or []
        self.bounds = tuple(cfg.reward_range) if cfg.reward_range else reward.bounds
        self.moments = RunningMoments()
        self.sampling = GenerationConfig(
            max_new_tokens=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            num_return_sequences=cfg.num_generations,
            batch_size=max(1, cfg.per_device_train_batch_size),
            seed=None,  # Trainer seeded the global RNG once; reseeding per step would repeat the samples
            repetition_penalty=1.0,
        )
        self._rollouts: dict[tuple[int, ...], Rollout] = {}
        self._vllm = None  # the colocated engine, started on the first rollout with generation_backend: vllm
        self._first_pass = True
        self._timers: dict[str, float] = defaultdict(float)
        self.add_callback(_OnlineCallback(self))

    # ----------------------------------------------------------------- data
    def _get_train_sampler(self, train_dataset=None):
        """With ``num_iterations > 1`` each step's prompts come ``num_iterations`` times in a row."""
        if self.args.num_iterations <= 1:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        chunk = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return RepeatedChunkSampler(len(dataset), chunk, self.args.num_iterations, seed)

    def floating_point_ops(self, inputs) -> int:
        """Not estimated: the inputs are prompt indices, the sequences are made during the step."""
        return 0

    # ----------------------------------------------------------------- rollouts
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Make (or reuse) the rollout of these prompts, then one forward/backward on it."""
        indices = inputs["prompt_index"].tolist()
        key = tuple(indices)
        rollout = self._rollouts.get(key)
        if rollout is None or rollout.passes >= self.args.num_iterations:
            rollout = self.make_rollout(model, indices)
            self._rollouts[key] = rollout
            self._store_metrics(rollout.metrics, "train")
        rollout.passes += 1
        self._first_pass = rollout.passes == 1
        loss = super().training_step(model, rollout.batch, num_items_in_batch)
        if rollout.passes >= self.args.num_iterations:
            del self._rollouts[key]
        return loss

    def _sample(self, model, prompt_ids: list[list[int]]) -> list[list[Generation]]:
        """Sample ``num_generations`` completions per prompt from the current policy with the configured backend."""
        policy = self.accelerator.unwrap_model(model)
        if self.args.generation_backend != "vllm":
            return generate_from_ids(policy, self.processing_class, prompt_ids, self.sampling)
        if self._vllm is None:
            self._vllm = self._start_vllm()
        self._vllm.sync_weights(policy, self.state.global_step)
        return self._vllm.generate(prompt_ids, self.sampling, self.processing_class)

    def _start_vllm(self):
        from unialign.models import resolve_model_path
        from unialign.online.vllm_backend import VLLMGenerator, check_vllm_setup

        cfg = self.args
        stage = self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None
        check_vllm_setup(cfg.world_size, stage, self.is_fsdp_enabled)
        return VLLMGenerator(resolve_model_path(cfg.model_name_or_path),
                             gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                             max_model_len=cfg.vllm_max_model_len or cfg.max_length, seed=cfg.seed)

    @torch.no_grad()
    def make_rollout(self, model, indices: list[int]) -> Rollout:
        """Sample, score and prepare the completions of the prompts ``indices`` (docs/online.md)."""
        cfg = self.args
        records = [self.prompts[i] for i in indices]
        tokenizer = self.processing_class
        k = cfg.num_generations

        start = time.perf_counter()
        groups = self._sample(model, [r.prompt_ids for r in records])
        self._timers["generation"] += time.perf_counter() - start

        start = time.perf_counter()
        samples = [g for group in groups for g in group]
        raw = torch.tensor(
            self.reward([r.prompt for r in records for _ in range(k)], [g.text for g in samples]), dtype=torch.float32
        )
        if not torch.isfinite(raw).all():
            raise FloatingPointError(f"reward source {self.reward.name!r} returned a non-finite reward: {raw.tolist()}")
        self._timers["scoring"] += time.perf_counter() - start

        start = time.perf_counter()
        ended = torch.tensor([g.ended for g in samples])
        penalized = apply_missing_eos_penalty(raw, ended, cfg.missing_eos_penalty)
        scores, reward_targets = explicit_targets(
            penalized,
            cfg.reward_normalization,
            reward_scale=cfg.reward_scale,
            reward_shift=cfg.reward_shift,
            bounds=self.bounds,
            moments=self.moments,
        )
        sequences = rollout_sequences(
            [r.prompt_ids for r in records], [[completion_ids(g) for g in group] for group in groups],
            tokenizer.pad_token_id,
        )
        batch = self._prepare_inputs(sequences)
        slot_seq = batch.slot_seq
        ref = gather_slots(self.reference_logps(batch).seq, slot_seq)
        rollout_logps = None
        if cfg.ratio_base == "rollout":
            was_training = model.training
            model.eval()
            try:
                rollout_logps = gather_slots(self._logps(model, batch).seq, slot_seq)
            finally:
                model.train(was_training)
        batch.ref_logps = ratio_base_logps(cfg.ratio_base, ref, rollout_logps)
        device = slot_seq.device
        batch.scores = scores.view(len(records), k).to(device)
        batch.rewards = raw.view(len(records), k).to(device)
        batch.reward_targets = reward_targets.view(len(records), k).to(device)
        self._timers["reference"] += time.perf_counter() - start

        lengths = batch.target_mask.sum(-1).float()
        metrics = {
            "reward": raw.mean(),
            "reward_std": raw.std() if raw.numel() > 1 else torch.zeros(()),
            "completions/mean_length": lengths.mean(),
            "completions/eos_fraction": ended.float().mean(),
        }
        if cfg.missing_eos_penalty is not None:
            metrics["reward_penalized"] = penalized.mean()
        if rollout_logps is not None:
            metrics["kl"] = (rollout_logps - ref).mean()
        return Rollout(tuple(indices), batch, metrics)

    # ----------------------------------------------------------------- loss
    def method_inputs(self, model, batch: Batch):
        """The offline trainer's inputs; on a rollout's first pass (reference base) also the KL estimate."""
        inputs = super().method_inputs(model, batch)
        if model.training and self._first_pass and self.args.ratio_base == "reference":
            # π_θ is still the sampling policy here, so this is the Monte-Carlo KL(π_θ‖π_ref) on the samples
            kl = masked_mean(inputs.logratios().detach(), inputs.completion_mask)
            self._store_metrics({"kl": kl}, "train")
        return inputs

    def _save_checkpoint(self, model, trial) -> None:
        """Checkpoints also keep the running reward statistics (in trainer_state.json)."""
        self.state.stateful_callbacks[MOMENTS_KEY] = self.moments.state_dict()
        super()._save_checkpoint(model, trial)

    # ----------------------------------------------------------------- evaluation
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """Greedy completions of the held-out prompts, scored by the reward source: mean/std reward, length, EOS."""
        if not self.eval_prompts:
            return {}
        policy = self.accelerator.unwrap_model(self.model)
        greedy = GenerationConfig(
            max_new_tokens=self.args.max_completion_length, temperature=0, batch_size=16, seed=None,
            repetition_penalty=1.0,
        )
        groups = generate_from_ids(policy, self.processing_class, [r.prompt_ids for r in self.eval_prompts], greedy)
        samples = [group[0] for group in groups]
        rewards = torch.tensor(self.reward([r.prompt for r in self.eval_prompts], [g.text for g in samples]))
        metrics = {
            f"{metric_key_prefix}_reward": rewards.mean().item(),
            f"{metric_key_prefix}_reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
            f"{metric_key_prefix}_completion_length": sum(len(completion_ids(g)) for g in samples) / len(samples),
            f"{metric_key_prefix}_eos_fraction": sum(g.ended for g in samples) / len(samples),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics


class _OnlineCallback(TrainerCallback):
    """Per-step timings (generation, scoring, reference, update); restores the reward statistics on resume."""

    def __init__(self, trainer: OnlineUnaTrainer):
        self.trainer = trainer
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(MOMENTS_KEY)
        if saved:
            self.trainer.moments.load_state_dict(saved)

    def on_step_begin(self, args, state, control, **kwargs):
        self.trainer._timers.clear()
        self.started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        total = time.perf_counter() - self.started
        timers = self.trainer._timers
        values = {f"time/{name}": timers.get(name, 0.0) for name in TIMERS}
        values["time/update"] = max(0.0, total - sum(values.values()))
        values["time/step"] = total
        self.trainer._store_metrics({k: torch.tensor(v) for k, v in values.items()}, "train")


def check_online_config(cfg, reward: RewardSource) -> None:
    """Refuse settings online UNA cannot run with, naming the key (counts below 1 are refused by the config)."""
    if cfg.temperature <= 0:
        raise ValueError(
            f"config key 'temperature' must be > 0 for online training (got {cfg.temperature}): "
            "completions are sampled from the policy"
        )
    if cfg.precompute_ref_log_probs:
        raise ValueError(
            "config key 'precompute_ref_log_probs' does not apply to una_online: its completions are sampled during "
            "training, so reference log-probs cannot be computed in advance"
        )
    if cfg.reward_normalization == "range" and not (cfg.reward_range or reward.bounds):
        raise ValueError(
            f"reward_normalization: range needs config key 'reward_range' ([low, high]); reward source "
            f"{reward.name!r} has no known bounds"
        )
    if cfg.reward_range is not None and (len(cfg.reward_range) != 2 or cfg.reward_range[0] >= cfg.reward_range[1]):
        raise ValueError(f"config key 'reward_range' must be [low, high] with low < high, got {cfg.reward_range}")
    if cfg.reward_normalization == "none" and cfg.una_space == "score" and reward.bounds is not None:
        logger.warning(
            "reward source %s is bounded %s but reward_normalization is none, so the target is "
            "sigmoid((r - reward_shift) / reward_scale); reward_normalization: range maps it to [0, 1] instead",
            reward.name, reward.bounds,
        )
    check_backend(cfg.generation_backend)


def train_online(cfg, reward: RewardSource | None = None):
    """Train an online method (``loss_type: una_online``) and save the model like :func:`unialign.train`.

    Args:
        cfg: a :class:`~unialign.config.UnialignConfig` with ``reward`` set (or ``reward`` passed here).
        reward: a reward source object, overriding ``cfg.reward`` (for callers that built one already).
    Returns:
        A :class:`~unialign.run.TrainResult`.
    """
    from unialign.models import load_tokenizer

    method = get_method(cfg.loss_type).for_config(cfg)
    if cfg.dataset is None:
        raise ValueError("config key 'dataset' is not set: give a file or 'bundled' with a `prompt` column")
    if reward is None and cfg.reward is None:
        raise ValueError(
            f"{method.name} needs config key 'reward': offline | callable:MODULE:FUNCTION | reward-model:PATH | "
            "llm-judge:MODEL"
        )
    reward = load_reward(reward if reward is not None else cfg.reward)
    check_online_config(cfg, reward)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    train_data: PreparedPrompts = prepare_prompts(cfg.dataset, cfg, method, tokenizer)
    eval_data = prepare_prompts(cfg.eval_dataset, cfg, method, tokenizer, split="test") if cfg.eval_dataset else None
    policy, reference = build_models(cfg, method)
    output_dir = Path(cfg.output_dir)
    trainer = OnlineUnaTrainer(
        model=policy,
        args=cfg,
        method=method,
        ref_model=reference,
        reward=reward,
        prompts=train_data.records,
        eval_prompts=eval_data.records if eval_data else None,
        train_dataset=list(range(len(train_data.records))),
        eval_dataset=list(range(len(eval_data.records))) if eval_data else None,
        data_collator=collate_prompt_indices,
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(output_dir / "metrics.jsonl")],
    )
    return run_training(trainer, cfg, method, train_data, output_dir)
