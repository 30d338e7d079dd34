"""GRPO's and RLOO's losses and advantages against TRL 1.16's on identical fabricated inputs (to 1e-6).

As in test_losses_vs_trl.py, TRL's ``_compute_loss`` runs unbound on a ``SimpleNamespace`` exposing only the
attributes it reads; its per-token log-prob function is replaced by one returning fixed values.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from unialign.losses import get_method
from unialign.losses.grpo import group_advantages, leave_one_out_advantages
from unialign.losses.policy_gradient import RolloutSignals, TokenInputs

trl = pytest.importorskip("trl")
from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.rloo_trainer import RLOOTrainer  # noqa: E402

GEN = torch.Generator().manual_seed(0)
B, K, T = 3, 4, 7
N = B * K


def fabricated():
    """Log-probs of policy, sampling policy and reference, a ragged mask and per-completion advantages."""
    old = -4 * torch.rand(N, T, generator=GEN, dtype=torch.float64) - 0.1
    # ratios from ~0.6 to ~1.5 so that both clipping sides are hit
    logps = old + 0.9 * (torch.rand(N, T, generator=GEN, dtype=torch.float64) - 0.5)
    ref = old + 0.3 * torch.randn(N, T, generator=GEN, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (N,), generator=GEN)
    mask = torch.arange(T)[None, :] < lengths[:, None]
    advantages = torch.randn(N, generator=GEN, dtype=torch.float64)
    return logps, old, ref, mask, advantages


def accelerator():
    return SimpleNamespace(device="cpu", num_processes=1, gather=lambda x: x, gather_for_metrics=lambda x: x,
                           reduce=lambda x, reduction="sum": x)


def trl_inputs(mask, advantages, old, ref):
    return {"prompt_ids": torch.ones(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
            "completion_ids": torch.ones(N, T, dtype=torch.long), "completion_mask": mask.long(),
            "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
            "num_items_in_batch": mask.sum()}


def trl_grpo_loss(loss_type, beta, logps, old, ref, mask, advantages, epsilon=0.2, epsilon_high=None):
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator(), aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level="token", beta=beta, loss_type=loss_type, epsilon_low=epsilon,
        epsilon_high=epsilon_high if epsilon_high is not None else epsilon, use_vllm=False,
        vllm_importance_sampling_correction=False, current_gradient_accumulation_steps=1, max_completion_length=T,
        _entropy_bonus_enabled=False,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    loss = GRPOTrainer._compute_loss(stub, None, trl_inputs(mask.float(), advantages, old, ref))
    return loss, stub._metrics["train"]


def cfg(**kw):
    base = dict(beta=0.0, epsilon=0.2, epsilon_high=None, grpo_loss_type="dapo", max_completion_length=T,
                scale_rewards="group", normalize_advantages=False)
    return SimpleNamespace(**(base | kw))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_grpo_loss_equals_trl(loss_type, beta):
    logps, old, ref, mask, advantages = fabricated()
    theirs, their_metrics = trl_grpo_loss(loss_type, beta, logps, old, ref, mask, advantages, epsilon_high=0.28)
    inputs = TokenInputs(logps=logps, mask=mask, old_logps=old, advantages=advantages,
                         ref_logps=ref if beta else None)
    ours = get_method("grpo").loss(inputs, cfg(beta=beta, grpo_loss_type=loss_type, epsilon_high=0.28))
    assert ours.loss.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert abs(theirs.item()) > 1e-3  # a non-trivial value was compared
    assert ours.metrics["clip_ratio/region_mean"].item() == pytest.approx(their_metrics["clip_ratio/region_mean"][0],
                                                                          abs=1e-6)
    assert their_metrics["clip_ratio/low_mean"][0] > 0 and their_metrics["clip_ratio/high_mean"][0] > 0
    if beta:
        assert ours.metrics["kl"].item() == pytest.approx(their_metrics["kl"][0], abs=1e-6)


def test_grpo_loss_gradient_equals_trl():
    logps, old, ref, mask, advantages = fabricated()
    mine, theirs = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    trl_grpo_loss("grpo", 0.04, theirs, old, ref, mask, advantages)[0].backward()
    inputs = TokenInputs(logps=mine, mask=mask, old_logps=old, advantages=advantages, ref_logps=ref)
    get_method("grpo").loss(inputs, cfg(beta=0.04, grpo_loss_type="grpo")).loss.backward()
    assert torch.allclose(mine.grad, theirs.grad, atol=1e-9)


def trl_group_advantages(rewards, scale_rewards):
    """The advantage lines of TRL 1.16's ``GRPOTrainer._generate_and_score_completions`` (one reward function)."""
    from trl.trainer.utils import nanstd

    flat = rewards.reshape(-1)
    mean = flat.view(-1, K).mean(dim=1).repeat_interleave(K)
    if scale_rewards == "batch":
        std = nanstd(flat).expand_as(flat)
    else:
        std = nanstd(flat.view(-1, K), dim=1).repeat_interleave(K)
    advantages = flat - mean
    return advantages / (std + 1e-4) if scale_rewards != "none" else advantages


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_equal_trl(scale):
    rewards = torch.rand(B, K, generator=GEN, dtype=torch.float64)
    ours = group_advantages(rewards, scale).reshape(-1)
    assert torch.allclose(ours, trl_group_advantages(rewards, scale), atol=1e-9)


