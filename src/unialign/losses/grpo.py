"""GRPO and RLOO: critic-free policy gradients whose baseline comes from the other samples of the same prompt.

- **GRPO** (Shao et al. 2024, "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
  Models", arXiv:2402.03300): ``A_ij = (r_ij − mean_j r_ij) / (std_j r_ij + 1e-4)`` for the ``K`` samples
  ``j`` of prompt ``i`` (``scale_rewards``: ``group``; ``batch`` uses the std of the whole batch, ``none``
  no division), the same for every token of a completion; the per-token loss is the clipped surrogate
  plus ``β·KL_k3(π_θ‖π_ref)``, aggregated by ``grpo_loss_type`` (TRL's ``loss_type``:
  ``grpo | bnpo | dr_grpo | dapo``).
- **RLOO** (Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning
  from Human Feedback in LLMs", arXiv:2402.14740): the reward first pays ``β·Σ_t (log π_old − log π_ref)``
  (a sequence-level KL penalty), then ``A_ij = r_ij − (Σ_{l≠j} r_il) / (K − 1)`` (leave-one-out), optionally
  whitened over the batch (``normalize_advantages``); the ratio is per *sequence*
  (``exp(Σ_t logp − Σ_t logp_old)``), clipped, and the loss is the mean over completions.

Both follow TRL 1.16's ``GRPOTrainer`` / ``RLOOTrainer`` formulas (tests/losses/test_online_rl_vs_trl.py).
Shapes: rewards ``(B, K)``; per-token tensors ``(N, T)`` with ``N = B·K`` (see ``policy_gradient``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from unialign.losses.base import LossOutput
from unialign.losses.policy_gradient import (
    RolloutSignals,
    TokenInputs,
    aggregate,
    clip_fractions,
    clipped_surrogate,
    k3_kl,
    masked_mean,
)
from unialign.losses.registry import Method, register

SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGE_EPS = 1e-4  # TRL's


def group_advantages(rewards: Tensor, scale_rewards: str = "group") -> Tensor:
    """GRPO's group-relative advantages: ``(r − group mean) / (std + 1e-4)``.

    Args:
        rewards: ``(B, K)``, row ``i`` the rewards of prompt ``i``'s ``K`` samples.
        scale_rewards: ``group`` (each group's unbiased std), ``batch`` (the whole batch's) or ``none``.
    Returns:
        ``(B, K)`` advantages.
    """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if scale_rewards == "none":
        return centred
    k = rewards.shape[1]
    if scale_rewards == "group":
        std = rewards.std(dim=1, keepdim=True) if k > 1 else torch.zeros_like(rewards[:, :1])
    elif scale_rewards == "batch":
        std = rewards.std() if rewards.numel() > 1 else torch.zeros(())
    else:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    return centred / (std + ADVANTAGE_EPS)


def leave_one_out_advantages(rewards: Tensor, normalize: bool = False) -> Tensor:
    """RLOO's advantages ``r_ij − (Σ_l r_il − r_ij) / (K − 1)``; with ``normalize`` whitened over the batch.

    Args:
        rewards: ``(B, K)`` with ``K ≥ 2``.
    Returns:
        ``(B, K)``.
    """
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("RLOO's leave-one-out baseline needs num_generations >= 2")
    baseline = (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)
    advantages = rewards - baseline
    if normalize:
        advantages = (advantages - advantages.mean()) / (advantages.std() + ADVANTAGE_EPS)
    return advantages


def grpo_rollout(signals: RolloutSignals, cfg) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rollout time: one advantage per completion, ``(N,)``; logs the share of groups with equal rewards."""
    rewards = signals.rewards.float()
    advantages = group_advantages(rewards, cfg.scale_rewards)
    flat = rewards.std(dim=1) if rewards.shape[1] > 1 else torch.zeros(rewards.shape[0])
    metrics = {"frac_reward_zero_std": torch.isclose(flat, torch.zeros_like(flat)).float().mean()}
    return {"advantages": advantages.reshape(-1)}, metrics


