"""DPO and the reference-based pairwise baselines.

Slots: ``0 = chosen (y_w)``, ``1 = rejected (y_l)``. ``h = r_θ(x, y_w) − r_θ(x, y_l)`` with the
implicit reward ``r_θ = β·(logp_θ − logp_ref)`` on summed completion log-probs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unialign.losses.base import LossOutput, MethodInputs, logp_metrics, pair_metrics
from unialign.losses.registry import Method, register


def dpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
             label_smoothing: float = 0.0) -> Tensor:
    """Per-row DPO loss (Rafailov et al. 2023), with cDPO label smoothing ε.

    ``L = −(1−ε)·log σ(β·Δ) − ε·log σ(−β·Δ)``, ``Δ = (logp_θ−logp_ref)(y_w) − (logp_θ−logp_ref)(y_l)``.
    ``ε = 0`` is plain DPO (and UNA-pair, UNA paper Eq. 5).

    Args:
        chosen_logratios, rejected_logratios: ``(B,)`` unscaled log-ratios ``logp_θ − logp_ref``.
    """
    h = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def robust_dpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
                    label_smoothing: float) -> Tensor:
    """Per-row robust DPO loss (Chowdhury et al. 2024, "Provably Robust DPO"; TRL's ``robust``).

    ``L = [−(1−ε)·log σ(β·Δ) + ε·log σ(−β·Δ)] / (1 − 2ε)``: an unbiased estimate of the clean DPO
    loss when labels flip with probability ``ε < 1/2``. Shapes as :func:`dpo_loss`.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_dpo needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    h = beta * (chosen_logratios - rejected_logratios)
    clean = -(1 - label_smoothing) * F.logsigmoid(h)
    flipped = -label_smoothing * F.logsigmoid(-h)
    return (clean - flipped) / (1 - 2 * label_smoothing)


def ipo_loss(chosen_avg_logratios: Tensor, rejected_avg_logratios: Tensor, beta: float) -> Tensor:
    """Per-row IPO loss (Azar et al. 2023, Eq. 17), on length-normalized log-ratios as TRL does.

    ``L = (h_avg − 1/(2β))²``, ``h_avg = (logp_θ−logp_ref)(y_w)/|y_w| − (logp_θ−logp_ref)(y_l)/|y_l|``;
    β plays the role of the paper's τ.

    Args:
        chosen_avg_logratios, rejected_avg_logratios: ``(B,)`` per-token log-ratios.
    """
    return (chosen_avg_logratios - rejected_avg_logratios - 1 / (2 * beta)) ** 2


def hinge_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Per-row SLiC-HF hinge loss (Zhao et al. 2023): ``L = max(0, 1 − β·Δ)``, shapes as :func:`dpo_loss`."""
    return torch.relu(1 - beta * (chosen_logratios - rejected_logratios))


def cal_dpo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float) -> Tensor:
    """Per-row Cal-DPO loss (Xiao et al. 2024, the authors' code form) on unscaled log-ratios ``h``.

    ``L = −log σ(h_w − h_l) + ½·[(h_w − 1/(2β))² + (h_l + 1/(2β))²]``: the contrastive term has no β;
    the calibration term pulls the implicit rewards ``β·h`` towards ``±½``.

    Args:
        chosen_logratios, rejected_logratios: ``(B,)`` unscaled log-ratios ``logp_θ − logp_ref``.
    """
    target = 1 / (2 * beta)
    contrastive = -F.logsigmoid(chosen_logratios - rejected_logratios)
    calibration = 0.5 * ((chosen_logratios - target) ** 2 + (rejected_logratios + target) ** 2)
    return contrastive + calibration


def distill_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, chosen_rewards: Tensor,
                 rejected_rewards: Tensor, beta: float) -> Tensor:
    """Per-row reward-gap distillation (Fisch et al. 2024, "Robust Preference Optimization", RPO).

    ``L = ((r_θ(w) − r_θ(l)) − (r_φ(w) − r_φ(l)))²`` with ``r_θ = β·(logp_θ − logp_ref)``.

    Args:
        chosen_logratios, rejected_logratios: ``(B,)`` unscaled log-ratios.
        chosen_rewards, rejected_rewards: ``(B,)`` explicit rewards ``r_φ`` (not normalized).
    """
    implicit_gap = beta * (chosen_logratios - rejected_logratios)
    return (implicit_gap - (chosen_rewards - rejected_rewards)) ** 2


def _pair_log(inputs: MethodInputs, beta: float) -> dict[str, Tensor]:
    ratios = inputs.logratios()
    return pair_metrics(beta * ratios[:, 0], beta * ratios[:, 1]) | logp_metrics(inputs)


def dpo(inputs: MethodInputs, cfg) -> LossOutput:
    """DPO on pairwise rows: mean of :func:`dpo_loss` over the batch."""
    ratios = inputs.logratios()
    losses = dpo_loss(ratios[:, 0], ratios[:, 1], cfg.beta, cfg.label_smoothing)
    return LossOutput(losses.mean(), _pair_log(inputs, cfg.beta))


def robust_dpo(inputs: MethodInputs, cfg) -> LossOutput:
    """Robust DPO on pairwise rows: mean of :func:`robust_dpo_loss`."""
    ratios = inputs.logratios()
    losses = robust_dpo_loss(ratios[:, 0], ratios[:, 1], cfg.beta, cfg.label_smoothing)
    return LossOutput(losses.mean(), _pair_log(inputs, cfg.beta))


def ipo(inputs: MethodInputs, cfg) -> LossOutput:
    """IPO on pairwise rows: mean of :func:`ipo_loss` on per-token log-ratios."""
    avg_ratios = inputs.avg_logps - inputs.ref_avg_logps
    losses = ipo_loss(avg_ratios[:, 0], avg_ratios[:, 1], cfg.beta)
    return LossOutput(losses.mean(), _pair_log(inputs, cfg.beta))


def hinge(inputs: MethodInputs, cfg) -> LossOutput:
    """SLiC-HF hinge on pairwise rows: mean of :func:`hinge_loss`."""
    ratios = inputs.logratios()
    losses = hinge_loss(ratios[:, 0], ratios[:, 1], cfg.beta)
    return LossOutput(losses.mean(), _pair_log(inputs, cfg.beta))


def cal_dpo(inputs: MethodInputs, cfg) -> LossOutput:
    """Cal-DPO on pairwise rows: mean of :func:`cal_dpo_loss`."""
    ratios = inputs.logratios()
    losses = cal_dpo_loss(ratios[:, 0], ratios[:, 1], cfg.beta)
    return LossOutput(losses.mean(), _pair_log(inputs, cfg.beta))


def rpo_nll(inputs: MethodInputs, cfg) -> LossOutput:
    """DPO plus ``α·NLL(y_w)`` (TRL's ``rpo``), NLL the token mean over the micro-batch's chosen tokens."""
    ratios = inputs.logratios()
    preference = dpo_loss(ratios[:, 0], ratios[:, 1], cfg.beta, cfg.label_smoothing).mean()
    nll = inputs.nll(0)
    metrics = _pair_log(inputs, cfg.beta) | {"nll_loss": nll.detach(), "preference_loss": preference.detach()}
    return LossOutput(preference + cfg.alpha * nll, metrics)


def distill(inputs: MethodInputs, cfg) -> LossOutput:
    """Reward-gap distillation on pairwise rows with explicit rewards in ``inputs.rewards[:, 0/1]``."""
    if inputs.rewards is None:
        raise ValueError("distill needs explicit rewards for chosen and rejected (chosen_score/rejected_score)")
    ratios = inputs.logratios()
    rewards = inputs.rewards.to(ratios.dtype)
    losses = distill_loss(ratios[:, 0], ratios[:, 1], rewards[:, 0], rewards[:, 1], cfg.beta)
    metrics = _pair_log(inputs, cfg.beta) | {"targets/margins": (rewards[:, 0] - rewards[:, 1]).mean()}
    return LossOutput(losses.mean(), metrics)


register(Method(
    name="dpo", loss=dpo, formats=("pairwise",), needs_reference=True,
    summary="Direct Preference Optimization; label_smoothing gives cDPO",
    paper='Rafailov et al. 2023, "Direct Preference Optimization" (arXiv:2305.18290); cDPO: Mitchell 2023, '
          '"A note on DPO with noisy preferences and relationship to IPO" (note, no arXiv id)',
    defaults={"beta": 0.1, "learning_rate": 5e-7},
))

register(Method(
    name="robust_dpo", loss=robust_dpo, formats=("pairwise",), needs_reference=True,
    summary="Robust DPO: unbiased DPO under label noise of rate label_smoothing (TRL's robust)",
    paper='Chowdhury et al. 2024, "Provably Robust DPO" (arXiv:2403.00409)',
    defaults={"beta": 0.1, "learning_rate": 5e-7, "label_smoothing": 0.1},
))

register(Method(
    name="ipo", loss=ipo, formats=("pairwise",), needs_reference=True,
    summary="Identity Preference Optimization: squared loss on per-token log-ratio margins",
    paper='Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human Preferences" '
          '(arXiv:2310.12036)',
    defaults={"beta": 0.1, "learning_rate": 5e-7},
))

register(Method(
    name="hinge", loss=hinge, formats=("pairwise",), needs_reference=True,
    summary="SLiC-HF hinge loss on the implicit reward margin",
    paper='Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback" (arXiv:2305.10425)',
    defaults={"beta": 0.1, "learning_rate": 5e-7},
))

register(Method(
    name="cal_dpo", loss=cal_dpo, formats=("pairwise",), needs_reference=True,
    summary="Calibrated DPO: contrastive term plus calibration of implicit rewards to ±1/2",
    paper='Xiao et al. 2024, "Cal-DPO: Calibrated Direct Preference Optimization" (arXiv:2412.14516)',
    defaults={"beta": 0.1, "learning_rate": 5e-7},
))

register(Method(
    name="rpo_nll", loss=rpo_nll, formats=("pairwise",), needs_reference=True,
    summary="DPO plus alpha times the chosen completion's NLL (TRL's rpo)",
    paper='Pang et al. 2024, "Iterative Reasoning Preference Optimization" (arXiv:2404.19733)',
    defaults={"beta": 0.1, "learning_rate": 5e-7, "alpha": 1.0},
))

register(Method(
    name="distill", loss=distill, formats=("pairwise",), needs_reference=True,
    summary="Distill explicit reward gaps into implicit reward gaps (squared error)",
    paper='Fisch et al. 2024, "Robust Preference Optimization through Reward Model Distillation" '
          '(arXiv:2405.19316)',
    defaults={"beta": 0.1, "learning_rate": 2e-7},
))
