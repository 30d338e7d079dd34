"""RAO: reward alignment optimization on listwise rows (RAO paper, Eq. 7–8 and Algorithm 1).

Each row is one prompt ``x_i`` with ``K`` completion slots ``y_ij`` (``completion_mask`` marks the
real ones) and explicit rewards ``r_ij``. Every prompt starts with the same first token ``t0``; the
prefix-consistency term ``Δ_i = sg(logp_θ(x̃_i|t0) − logp_ref(x̃_i|t0))`` uses the prompt tokens
after ``t0`` and is detached. The implicit reward plus the log-normalizer ``z0`` and ``Δ_i`` is
regressed onto the (optionally rescaled) explicit reward:

    pred_ij = β·(logp_θ(y_ij|x_i) − logp_ref(y_ij|x_i) + z0 + Δ_i)
    L = mean_i mean_{j real} (pred_ij − r̃_ij)²,   r̃_ij = (r_ij − reward_shift) / reward_scale

The reward convention matches docs/online.md (online UNA: ``σ((r − shift)/scale)``); the defaults
``reward_scale = 1, reward_shift = 0`` leave rewards unchanged. At the optimum with ``Δ = 0`` the
log-ratio is ``r̃/β − z0``: ``z0`` shifts the mean implicit reward, β scales the gaps.
"""

from __future__ import annotations

from torch import Tensor

from unialign.losses.base import LossOutput, MethodInputs, masked_mean, pair_metrics
from unialign.losses.registry import Method, register


def scale_rewards(rewards: Tensor, reward_scale: float = 1.0, reward_shift: float = 0.0) -> Tensor:
    """``(r − reward_shift) / reward_scale``: the one reward-rescaling convention of the package."""
    if reward_scale == 0:
        raise ValueError("reward_scale must be non-zero")
    return (rewards - reward_shift) / reward_scale


def rao_loss(logratios: Tensor, prompt_delta: Tensor, rewards: Tensor, mask: Tensor, beta: float,
             z0: float) -> Tensor:
    """Per-prompt RAO loss: mean over the real slots of ``(β·(h_ij + z0 + Δ_i) − r_ij)²``.

    Args:
        logratios: ``(B, K)`` unscaled completion log-ratios ``h = logp_θ − logp_ref``.
        prompt_delta: ``(B,)`` prompt log-ratio after ``t0``; detached here, no gradient reaches it.
        rewards: ``(B, K)`` explicit rewards, already rescaled.
        mask: ``(B, K)`` ``True`` for real completions.

    Returns:
        ``(B,)`` losses; a prompt without a real completion gets 0.
    """
    pred = beta * (logratios + z0 + prompt_delta.detach().unsqueeze(1))
    weights = mask.to(pred.dtype)
    squared = (pred - rewards) ** 2 * weights
    return squared.sum(dim=1) / weights.sum(dim=1).clamp(min=1)


def best_and_worst(rewards: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Slot indices ``(B,)`` of the highest and lowest reward among the real slots of each row."""
    best = rewards.masked_fill(~mask, float("-inf")).argmax(dim=1)
    worst = rewards.masked_fill(~mask, float("inf")).argmin(dim=1)
    return best, worst


def _pick(values: Tensor, idx: Tensor) -> Tensor:
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def _prompt_delta(inputs: MethodInputs) -> Tensor:
    if inputs.prompt_logps is None or inputs.ref_prompt_logps is None:
        raise ValueError("rao needs prompt log-probs after the first token under policy and reference")
    return inputs.prompt_logps - inputs.ref_prompt_logps


def _rao_metrics(inputs: MethodInputs, ratios: Tensor, rewards: Tensor, delta: Tensor,
                 beta: float) -> dict[str, Tensor]:
    mask = inputs.completion_mask
    ratios, logps = ratios.detach(), inputs.policy_logps.detach()
    best, worst = best_and_worst(rewards, mask)
    return pair_metrics(beta * _pick(ratios, best), beta * _pick(ratios, worst)) | {
        "logps/chosen": _pick(logps, best).mean(),
        "logps/rejected": _pick(logps, worst).mean(),
        "logratios/chosen": _pick(ratios, best).mean(),
        "rewards/implicit": masked_mean(beta * ratios, mask),
        "targets/mean": masked_mean(rewards.detach(), mask),
        "prompt_delta": delta.detach().mean(),
    }


def rao(inputs: MethodInputs, cfg) -> LossOutput:
    """RAO on listwise rows: mean over prompts of :func:`rao_loss` (prompts with no completion skipped)."""
    if inputs.rewards is None:
        raise ValueError("rao needs explicit rewards per completion (listwise `rewards` column)")
    ratios = inputs.logratios()
    rewards = scale_rewards(inputs.rewards.to(ratios.dtype), cfg.reward_scale, cfg.reward_shift)
    delta = _prompt_delta(inputs)
    per_prompt = rao_loss(ratios, delta, rewards, inputs.completion_mask, cfg.beta, cfg.z0)
    loss = masked_mean(per_prompt, inputs.completion_mask.any(dim=1))
    return LossOutput(loss, _rao_metrics(inputs, ratios, rewards, delta, cfg.beta))


register(Method(
    name="rao", loss=rao, formats=("listwise",), needs_reference=True, needs_prompt_logps=True,
    needs_shared_first_token=True,
    summary="Reward Alignment Optimization: regress β·(log-ratio + z0 + prompt term) onto explicit rewards",
    paper='Li et al. 2026, "Reward Alignment Optimization: A Direct Point-wise Alignment Approach" (ACL 2026)',
    defaults={"beta": 0.1, "learning_rate": 5e-7, "z0": 50.0},
))
