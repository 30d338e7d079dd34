"""Every loss against its SPEC §3 formula written out in plain math, and the sign of its gradient."""

from __future__ import annotations

import math

import pytest
import torch

from unialign.losses import get_method

from .loss_testing import logsig, make_cfg, make_inputs, mean, sig

POLICY = [[-12.0, -15.0], [-20.5, -18.0], [-7.25, -9.5]]
REF = [[-13.0, -14.0], [-20.0, -19.0], [-8.0, -9.0]]
LENGTHS = [[6, 8], [10, 9], [4, 5]]
EXPLICIT = [[1.0, 0.2], [0.5, 0.4], [2.0, -1.0]]
ROWS = range(len(POLICY))


def ratio(i: int, j: int) -> float:
    return POLICY[i][j] - REF[i][j]


def avg(i: int, j: int) -> float:
    return POLICY[i][j] / LENGTHS[i][j]


def nll_chosen() -> float:
    return -sum(p[0] for p in POLICY) / sum(n[0] for n in LENGTHS)


def run(name: str, inputs, **cfg):
    return get_method(name).loss(inputs, make_cfg(**cfg))


def pairwise(**extra):
    return make_inputs(POLICY, LENGTHS, ref=REF, **extra)


def expected_dpo(beta: float, eps: float = 0.0) -> float:
    def row(i):
        h = beta * (ratio(i, 0) - ratio(i, 1))
        return -(1 - eps) * logsig(h) - eps * logsig(-h)
    return mean(row(i) for i in ROWS)


def expected_log_odds(a: float) -> float:
    p = math.exp(a)
    return math.log(p / (1 - p))


PAIRWISE_CASES = {
    "dpo": ({"beta": 0.1}, lambda: expected_dpo(0.1)),
    "dpo_smoothed": ({"beta": 0.1, "label_smoothing": 0.2}, lambda: expected_dpo(0.1, 0.2)),
    "robust_dpo": ({"beta": 0.1, "label_smoothing": 0.2}, lambda: mean(
        (-0.8 * logsig(0.1 * (ratio(i, 0) - ratio(i, 1))) + 0.2 * logsig(-0.1 * (ratio(i, 0) - ratio(i, 1))))
        / 0.6 for i in ROWS)),
    "ipo": ({"beta": 0.1}, lambda: mean(
        (ratio(i, 0) / LENGTHS[i][0] - ratio(i, 1) / LENGTHS[i][1] - 1 / 0.2) ** 2 for i in ROWS)),
    "hinge": ({"beta": 0.1}, lambda: mean(max(0.0, 1 - 0.1 * (ratio(i, 0) - ratio(i, 1))) for i in ROWS)),
    "cal_dpo": ({"beta": 0.1}, lambda: mean(
        -logsig(ratio(i, 0) - ratio(i, 1)) + 0.5 * ((ratio(i, 0) - 5.0) ** 2 + (ratio(i, 1) + 5.0) ** 2)
        for i in ROWS)),
    "rpo_nll": ({"beta": 0.1, "alpha": 0.7}, lambda: expected_dpo(0.1) + 0.7 * nll_chosen()),
    "distill": ({"beta": 0.1}, lambda: mean(
        (0.1 * (ratio(i, 0) - ratio(i, 1)) - (EXPLICIT[i][0] - EXPLICIT[i][1])) ** 2 for i in ROWS)),
    "una_pair": ({"beta": 0.03}, lambda: expected_dpo(0.03)),
    "simpo": ({"beta": 2.0, "gamma": 0.5}, lambda: mean(
        -logsig(2.0 * (avg(i, 0) - avg(i, 1)) - 0.5) for i in ROWS)),
    "simpo_smoothed": ({"beta": 2.0, "gamma": 0.5, "label_smoothing": 0.1}, lambda: mean(
        -0.9 * logsig(2.0 * (avg(i, 0) - avg(i, 1)) - 0.5) - 0.1 * logsig(-(2.0 * (avg(i, 0) - avg(i, 1)) - 0.5))
        for i in ROWS)),
    "cpo": ({"beta": 0.1, "alpha": 1.0}, lambda: mean(
        -logsig(0.1 * (POLICY[i][0] - POLICY[i][1])) for i in ROWS) + nll_chosen()),
    "orpo": ({"beta": 0.1, "orpo_nll_scope": "completion"}, lambda: nll_chosen() - 0.1 * mean(
        logsig(expected_log_odds(avg(i, 0)) - expected_log_odds(avg(i, 1))) for i in ROWS)),
    "sft": ({}, nll_chosen),
}


