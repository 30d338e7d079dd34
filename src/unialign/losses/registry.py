"""Maps method names to their loss and to what the trainer must compute for them.

This is the only place that knows which method needs what: the trainer reads a :class:`Method`
and computes exactly the declared inputs, nothing more.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from unialign.losses.base import LossFn


@dataclass(frozen=True)
class Method:
    """A registered alignment method.

    Attributes:
        name: registry key, used as ``loss_type`` in configs.
        loss: pure loss function ``(MethodInputs, config) -> LossOutput``.
        formats: feedback formats the method can train on (docs/methods.md, data formats), first one preferred.
        needs_reference: whether reference log-probs are computed (never loaded otherwise).
        needs_prompt_logps: whether prompt log-probs after the first token are computed (RAO; ORPO's
            NLL over prompt and completion).
        needs_shared_first_token: whether every prompt must start with the same token ``t0`` (RAO's
            prefix consistency); checked when the data is prepared.
        needs_kl_pairs: whether mismatched (prompt, completion) pairs are scored (KTO).
        model_kind: ``causal_lm`` or ``sequence_classifier`` (reward-model training).
        online: whether the method samples its own completions during training (``pipeline.train``
            hands it to :mod:`unialign.online`).
        targets_from: which per-slot feedback fills ``MethodInputs.targets``: ``labels`` (1 preferred /
            0 not) or ``scores`` (normalized explicit scores, labels when a row has none); ``None``: no targets.
        token_level: whether the loss reads per-token log-probs (a ``losses.policy_gradient.TokenInputs``) instead
            of per-sequence sums (the online RL methods: PPO, GRPO, RLOO).
        needs_old_logps: whether the rollout keeps the sampling policy's per-token log-probs (clipped ratios).
        needs_value_model: whether a value model is built and trained beside the policy (PPO).
        needs_groups: whether the advantages compare the ``num_generations`` samples of one prompt (so at least 2).
        advantages: for online RL methods, the rollout-time estimator ``(RolloutSignals, cfg) -> (tensors,
            metrics)`` that turns rewards (and values, log-probs) into what the loss reads.
        schedule: ``cfg -> (epochs, minibatches)``: optimizer passes over each rollout, and how many
            minibatches each pass splits it into; ``None``: ``(num_iterations, 1)``.
        ranges: config-key ranges that differ for this method (``config.RANGES`` form), e.g. GRPO's ``beta >= 0``.
        defaults: the papers' hyperparameters, applied where the config leaves a field unset.
        config_needs: for a method whose needs depend on config keys, ``cfg -> {field: value}`` giving
            them; :meth:`for_config` applies it. The declared fields hold the needs of the defaults.
        summary: one line for ``unialign methods`` and the docs.
        paper: where the formula comes from.
    """

    name: str
    loss: LossFn
    formats: tuple[str, ...]
    needs_reference: bool
    summary: str
    paper: str
    needs_prompt_logps: bool = False
    needs_shared_first_token: bool = False
    needs_kl_pairs: bool = False
    model_kind: str = "causal_lm"
    online: bool = False
    targets_from: str | None = None
    token_level: bool = False
    needs_old_logps: bool = False
    needs_value_model: bool = False
    needs_groups: bool = False
    advantages: Callable[..., Any] | None = None
    schedule: Callable[[Any], tuple[int, int]] | None = None
    ranges: dict[str, tuple] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    config_needs: Callable[[Any], dict[str, Any]] | None = None

    def passes(self, cfg) -> tuple[int, int]:
        """``(epochs, minibatches)`` of optimizer passes over each batch of rollouts under ``cfg``."""
        return self.schedule(cfg) if self.schedule is not None else (cfg.num_iterations, 1)

    def for_config(self, cfg) -> Method:
        """This method as one config trains it: the needs that depend on config keys, resolved."""
        if self.config_needs is None:
            return self
        return dataclasses.replace(self, **self.config_needs(cfg))


# How to obtain a format another method needs, for the "wrong format" error.
CONVERTER_HINTS: dict[str, str] = {
    "pairwise": "`unialign data convert --to pairwise` (from listwise, UltraFeedback or HelpSteer2 rows)",
    "binary": "`unialign data convert --to binary` (from listwise or pairwise rows)",
    "score": "`unialign data convert --to score` (from listwise or HelpSteer2 rows)",
    "triple": "`unialign data convert --to triple` (from listwise or UltraFeedback rows)",
    "listwise": "`unialign data convert --to listwise` (from UltraFeedback rows) or `unialign data build`",
    "sft": "`unialign data convert --to sft` (from pairwise or listwise rows)",
    "prompt": "any dataset with a `prompt` column",
}

_REGISTRY: dict[str, Method] = {}

# TRL's loss_type spellings that name one of our methods.
ALIASES: dict[str, str] = {"sigmoid": "dpo", "robust": "robust_dpo", "cdpo": "dpo", "slic": "hinge", "rpo": "rpo_nll"}


def register(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """Look a method up by name or TRL alias; unknown names list the known ones."""
    key = ALIASES.get(name, name)
    if key not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown loss_type {name!r}; choose one of: {known}")
    return _REGISTRY[key]


def all_methods() -> list[Method]:
    """Every registered method, sorted by name."""
    return [_REGISTRY[k] for k in sorted(_REGISTRY)]


def check_format(method: Method, data_format: str) -> None:
    """Refuse a dataset format the method cannot use, naming the converter that makes one."""
    if data_format in method.formats:
        return
    wanted = method.formats[0]
    raise ValueError(
        f"method {method.name!r} trains on {' or '.join(method.formats)} data, but the dataset is "
        f"{data_format}; make {wanted} rows with {CONVERTER_HINTS.get(wanted, 'a converter')}"
    )
