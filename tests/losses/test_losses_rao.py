"""RAO on a synthetic problem whose optimum is known in closed form."""

from __future__ import annotations

import pytest
import torch

from unialign.losses import get_method
from unialign.losses.rao import rao_loss, scale_rewards

from .loss_testing import make_cfg, make_inputs

REWARDS = [[3.0, 1.0, -2.0], [0.5, -0.5, 7.0]]
MASK = [[True, True, True], [True, True, False]]
BETA = 0.1


def rao_inputs(logratios, prompt_delta=0.0, prompt_grad=False):
    """Listwise inputs with ``logp_ref = 0`` so that ``policy_logps`` are the log-ratios."""
    prompt = torch.tensor([prompt_delta - 40.0, prompt_delta - 55.0], dtype=torch.float64,
                          requires_grad=prompt_grad)
    return make_inputs(logratios, [[4] * 3] * 2, ref=[[0.0] * 3] * 2, mask=MASK, rewards=REWARDS,
                       prompt_logps=prompt, ref_prompt_logps=[-40.0, -55.0])


def optimum(z0: float, delta: float = 0.0) -> list[list[float]]:
    return [[r / BETA - z0 - delta for r in row] for row in REWARDS]


def loss_at(logratios, z0, delta=0.0):
    return get_method("rao").loss(rao_inputs(logratios, delta), make_cfg(beta=BETA, z0=z0)).loss


@pytest.mark.parametrize("z0", [-50.0, 0.0, 50.0, 500.0])
def test_loss_vanishes_at_the_closed_form_optimum(z0):
    inputs = rao_inputs(optimum(z0))
    loss = get_method("rao").loss(inputs, make_cfg(beta=BETA, z0=z0)).loss
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert inputs.policy_logps.grad.abs().max().item() < 1e-9


def minimize(z0: float) -> torch.Tensor:
    """The log-ratios that LBFGS finds for the RAO loss from a zero start."""
    logratios = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([logratios], max_iter=200, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-14, tolerance_change=1e-16)

    def closure():
        optimizer.zero_grad()
        inputs = rao_inputs(logratios.tolist())
        inputs.policy_logps = logratios
        loss = get_method("rao").loss(inputs, make_cfg(beta=BETA, z0=z0)).loss
        loss.backward()
        return loss

    optimizer.step(closure)
    return logratios.detach()


def test_gradient_descent_finds_the_optimum_and_z0_only_shifts_it():
    solutions = {z0: minimize(z0) for z0 in (50.0, 80.0)}
    real = torch.tensor(MASK)
    for z0, solution in solutions.items():
        torch.testing.assert_close(solution[real], torch.tensor(optimum(z0), dtype=torch.float64)[real])
    shift = solutions[80.0][real].mean() - solutions[50.0][real].mean()
    assert shift.item() == pytest.approx(-30.0, abs=1e-6)
    for solution in solutions.values():
        assert (solution[0, 0] - solution[0, 2]).item() == pytest.approx((3.0 - -2.0) / BETA, abs=1e-6)
        assert (solution[1, 0] - solution[1, 1]).item() == pytest.approx((0.5 - -0.5) / BETA, abs=1e-6)


def test_prompt_term_shifts_the_target_and_is_detached():
    delta = 2.5
    assert loss_at(optimum(50.0, delta), 50.0, delta).item() == pytest.approx(0.0, abs=1e-12)
    assert loss_at(optimum(50.0), 50.0, delta).item() > 0
    inputs = rao_inputs(optimum(50.0), delta, prompt_grad=True)
    loss = get_method("rao").loss(inputs, make_cfg(beta=BETA, z0=40.0)).loss
    loss.backward()
    assert inputs.prompt_logps.grad is None
    assert inputs.policy_logps.grad.abs().sum() > 0


def test_padding_slots_do_not_enter_the_loss():
    a = optimum(50.0)
    b = [row[:] for row in a]
    b[1][2] = 1234.0
    assert loss_at(a, 50.0).item() == loss_at(b, 50.0).item()


def test_reward_scale_and_shift_convention():
    rewards = torch.tensor([4.0, -2.0])
    torch.testing.assert_close(scale_rewards(rewards, 2.0, 1.0), torch.tensor([1.5, -1.5]))
    with pytest.raises(ValueError):
        scale_rewards(rewards, 0.0, 0.0)
    logratios = torch.tensor([[(4.0 - 1.0) / 2.0 / BETA - 50.0]], dtype=torch.float64)
    loss = rao_loss(logratios, torch.zeros(1, dtype=torch.float64),
                    scale_rewards(torch.tensor([[4.0]], dtype=torch.float64), 2.0, 1.0),
                    torch.ones(1, 1, dtype=torch.bool), BETA, 50.0)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_metrics_pick_best_and_worst_real_slots():
    logratios = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    out = get_method("rao").loss(rao_inputs(logratios), make_cfg(beta=BETA, z0=50.0))
    assert out.metrics["logratios/chosen"].item() == pytest.approx((1.0 + 4.0) / 2)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(BETA * (1.0 + 4.0) / 2)
    assert out.metrics["rewards/rejected"].item() == pytest.approx(BETA * (3.0 + 5.0) / 2)
    assert out.metrics["targets/mean"].item() == pytest.approx((3.0 + 1.0 - 2.0 + 0.5 - 0.5) / 5)


def test_missing_prompt_logps_is_a_clear_error():
    inputs = make_inputs([[-1.0]], [[2]], ref=[[-1.0]], rewards=[[1.0]])
    with pytest.raises(ValueError, match="prompt log-probs"):
        get_method("rao").loss(inputs, make_cfg())
