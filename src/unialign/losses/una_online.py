"""Online UNA: RLHF's RL stage as a regression of implicit on explicit rewards, with no value model.

Wang et al. 2024, "UNA: Unifying Alignments of RLHF/PPO, DPO and KTO by a Generalized Implicit
Reward Function" (arXiv:2408.15339), §2.3.4 (simplification of RLHF) and §4.2 (online experiments); docs/online.md.

Each step the policy samples completions ``y ~ π_θ(·|x)``, a reward source rates them with an
explicit reward ``r_φ(x, y)``, and the implicit reward

    r_θ(x, y) = β · (log π_θ(y|x) − log π_base(y|x))

is pulled towards it (Eq. 7 and 9):

- score space (``una_space: score``): ``(σ(r_θ) − s_φ)²`` (``una_loss: mse``) or the BCE with the soft
  target ``s_φ``: ``−[s_φ·log σ(r_θ) + (1 − s_φ)·log σ(−r_θ)]`` (``una_loss: bce``);
- reward space (``una_space: reward``): ``(r_θ − r̃_φ)²``.

The explicit target comes from ``r_φ`` by ``reward_normalization`` (after the missing-EOS penalty):

- ``none``: ``r̃_φ = (r_φ − reward_shift) / reward_scale`` and ``s_φ = σ(r̃_φ)``;
- ``running``: ``r̃_φ = (r_φ − μ) / (σ + 1e-8)`` with the mean and (Bessel-corrected) standard
  deviation of every reward seen so far, the current batch included; ``s_φ = σ(r̃_φ)``;
- ``range``: ``s_φ = clip((r_φ − lo) / (hi − lo), 0, 1)`` for a bounded source (``reward_range``, or
  the source's ``bounds``); in reward space the target is that same ``[0, 1]`` value.

``π_base`` is the frozen reference ``π_ref`` (``ratio_base: reference``, docs/online.md, the default) or the
policy that sampled the rollout (``ratio_base: rollout``, the authors' code). With ``rollout`` the
log-ratio is exactly 0 on the first optimizer pass over a batch of rollouts, so ``σ(r_θ) = 0.5``
there and each completion's log-prob is pushed up when ``s_φ > 0.5`` and down when ``s_φ < 0.5``;
nothing ties the policy to ``π_ref`` across steps.

The trainer puts ``log π_base`` in ``MethodInputs.ref_logps``, ``s_φ`` in ``targets`` and ``r̃_φ``
in ``reward_targets``; every ``(B, K)`` slot is one sampled completion (K = ``num_generations``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from unialign.feedback import rescale
from unialign.losses.base import LossOutput, MethodInputs, masked_mean
from unialign.losses.registry import Method, register
from unialign.losses.una import una_reward_loss, una_score_loss

NORMALIZATIONS = ("none", "running", "range")
SPACES = ("score", "reward")
RATIO_BASES = ("reference", "rollout")
WHITEN_EPS = 1e-8


def apply_missing_eos_penalty(rewards: Tensor, ended: Tensor, penalty: float | None) -> Tensor:
    """``r_φ − penalty`` for completions that did not end in EOS (cut off at ``max_completion_length``).

    Args:
        rewards: ``(N,)`` explicit rewards.
        ended: ``(N,)`` bool, true where the completion ended with EOS.
        penalty: amount subtracted; ``None`` leaves the rewards unchanged.
    """
    if penalty is None:
        return rewards
    return rewards - penalty * (~ended).to(rewards.dtype)


class RunningMoments:
    """Mean and standard deviation of every value seen so far (Chan et al.'s parallel update).

    Used by ``reward_normalization: running``; its state is saved with checkpoints.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0  # sum of squared deviations from the mean

    def update(self, values: Tensor) -> None:
        """Fold a batch of values into the statistics."""
        values = values.detach().double().flatten()
        n = values.numel()
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        """Sample standard deviation (Bessel-corrected); 0 with fewer than two values."""
        return math.sqrt(self.m2 / (self.count - 1)) if self.count > 1 else 0.0

    def whiten(self, values: Tensor) -> Tensor:
        """``(values − mean) / (std + 1e-8)`` with the current statistics."""
        return (values - self.mean) / (self.std + WHITEN_EPS)

    def state_dict(self) -> dict[str, float]:
        """The statistics, for checkpoints."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        """Restore statistics saved by :meth:`state_dict`."""
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def explicit_targets(
    rewards: Tensor,
    normalization: str = "none",
    *,
    reward_scale: float = 1.0,
    reward_shift: float = 0.0,
    bounds: tuple[float, float] | None = None,
    moments: RunningMoments | None = None,
) -> tuple[Tensor, Tensor]:
    """The score-space target ``s_φ`` and the reward-space target ``r̃_φ`` of explicit rewards.

    ``none``: ``r̃ = (r − shift)/scale``, ``s = σ(r̃)``; ``running``: ``r̃ = (r − μ)/(σ + 1e-8)`` after
    folding this batch into ``moments``, ``s = σ(r̃)``; ``range``: ``s = r̃ = clip((r − lo)/(hi − lo), 0, 1)``.

    Returns:
        ``(scores, reward_targets)``, both shaped like ``rewards``.
    """
    if normalization == "none":
        if reward_scale == 0:
            raise ValueError("reward_scale must be non-zero")
        scaled = (rewards - reward_shift) / reward_scale
        return torch.sigmoid(scaled), scaled
    if normalization == "running":
        if moments is None:
            raise ValueError("reward_normalization 'running' needs a RunningMoments to keep the statistics in")
        moments.update(rewards)
        whitened = moments.whiten(rewards)
        return torch.sigmoid(whitened), whitened
    if normalization == "range":
        if bounds is None:
            raise ValueError(
                "reward_normalization 'range' needs reward_range: [low, high] or a reward source with known bounds"
            )
        try:
            scores = rescale(rewards, bounds).clamp(0.0, 1.0)
        except ValueError as err:
            raise ValueError(f"reward_range: {err}") from None
        return scores, scores
    raise ValueError(f"reward_normalization must be one of {', '.join(NORMALIZATIONS)}, got {normalization!r}")


def ratio_base_logps(ratio_base: str, ref_logps: Tensor, rollout_logps: Tensor | None) -> Tensor:
    """``log π_base(y|x)``: the reference's log-probs (``reference``) or the sampling policy's (``rollout``)."""
    if ratio_base == "reference":
        return ref_logps
    if ratio_base == "rollout":
        if rollout_logps is None:
            raise ValueError("ratio_base 'rollout' needs the log-probs of the policy that sampled the completions")
        return rollout_logps
    raise ValueError(f"ratio_base must be one of {', '.join(RATIO_BASES)}, got {ratio_base!r}")


def una_online_losses(
    logratios: Tensor, scores: Tensor, reward_targets: Tensor, beta: float, space: str = "score", kind: str = "mse"
) -> Tensor:
    """Per-completion online UNA loss.

    score space: ``(σ(β·h) − s_φ)²`` (mse) or soft-target BCE (bce); reward space: ``(β·h − r̃_φ)²``.

    Args:
        logratios: ``h = log π_θ − log π_base``, any shape.
        scores: ``s_φ ∈ [0, 1]``, same shape.
        reward_targets: ``r̃_φ``, same shape.
        space: ``"score"`` or ``"reward"``.
        kind: ``"mse"`` or ``"bce"`` (score space only).
    """
    if space == "score":
        return una_score_loss(logratios, scores, beta, kind)
    if space == "reward":
        return una_reward_loss(logratios, reward_targets, beta)
    raise ValueError(f"una_space must be one of {', '.join(SPACES)}, got {space!r}")


def una_online(inputs: MethodInputs, cfg) -> LossOutput:
    """Online UNA on ``(B, K)`` sampled completions, averaged over the real slots.

    ``inputs.ref_logps`` holds ``log π_base``, ``inputs.targets`` holds ``s_φ`` and
    ``inputs.reward_targets`` holds ``r̃_φ`` (see the module docstring).
    """
    if inputs.targets is None or inputs.reward_targets is None:
        raise ValueError("una_online needs score targets (inputs.targets) and reward targets (inputs.reward_targets)")
    logratios = inputs.logratios()
    dtype = inputs.policy_logps.dtype
    scores, reward_targets = inputs.targets.to(dtype), inputs.reward_targets.to(dtype)
    losses = una_online_losses(logratios, scores, reward_targets, cfg.beta, cfg.una_space, cfg.una_loss)
    mask = inputs.completion_mask
    implicit = (cfg.beta * logratios).detach()
    targets = scores if cfg.una_space == "score" else reward_targets
    metrics = {
        "rewards/implicit": masked_mean(implicit, mask),
        "scores/implicit": masked_mean(torch.sigmoid(implicit), mask),
        "targets/mean": masked_mean(targets.detach(), mask),
        "logps/mean": masked_mean(inputs.policy_logps.detach(), mask),
    }
    return LossOutput(masked_mean(losses, mask), metrics)


register(Method(
    name="una_online", loss=una_online, formats=("prompt",), needs_reference=True, online=True,
    targets_from="scores",
    summary="online UNA: sample, score with a reward source, regress the implicit on the explicit reward",
    paper='Wang et al. 2024, "UNA: Unifying Alignments of RLHF/PPO, DPO and KTO by a Generalized Implicit '
          'Reward Function" (arXiv:2408.15339), §2.3.4, §4.2; Eq. 7, 9',
    # The paper gives no online beta / lr: UNA-score's beta and the paper's usual lr (docs/methods.md).
    defaults={"beta": 0.03, "learning_rate": 5e-6},
))
