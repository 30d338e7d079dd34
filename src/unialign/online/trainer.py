"""The online loop (docs/online.md): sample → score → advantages or targets → loss, inside ``transformers.Trainer``.

:class:`OnlineTrainer` is a :class:`~unialign.trainer.UnialignTrainer` whose training dataset is a
list of prompt indices. Each micro-batch of prompts becomes a :class:`~unialign.online.rollout.Rollout`
before the usual forward/backward: the policy samples ``num_generations`` completions per prompt, the
reward sources score them, and what the method declared is computed once without gradients:

- online UNA (per-sequence method): the reference's (or the sampling policy's, ``ratio_base: rollout``)
  log-probs and the explicit targets;
- token-level methods (PPO, GRPO, RLOO, ``Method.token_level``): the sampling policy's per-token
  log-probs and entropy, the reference's per-token log-probs (``needs_reference``), the value model's
  predictions (``needs_value_model``), then the method's own ``advantages`` estimator.

The rollout is reused for ``epochs × minibatches`` optimizer steps (``Method.passes``: ``num_iterations``
for UNA and GRPO/RLOO, ``num_ppo_epochs × num_mini_batches`` for PPO). Everything else (optimizer,
scheduler, gradient accumulation, LoRA, checkpoints, ``report_to``, saving) is plain Trainer behaviour,
so a run directory looks like an offline one.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

from unialign.data.collate import Batch
from unialign.distributed import shards_weights
from unialign.evaluate import eval_mode
from unialign.generation import Generation, GenerationConfig, check_backend, completion_ids, generate_from_ids
from unialign.losses.base import masked_mean
from unialign.losses.policy_gradient import RolloutSignals, TokenInputs
from unialign.losses.registry import get_method
from unialign.losses.una_online import (
    RunningMoments,
    apply_missing_eos_penalty,
    explicit_targets,
    ratio_base_logps,
)
from unialign.models import load_tokenizer, resolve_model_path
from unialign.online.completions import CompletionsLog, completion_rows
from unialign.online.rollout import (
    PreparedPrompts,
    PromptRecord,
    RepeatedChunkSampler,
    Rollout,
    TokenBatch,
    collate_prompt_indices,
    prepare_prompts,
    rollout_sequences,
)
from unialign.online.value import build_value_model
from unialign.online.vllm_backend import VLLMGenerator, check_vllm_setup
from unialign.rewards.base import RewardSource
from unialign.rewards.sources import WeightedReward, load_weighted_reward
from unialign.run import MetricsFileCallback, build_models, run_training
from unialign.trainer import UnialignTrainer, gather_slots, unwrap_peft

logger = logging.getLogger(__name__)

MOMENTS_KEY = "una_online_reward_moments"
TIMERS = ("generation", "scoring", "old_logps", "reference", "value")
VALUE_WEIGHTS = "value_model.safetensors"
VALUE_MODEL_DIR = "value_model"  # inside the final model's folder


class OnlineTrainer(UnialignTrainer):
    """An online method (online UNA, PPO, GRPO, RLOO) on a prompt dataset.

    Args:
        reward: the explicit reward source(s) (see :func:`unialign.rewards.sources.load_weighted_reward`).
        prompts: the training prompts; the train dataset holds their indices.
        eval_prompts: held-out prompts for :meth:`evaluate` (greedy completions, mean reward).
        value_model: PPO's :class:`~unialign.online.value.ValueModel` (trained beside the policy by the same
            optimizer, in its own parameter group), or ``None``.
        Everything else goes to :class:`~unialign.trainer.UnialignTrainer`.
    """

    def __init__(self, *args, reward: RewardSource, prompts: list[PromptRecord],
                 eval_prompts: list[PromptRecord] | None = None, value_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.args
        self.reward = load_weighted_reward(reward)
        self.value_model = value_model.to(self.accelerator.device) if value_model is not None else None
        self.completions_log = CompletionsLog(cfg.output_dir, cfg.report_to) if cfg.log_completions else None
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
            # The token-level methods compute entropy in their own no-grad pass over the samples.
            record_entropy=not self.method.token_level,
        )
        self._rollouts: dict[tuple[int, ...], Rollout] = {}
        self._vllm = None  # the colocated engine, started on the first rollout with generation_backend: vllm
        self._first_pass = True
        self._timers: dict[str, float] = defaultdict(float)
        self._completions_logged_at = -1
        self.add_callback(_OnlineCallback(self))

    # ----------------------------------------------------------------- data
    @property
    def passes_per_rollout(self) -> int:
        """Optimizer passes made over each rollout: epochs × minibatches (``Method.passes``)."""
        epochs, minibatches = self.method.passes(self.args)
        return epochs * minibatches

    def _get_train_sampler(self, train_dataset=None):
        """With several passes per rollout each step's prompts come that many times in a row."""
        repeats = self.passes_per_rollout
        if repeats <= 1:
            return super()._get_train_sampler(train_dataset)
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        chunk = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return RepeatedChunkSampler(len(dataset), chunk, repeats, seed)

    def create_optimizer(self, model=None):
        """Trainer's optimizer; with a value model, its trainable parameters join as a second group."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.value_model is not None:
            params = [p for p in self.value_model.parameters() if p.requires_grad]
            self.optimizer.add_param_group({"params": params, "weight_decay": self.args.weight_decay})
        return optimizer

    def floating_point_ops(self, inputs) -> int:
        """Not estimated: the inputs are prompt indices, the sequences are made during the step."""
        return 0

    # ----------------------------------------------------------------- rollouts
    def training_step(self, model, inputs, num_items_in_batch=None):
        """Make (or reuse) the rollout of these prompts, then one forward/backward on it."""
        indices = inputs["prompt_index"].tolist()
        key = tuple(indices)
        passes = self.passes_per_rollout
        rollout = self._rollouts.get(key)
        if rollout is None or rollout.passes >= passes:
            rollout = self.make_rollout(model, indices)
            self._rollouts[key] = rollout
            self._store_metrics(rollout.metrics, "train")
        batch = self._minibatch(rollout.batch, rollout.passes)
        rollout.passes += 1
        self._first_pass = rollout.passes == 1
        loss = super().training_step(model, batch, num_items_in_batch)
        if rollout.passes >= passes:
            del self._rollouts[key]
        return loss

    def _minibatch(self, batch: Batch, passes_made: int) -> Batch:
        """The rows of the rollout this pass trains on: minibatch ``passes_made mod minibatches``.

        Minibatches are contiguous blocks of whole prompts (all ``num_generations`` samples of a prompt
        stay together); with one minibatch the whole rollout.
        """
        _, minibatches = self.method.passes(self.args)
        if minibatches <= 1:
            return batch
        prompts, k = batch.slot_seq.shape
        if minibatches > prompts:
            raise ValueError(
                f"config key 'num_mini_batches' ({minibatches}) is larger than the {prompts} prompts of a micro-batch "
                "(per_device_train_batch_size); each minibatch needs at least one prompt"
            )
        part = passes_made % minibatches
        bounds = torch.linspace(0, prompts, minibatches + 1).round().long().tolist()
        rows = torch.arange(bounds[part] * k, bounds[part + 1] * k, device=batch.input_ids.device)
        prompt_rows = torch.arange(bounds[part], bounds[part + 1], device=rows.device)
        count = batch.input_ids.shape[0]
        changes = {"slot_seq": torch.arange(len(rows), device=rows.device).view(-1, k), "packed": None}
        for f in dataclasses.fields(batch):
            value = getattr(batch, f.name)
            if f.name in changes or not isinstance(value, torch.Tensor):
                continue
            if value.shape[:1] == (count,):
                changes[f.name] = value[rows]
            elif value.shape[:1] == (prompts,):  # per-row fields such as row_index
                changes[f.name] = value[prompt_rows]
        return dataclasses.replace(batch, **changes)

    def _sample(self, model, prompt_ids: list[list[int]]) -> list[list[Generation]]:
        """Sample ``num_generations`` completions per prompt from the current policy with the configured backend."""
        policy = self.accelerator.unwrap_model(model)
        if self.args.generation_backend != "vllm":
            return generate_from_ids(policy, self.processing_class, prompt_ids, self.sampling,
                                     synced=shards_weights(self.accelerator))
        if self._vllm is None:
            self._vllm = self._start_vllm()
        self._vllm.sync_weights(policy, self.state.global_step)
        return self._vllm.generate(prompt_ids, self.sampling, self.processing_class)

    def _start_vllm(self):

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
        k = cfg.num_generations

        start = time.perf_counter()
        groups = self._sample(model, [r.prompt_ids for r in records])
        self._timers["generation"] += time.perf_counter() - start

        start = time.perf_counter()
        samples = [g for group in groups for g in group]
        prompts = [r.prompt for r in records for _ in range(k)]
        texts = [g.text for g in samples]
        per_source = self.reward.score(prompts, texts)
        raw = torch.tensor(self.reward.combine(per_source), dtype=torch.float32)
        if not torch.isfinite(raw).all():
            raise FloatingPointError(f"reward source {self.reward.name!r} returned a non-finite reward: {raw.tolist()}")
        self._timers["scoring"] += time.perf_counter() - start

        ended = torch.tensor([g.ended for g in samples])
        penalized = apply_missing_eos_penalty(raw, ended, cfg.missing_eos_penalty)
        sequences = rollout_sequences(
            [r.prompt_ids for r in records], [[completion_ids(g) for g in group] for group in groups],
            self.processing_class.pad_token_id,
        )
        batch = self._prepare_inputs(sequences)
        if self.method.token_level:
            batch = TokenBatch.extend(batch)
            metrics, signal_name, signal = self._token_rollout(model, batch, penalized.view(len(records), k))
        else:
            metrics, signal_name, signal = self._una_rollout(model, batch, raw, penalized, len(records))

        entropies = [e for g in samples if g.entropy is not None for e in g.entropy]
        if entropies and "entropy" not in metrics:
            metrics["entropy"] = torch.tensor(entropies).mean()
        lengths = batch.target_mask.sum(-1).float()
        metrics |= {
            "reward": raw.mean(),
            "reward_std": raw.std() if raw.numel() > 1 else torch.zeros(()),
            "completions/mean_length": lengths.mean(),
            "completions/eos_fraction": ended.float().mean(),
        }
        if len(per_source) > 1 or cfg.log_completions:
            for name, values in per_source.items():
                column = torch.tensor(values, dtype=torch.float32)
                metrics[f"reward/{name}/mean"] = column.mean()
                metrics[f"reward/{name}/std"] = column.std() if column.numel() > 1 else torch.zeros(())
        if cfg.missing_eos_penalty is not None:
            metrics["reward_penalized"] = penalized.mean()
        self._log_completions(prompts, texts, raw.tolist(), per_source, signal_name, signal)
        return Rollout(tuple(indices), batch, metrics)

    def _una_rollout(self, model, batch: Batch, raw, penalized, num_prompts: int):
        """Online UNA's rollout: ``log π_base`` and the explicit targets ``s_φ``, ``r̃_φ`` per slot."""
        cfg = self.args
        start = time.perf_counter()
        scores, reward_targets = explicit_targets(
            penalized,
            cfg.reward_normalization,
            reward_scale=cfg.reward_scale,
            reward_shift=cfg.reward_shift,
            bounds=self.bounds,
            moments=self.moments,
        )
        slot_seq = batch.slot_seq
        ref = gather_slots(self.reference_logps(batch).seq, slot_seq)
        rollout_logps = None
        if cfg.ratio_base == "rollout":
            with eval_mode(model):
                rollout_logps = gather_slots(self._logps(model, batch).seq, slot_seq)
        batch.ref_logps = ratio_base_logps(cfg.ratio_base, ref, rollout_logps)
        device = slot_seq.device
        batch.scores = scores.view(num_prompts, -1).to(device)
        batch.rewards = raw.view(num_prompts, -1).to(device)
        batch.reward_targets = reward_targets.view(num_prompts, -1).to(device)
        self._timers["reference"] += time.perf_counter() - start
        metrics = {}
        if rollout_logps is not None:
            metrics["kl"] = (rollout_logps - ref).mean()
        targets = scores if cfg.una_space == "score" else reward_targets
        return metrics, "target", targets.tolist()

    def _token_rollout(self, model, batch: TokenBatch, rewards):
        """PPO/GRPO/RLOO's rollout: per-token log-probs (policy, reference), values, then the method's advantages."""
        cfg = self.args
        index, mask = completion_layout(batch.target_mask)
        batch.tok_index, batch.tok_mask = index, mask

        start = time.perf_counter()
        with eval_mode(model):
            old, entropy = logps_and_entropy(model, batch, index, mask, cfg.temperature,
                                             rows=cfg.per_device_train_batch_size * cfg.num_generations)
        batch.old_tok_logps, batch.tok_entropy = old, entropy
        self._timers["old_logps"] += time.perf_counter() - start

        ref = None
        if self.method.needs_reference:
            start = time.perf_counter()
            ref = self.reference_token_logps(batch)
            batch.ref_tok_logps = ref
            self._timers["reference"] += time.perf_counter() - start

        values = None
        if self.method.needs_value_model:
            start = time.perf_counter()
            with eval_mode(self.value_model):
                values = self.value_model.completion_values(batch, index, mask)
            self._timers["value"] += time.perf_counter() - start

        signals = RolloutSignals(rewards=rewards.to(old.device), mask=mask, old_logps=old, ref_logps=ref,
                                 values=values)
        tensors, metrics = self.method.advantages(signals, cfg)
        for name, value in tensors.items():
            setattr(batch, name, value)
        metrics = dict(metrics)
        metrics["entropy"] = masked_mean(entropy, mask)
        if ref is not None:
            metrics["kl/sequence"] = ((old - ref) * mask).sum(-1).mean()
        advantages = tensors["advantages"]
        if advantages.dim() == 2:  # per token (PPO): show each completion's mean advantage
            advantages = (advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return metrics, "advantage", advantages.tolist()

    @torch.no_grad()
    def reference_token_logps(self, batch: TokenBatch):
        """``(N, T)`` reference log-probs of the completion tokens: frozen model or adapters disabled."""
        self.reference_forwards += 1
        if self.ref_model is not None:
            return self._completion_logps(self.ref_model, batch)
        policy = unwrap_peft(self.model)
        if policy is None:
            raise RuntimeError(
                f"{self.method.name} needs a reference, but there is no reference model and no PEFT adapter to disable"
            )
        with eval_mode(self.model), policy.disable_adapter():
            return self._completion_logps(self.model, batch)

    def _completion_logps(self, model, batch: TokenBatch):
        """``(N, T)`` tempered log-probs of the completion tokens under ``model`` (with gradient when enabled)."""
        logps, _ = logps_and_entropy(model, batch, batch.tok_index, batch.tok_mask, self.args.temperature,
                                     entropy=False)
        return logps

    def _log_completions(self, prompts, texts, rewards, per_source, signal_name, signal) -> None:
        """Write the completions table at most once per optimizer step, every ``log_completions_steps``."""
        if self.completions_log is None or not self.is_world_process_zero():
            return
        step = self.state.global_step
        every = self.args.log_completions_steps or max(1, int(self.args.logging_steps))
        if step % every or step == self._completions_logged_at:
            return
        self._completions_logged_at = step
        rows = completion_rows(step + 1, prompts, texts, rewards, per_source, signal_name, signal,
                               self.args.num_completions_to_print)
        self.completions_log.write(rows)

    # ----------------------------------------------------------------- loss
    def method_inputs(self, model, batch: Batch):
        """The offline trainer's inputs; on a rollout's first pass (reference base) also the KL estimate.

        Token-level methods get a :class:`~unialign.losses.policy_gradient.TokenInputs`: this pass's
        per-token policy log-probs (and values, for PPO) beside what the rollout stored.
        """
        if self.method.token_level:
            return self._token_inputs(model, batch)
        inputs = super().method_inputs(model, batch)
        if model.training and self._first_pass and self.args.ratio_base == "reference":
            # π_θ is still the sampling policy here, so this is the Monte-Carlo KL(π_θ‖π_ref) on the samples
            kl = masked_mean(inputs.logratios().detach(), inputs.completion_mask)
            self._store_metrics({"kl": kl}, "train")
        return inputs

    def _token_inputs(self, model, batch: TokenBatch) -> TokenInputs:
        mask = batch.tok_mask
        values = None
        if self.value_model is not None:
            values = self.value_model.completion_values(batch, batch.tok_index, mask)
        return TokenInputs(
            logps=self._completion_logps(model, batch),
            mask=mask,
            old_logps=batch.old_tok_logps,
            advantages=batch.advantages,
            ref_logps=batch.ref_tok_logps,
            values=values,
            old_values=batch.old_values,
            returns=batch.returns,
            entropy=batch.tok_entropy,
        )

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Trainer's optimizer and scheduler files; a value model's weights go beside them."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.value_model is not None and self.args.should_save:

            state = {k: v.detach().contiguous().cpu() for k, v in self.value_model.state_dict().items()}
            save_file(state, str(Path(output_dir) / VALUE_WEIGHTS))

    def save_companion_models(self, model_dir: Path) -> None:
        """PPO: the trained value model in ``model_dir/value_model`` (sequence classifier, Hugging Face layout).

        ``AutoModelForSequenceClassification.from_pretrained`` loads it; LoRA adapters are merged unless
        ``save_merged`` is false, as for the policy.
        """
        if self.value_model is None:
            return
        model = self.value_model.model
        if self.args.use_peft and self.args.save_merged:
            model = model.merge_and_unload()  # at the end of the run, as the policy is merged
        model.save_pretrained(model_dir / VALUE_MODEL_DIR, safe_serialization=True)
        self.processing_class.save_pretrained(model_dir / VALUE_MODEL_DIR)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Restore the value model's weights (before its optimizer state) when resuming."""
        if checkpoint is not None and self.value_model is not None:
            path = Path(checkpoint) / VALUE_WEIGHTS
            if path.is_file():

                self.value_model.load_state_dict(load_file(str(path), device=str(self.accelerator.device)))
        super()._load_optimizer_and_scheduler(checkpoint)

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
        groups = generate_from_ids(policy, self.processing_class, [r.prompt_ids for r in self.eval_prompts], greedy,
                                   synced=shards_weights(self.accelerator))
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


OnlineUnaTrainer = OnlineTrainer  # the name from before PPO, GRPO and RLOO joined


def completion_layout(target_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns of each sequence's completion tokens, left-aligned: ``index`` and ``mask``, both ``(N, T)``.

    ``target_mask`` ``(N, L)`` marks one contiguous run of completion tokens per row (prompt, then
    completion, then padding); ``T`` is the longest run. Padding entries of ``index`` repeat a valid column.
    """
    lengths = target_mask.sum(-1)
    width = max(1, int(lengths.max()))
    first = target_mask.int().argmax(-1)
    offsets = torch.arange(width, device=target_mask.device)
    mask = offsets[None, :] < lengths[:, None]
    index = (first[:, None] + offsets[None, :]).clamp(max=target_mask.shape[1] - 1)
    return torch.where(mask, index, first[:, None]), mask


def logps_and_entropy(model, batch: Batch, index: torch.Tensor, mask: torch.Tensor, temperature: float,
                      rows: int | None = None, entropy: bool = True):
    """``(N, T)`` log-probs of the completion tokens under ``softmax(logits / temperature)``, and its entropy.

    The distribution is the one the completions were sampled from (TRL's GRPO, RLOO and PPO score with
    the same temperature), so the ratio ``π_θ / π_old`` is that of the sampling distributions. Runs
    ``rows`` sequences at a time (all at once by default); gradients flow when enabled.

    Returns:
        ``(logps, entropy)``; ``entropy`` is ``None`` when not asked for.
    """
    out_logps, out_entropy = [], []
    count = batch.input_ids.shape[0]
    rows = count if rows is None else max(1, rows)
    for start in range(0, count, rows):
        part = slice(start, start + rows)
        ids, positions = batch.input_ids[part], index[part]
        logits = model(input_ids=ids, attention_mask=batch.attention_mask[part], use_cache=False).logits
        sources = (positions - 1).clamp(min=0)
        picked = logits.gather(1, sources[..., None].expand(-1, -1, logits.shape[-1])).float()
        picked = (picked / temperature).log_softmax(-1)
        out_logps.append(picked.gather(-1, ids.gather(1, positions)[..., None]).squeeze(-1))
        if entropy:
            out_entropy.append(-(picked.exp() * picked).sum(-1).detach())
        del logits, picked
    logps = torch.cat(out_logps) * mask
    return logps, (torch.cat(out_entropy) * mask if entropy else None)


class _OnlineCallback(TrainerCallback):
    """Per-step timings (generation, scoring, old log-probs, reference, value, update); restores the reward
    statistics on resume; keeps the value model's gradients clipped and cleared."""

    def __init__(self, trainer: OnlineTrainer):
        self.trainer = trainer
        self.started = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        saved = (state.stateful_callbacks or {}).get(MOMENTS_KEY)
        if saved:
            self.trainer.moments.load_state_dict(saved)
        if self.trainer.completions_log is not None and state.is_world_process_zero:
            self.trainer.completions_log.start(state.global_step)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        """The value model's gradients are clipped to ``max_grad_norm`` on their own (Trainer clips the policy's)."""
        value = self.trainer.value_model
        if value is not None and args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in value.parameters() if p.grad is not None], args.max_grad_norm)

    def on_optimizer_step(self, args, state, control, **kwargs):
        """Trainer zeroes the policy's gradients after a step; the value model's are zeroed here."""
        if self.trainer.value_model is not None:
            self.trainer.value_model.zero_grad(set_to_none=True)

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
            f"config key 'precompute_ref_log_probs' does not apply to {cfg.loss_type}: its completions are sampled "
            "during training, so reference log-probs cannot be computed in advance"
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
    method = get_method(cfg.loss_type)
    if method.needs_groups and cfg.num_generations < 2:
        raise ValueError(
            f"config key 'num_generations' must be at least 2 for {method.name}: its advantages compare the samples "
            f"of one prompt (got {cfg.num_generations})"
        )


