"""Online UNA's pure functions against hand-computed values."""

import math
from types import SimpleNamespace

import pytest
import torch

from unialign.losses.base import MethodInputs
from unialign.losses.una_online import (
    RunningMoments,
    apply_missing_eos_penalty,
    explicit_targets,
    ratio_base_logps,
    una_online,
    una_online_losses,
)


def sig(x):
    return 1 / (1 + math.exp(-x))


def test_missing_eos_penalty_hits_only_unfinished_completions():
    rewards = torch.tensor([1.0, 0.5, -2.0])
    ended = torch.tensor([True, False, False])
    assert apply_missing_eos_penalty(rewards, ended, 1.5).tolist() == [1.0, -1.0, -3.5]
    assert apply_missing_eos_penalty(rewards, ended, None) is rewards


def test_none_normalization_is_sigmoid_of_shifted_scaled_reward():
    scores, targets = explicit_targets(torch.tensor([3.0, -1.0]), "none", reward_scale=2.0, reward_shift=1.0)
    # (3 − 1)/2 = 1, (−1 − 1)/2 = −1
    assert targets.tolist() == [1.0, -1.0]
    assert scores.tolist() == pytest.approx([sig(1.0), sig(-1.0)])
    with pytest.raises(ValueError, match="reward_scale must be non-zero"):
        explicit_targets(torch.tensor([1.0]), "none", reward_scale=0.0)


def test_range_normalization_maps_bounds_to_unit_interval_and_clips():
    scores, targets = explicit_targets(torch.tensor([1.0, 5.5, 10.0, 12.0, 0.0]), "range", bounds=(1.0, 10.0))
    assert scores.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0, 0.0])
    assert targets.tolist() == scores.tolist()
    with pytest.raises(ValueError, match="needs reward_range"):
        explicit_targets(torch.tensor([1.0]), "range")
    with pytest.raises(ValueError, match="low < high"):
        explicit_targets(torch.tensor([1.0]), "range", bounds=(2.0, 2.0))


def test_running_moments_match_hand_computed_statistics():
    moments = RunningMoments()
    moments.update(torch.tensor([1.0, 2.0, 3.0]))
    assert (moments.count, moments.mean, moments.std) == (3, 2.0, pytest.approx(1.0))
    moments.update(torch.tensor([7.0]))
    # values 1, 2, 3, 7: mean 3.25, squared deviations 5.0625 + 1.5625 + 0.0625 + 14.0625 = 20.75, /3
    assert moments.mean == pytest.approx(3.25)
    assert moments.std == pytest.approx(math.sqrt(20.75 / 3))
    restored = RunningMoments()
    restored.load_state_dict(moments.state_dict())
    assert restored.state_dict() == moments.state_dict()


def test_running_normalization_whitens_with_the_batch_included():
    moments = RunningMoments()
    scores, targets = explicit_targets(torch.tensor([1.0, 3.0]), "running", moments=moments)
    # mean 2, sample std sqrt(2): whitened ±1/sqrt(2)
    w = 1 / math.sqrt(2)
    assert targets.tolist() == pytest.approx([-w, w], abs=1e-6)
    assert scores.tolist() == pytest.approx([sig(-w), sig(w)], abs=1e-6)
    _, targets = explicit_targets(torch.tensor([5.0]), "running", moments=moments)
    # history 1, 3, 5: mean 3, std 2 → (5 − 3)/2 = 1
    assert targets.tolist() == pytest.approx([1.0], abs=1e-6)
    _, first = explicit_targets(torch.tensor([4.0]), "running", moments=RunningMoments())
    assert first.tolist() == [0.0]  # one value: no spread yet, so the target is the mean itself


def test_unknown_normalization_is_refused():
    with pytest.raises(ValueError, match="reward_normalization must be one of none, running, range"):
        explicit_targets(torch.tensor([1.0]), "zscore")


def test_ratio_base_selects_reference_or_rollout():
    ref, old = torch.tensor([-3.0]), torch.tensor([-2.0])
    assert ratio_base_logps("reference", ref, old) is ref
    assert ratio_base_logps("rollout", ref, old) is old
    with pytest.raises(ValueError, match="needs the log-probs of the policy that sampled"):
        ratio_base_logps("rollout", ref, None)


def test_score_space_losses():
    h = torch.tensor([2.0, -1.0])
    scores = torch.tensor([0.9, 0.2])
    mse = una_online_losses(h, scores, torch.zeros(2), beta=0.5, space="score", kind="mse")
    assert mse.tolist() == pytest.approx([(sig(1.0) - 0.9) ** 2, (sig(-0.5) - 0.2) ** 2])
    bce = una_online_losses(h, scores, torch.zeros(2), beta=0.5, space="score", kind="bce")
    expected = [
        -(0.9 * math.log(sig(1.0)) + 0.1 * math.log(sig(-1.0))),
        -(0.2 * math.log(sig(-0.5)) + 0.8 * math.log(sig(0.5))),
    ]
    assert bce.tolist() == pytest.approx(expected)


def test_reward_space_loss():
    losses = una_online_losses(torch.tensor([2.0, -1.0]), torch.zeros(2), torch.tensor([0.5, 1.0]), beta=0.5,
                               space="reward")
    # (0.5·2 − 0.5)² = 0.25, (0.5·(−1) − 1)² = 2.25
    assert losses.tolist() == pytest.approx([0.25, 2.25])
    with pytest.raises(ValueError, match="una_space must be one of score, reward"):
        una_online_losses(torch.zeros(1), torch.zeros(1), torch.zeros(1), beta=1.0, space="both")


def test_una_online_loss_averages_real_slots_and_logs():
    inputs = MethodInputs(
        policy_logps=torch.tensor([[-1.0, -2.0]]),
        lengths=torch.tensor([[3.0, 4.0]]),
        completion_mask=torch.tensor([[True, True]]),
        ref_logps=torch.tensor([[-3.0, -2.0]]),  # log-ratios 2 and 0
        targets=torch.tensor([[1.0, 0.0]]),
        reward_targets=torch.tensor([[0.0, 1.0]]),
    )
    cfg = SimpleNamespace(beta=0.5, una_space="score", una_loss="mse")
    out = una_online(inputs, cfg)
    assert out.loss.item() == pytest.approx(((sig(1.0) - 1) ** 2 + (0.5 - 0) ** 2) / 2)
    assert out.metrics["rewards/implicit"].item() == pytest.approx(0.5)
    assert out.metrics["targets/mean"].item() == pytest.approx(0.5)
    cfg.una_space = "reward"
    out = una_online(inputs, cfg)
    assert out.loss.item() == pytest.approx(((1.0 - 0.0) ** 2 + (0.0 - 1.0) ** 2) / 2)


def test_rollout_base_gives_half_score_on_the_first_pass():
    # with ratio_base rollout, policy = base on the first pass: h = 0 so the loss is (0.5 − s)²
    logps = torch.tensor([[-4.0, -6.0]])
    inputs = MethodInputs(
        policy_logps=logps, lengths=torch.ones(1, 2), completion_mask=torch.ones(1, 2, dtype=torch.bool),
        ref_logps=ratio_base_logps("rollout", torch.tensor([[-9.0, -9.0]]), logps.clone()),
        targets=torch.tensor([[0.8, 0.1]]), reward_targets=torch.zeros(1, 2),
    )
    out = una_online(inputs, SimpleNamespace(beta=0.1, una_space="score", una_loss="mse"))
    assert out.loss.item() == pytest.approx((0.3**2 + 0.4**2) / 2)
    assert out.metrics["scores/implicit"].item() == pytest.approx(0.5)
