"""The contract between the trainer and every loss.

A batch of ``B`` dataset rows becomes ``B`` prompts with ``K`` completion *slots* each. The slot
layout is fixed per feedback format (see :data:`unialign.feedback.SLOTS`); listwise rows may fill
fewer than ``K`` slots, which ``completion_mask`` records. The trainer computes the log-probs a method declares it
needs and hands them over in a :class:`MethodInputs`; a loss is a pure function of those tensors and
returns a :class:`LossOutput`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class MethodInputs:
    """Per-sequence quantities for one micro-batch. All ``(B, K)`` tensors share the slot layout.

    Attributes:
        policy_logps: summed completion log-probs under the policy (EOS included, prompt excluded).
        lengths: number of completion tokens per slot (0 for an empty slot).
        completion_mask: ``True`` where the slot holds a real completion.
        ref_logps: the same sums under the reference, or ``None`` when the method needs none.
        targets: per-slot explicit feedback in [0, 1] (binary labels or normalized scores).
        rewards: per-slot explicit rewards, unnormalized (reward models, judges, RAO, distill).
        reward_targets: per-slot rewards already normalized into the loss's reward space (online
            UNA's ``r̃_φ``; the rollout normalizes them, so losses use them as they are).
        prompt_logps / ref_prompt_logps: ``(B,)`` summed log-probs of the prompt tokens after the
            first one (RAO's prefix-consistency term, where that token ``t0`` is shared; ORPO's NLL).
        prompt_lengths: ``(B,)`` how many prompt tokens ``prompt_logps`` sums (prompt length − 1).
        kl_logps / ref_kl_logps: ``(B,)`` log-probs of mismatched (prompt, completion) pairs for
            KTO's KL estimate.
        rm_rewards: ``(B, K)`` scalar outputs of a sequence-classification head (reward-model training).
    """

    policy_logps: Tensor
    lengths: Tensor
    completion_mask: Tensor
    ref_logps: Tensor | None = None
    targets: Tensor | None = None
    rewards: Tensor | None = None
    reward_targets: Tensor | None = None
    prompt_logps: Tensor | None = None
    ref_prompt_logps: Tensor | None = None
    prompt_lengths: Tensor | None = None
    kl_logps: Tensor | None = None
    ref_kl_logps: Tensor | None = None
    rm_rewards: Tensor | None = None

    @property
    def avg_logps(self) -> Tensor:
        """Length-normalized log-probs ``logp / |y|`` (0 for empty slots)."""
        return self.policy_logps / self.lengths.clamp(min=1)

    @property
    def ref_avg_logps(self) -> Tensor:
        """Length-normalized reference log-probs."""
        if self.ref_logps is None:
            raise ValueError("this method declared no reference, so ref_avg_logps is unavailable")
        return self.ref_logps / self.lengths.clamp(min=1)

    def logratios(self) -> Tensor:
        """``logp_θ − logp_ref`` per slot (unscaled implicit reward)."""
        if self.ref_logps is None:
            raise ValueError("this method declared no reference, so log-ratios are unavailable")
        return self.policy_logps - self.ref_logps

    def nll(self, slot: int, with_prompt: bool = False) -> Tensor:
        """Token-mean negative log-likelihood of one slot over the whole micro-batch.

        ``−Σ_rows logp(y_slot) / Σ_rows |y_slot|``: every completion token of that slot weighs the
        same, as in a plain SFT cross-entropy over the micro-batch. With ``with_prompt`` the prompt
        tokens after the first join in, under the same convention (one token, one weight):
        ``−Σ_rows (logp(x̃) + logp(y_slot)) / Σ_rows (|x| − 1 + |y_slot|)``, the cross-entropy of
        Hugging Face ``labels`` over the whole sequence ``x + y_slot``.
        """
        mask = self.completion_mask[:, slot]
        logps, tokens = self.policy_logps[:, slot], self.lengths[:, slot]
        if with_prompt:
            if self.prompt_logps is None or self.prompt_lengths is None:
                raise ValueError("an NLL over the prompt needs prompt log-probs; the method declared none")
            logps, tokens = logps + self.prompt_logps, tokens + self.prompt_lengths
        return -logps[mask].sum() / tokens[mask].sum().clamp(min=1)


@dataclass
class LossOutput:
    """A scalar loss and the metrics to log for it (detached scalars, TRL names, docs/methods.md)."""

    loss: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


LossFn = Callable[[MethodInputs, Any], LossOutput]


def pair_metrics(chosen: Tensor, rejected: Tensor) -> dict[str, Tensor]:
    """The standard ``rewards/{chosen,rejected,margins,accuracies}`` metrics from per-row rewards."""
    chosen, rejected = chosen.detach(), rejected.detach()
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


def logp_metrics(inputs: MethodInputs, chosen: int = 0, rejected: int = 1) -> dict[str, Tensor]:
    """``logps/chosen`` and ``logps/rejected`` for methods whose rows hold a pair."""
    logps = inputs.policy_logps.detach()
    return {"logps/chosen": logps[:, chosen].mean(), "logps/rejected": logps[:, rejected].mean()}


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` where ``mask`` is true; padding slots never enter the loss."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)
