"""KTO: Kahneman–Tversky optimization (Ethayarajh et al. 2024, Eq. 7), TRL's ``kto`` loss type.

Each completion slot is one example, desirable (target 1) or undesirable (target 0). With
``h = logp_θ − logp_ref`` and the batch KL estimate ``z_ref``:

    desirable:   w_d · (1 − σ(β·(h − z_ref)))
    undesirable: w_u · (1 − σ(β·(z_ref − h)))
    L = Σ_examples weighted loss / number of examples   (the weights do not renormalize the mean)

``z_ref = max(0, mean_b(logp_θ(y'_b|x_b) − logp_ref(y'_b|x_b)))`` over mismatched pairs
``(x_b, y'_b)`` is detached. On several processes TRL also averages it across ranks; a loss here
only sees its micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from unialign.losses.base import LossOutput, MethodInputs
from unialign.losses.registry import Method, register


def kto_kl(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """Detached KL estimate ``max(0, mean(kl_logps − ref_kl_logps))`` from ``(B,)`` mismatched pairs."""
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(logratios: Tensor, desirable: Tensor, kl: Tensor, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> Tensor:
    """Per-example weighted KTO loss.

    Args:
        logratios: ``(N,)`` unscaled log-ratios ``logp_θ − logp_ref``.
        desirable: ``(N,)`` bool, ``True`` for desirable completions.
        kl: scalar (detached) reference point ``z_ref``.
    """
    chosen = desirable_weight * (1 - F.sigmoid(beta * (logratios - kl)))
    rejected = undesirable_weight * (1 - F.sigmoid(beta * (kl - logratios)))
    return torch.where(desirable, chosen, rejected)


def _labels(inputs: MethodInputs) -> Tensor:
    if inputs.targets is not None:
        return inputs.targets >= 0.5
    if inputs.policy_logps.shape[1] == 2:
        labels = torch.zeros_like(inputs.completion_mask)
        labels[:, 0] = True
        return labels
    raise ValueError("kto needs a desirable/undesirable label per completion (inputs.targets)")


def _group_metrics(name: str, values: Tensor, group: Tensor) -> dict[str, Tensor]:
    return {name: values[group].mean()} if group.any() else {}


def _kto_metrics(rewards: Tensor, logps: Tensor, desirable: Tensor, kl: Tensor) -> dict[str, Tensor]:
    metrics = {"kl": kl.detach()}
    for tag, group in (("chosen", desirable), ("rejected", ~desirable)):
        metrics |= _group_metrics(f"rewards/{tag}", rewards, group)
        metrics |= _group_metrics(f"logps/{tag}", logps, group)
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return metrics


def kto(inputs: MethodInputs, cfg) -> LossOutput:
    """KTO on binary rows (or pairwise rows: chosen desirable, rejected undesirable), mean over real slots."""
    if inputs.kl_logps is None or inputs.ref_kl_logps is None:
        raise ValueError("kto needs log-probs of mismatched (prompt, completion) pairs for its KL estimate")
    mask = inputs.completion_mask
    ratios = inputs.logratios()[mask]
    desirable = _labels(inputs)[mask]
    kl = kto_kl(inputs.kl_logps, inputs.ref_kl_logps)
    losses = kto_loss(ratios, desirable, kl, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
    metrics = _kto_metrics(cfg.beta * ratios.detach(), inputs.policy_logps.detach()[mask], desirable, kl)
    return LossOutput(losses.mean(), metrics)


register(Method(
    name="kto", loss=kto, formats=("binary", "pairwise"), needs_reference=True, needs_kl_pairs=True,
    targets_from="labels",
    summary="Kahneman-Tversky Optimization on unpaired desirable/undesirable completions",
    paper='Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization" (arXiv:2402.01306)',
    defaults={"beta": 0.1, "learning_rate": 1e-6, "desirable_weight": 1.0, "undesirable_weight": 1.0},
))
