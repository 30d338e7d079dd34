"""TPO: triple preference optimization.

Saeidi et al. 2024, "Triple Preference Optimization: Achieving Better Alignment with Less Data in a
Single Step Optimization" (arXiv:2405.16681).

Slots: ``0 = reference (gold, y_ref)``, ``1 = chosen (y_w)``, ``2 = rejected (y_l)``. No reference
*model*: the preference term uses the policy's own log-probs and the gold completion is learned by
an NLL term, the token-mean cross-entropy over all gold tokens of the micro-batch.

    tpo:   L = −(1−ε)·log σ(β·(logp_w − logp_l)) − ε·log σ(−β·(logp_w − logp_l)) + α·NLL(y_ref)
    tpo_l: L = −(1−ε)·log σ(z) − ε·log σ(−z) + α·NLL(y_ref),  z = β·(avg_w − avg_l) − γ
"""

from __future__ import annotations

from torch import Tensor

from unialign.losses.base import LossOutput, MethodInputs, logp_metrics, pair_metrics
from unialign.losses.reference_free import sigmoid_margin_loss
from unialign.losses.registry import Method, register

REFERENCE, CHOSEN, REJECTED = 0, 1, 2


def tpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, beta: float, label_smoothing: float = 0.0,
             gamma: float = 0.0) -> Tensor:
    """Per-row TPO preference term (summed log-probs, ``γ = 0``) or TPO-L (per-token log-probs, margin γ).

    Args:
        chosen_logps, rejected_logps: ``(B,)`` policy log-probs of ``y_w`` and ``y_l``.
    """
    return sigmoid_margin_loss(chosen_logps, rejected_logps, beta, gamma, label_smoothing)


def _tpo_output(inputs: MethodInputs, cfg, logps: Tensor, gamma: float) -> LossOutput:
    preference = tpo_loss(logps[:, CHOSEN], logps[:, REJECTED], cfg.beta, cfg.label_smoothing, gamma).mean()
    nll = inputs.nll(REFERENCE) if cfg.alpha != 0 else preference.new_zeros(())
    metrics = pair_metrics(cfg.beta * logps[:, CHOSEN], cfg.beta * logps[:, REJECTED])
    metrics |= logp_metrics(inputs, CHOSEN, REJECTED)
    metrics |= {"nll_loss": nll.detach(), "preference_loss": preference.detach()}
    return LossOutput(preference + cfg.alpha * nll, metrics)


def tpo(inputs: MethodInputs, cfg) -> LossOutput:
    """TPO on triple rows with summed log-probs; ``rewards/* = β·logp_θ``."""
    return _tpo_output(inputs, cfg, inputs.policy_logps, 0.0)


def tpo_l(inputs: MethodInputs, cfg) -> LossOutput:
    """TPO-L on triple rows with per-token log-probs and margin ``cfg.gamma``; ``rewards/* = β·avg_logp``."""
    return _tpo_output(inputs, cfg, inputs.avg_logps, cfg.gamma)


_TPO_PAPER = 'Saeidi et al. 2024, "Triple Preference Optimization" (arXiv:2405.16681)'

register(Method(
    name="tpo", loss=tpo, formats=("triple",), needs_reference=False,
    summary="Triple Preference Optimization: reference-free preference term plus alpha times gold NLL",
    paper=_TPO_PAPER,
    defaults={"beta": 0.01, "alpha": 1.0, "learning_rate": 5e-7},
))

register(Method(
    name="tpo_l", loss=tpo_l, formats=("triple",), needs_reference=False,
    summary="TPO-L: length-normalized TPO with target margin gamma",
    paper=_TPO_PAPER + " (TPO-L)",
    defaults={"beta": 0.01, "alpha": 1.0, "gamma": 0.5, "learning_rate": 5e-7},
))
