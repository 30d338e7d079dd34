"""Reference-free pairwise baselines: SimPO, CPO and ORPO. No reference model is loaded.

Slots: ``0 = chosen (y_w)``, ``1 = rejected (y_l)``. ``NLL(y_w)`` is the token-mean cross-entropy
over all chosen-completion tokens of the micro-batch (:meth:`MethodInputs.nll`); ORPO's NLL also
covers the prompt tokens after the first by default (``orpo_nll_scope``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from unialign.losses.base import LossOutput, MethodInputs, logp_metrics, pair_metrics
from unialign.losses.registry import Method, register


def sigmoid_margin_loss(chosen: Tensor, rejected: Tensor, beta: float, gamma: float = 0.0,
                        label_smoothing: float = 0.0) -> Tensor:
    """Per-row ``−(1−ε)·log σ(z) − ε·log σ(−z)`` with ``z = β·(chosen − rejected) − γ``.

    With summed log-probs and ``γ = 0`` this is CPO's preference term (Xu et al. 2024, Eq. 3); with
    average log-probs it is SimPO (Meng et al. 2024, Eq. 6). ``ε`` is TRL's conservative label smoothing.

    Args:
        chosen, rejected: ``(B,)`` log-probs (summed or per-token), no reference term.
    """
    z = beta * (chosen - rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 − exp(x))`` for ``x < 0``, stable on both sides of ``−log 2`` (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds_ratio(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor) -> Tensor:
    """``log odds(p_w) − log odds(p_l)`` with ``odds(p) = p/(1−p)`` and ``log p = avg_logp``.

    ``log odds(p) = avg − log(1 − exp(avg))``; per-token log-probs are capped just below 0 so the
    odds stay finite when a completion is certain. Shapes ``(B,)``.
    """
    chosen = chosen_avg_logps.clamp(max=-1e-6)
    rejected = rejected_avg_logps.clamp(max=-1e-6)
    return (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))


# ``orpo_nll_scope`` values (the config checks against this tuple): the first is the default.
ORPO_NLL_SCOPES = ("prompt_and_completion", "completion")


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float) -> Tensor:
    """Per-row ORPO odds-ratio term (Hong et al. 2024, Eq. 6–7): ``−λ·log σ(log odds ratio)``, λ = β.

    The full ORPO loss adds ``NLL(y_w)`` once per micro-batch. Shapes ``(B,)``.
    """
    return -beta * F.logsigmoid(orpo_log_odds_ratio(chosen_avg_logps, rejected_avg_logps))


def simpo(inputs: MethodInputs, cfg) -> LossOutput:
    """SimPO on pairwise rows: ``−log σ(β·(avg_w − avg_l) − γ)``, with label smoothing as TRL's CPO-simpo."""
    avg = inputs.avg_logps
    losses = sigmoid_margin_loss(avg[:, 0], avg[:, 1], cfg.beta, cfg.gamma, cfg.label_smoothing)
    metrics = pair_metrics(cfg.beta * avg[:, 0], cfg.beta * avg[:, 1]) | logp_metrics(inputs)
    return LossOutput(losses.mean(), metrics)


def cpo(inputs: MethodInputs, cfg) -> LossOutput:
    """CPO on pairwise rows: ``−log σ(β·(logp_w − logp_l)) + α·NLL(y_w)`` (TRL's cpo_alpha is α)."""
    logps = inputs.policy_logps
    preference = sigmoid_margin_loss(logps[:, 0], logps[:, 1], cfg.beta, 0.0, cfg.label_smoothing).mean()
    nll = inputs.nll(0)
    metrics = pair_metrics(cfg.beta * logps[:, 0], cfg.beta * logps[:, 1]) | logp_metrics(inputs)
    metrics |= {"nll_loss": nll.detach(), "preference_loss": preference.detach()}
    return LossOutput(preference + cfg.alpha * nll, metrics)


def orpo_nll(inputs: MethodInputs, scope: str) -> Tensor:
    """ORPO's NLL term on the chosen slot, token-mean over the micro-batch (:meth:`MethodInputs.nll`).

    ``prompt_and_completion`` (the default): ``−Σ_rows (logp(x̃) + logp(y_w)) / Σ_rows (|x| − 1 + |y_w|)``
    with ``x̃`` the prompt after its first token, i.e. the cross-entropy of every token of ``x + y_w``
    that has a token before it. That is the loss of Hong et al. 2024, "ORPO: Monolithic Preference
    Optimization without Reference Model" (arXiv:2403.07691), as the authors' code and TRL compute
    it. ``completion``: ``−Σ_rows logp(y_w) / Σ_rows |y_w|``, the completion-only SFT form.
    """
    if scope not in ORPO_NLL_SCOPES:
        raise ValueError(f"orpo_nll_scope must be one of {', '.join(ORPO_NLL_SCOPES)}, got {scope!r}")
    return inputs.nll(0, with_prompt=scope == "prompt_and_completion")


def orpo(inputs: MethodInputs, cfg) -> LossOutput:
    """ORPO on pairwise rows: ``NLL − λ·log σ(log odds(avg_w) − log odds(avg_l))``, λ = ``cfg.beta``.

    The NLL's tokens are chosen by ``cfg.orpo_nll_scope`` (:func:`orpo_nll`); the odds use the
    completions' average log-probs only.
    """
    avg = inputs.avg_logps
    odds_term = orpo_loss(avg[:, 0], avg[:, 1], cfg.beta).mean()
    ratio = orpo_log_odds_ratio(avg[:, 0].detach(), avg[:, 1].detach())
    nll = orpo_nll(inputs, cfg.orpo_nll_scope)
    metrics = pair_metrics(cfg.beta * avg[:, 0], cfg.beta * avg[:, 1]) | logp_metrics(inputs)
    metrics |= {
        "nll_loss": nll.detach(),
        "log_odds_ratio": F.logsigmoid(ratio).mean(),
        "log_odds_chosen": ratio.mean(),
    }
    return LossOutput(nll + odds_term, metrics)


register(Method(
    name="simpo", loss=simpo, formats=("pairwise",), needs_reference=False,
    summary="SimPO: length-normalized log-prob margin with target margin gamma, no reference",
    paper='Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward" (arXiv:2405.14734)',
    defaults={"beta": 2.0, "gamma": 0.5, "learning_rate": 5e-7},
))

register(Method(
    name="cpo", loss=cpo, formats=("pairwise",), needs_reference=False,
    summary="Contrastive Preference Optimization: reference-free sigmoid loss plus alpha times NLL(y_w)",
    paper='Xu et al. 2024, "Contrastive Preference Optimization" (arXiv:2401.08417)',
    defaults={"beta": 0.1, "alpha": 1.0, "learning_rate": 1e-6},
))

def _orpo_needs(cfg) -> dict[str, bool]:
    return {"needs_prompt_logps": cfg.orpo_nll_scope == "prompt_and_completion"}


register(Method(
    name="orpo", loss=orpo, formats=("pairwise",), needs_reference=False, needs_prompt_logps=True,
    summary="ORPO: NLL of prompt and chosen (or the chosen only) plus beta times an odds-ratio penalty",
    paper='Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model" (arXiv:2403.07691)',
    defaults={"beta": 0.1, "learning_rate": 1e-6},
    config_needs=_orpo_needs,
))
