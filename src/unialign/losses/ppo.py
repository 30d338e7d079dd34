"""PPO for language models: a value model, GAE, clipped policy and value losses, per-token KL penalty.

Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347); GAE from Schulman et
al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation" (arXiv:1506.02438);
the RLHF form of Ouyang et al. 2022, "Training language models to follow instructions with human
feedback" (arXiv:2203.02155), with the choices and key names of TRL's PPOConfig (TRL ≤ 0.x had a PPO
trainer; TRL 1.16 does not):

- per-token reward ``r_t = −kl_coef·(log π_old(y_t) − log π_ref(y_t))``, plus the explicit reward of the
  whole completion on its last token; ``whiten_rewards`` rescales them (mean kept);
- GAE: ``δ_t = r_t + γ·V_{t+1} − V_t`` (``V`` past the end is 0), ``A_t = δ_t + γλ·A_{t+1}``, returns
  ``R_t = A_t + V_t``; advantages whitened over the batch (``whiten_advantages``, TRL always did);
- policy loss ``masked_mean(max(−A·ρ, −A·clip(ρ, 1 ± cliprange)))``, ``ρ = exp(logp − logp_old)``;
- value loss ``½·masked_mean(max((V − R)², (clip(V, V_old ± cliprange_value) − R)²))``;
- total ``policy + vf_coef·value``, over ``num_ppo_epochs`` passes of ``num_mini_batches`` minibatches.

Shapes: ``(N, T)`` completion layout (see ``policy_gradient``); scores ``(N,)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from unialign.losses.base import LossOutput
from unialign.losses.policy_gradient import RolloutSignals, TokenInputs, masked_mean, masked_whiten
from unialign.losses.registry import Method, register


def kl_penalized_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor | None, mask: Tensor,
                         kl_coef: float) -> Tensor:
    """``(N, T)`` per-token rewards: ``−kl_coef·(logp − logp_ref)`` on every token, plus ``scores`` on the last one.

    Args:
        scores: ``(N,)`` explicit reward per completion.
        logps, ref_logps: ``(N, T)`` sampling-policy and reference log-probs (``ref_logps`` may be
            ``None`` when ``kl_coef`` is 0).
        mask: ``(N, T)`` completion tokens, left-aligned; every row has at least one.
    """
    weights = mask.to(scores.dtype)
    rewards = torch.zeros_like(logps, dtype=scores.dtype)
    if kl_coef != 0:
        if ref_logps is None:
            raise ValueError("ppo with kl_coef > 0 needs reference log-probs")
        rewards = -kl_coef * (logps - ref_logps) * weights
    last = (mask.long().sum(-1) - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0]), last] += scores
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimates and returns over each completion's tokens.

    ``δ_t = r_t + γ·V_{t+1} − V_t`` with ``V`` 0 after the last token, ``A_t = δ_t + γλ·A_{t+1}``,
    ``R_t = A_t + V_t``; padding positions get 0.

    Args:
        rewards, values, mask: ``(N, T)``, completion tokens left-aligned.
    Returns:
        ``(advantages, returns)``, both ``(N, T)``.
    """
    weights = mask.to(values.dtype)
    values = values * weights
    rewards = rewards * weights
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    width = values.shape[1]
    for t in reversed(range(width)):
        following = values[:, t + 1] if t + 1 < width else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * following - values[:, t]
        running = (delta + gamma * lam * running) * weights[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * weights


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       cliprange_value: float) -> tuple[Tensor, Tensor]:
    """``½·masked_mean(max((V − R)², (clip(V, V_old − c, V_old + c) − R)²))`` and the share of tokens clipped."""
    clipped = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    plain, limited = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(plain, limited), mask)
    return loss, masked_mean((limited > plain).float(), mask)


def ppo_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                    cliprange: float) -> tuple[Tensor, Tensor, Tensor]:
    """``masked_mean(max(−A·ρ, −A·clip(ρ, 1 − c, 1 + c)))``, the clipped share and ``½·mean((logp − old)²)``."""
    diff = logps - old_logps
    ratio = torch.exp(diff)
    plain, limited = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(plain, limited), mask)
    return loss, masked_mean((limited > plain).float(), mask), 0.5 * masked_mean(diff.detach() ** 2, mask)


def ppo_rollout(signals: RolloutSignals, cfg) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Rollout time: KL-penalized per-token rewards → (whitened) GAE advantages and returns, ``(N, T)`` each."""
    if signals.values is None:
        raise ValueError("ppo needs value predictions at rollout time")
    mask = signals.mask
    scores = signals.rewards.float().reshape(-1)
    rewards = kl_penalized_rewards(scores, signals.old_logps, signals.ref_logps, mask, cfg.kl_coef)
    if cfg.whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, signals.values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    metrics = {"objective/scores": scores.mean()}
    if signals.ref_logps is not None:
        kl = ((signals.old_logps - signals.ref_logps) * mask).sum(-1)
        metrics["objective/kl"] = kl.mean()
        metrics["objective/non_score_reward"] = (-cfg.kl_coef * kl).mean()
    return {"advantages": advantages, "returns": returns, "old_values": signals.values}, metrics


def ppo_loss(inputs: TokenInputs, cfg) -> LossOutput:
    """PPO's loss on one minibatch: clipped policy loss + ``vf_coef`` × clipped value loss."""
    if inputs.values is None or inputs.old_values is None or inputs.returns is None:
        raise ValueError("ppo needs the value model's predictions, the rollout's values and the returns")
    mask = inputs.mask
    policy, clipfrac, approxkl = ppo_policy_loss(inputs.logps, inputs.old_logps, inputs.advantages, mask,
                                                 cfg.cliprange)
    value, vf_clipfrac = clipped_value_loss(inputs.values, inputs.old_values, inputs.returns, mask,
                                            cfg.cliprange_value)
    metrics = {
        "loss/policy_avg": policy.detach(),
        "loss/value_avg": value.detach(),
        "policy/clipfrac_avg": clipfrac,
        "val/clipfrac_avg": vf_clipfrac,
        "policy/approxkl_avg": approxkl,
        "val/vpred": masked_mean(inputs.values.detach(), mask),
    }
    if inputs.entropy is not None:
        metrics["entropy"] = masked_mean(inputs.entropy, mask)
    return LossOutput(policy + cfg.vf_coef * value, metrics)


register(Method(
    name="ppo", loss=ppo_loss, formats=("prompt",), needs_reference=True, online=True, token_level=True,
    needs_old_logps=True, needs_value_model=True, advantages=ppo_rollout,
    config_needs=lambda cfg: {"needs_reference": cfg.kl_coef != 0},
    schedule=lambda cfg: (cfg.num_ppo_epochs, cfg.num_mini_batches),
    summary="PPO: value model, GAE, clipped policy and value losses, per-token KL penalty to the reference",
    paper='Schulman et al. 2017, "Proximal Policy Optimization Algorithms" (arXiv:1707.06347); Ouyang et al. 2022 '
          "(arXiv:2203.02155); TRL's PPOConfig names",
    # gamma is PPO's discount here (TRL's PPOConfig default 1.0); lr as for GRPO and RLOO.
    defaults={"gamma": 1.0, "learning_rate": 1e-6},
))