def rloo_rollout(signals: RolloutSignals, cfg) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rollout time: the KL-penalized reward (when ``beta > 0``), then leave-one-out advantages ``(N,)``."""
    rewards = signals.rewards.float()
    metrics = {}
    if cfg.beta != 0:
        if signals.ref_logps is None:
            raise ValueError("rloo with beta > 0 needs reference log-probs")
        per_token = (signals.old_logps - signals.ref_logps) * signals.mask
        kl = per_token.sum(-1).view_as(rewards)
        rewards = rewards - cfg.beta * kl
        metrics["kl"] = per_token.sum() / signals.mask.sum().clamp(min=1)
    advantages = leave_one_out_advantages(rewards, cfg.normalize_advantages)
    return {"advantages": advantages.reshape(-1)}, metrics


def grpo_loss(inputs: TokenInputs, cfg) -> LossOutput:
    """GRPO's loss on one micro-batch: clipped surrogate (+ ``β``·k3 KL) per token, aggregated by ``grpo_loss_type``."""
    eps_low = cfg.epsilon
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    advantages = inputs.advantages
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    per_token, ratio = clipped_surrogate(inputs.logps, inputs.old_logps, advantages, eps_low, eps_high)
    metrics = {}
    if cfg.beta != 0:
        if inputs.ref_logps is None:
            raise ValueError("grpo with beta > 0 needs reference log-probs")
        kl = k3_kl(inputs.logps, inputs.ref_logps)
        per_token = per_token + cfg.beta * kl
        metrics["kl"] = masked_mean(kl.detach(), inputs.mask)
    loss = aggregate(per_token, inputs.mask, cfg.grpo_loss_type, cfg.max_completion_length, inputs.num_items)
    metrics |= clip_fractions(ratio.detach(), advantages, eps_low, eps_high, inputs.mask)
    if inputs.entropy is not None:
        metrics["entropy"] = masked_mean(inputs.entropy, inputs.mask)
    return LossOutput(loss, metrics)


def rloo_loss(inputs: TokenInputs, cfg) -> LossOutput:
    """RLOO's loss on one micro-batch: the clipped surrogate on sequence-level ratios, averaged over completions."""
    eps_low = cfg.epsilon
    eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
    weights = inputs.mask.to(inputs.logps.dtype)
    logps = (inputs.logps * weights).sum(-1)
    old = (inputs.old_logps * weights).sum(-1)
    per_sequence, ratio = clipped_surrogate(logps, old, inputs.advantages, eps_low, eps_high)
    metrics = clip_fractions(ratio.detach(), inputs.advantages, eps_low, eps_high)
    if inputs.entropy is not None:
        metrics["entropy"] = masked_mean(inputs.entropy, inputs.mask)
    return LossOutput(per_sequence.mean(), metrics)


def _reference_when_kl(cfg) -> dict:
    return {"needs_reference": cfg.beta != 0}


_BETA_MAY_BE_ZERO = {"beta": (0.0, True, None, False)}

register(Method(
    name="grpo", loss=grpo_loss, formats=("prompt",), needs_reference=False, online=True, token_level=True,
    needs_old_logps=True, needs_groups=True, advantages=grpo_rollout, config_needs=_reference_when_kl,
    ranges=_BETA_MAY_BE_ZERO,
    summary="GRPO: group-relative advantages over k samples per prompt, clipped ratios, optional k3 KL",
    paper='Shao et al. 2024, "DeepSeekMath" (arXiv:2402.03300); TRL GRPOTrainer',
    # TRL 1.16's GRPOConfig: beta 0 (no KL, no reference), learning rate 1e-6.
    defaults={"beta": 0.0, "learning_rate": 1e-6},
))

register(Method(
    name="rloo", loss=rloo_loss, formats=("prompt",), needs_reference=True, online=True, token_level=True,
    needs_old_logps=True, needs_groups=True, advantages=rloo_rollout, config_needs=_reference_when_kl,
    ranges=_BETA_MAY_BE_ZERO,
    summary="RLOO: leave-one-out baseline over k samples per prompt, sequence-level clipped ratio, KL in the reward",
    paper='Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization" (arXiv:2402.14740); '
          "TRL RLOOTrainer",
    # TRL 1.16's RLOOConfig: beta 0.05, learning rate 1e-6.
    defaults={"beta": 0.05, "learning_rate": 1e-6},
))
