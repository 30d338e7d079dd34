"""Supervised fine-tuning: token-mean NLL of the completion in slot 0.

Slot 0 is the completion of SFT rows, the chosen completion of pairwise rows and the gold reference
of triple rows, so SFT trains on any of them without conversion.
"""

from __future__ import annotations

from unialign.losses.base import LossOutput, MethodInputs, masked_mean
from unialign.losses.registry import Method, register


def sft(inputs: MethodInputs, cfg) -> LossOutput:
    """``−Σ_rows logp(y_0|x) / Σ_rows |y_0|``: every completion token of the micro-batch weighs the same."""
    nll = inputs.nll(0)
    mask = inputs.completion_mask[:, 0]
    metrics = {"nll_loss": nll.detach(), "logps/completion": masked_mean(inputs.policy_logps[:, 0].detach(), mask)}
    return LossOutput(nll, metrics)


register(Method(
    name="sft", loss=sft, formats=("sft", "pairwise", "triple"), needs_reference=False,
    summary="Supervised fine-tuning: token-mean cross-entropy on the completion (chosen/reference slot)",
    paper="Ouyang et al. 2022 (arXiv:2203.02155), SFT stage; TRL SFTTrainer",
    defaults={"learning_rate": 2e-5},
))