@pytest.mark.parametrize("case", sorted(PAIRWISE_CASES))
def test_pairwise_loss_value_and_gradient(case):
    cfg, expected = PAIRWISE_CASES[case]
    name = case.removesuffix("_smoothed")
    inputs = pairwise(rewards=EXPLICIT)
    out = run(name, inputs, **cfg)
    assert out.loss.item() == pytest.approx(expected(), abs=1e-6)
    out.loss.backward()
    grad = inputs.policy_logps.grad
    assert (grad[:, 0] < 0).all(), "raising the chosen log-prob must lower the loss"
    if name != "sft":
        assert (grad[:, 1] > 0).all(), "raising the rejected log-prob must raise the loss"


def test_pairwise_metrics_are_logged():
    out = run("dpo", pairwise(), beta=0.1)
    chosen = mean(0.1 * ratio(i, 0) for i in ROWS)
    rejected = mean(0.1 * ratio(i, 1) for i in ROWS)
    assert out.metrics["rewards/chosen"].item() == pytest.approx(chosen)
    assert out.metrics["rewards/margins"].item() == pytest.approx(chosen - rejected)
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)
    assert out.metrics["logps/rejected"].item() == pytest.approx(mean(p[1] for p in POLICY))
    assert all(not v.requires_grad for v in out.metrics.values())


def test_una_pair_equals_dpo():
    a, b = run("una_pair", pairwise(), beta=0.03), run("dpo", pairwise(), beta=0.03)
    assert a.loss.item() == pytest.approx(b.loss.item(), abs=1e-12)


# --- TPO: slot 0 gold reference, 1 chosen, 2 rejected -------------------------------------------

TRIPLE = [[-10.0, -14.0, -13.0], [-6.0, -9.0, -12.5]]
TRIPLE_LENGTHS = [[5, 7, 6], [3, 4, 8]]


def tpo_expected(beta, alpha, eps, gamma, normalize):
    def value(i, j):
        return TRIPLE[i][j] / TRIPLE_LENGTHS[i][j] if normalize else TRIPLE[i][j]

    def row(i):
        z = beta * (value(i, 1) - value(i, 2)) - gamma
        return -(1 - eps) * logsig(z) - eps * logsig(-z)
    nll = -sum(r[0] for r in TRIPLE) / sum(n[0] for n in TRIPLE_LENGTHS)
    return mean(row(i) for i in range(2)) + alpha * nll


@pytest.mark.parametrize("name,cfg,normalize", [
    ("tpo", {"beta": 0.01, "alpha": 1.0}, False),
    ("tpo", {"beta": 0.2, "alpha": 0.9, "label_smoothing": 0.1}, False),
    ("tpo_l", {"beta": 2.0, "alpha": 1.0, "gamma": 0.5}, True),
])
def test_tpo_value_and_gradient(name, cfg, normalize):
    inputs = make_inputs(TRIPLE, TRIPLE_LENGTHS)
    out = run(name, inputs, **cfg)
    full = make_cfg(**cfg)
    gamma = full.gamma if name == "tpo_l" else 0.0
    expected = tpo_expected(full.beta, full.alpha, full.label_smoothing, gamma, normalize)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    out.loss.backward()
    grad = inputs.policy_logps.grad
    assert (grad[:, 0] < 0).all() and (grad[:, 1] < 0).all() and (grad[:, 2] > 0).all()
    assert out.metrics["rewards/chosen"].item() == pytest.approx(
        mean(full.beta * (TRIPLE[i][1] / (TRIPLE_LENGTHS[i][1] if normalize else 1)) for i in range(2)))
    assert "nll_loss" in out.metrics


