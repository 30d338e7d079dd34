"""Shared fixtures-as-functions for the loss tests: configs, inputs and plain-math references."""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch

from unialign.losses.base import MethodInputs

CONFIG_DEFAULTS = {
    "beta": 0.1,
    "label_smoothing": 0.0,
    "una_loss": "mse",
    "z0": 50.0,
    "reward_scale": 1.0,
    "reward_shift": 0.0,
    "alpha": 1.0,
    "gamma": 0.5,
    "desirable_weight": 1.0,
    "undesirable_weight": 1.0,
    "rm_margin": 0.0,
    "center_rewards_coefficient": None,
    "orpo_nll_scope": "prompt_and_completion",
}


def make_cfg(**overrides) -> SimpleNamespace:
    """A stand-in for the trainer's config with every attribute a loss may read."""
    return SimpleNamespace(**(CONFIG_DEFAULTS | overrides))


def t(values, requires_grad: bool = False) -> torch.Tensor:
    """A float64 tensor (1e-6 comparisons need double precision)."""
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def make_inputs(policy, lengths, ref=None, mask=None, grad: bool = True, **extra) -> MethodInputs:
    """``MethodInputs`` from nested lists; ``policy_logps`` is a leaf that records gradients."""
    policy_logps = t(policy, requires_grad=grad)
    lengths = torch.tensor(lengths, dtype=torch.long)
    mask = torch.ones_like(lengths, dtype=torch.bool) if mask is None else torch.tensor(mask)
    tensors = {k: (t(v) if isinstance(v, list) else v) for k, v in extra.items()}
    return MethodInputs(policy_logps=policy_logps, lengths=lengths, completion_mask=mask,
                        ref_logps=None if ref is None else t(ref), **tensors)


def logsig(x: float) -> float:
    """``log σ(x)`` in plain math."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    """``σ(x)`` in plain math."""
    return 1 / (1 + math.exp(-x))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
