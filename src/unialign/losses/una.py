"""UNA: unified alignment by matching implicit and explicit rewards (Wang et al. 2024, UNA paper).

The implicit reward is ``r_θ = β·(logp_θ − logp_ref)`` and the implicit score ``s_θ = σ(r_θ)``.

- ``una_pair``: pairwise rows, the DPO sigmoid loss (UNA Eq. 5/10).
- ``una_binary`` / ``una_score``: each completion slot is one example with a target score
  ``t ∈ [0, 1]`` in ``inputs.targets``; mse ``(s_θ − t)²`` or bce (Eq. 11–13).
- ``una_reward``: each completion slot against an unnormalized explicit reward ``r_φ`` in
  ``inputs.rewards``: ``(r_θ − r_φ)²`` (Eq. 7 in reward space).

Point-wise methods take ``(B, K)`` slots (K = 1 for binary/score rows, K = 2 for pairwise rows,
K ≥ 1 for listwise rows) and average the per-example loss over the real slots only.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from unialign.losses.base import LossOutput, MethodInputs, logp_metrics, masked_mean, pair_metrics
from unialign.losses.dpo import dpo_loss
from unialign.losses.rao import scale_rewards
from unialign.losses.registry import Method, register

UNA_LOSSES = ("mse", "bce")


def una_score_loss(logratios: Tensor, targets: Tensor, beta: float, kind: str = "mse") -> Tensor:
    """Per-slot UNA loss between the implicit score ``σ(β·h)`` and a target score ``t ∈ [0, 1]``.

    mse: ``(σ(β·h) − t)²``; bce: ``−[t·log σ(β·h) + (1−t)·log σ(−β·h)]`` (soft targets allowed).

    Args:
        logratios: ``(B, K)`` unscaled log-ratios ``h = logp_θ − logp_ref``.
        targets: ``(B, K)`` target scores (1 desirable, 0 undesirable for binary feedback).
        kind: ``"mse"`` or ``"bce"``.
    """
    rewards = beta * logratios
    if kind == "mse":
        return (F.sigmoid(rewards) - targets) ** 2
    if kind == "bce":
        return -(targets * F.logsigmoid(rewards) + (1 - targets) * F.logsigmoid(-rewards))
    raise ValueError(f"una_loss must be one of {UNA_LOSSES}, got {kind!r}")


def una_reward_loss(logratios: Tensor, rewards: Tensor, beta: float) -> Tensor:
    """Per-slot UNA loss in reward space: ``(β·h − r_φ)²``; ``(B, K)`` log-ratios and explicit rewards."""
    return (beta * logratios - rewards) ** 2


def una_pair(inputs: MethodInputs, cfg) -> LossOutput:
    """UNA on pairwise rows: the DPO sigmoid loss without label smoothing, averaged over rows."""
    ratios = inputs.logratios()
    losses = dpo_loss(ratios[:, 0], ratios[:, 1], cfg.beta)
    metrics = pair_metrics(cfg.beta * ratios[:, 0], cfg.beta * ratios[:, 1]) | logp_metrics(inputs)
    return LossOutput(losses.mean(), metrics)


def _pointwise_metrics(inputs: MethodInputs, rewards: Tensor, targets: Tensor) -> dict[str, Tensor]:
    mask = inputs.completion_mask
    rewards, targets = rewards.detach(), targets.detach()
    metrics = {
        "rewards/implicit": masked_mean(rewards, mask),
        "scores/implicit": masked_mean(F.sigmoid(rewards), mask),
        "targets/mean": masked_mean(targets, mask),
        "logps/mean": masked_mean(inputs.policy_logps.detach(), mask),
    }
    if rewards.shape[1] == 2:
        metrics |= pair_metrics(rewards[:, 0], rewards[:, 1]) | logp_metrics(inputs)
    return metrics


def _score_targets(inputs: MethodInputs, name: str) -> Tensor:
    if inputs.targets is None:
        raise ValueError(f"{name} needs target scores in [0, 1] per completion (inputs.targets)")
    return inputs.targets.to(inputs.policy_logps.dtype)


def _una_scores(inputs: MethodInputs, cfg, name: str) -> LossOutput:
    targets = _score_targets(inputs, name)
    ratios = inputs.logratios()
    losses = una_score_loss(ratios, targets, cfg.beta, cfg.una_loss)
    loss = masked_mean(losses, inputs.completion_mask)
    return LossOutput(loss, _pointwise_metrics(inputs, cfg.beta * ratios, targets))


def una_binary(inputs: MethodInputs, cfg) -> LossOutput:
    """UNA on binary feedback (targets 1/0), mse or bce by ``cfg.una_loss``, mean over real slots."""
    return _una_scores(inputs, cfg, "una_binary")


def una_score(inputs: MethodInputs, cfg) -> LossOutput:
    """UNA on normalized scores in [0, 1], mse (default) or soft-target bce, mean over real slots."""
    return _una_scores(inputs, cfg, "una_score")


def una_reward(inputs: MethodInputs, cfg) -> LossOutput:
    """UNA in reward space against ``r̃ = (r − reward_shift) / reward_scale``, mean over real slots."""
    if inputs.rewards is None:
        raise ValueError("una_reward needs explicit rewards per completion (inputs.rewards)")
    rewards = scale_rewards(inputs.rewards.to(inputs.policy_logps.dtype), cfg.reward_scale, cfg.reward_shift)
    ratios = inputs.logratios()
    loss = masked_mean(una_reward_loss(ratios, rewards, cfg.beta), inputs.completion_mask)
    return LossOutput(loss, _pointwise_metrics(inputs, cfg.beta * ratios, rewards))


_UNA_PAPER = ('Wang et al. 2024, "UNA: Unifying Alignments of RLHF/PPO, DPO and KTO by a Generalized Implicit Reward '
              'Function" (arXiv:2408.15339)')

register(Method(
    name="una_pair", loss=una_pair, formats=("pairwise",), needs_reference=True,
    summary="UNA on pairwise feedback (the DPO sigmoid loss)",
    paper=_UNA_PAPER + " (Eq. 10)",
    defaults={"beta": 0.03, "learning_rate": 5e-6},
))

register(Method(
    name="una_binary", loss=una_binary, formats=("binary", "pairwise"), needs_reference=True,
    targets_from="labels",
    summary="UNA on binary feedback: implicit score σ(r_θ) towards 1/0 by mse or bce (una_loss)",
    paper=_UNA_PAPER + " (Eq. 11-12)",
    defaults={"beta": 0.01, "learning_rate": 5e-6, "una_loss": "mse"},
))

register(Method(
    name="una_score", loss=una_score, formats=("score", "pairwise", "listwise"), needs_reference=True,
    targets_from="scores",
    summary="UNA on score feedback: implicit score σ(r_θ) towards the normalized score (mse, or bce)",
    paper=_UNA_PAPER + " (Eq. 13)",
    defaults={"beta": 0.03, "learning_rate": 3e-5, "una_loss": "mse"},
))

register(Method(
    name="una_reward", loss=una_reward, formats=("score", "pairwise", "listwise"), needs_reference=True,
    summary="UNA in reward space: implicit reward r_θ towards an unnormalized explicit reward (mse)",
    paper=_UNA_PAPER + " (Eq. 7)",
    defaults={"beta": 0.03, "learning_rate": 5e-6},
))