def test_tpo_without_nll_does_not_need_the_reference_slot():
    inputs = make_inputs(TRIPLE, TRIPLE_LENGTHS, mask=[[False, True, True]] * 2)
    out = run("tpo", inputs, beta=0.01, alpha=0.0)
    assert out.loss.item() == pytest.approx(tpo_expected(0.01, 0.0, 0.0, 0.0, False), abs=1e-6)


# --- KTO -----------------------------------------------------------------------------------------

BINARY = [[-10.0], [-12.0], [-8.0], [-15.0]]
BINARY_REF = [[-11.0], [-11.5], [-8.5], [-14.0]]
LABELS = [[1.0], [0.0], [1.0], [0.0]]
KL = [-9.0, -13.0, -10.0, -11.0]
KL_REF = [-9.5, -13.2, -10.1, -11.4]


def kto_expected(beta, wd, wu, kl):
    losses = []
    for (p,), (r,), (label,) in zip(BINARY, BINARY_REF, LABELS):
        h = p - r
        losses.append(wd * (1 - sig(beta * (h - kl))) if label else wu * (1 - sig(beta * (kl - h))))
    return mean(losses)


@pytest.mark.parametrize("wd,wu", [(1.0, 1.0), (1.33, 0.5)])
def test_kto_value_and_gradient(wd, wu):
    inputs = make_inputs(BINARY, [[5]] * 4, ref=BINARY_REF, targets=LABELS, kl_logps=KL, ref_kl_logps=KL_REF)
    out = run("kto", inputs, beta=0.1, desirable_weight=wd, undesirable_weight=wu)
    kl = max(0.0, mean(a - b for a, b in zip(KL, KL_REF)))
    assert out.metrics["kl"].item() == pytest.approx(kl)
    assert out.loss.item() == pytest.approx(kto_expected(0.1, wd, wu, kl), abs=1e-6)
    out.loss.backward()
    grad = inputs.policy_logps.grad[:, 0]
    assert (grad[[0, 2]] < 0).all() and (grad[[1, 3]] > 0).all()


def test_kto_kl_is_clamped_at_zero_and_detached():
    kl_logps = torch.tensor([-9.0, -13.0], dtype=torch.float64, requires_grad=True)
    inputs = make_inputs([[-1.0], [-2.0]], [[2], [2]], ref=[[-1.0], [-2.0]], targets=[[1.0], [0.0]],
                         kl_logps=kl_logps, ref_kl_logps=[-8.0, -12.0])
    out = run("kto", inputs, beta=0.1)
    assert out.metrics["kl"].item() == 0.0
    assert out.loss.item() == pytest.approx(0.5, abs=1e-12)
    out.loss.backward()
    assert kl_logps.grad is None


def test_kto_on_pairwise_rows_treats_chosen_as_desirable():
    paired = make_inputs([[-10.0, -12.0]], [[5, 5]], ref=[[-11.0, -11.5]], kl_logps=[-9.0], ref_kl_logps=[-9.5])
    unpaired = make_inputs([[-10.0], [-12.0]], [[5], [5]], ref=[[-11.0], [-11.5]], targets=[[1.0], [0.0]],
                           kl_logps=[-9.0], ref_kl_logps=[-9.5])
    assert run("kto", paired).loss.item() == pytest.approx(run("kto", unpaired).loss.item(), abs=1e-12)


# --- UNA point-wise ------------------------------------------------------------------------------

def una_expected(policy, ref, targets, mask, beta, kind):
    losses = []
    for i, row in enumerate(policy):
        for j, p in enumerate(row):
            if not mask[i][j]:
                continue
            r, tgt = beta * (p - ref[i][j]), targets[i][j]
            losses.append((sig(r) - tgt) ** 2 if kind == "mse" else -(tgt * logsig(r) + (1 - tgt) * logsig(-r)))
    return mean(losses)


LIST_POLICY = [[-10.0, -30.0, -12.0], [-8.0, -9.0, -50.0]]
LIST_REF = [[-12.0, -20.0, -11.0], [-9.0, -8.5, -1.0]]
LIST_MASK = [[True, True, True], [True, True, False]]
SOFT = [[0.9, 0.1, 0.4], [0.7, 0.3, 0.0]]