def trl_rloo_loss(logps, old_seq, mask, advantages, epsilon=0.2):
    stub = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator(), aux_loss_enabled=False,
        _metrics=defaultdict(lambda: defaultdict(list)), epsilon_low=epsilon, epsilon_high=epsilon,
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
    )
    inputs = {"prompt_ids": torch.ones(N, 2, dtype=torch.long), "prompt_mask": torch.ones(N, 2, dtype=torch.long),
              "completion_ids": torch.ones(N, T, dtype=torch.long), "completion_mask": mask.double(),
              "advantages": advantages, "old_logps": old_seq}
    return RLOOTrainer._compute_loss(stub, None, inputs), stub._metrics["train"]


def test_rloo_loss_equals_trl():
    _, old, _, mask, _ = fabricated()
    # sequence-level log-ratios from -0.5 to 0.5 (ratios 0.61 to 1.65) spread over each completion's tokens
    shift = torch.linspace(-0.5, 0.5, N, dtype=torch.float64)[:, None] / mask.sum(-1, keepdim=True)
    logps = old + shift * mask
    advantages = torch.randn(N, generator=GEN, dtype=torch.float64)
    old_seq = (old * mask).sum(-1)
    theirs, metrics = trl_rloo_loss(logps, old_seq, mask, advantages)
    inputs = TokenInputs(logps=logps, mask=mask, old_logps=old, advantages=advantages)
    ours = get_method("rloo").loss(inputs, cfg())
    assert ours.loss.item() == pytest.approx(theirs.item(), abs=1e-6)
    assert ours.metrics["clip_ratio/region_mean"].item() == pytest.approx(metrics["clip_ratio/region_mean"][0])
    assert 0 < metrics["clip_ratio/region_mean"][0] < 1


def trl_rloo_advantages(rewards, old, ref, mask, beta, normalize):
    """The advantage lines of TRL 1.16's ``RLOOTrainer._generate_and_score_completions`` (one reward function)."""
    from trl.trainer.utils import nanstd

    flat = rewards.reshape(-1).clone()
    if beta:
        flat = flat - beta * ((old - ref) * mask).sum(-1)
    grouped = flat.view(-1, K)
    baselines = ((grouped.sum(dim=1, keepdim=True) - grouped) / (K - 1)).view(-1)
    advantages = flat - baselines
    if normalize:
        advantages = (advantages - advantages.mean()) / (nanstd(advantages) + 1e-4)
    return advantages


@pytest.mark.parametrize("beta,normalize", [(0.0, False), (0.05, False), (0.05, True)])
def test_rloo_advantages_equal_trl(beta, normalize):
    _, old, ref, mask, _ = fabricated()
    rewards = torch.rand(B, K, generator=GEN, dtype=torch.float64)
    signals = RolloutSignals(rewards=rewards, mask=mask, old_logps=old, ref_logps=ref)
    tensors, _ = get_method("rloo").advantages(signals, cfg(beta=beta, normalize_advantages=normalize))
    expected = trl_rloo_advantages(rewards, old, ref, mask.double(), beta, normalize)
    assert torch.allclose(tensors["advantages"].double(), expected, atol=1e-6)
    if not beta and not normalize:
        assert torch.allclose(tensors["advantages"].double(), leave_one_out_advantages(rewards).reshape(-1))
