"""GAE, returns, clipped losses, GRPO's group advantages and loss normalizations, RLOO's baseline: hand-computed."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from unialign.losses import get_method
from unialign.losses.grpo import group_advantages, leave_one_out_advantages
from unialign.losses.policy_gradient import (
    RolloutSignals,
    aggregate,
    clipped_surrogate,
    k3_kl,
    masked_whiten,
)
from unialign.losses.ppo import clipped_value_loss, gae, kl_penalized_rewards, ppo_policy_loss


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_gae_and_returns_by_hand():
    # row 0: three tokens; row 1: two tokens then padding (its value 9 must not leak in)
    rewards = t([[0.0, 0.0, 1.0], [0.0, 2.0, 5.0]])
    values = t([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: δ2 = 1 − 0.7 = 0.3; δ1 = 0.9·0.7 − 0.6 = 0.03, A1 = 0.03 + 0.72·0.3 = 0.246;
    #        δ0 = 0.9·0.6 − 0.5 = 0.04, A0 = 0.04 + 0.72·0.246 = 0.21712
    # row 1: δ1 = 2 − 0.5 = 1.5; δ0 = 0.9·0.5 − 1 = −0.55, A0 = −0.55 + 0.72·1.5 = 0.53
    assert torch.allclose(advantages, t([[0.21712, 0.246, 0.3], [0.53, 1.5, 0.0]]))
    assert torch.allclose(returns, t([[0.71712, 0.846, 1.0], [1.53, 2.0, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards, values = t([[1.0, 2.0, 3.0]]), t([[0.5, 0.25, 0.0]])
    advantages, returns = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), 1.0, 1.0)
    assert torch.allclose(returns, t([[6.0, 5.0, 3.0]]))
    assert torch.allclose(advantages, t([[5.5, 4.75, 3.0]]))


def test_kl_penalized_rewards_put_the_score_on_the_last_token():
    rewards = kl_penalized_rewards(t([1.0, 2.0]), t([[-1.0, -2.0], [-1.0, 0.0]]), t([[-1.5, -1.0], [-1.0, 0.0]]),
                                   torch.tensor([[True, True], [True, False]]), kl_coef=0.1)
    # −0.1·(logp − ref) per token: row 0 [−0.05, 0.1] + score 1 on token 1; row 1 [0] + score 2 on token 0
    assert torch.allclose(rewards, t([[-0.05, 1.1], [2.0, 0.0]]))


def test_clipped_value_loss_by_hand():
    loss, clipfrac = clipped_value_loss(t([1.0, 2.0]), t([0.5, 0.5]), t([0.0, 3.0]), torch.ones(2, dtype=torch.bool),
                                        cliprange_value=0.2)
    # clipped V = [0.7, 0.7]: squared errors plain [1, 1], clipped [0.49, 5.29]; max [1, 5.29]
    assert loss.item() == pytest.approx(0.5 * (1 + 5.29) / 2)
    assert clipfrac.item() == 0.5


def test_ppo_policy_loss_by_hand():
    logps, old = t([math.log(1.5), math.log(0.5)]), t([0.0, 0.0])
    loss, clipfrac, approxkl = ppo_policy_loss(logps, old, t([1.0, -1.0]), torch.ones(2, dtype=torch.bool), 0.2)
    # ratio 1.5 with A=1: max(−1.5, −1.2) = −1.2; ratio 0.5 with A=−1: max(0.5, 0.8) = 0.8
    assert loss.item() == pytest.approx(-0.2)
    assert clipfrac.item() == 1.0
    assert approxkl.item() == pytest.approx(0.5 * (math.log(1.5) ** 2 + math.log(0.5) ** 2) / 2)


def test_clipped_surrogate_is_asymmetric_with_epsilon_high():
    loss, ratio = clipped_surrogate(t([math.log(1.5), math.log(1.5)]), t([0.0, 0.0]), t([1.0, -1.0]), 0.2, 0.28)
    # A>0: min(1.5, 1.28)·1 = 1.28 → −1.28; A<0: min(−1.5, −1.28) = −1.5 → 1.5 (no clipping helps the loss)
    assert torch.allclose(loss, t([-1.28, 1.5]))
    assert torch.allclose(ratio, t([1.5, 1.5]))


def test_k3_kl_by_hand():
    value = k3_kl(t([0.0]), t([math.log(0.5)])).item()
    assert value == pytest.approx(0.5 + math.log(2) - 1)
    assert k3_kl(t([-2.0]), t([-2.0])).item() == 0.0


def test_group_advantages_by_hand():
    rewards = t([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(group_advantages(rewards, "group"), t([[-1, 0, 1], [0, 0, 0]]) / (1 + 1e-4))
    assert torch.allclose(group_advantages(rewards, "none"), t([[-1, 0, 1], [0, 0, 0]]))
    # batch std of [1, 2, 3, 0, 0, 0]: mean 1, squared deviations sum 8, unbiased variance 8/5
    assert torch.allclose(group_advantages(rewards, "batch"), t([[-1, 0, 1], [0, 0, 0]]) / (math.sqrt(1.6) + 1e-4))


def test_rloo_baseline_is_the_mean_of_the_others():
    advantages = leave_one_out_advantages(t([[1.0, 2.0, 3.0], [4.0, 4.0, 1.0]]))
    # baselines (2+3)/2, (1+3)/2, (1+2)/2 and (4+1)/2, (4+1)/2, (4+4)/2
    assert torch.allclose(advantages, t([[-1.5, 0.0, 1.5], [1.5, 1.5, -3.0]]))
    with pytest.raises(ValueError, match="num_generations >= 2"):
        leave_one_out_advantages(t([[1.0]]))


@pytest.mark.parametrize("loss_type,expected", [("grpo", 3.0), ("bnpo", 2.5), ("dr_grpo", 1.0), ("dapo", 1.25)])
def test_each_loss_normalization_by_hand(loss_type, expected):
    per_token = t([[1.0, 2.0, 3.0], [4.0, 7.0, 7.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    # grpo: (6/3 + 4/1)/2; bnpo: 10/4; dr_grpo: 10/(2·5); dapo: 10/num_items (8)
    assert aggregate(per_token, mask, loss_type, max_completion_length=5, num_items=8).item() == expected


def test_masked_whiten_ignores_padding():
    values, mask = t([[1.0, 3.0, 100.0]]), torch.tensor([[True, True, False]])
    whitened = masked_whiten(values, mask)
    # mean 2, unbiased variance 2: (±1)/sqrt(2)
    assert torch.allclose(whitened, t([[-1 / math.sqrt(2), 1 / math.sqrt(2), 0.0]]), atol=1e-7)
    assert torch.allclose(masked_whiten(values, mask, shift_mean=False), t([[2 - 0.70710678, 2 + 0.70710678, 0.0]]))


def test_ppo_rollout_gives_whitened_advantages_and_returns():
    cfg = SimpleNamespace(kl_coef=0.0, whiten_rewards=False, gamma=1.0, lam=1.0, whiten_advantages=False)
    mask = torch.ones(2, 2, dtype=torch.bool)
    signals = RolloutSignals(rewards=t([[1.0, 3.0]]), mask=mask, old_logps=torch.zeros(2, 2, dtype=torch.float64),
                             values=t([[0.5, 0.0], [1.0, 1.0]]))
    tensors, _ = get_method("ppo").advantages(signals, cfg)
    assert torch.allclose(tensors["returns"], t([[1.0, 1.0], [3.0, 3.0]]))
    assert torch.allclose(tensors["advantages"], t([[0.5, 1.0], [2.0, 2.0]]))
    cfg.whiten_advantages = True
    whitened, _ = get_method("ppo").advantages(signals, cfg)
    assert whitened["advantages"].mean().item() == pytest.approx(0.0, abs=1e-7)
    assert torch.allclose(whitened["returns"], tensors["returns"])  # returns are taken before whitening


def test_online_rl_registrations_declare_their_needs():
    grpo, rloo, ppo = get_method("grpo"), get_method("rloo"), get_method("ppo")
    assert all(m.online and m.token_level and m.needs_old_logps for m in (grpo, rloo, ppo))
    assert grpo.needs_groups and rloo.needs_groups and not ppo.needs_groups
    assert ppo.needs_value_model and not grpo.needs_value_model and not rloo.needs_value_model
    assert grpo.for_config(SimpleNamespace(beta=0.0)).needs_reference is False
    assert rloo.for_config(SimpleNamespace(beta=0.05)).needs_reference is True
    assert ppo.for_config(SimpleNamespace(kl_coef=0.0)).needs_reference is False
    assert ppo.passes(SimpleNamespace(num_ppo_epochs=4, num_mini_batches=2, num_iterations=1)) == (4, 2)
    assert grpo.passes(SimpleNamespace(num_iterations=3)) == (3, 1)
    assert get_method("una_online").passes(SimpleNamespace(num_iterations=2)) == (2, 1)


def test_grpo_accepts_beta_zero_and_dpo_does_not():
    from unialign.config import ConfigError, UnialignConfig

    assert UnialignConfig(loss_type="grpo", beta=0.0, output_dir="/tmp/unused").beta == 0.0
    with pytest.raises(ConfigError, match="config key 'beta' must be > 0.0; got 0.0"):
        UnialignConfig(loss_type="dpo", beta=0.0, output_dir="/tmp/unused")