@pytest.mark.parametrize("name,kind,policy,ref,targets,mask", [
    ("una_binary", "mse", BINARY, BINARY_REF, LABELS, [[True]] * 4),
    ("una_binary", "bce", BINARY, BINARY_REF, LABELS, [[True]] * 4),
    ("una_binary", "mse", POLICY, REF, [[1.0, 0.0]] * 3, [[True, True]] * 3),
    ("una_score", "mse", LIST_POLICY, LIST_REF, SOFT, LIST_MASK),
    ("una_score", "bce", LIST_POLICY, LIST_REF, SOFT, LIST_MASK),
])
def test_una_pointwise_value_and_gradient(name, kind, policy, ref, targets, mask):
    lengths = [[5] * len(policy[0])] * len(policy)
    inputs = make_inputs(policy, lengths, ref=ref, mask=mask, targets=targets)
    beta = 0.5
    out = run(name, inputs, beta=beta, una_loss=kind)
    assert out.loss.item() == pytest.approx(una_expected(policy, ref, targets, mask, beta, kind), abs=1e-6)
    out.loss.backward()
    grad = inputs.policy_logps.grad
    for i, row in enumerate(policy):
        for j, p in enumerate(row):
            if not mask[i][j]:
                assert grad[i, j] == 0
                continue
            direction = sig(beta * (p - ref[i][j])) - targets[i][j]
            assert math.copysign(1, grad[i, j].item()) == math.copysign(1, direction)


def test_una_pointwise_logs_pair_metrics_for_pairs():
    inputs = make_inputs(POLICY, LENGTHS, ref=REF, targets=[[1.0, 0.0]] * 3)
    metrics = run("una_binary", inputs, beta=0.1).metrics
    assert metrics["rewards/chosen"].item() == pytest.approx(mean(0.1 * ratio(i, 0) for i in ROWS))
    assert metrics["targets/mean"].item() == pytest.approx(0.5)


def test_una_reward_value_and_gradient():
    rewards = [[1.0, -3.0, 0.5], [2.0, 0.0, 99.0]]
    inputs = make_inputs(LIST_POLICY, [[5] * 3] * 2, ref=LIST_REF, mask=LIST_MASK, rewards=rewards)
    out = run("una_reward", inputs, beta=0.5, reward_scale=2.0, reward_shift=1.0)
    errors = [
        0.5 * (LIST_POLICY[i][j] - LIST_REF[i][j]) - (rewards[i][j] - 1.0) / 2.0
        for i in range(2) for j in range(3) if LIST_MASK[i][j]
    ]
    assert out.loss.item() == pytest.approx(mean(e ** 2 for e in errors), abs=1e-6)
    out.loss.backward()
    real = torch.tensor(LIST_MASK)
    assert torch.equal(torch.sign(inputs.policy_logps.grad[real]), torch.sign(torch.tensor(errors)).double())


# --- RAO -----------------------------------------------------------------------------------------

def test_rao_value_and_gradient():
    rewards = [[1.0, -3.0, 0.5], [2.0, 0.0, 99.0]]
    prompt, ref_prompt = [-20.0, -31.0], [-20.5, -30.0]
    inputs = make_inputs(LIST_POLICY, [[5] * 3] * 2, ref=LIST_REF, mask=LIST_MASK, rewards=rewards,
                         prompt_logps=prompt, ref_prompt_logps=ref_prompt)
    beta, z0 = 0.1, 12.0
    out = run("rao", inputs, beta=beta, z0=z0)
    per_prompt, errors = [], []
    for i in range(2):
        delta = prompt[i] - ref_prompt[i]
        row = [beta * (LIST_POLICY[i][j] - LIST_REF[i][j] + z0 + delta) - rewards[i][j]
               for j in range(3) if LIST_MASK[i][j]]
        errors += row
        per_prompt.append(mean(e ** 2 for e in row))
    assert out.loss.item() == pytest.approx(mean(per_prompt), abs=1e-6)
    out.loss.backward()
    real = torch.tensor(LIST_MASK)
    assert torch.equal(torch.sign(inputs.policy_logps.grad[real]), torch.sign(torch.tensor(errors)).double())
    assert (inputs.policy_logps.grad[~real] == 0).all()


