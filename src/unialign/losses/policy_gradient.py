"""Shared pieces of the online RL losses (PPO, GRPO, RLOO): token-level inputs, clipped ratios, KL, aggregation.

Every tensor here is in the *completion layout*: ``(N, T)`` with one row per sampled completion
(sample ``j`` of prompt ``i`` is row ``i·K + j``, ``K = num_generations``), the completion's tokens
left-aligned and ``mask`` true on them (EOS included when sampled). A prompt's tokens never appear.

The clipped surrogate is PPO's (Schulman et al. 2017, "Proximal Policy Optimization Algorithms",
arXiv:1707.06347); the k3 KL estimator is Schulman's "Approximating KL Divergence" (2020), as used by
GRPO (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# TRL's GRPOConfig.loss_type names, here as ``grpo_loss_type``: how per-token losses become one number.
AGGREGATIONS = ("grpo", "bnpo", "dr_grpo", "dapo")
WHITEN_EPS = 1e-8


@dataclass
class TokenInputs:
    """Per-token quantities of one micro-batch of rollouts, for the token-level losses.

    Attributes:
        logps: ``(N, T)`` policy log-probs of the completion tokens (with gradient).
        mask: ``(N, T)`` bool, true on completion tokens.
        old_logps: ``(N, T)`` log-probs under the policy that sampled the rollout (no gradient).
        advantages: ``(N,)`` one per completion (GRPO, RLOO) or ``(N, T)`` per token (PPO).
        ref_logps: ``(N, T)`` reference log-probs, or ``None`` when the method runs without a KL term.
        values: ``(N, T)`` value-model predictions for the state before each token (with gradient; PPO).
        old_values: ``(N, T)`` the same predictions at rollout time (PPO's value clipping).
        returns: ``(N, T)`` value targets (PPO: advantages + old values, before advantage whitening).
        entropy: ``(N, T)`` per-token entropy of the policy, when computed (metrics only).
        num_items: tokens the ``dapo`` aggregation divides by (TRL: the generation batch's tokens per
            accumulation window); ``None``: this micro-batch's tokens.
    """

    logps: Tensor
    mask: Tensor
    old_logps: Tensor
    advantages: Tensor
    ref_logps: Tensor | None = None
    values: Tensor | None = None
    old_values: Tensor | None = None
    returns: Tensor | None = None
    entropy: Tensor | None = None
    num_items: float | None = None


@dataclass
class RolloutSignals:
    """What a method's advantage estimator reads at rollout time (no gradients anywhere).

    Attributes:
        rewards: ``(B, K)`` explicit rewards of the ``K`` samples of each of ``B`` prompts (the weighted
            sum of the reward sources, after the missing-EOS penalty).
        mask: ``(N, T)`` completion-token mask, ``N = B·K``.
        old_logps: ``(N, T)`` the sampling policy's per-token log-probs.
        ref_logps: ``(N, T)`` the reference's, or ``None`` when no reference is needed.
        values: ``(N, T)`` value predictions (PPO), or ``None``.
    """

    rewards: Tensor
    mask: Tensor
    old_logps: Tensor
    ref_logps: Tensor | None = None
    values: Tensor | None = None


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the true entries of ``mask`` (all of them, or along ``dim``)."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """``(x − mean) / sqrt(var + 1e-8)`` over the masked entries (unbiased variance); ``shift_mean=False``
    adds the mean back (PPO's reward whitening rescales without moving the mean). Unmasked entries are 0."""
    mean = masked_mean(values, mask)
    count = mask.sum()
    centred = (values - mean) * mask
    variance = (centred**2).sum() / (count - 1).clamp(min=1)
    whitened = (values - mean) * torch.rsqrt(variance + WHITEN_EPS)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def clipped_surrogate(logps: Tensor, old_logps: Tensor, advantages: Tensor, epsilon_low: float,
                      epsilon_high: float) -> tuple[Tensor, Tensor]:
    """PPO's clipped objective as a loss: ``−min(ρ·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)``, ``ρ = exp(logp − old)``.

    Args:
        logps, old_logps: same shape (``(N, T)`` per token or ``(N,)`` per sequence).
        advantages: broadcastable to ``logps`` (``(N, 1)`` for one advantage per sequence).
    Returns:
        ``(loss, ratio)``, both shaped like ``logps``.
    """
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    return -torch.min(ratio * advantages, clipped * advantages), ratio


def clip_fractions(ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float,
                   mask: Tensor | None = None) -> dict[str, Tensor]:
    """Share of tokens (or sequences) whose ratio was clipped, with TRL's ``clip_ratio/*`` names.

    Low: ``ρ < 1 − ε_low`` with ``A < 0``; high: ``ρ > 1 + ε_high`` with ``A > 0``; region: either.
    """
    low = ((ratio < 1 - epsilon_low) & (advantages < 0)).float()
    high = ((ratio > 1 + epsilon_high) & (advantages > 0)).float()
    region = torch.maximum(low, high)
    mask = torch.ones_like(ratio, dtype=torch.bool) if mask is None else mask
    return {
        "clip_ratio/low_mean": masked_mean(low, mask),
        "clip_ratio/high_mean": masked_mean(high, mask),
        "clip_ratio/region_mean": masked_mean(region, mask),
    }


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token ``exp(ref − logp) − (ref − logp) − 1 ≥ 0``: an unbiased estimate of KL(π_θ‖π_ref) on π_θ's samples."""
    diff = ref_logps - logps
    return torch.exp(diff) - diff - 1


def aggregate(per_token: Tensor, mask: Tensor, loss_type: str, max_completion_length: int,
              num_items: float | None = None) -> Tensor:
    """One loss from ``(N, T)`` per-token losses, by TRL's ``loss_type`` names.

    - ``grpo``: mean over each sequence's tokens, then over sequences (the GRPO paper's form);
    - ``bnpo``: mean over all tokens of the micro-batch;
    - ``dr_grpo``: sum over tokens / (N · max_completion_length), a constant (Liu et al. 2025,
      "Understanding R1-Zero-Like Training", arXiv:2503.20783);
    - ``dapo``: sum over tokens / ``num_items`` (DAPO, Yu et al. 2025, arXiv:2503.14476; TRL divides by
      the tokens of the whole generation batch; ``None`` uses this micro-batch's, then it equals ``bnpo``).
    """
    weights = mask.to(per_token.dtype)
    total = per_token * weights
    if loss_type == "grpo":
        return (total.sum(-1) / weights.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return total.sum() / weights.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return total.sum() / (per_token.shape[0] * max_completion_length)
    if loss_type == "dapo":
        return total.sum() / (weights.sum().clamp(min=1) if num_items is None else max(float(num_items), 1.0))
    raise ValueError(f"grpo_loss_type must be one of {', '.join(AGGREGATIONS)}, got {loss_type!r}")
