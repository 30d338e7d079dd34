"""Reward-model training: Bradley–Terry on a sequence-classification head (TRL's RewardTrainer).

Slots: ``0 = chosen``, ``1 = rejected``; ``inputs.rm_rewards`` holds the head's scalar outputs.

    L = mean_b[−log σ(r(w) − r(l) − m)] + c · mean_b[(r(w) + r(l))²]

``m = cfg.rm_margin`` (a constant, default 0) and ``c = cfg.center_rewards_coefficient`` (``None``
disables the centering term; Eisenstein et al. 2023 recommend 0.01).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from unialign.losses.base import LossOutput, MethodInputs, pair_metrics
from unialign.losses.registry import Method, register


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: float | Tensor = 0.0) -> Tensor:
    """Per-row ``−log σ(r(w) − r(l) − margin)`` (Bradley–Terry, Llama-2's margin form); ``(B,)`` rewards."""
    return -F.logsigmoid(chosen_rewards - rejected_rewards - margin)


def center_rewards_penalty(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Tensor:
    """``mean((r(w) + r(l))²)``, pushing the head towards mean-zero rewards (Eisenstein et al. 2023, Eq. 2)."""
    return ((chosen_rewards + rejected_rewards) ** 2).mean()


def reward_model(inputs: MethodInputs, cfg) -> LossOutput:
    """Bradley–Terry loss on the head's pairwise outputs, plus the optional centering term."""
    if inputs.rm_rewards is None:
        raise ValueError("reward_model needs the classification head's outputs (inputs.rm_rewards)")
    chosen, rejected = inputs.rm_rewards[:, 0], inputs.rm_rewards[:, 1]
    loss = bradley_terry_loss(chosen, rejected, cfg.rm_margin).mean()
    if cfg.center_rewards_coefficient is not None:
        loss = loss + cfg.center_rewards_coefficient * center_rewards_penalty(chosen, rejected)
    rewards = inputs.rm_rewards.detach()
    metrics = pair_metrics(chosen, rejected) | {
        "rewards/mean": rewards.mean(),
        "rewards/min": rewards.min(),
        "rewards/max": rewards.max(),
    }
    return LossOutput(loss, metrics)


register(Method(
    name="reward_model", loss=reward_model, formats=("pairwise",), needs_reference=False,
    model_kind="sequence_classifier",
    summary="Bradley-Terry reward-model training on a sequence-classification head",
    paper="Ouyang et al. 2022 (arXiv:2203.02155); margin: Touvron et al. 2023 (arXiv:2307.09288); "
          "centering: Eisenstein et al. 2023 (arXiv:2312.09244)",
    defaults={"learning_rate": 1e-4},
))