def train_online(cfg, reward: RewardSource | None = None):
    """Train an online method (``una_online``, ``ppo``, ``grpo``, ``rloo``); save the model like :func:`unialign.train`.

    Args:
        cfg: a :class:`~unialign.config.UnialignConfig` with ``reward`` set (or ``reward`` passed here).
        reward: a reward source object, overriding ``cfg.reward`` (for callers that built one already).
    Returns:
        A :class:`~unialign.run.TrainResult`.
    """

    method = get_method(cfg.loss_type).for_config(cfg)
    if cfg.dataset is None:
        raise ValueError("config key 'dataset' is not set: give a file or 'bundled' with a `prompt` column")
    if reward is None and cfg.reward is None:
        raise ValueError(
            f"{method.name} needs config key 'reward': offline | callable:MODULE:FUNCTION | reward-model:PATH | "
            "llm-judge:MODEL"
        )
    reward: WeightedReward = load_weighted_reward(reward if reward is not None else cfg.reward)
    check_online_config(cfg, reward)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code)
    train_data: PreparedPrompts = prepare_prompts(cfg.dataset, cfg, method, tokenizer)
    eval_data = prepare_prompts(cfg.eval_dataset, cfg, method, tokenizer, split="test") if cfg.eval_dataset else None
    policy, reference = build_models(cfg, method)
    value_model = None
    if method.needs_value_model:

        value_model = build_value_model(cfg)
    output_dir = Path(cfg.output_dir)
    trainer = OnlineTrainer(
        model=policy,
        args=cfg,
        method=method,
        ref_model=reference,
        reward=reward,
        value_model=value_model,
        prompts=train_data.records,
        eval_prompts=eval_data.records if eval_data else None,
        train_dataset=list(range(len(train_data.records))),
        eval_dataset=list(range(len(eval_data.records))) if eval_data else None,
        data_collator=collate_prompt_indices,
        processing_class=tokenizer,
        callbacks=[MetricsFileCallback(output_dir / "metrics.jsonl")],
    )
    return run_training(trainer, cfg, method, train_data, output_dir)