# --- reward model --------------------------------------------------------------------------------

@pytest.mark.parametrize("margin,center", [(0.0, None), (0.5, 0.01)])
def test_reward_model_value_and_gradient(margin, center):
    scores = [[1.5, 0.5], [-0.2, 0.3], [2.0, -1.0]]
    rm = torch.tensor(scores, dtype=torch.float64, requires_grad=True)
    inputs = make_inputs(POLICY, LENGTHS, rm_rewards=rm)
    out = run("reward_model", inputs, rm_margin=margin, center_rewards_coefficient=center)
    expected = mean(-logsig(w - lose - margin) for w, lose in scores)
    if center is not None:
        expected += center * mean((w + lose) ** 2 for w, lose in scores)
    assert out.loss.item() == pytest.approx(expected, abs=1e-6)
    (grad,) = torch.autograd.grad(out.loss, rm)
    assert (grad[:, 0] < 0).all() and (grad[:, 1] > 0).all()
    assert out.metrics["rewards/accuracies"].item() == pytest.approx(2 / 3)


# Two rows: chosen/rejected completion log-probs and lengths, and each prompt's log-prob after its
# first token over its length − 1 tokens.
ORPO_POLICY, ORPO_LENGTHS = [[-2.0, -3.0], [-4.0, -6.0]], [[2, 3], [4, 3]]
ORPO_PROMPT, ORPO_PROMPT_LENGTHS = [-3.0, -5.0], [3.0, 1.0]


def orpo_inputs(with_prompt: bool = True):
    extra = {"prompt_logps": torch.tensor(ORPO_PROMPT, dtype=torch.float64, requires_grad=True),
             "prompt_lengths": torch.tensor(ORPO_PROMPT_LENGTHS, dtype=torch.float64)} if with_prompt else {}
    return make_inputs(ORPO_POLICY, ORPO_LENGTHS, **extra)


def orpo_odds_term() -> float:
    # avg_w = (−1, −1), avg_l = (−1, −2): row 1 has log odds ratio 0, so its term is β·ln 2.
    second = expected_log_odds(-1.0) - expected_log_odds(-2.0)
    return -0.1 * mean([logsig(0.0), logsig(second)])


@pytest.mark.parametrize("scope,nll", [
    # (2 + 4 + 3 + 5) / (2 + 4 + 3 + 1): every chosen and prompt token after the first weighs the same
    ("prompt_and_completion", 14 / 10),
    ("completion", 6 / 6),  # (2 + 4) / (2 + 4)
])
def test_orpo_nll_scope_by_hand(scope, nll):
    inputs = orpo_inputs()
    out = run("orpo", inputs, beta=0.1, orpo_nll_scope=scope)
    assert out.metrics["nll_loss"].item() == pytest.approx(nll, abs=1e-12)
    assert out.loss.item() == pytest.approx(nll + orpo_odds_term(), abs=1e-12)
    out.loss.backward()
    prompt_grad = inputs.prompt_logps.grad
    if scope == "completion":
        assert prompt_grad is None  # the prompt does not enter this loss
    else:
        assert torch.equal(prompt_grad, torch.full((2,), -1 / 10, dtype=torch.float64))


def test_orpo_default_scope_covers_the_prompt_and_needs_its_logps():
    assert run("orpo", orpo_inputs(), beta=0.1).metrics["nll_loss"].item() == pytest.approx(1.4)
    with pytest.raises(ValueError, match="needs prompt log-probs"):
        run("orpo", orpo_inputs(with_prompt=False), beta=0.1)
    with pytest.raises(ValueError, match="orpo_nll_scope must be one of prompt_and_completion, completion"):
        run("orpo", orpo_inputs(), beta=0.1, orpo_nll_scope="prompt")


def test_orpo_log_odds_is_stable_near_zero():
    inputs = make_inputs([[-1e-9, -30.0]], [[10, 10]])
    out = run("orpo", inputs, beta=0.1, orpo_nll_scope="completion")
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(inputs.policy_logps.grad).all()
