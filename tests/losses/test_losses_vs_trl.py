"""Our losses against TRL's on identical log-probs.

TRL computes most losses inside its trainers' ``_compute_loss``; these tests call those methods
unbound on a minimal stand-in (``SimpleNamespace``) that exposes only the attributes they read,
with a fake model returning fixed per-token log-probs (or logits, for TPO).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from unialign.losses import get_method
from unialign.losses.base import MethodInputs

from .loss_testing import make_cfg

trl = pytest.importorskip("trl")

GEN = torch.Generator().manual_seed(0)
B = 4


def rand(*shape, low=-30.0, high=-2.0):
    return low + (high - low) * torch.rand(*shape, generator=GEN, dtype=torch.float64)


def lengths_for(n):
    return torch.randint(2, 9, (n,), generator=GEN)


def accelerator():
    return SimpleNamespace(device="cpu", gather=lambda x: x, gather_for_metrics=lambda x: x)


def trainer_stub(**attrs):
    base = dict(model=SimpleNamespace(training=True), accelerator=accelerator(), aux_loss_enabled=False,
                _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    return SimpleNamespace(**(base | attrs))


def per_token(logps, lengths):
    """Input ids, completion mask and per-token log-probs (spread evenly) summing to ``logps``."""
    n, width = logps.shape[0], int(lengths.max()) + 1
    mask = torch.zeros(n, width, dtype=torch.long)
    token_logps = torch.zeros(n, width - 1, dtype=torch.float64)
    for i, length in enumerate(lengths.tolist()):
        mask[i, 1:1 + length] = 1
        token_logps[i, :length] = logps[i] / length
    return torch.ones(n, width, dtype=torch.long), mask, token_logps


def fused_output(token_logps):
    zeros = torch.zeros_like(token_logps)
    return SimpleNamespace(log_probs=token_logps, entropy=zeros, mean_logits=zeros,
                           is_top1=torch.zeros_like(token_logps, dtype=torch.bool))


def pairwise_data():
    policy, ref = rand(B, 2), rand(B, 2)
    policy[:, 0] = ref[:, 0] + torch.linspace(-3, 3, B, dtype=torch.float64)
    lengths = torch.stack([lengths_for(B), lengths_for(B)], dim=1)
    return policy, ref, lengths


def ours(name, policy, lengths, **kw):
    cfg = make_cfg(**{k: v for k, v in kw.items() if k in make_cfg().__dict__})
    inputs = MethodInputs(policy_logps=policy, lengths=lengths,
                          completion_mask=torch.ones_like(lengths, dtype=torch.bool),
                          **{k: v for k, v in kw.items() if k not in make_cfg().__dict__})
    return get_method(name).loss(inputs, cfg)


def trl_dpo(loss_type, policy, ref, lengths, beta, label_smoothing=0.0):
    """``DPOTrainer._compute_loss`` with precomputed reference log-probs (batch is [chosen; rejected])."""
    flat_logps = torch.cat([policy[:, 0], policy[:, 1]])
    flat_lengths = torch.cat([lengths[:, 0], lengths[:, 1]])
    input_ids, mask, token_logps = per_token(flat_logps, flat_lengths)
    stub = trainer_stub(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
                        use_weighting=False)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": mask,
              "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    return trl.DPOTrainer._compute_loss(stub, lambda **kw: fused_output(token_logps), inputs, False)


@pytest.mark.parametrize("ours_name,trl_type,beta,eps", [
    ("dpo", "sigmoid", 0.1, 0.0),
    ("dpo", "sigmoid", 0.5, 0.0),
    ("robust_dpo", "robust", 0.1, 0.2),
    ("ipo", "ipo", 0.1, 0.0),
    ("ipo", "ipo", 0.5, 0.0),
    ("hinge", "hinge", 0.1, 0.0),
    ("hinge", "hinge", 1.0, 0.0),
    ("una_pair", "sigmoid", 0.03, 0.0),
])
def test_dpo_family_matches_trl(ours_name, trl_type, beta, eps):
    policy, ref, lengths = pairwise_data()
    expected = trl_dpo(trl_type, policy, ref, lengths, beta, eps)
    got = ours(ours_name, policy, lengths, ref_logps=ref, beta=beta, label_smoothing=eps)
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_dpo_metrics_match_trl():
    policy, ref, lengths = pairwise_data()
    flat = torch.cat([policy[:, 0], policy[:, 1]])
    input_ids, mask, token_logps = per_token(flat, torch.cat([lengths[:, 0], lengths[:, 1]]))
    stub = trainer_stub(ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
                        loss_types=["sigmoid"], loss_weights=[1.0], beta=0.1, label_smoothing=0.0,
                        use_weighting=False)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": mask,
              "ref_chosen_logps": ref[:, 0], "ref_rejected_logps": ref[:, 1]}
    trl.DPOTrainer._compute_loss(stub, lambda **kw: fused_output(token_logps), inputs, False)
    metrics = ours("dpo", policy, lengths, ref_logps=ref, beta=0.1).metrics
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert metrics[key].item() == pytest.approx(stub._metrics["train"][key][-1], abs=1e-6), key


@pytest.mark.parametrize("wd,wu,kl_offset", [(1.0, 1.0, 0.3), (1.33, 0.7, 0.3), (1.0, 1.0, -0.3)])
def test_kto_matches_trl(wd, wu, kl_offset):
    n = 6
    policy, ref = rand(n, 1), rand(n, 1)
    policy = ref + torch.linspace(-2, 2, n, dtype=torch.float64).unsqueeze(1)
    labels = torch.tensor([1, 0, 1, 1, 0, 0])
    kl_policy, kl_ref = rand(n), rand(n)
    kl_policy = kl_ref + kl_offset + 0.1 * torch.linspace(-1, 1, n, dtype=torch.float64)
    lengths = lengths_for(n)
    input_ids, mask, token_logps = per_token(policy[:, 0], lengths)
    kl_ids, kl_mask, kl_token_logps = per_token(kl_policy, torch.full((n,), 12))

    def model(input_ids, **kw):
        return fused_output(kl_token_logps if input_ids.shape[1] == kl_ids.shape[1] else token_logps)

    stub = trainer_stub(calculate_KL=True, precompute_ref_logps=True, loss_type="kto", beta=0.1,
                        desirable_weight=wd, undesirable_weight=wu)
    stub._compute_kl_logps = lambda m, batch: trl.KTOTrainer._compute_kl_logps(stub, m, batch)
    batch = {"label": labels, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "completion_mask": mask, "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
             "KL_completion_mask": kl_mask, "ref_logps": ref[:, 0], "ref_KL_logps": kl_ref}
    expected = trl.KTOTrainer._compute_loss(stub, model, batch, False)
    got = ours("kto", policy, lengths.unsqueeze(1), ref_logps=ref, targets=labels.double().unsqueeze(1),
               kl_logps=kl_policy, ref_kl_logps=kl_ref, beta=0.1, desirable_weight=wd, undesirable_weight=wu)
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert got.metrics["kl"].item() == pytest.approx(stub._metrics["train"]["kl"][-1], abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert got.metrics[key].item() == pytest.approx(stub._metrics["train"][key][-1], abs=1e-6), key


def cpo_trainer():
    from trl.experimental.cpo import CPOTrainer
    return CPOTrainer


@pytest.mark.parametrize("name,loss_type,beta,eps", [
    ("simpo", "simpo", 2.0, 0.0),
    ("simpo", "simpo", 2.5, 0.15),
    ("cpo", "sigmoid", 0.1, 0.0),
    ("cpo", "sigmoid", 0.1, 0.1),
])
def test_cpo_and_simpo_preference_terms_match_trl(name, loss_type, beta, eps):
    policy, _, lengths = pairwise_data()
    logps = policy / lengths if loss_type == "simpo" else policy
    stub = SimpleNamespace(alpha=0.0, beta=beta, loss_type=loss_type, label_smoothing=eps, simpo_gamma=0.5,
                           accelerator=accelerator())
    losses, chosen_rewards, _ = cpo_trainer().cpo_loss(stub, logps[:, 0], logps[:, 1])
    inputs_policy = policy.clone()
    got = ours(name, inputs_policy, lengths, beta=beta, label_smoothing=eps, gamma=0.5, alpha=0.0)
    assert got.loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    assert got.metrics["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)


def test_orpo_odds_ratio_term_matches_trl():
    from trl.experimental.orpo import ORPOTrainer

    policy, _, lengths = pairwise_data()
    avg = policy / lengths
    avg[0, 0] = -0.01
    avg[1, 1] = -1e-3
    policy = avg * lengths
    stub = SimpleNamespace(beta=0.1, accelerator=accelerator())
    losses, chosen_rewards, _, log_odds_ratio, log_odds_chosen = ORPOTrainer.odds_ratio_loss(
        stub, avg[:, 0], avg[:, 1])
    inputs = MethodInputs(policy_logps=policy, lengths=lengths, completion_mask=torch.ones(B, 2, dtype=torch.bool))
    got = get_method("orpo").loss(inputs, make_cfg(beta=0.1, orpo_nll_scope="completion"))
    odds_term = got.loss - inputs.nll(0)
    assert odds_term.item() == pytest.approx(-losses.mean().item(), abs=1e-6)
    assert got.metrics["log_odds_ratio"].item() == pytest.approx(log_odds_ratio.item(), abs=1e-6)
    assert got.metrics["log_odds_chosen"].item() == pytest.approx(log_odds_chosen.item(), abs=1e-6)
    assert got.metrics["rewards/chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)


@pytest.mark.parametrize("loss_type,ours_name,beta,alpha,eps", [
    ("sigmoid", "tpo", 0.01, 1.0, 0.0),
    ("sigmoid", "tpo", 0.2, 0.9, 0.1),
    ("tpo-l", "tpo_l", 2.0, 1.0, 0.0),
    ("tpo-l", "tpo_l", 0.5, 0.5, 0.2),
])
def test_tpo_matches_trl_end_to_end(loss_type, ours_name, beta, alpha, eps):
    """TRL's TPO works from logits; both sides see the same logits, ours through summed log-probs."""
    from trl.experimental.tpo import TPOTrainer

    width, vocab = 9, 11
    logits = torch.randn(3 * B, width, vocab, generator=GEN, dtype=torch.float64)
    input_ids = torch.randint(0, vocab, (3 * B, width), generator=GEN)
    lengths = torch.randint(2, width, (3 * B,), generator=GEN)
    mask = torch.zeros(3 * B, width, dtype=torch.long)
    for i, length in enumerate(lengths.tolist()):
        mask[i, width - length:] = 1
    stub = trainer_stub(beta=beta, loss_type=loss_type, label_smoothing=eps, tpo_alpha=alpha, tpo_l_gamma=0.5)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "completion_mask": mask}
    expected = TPOTrainer._compute_loss(stub, lambda **kw: SimpleNamespace(logits=logits), batch, False)

    token_logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:].unsqueeze(2)).squeeze(2)
    summed = (token_logps * mask[:, 1:]).sum(dim=1)
    n_tokens = mask[:, 1:].sum(dim=1)
    chosen, rejected, gold = summed.chunk(3)
    len_chosen, len_rejected, len_gold = n_tokens.chunk(3)
    policy = torch.stack([gold, chosen, rejected], dim=1)
    slot_lengths = torch.stack([len_gold, len_chosen, len_rejected], dim=1)
    got = ours(ours_name, policy, slot_lengths, beta=beta, alpha=alpha, label_smoothing=eps, gamma=0.5)
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    gold_mask = mask[2 * B:, 1:].bool()
    gold_ce = F.cross_entropy(logits[2 * B:, :-1][gold_mask], input_ids[2 * B:, 1:][gold_mask])
    assert got.metrics["nll_loss"].item() == pytest.approx(gold_ce.item(), abs=1e-6)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert got.metrics[key].item() == pytest.approx(stub._metrics["train"][key][-1], abs=1e-6), key


@pytest.mark.parametrize("margin,center", [(None, None), (0.5, 0.01)])
def test_reward_model_matches_trl(margin, center):
    scores = torch.randn(2 * B, 1, generator=GEN, dtype=torch.float64)
    stub = trainer_stub(args=SimpleNamespace(center_rewards_coefficient=center))
    inputs = {"input_ids": torch.ones(2 * B, 3, dtype=torch.long), "attention_mask": torch.ones(2 * B, 3)}
    if margin is not None:
        inputs["margin"] = torch.full((B,), margin, dtype=torch.float64)

    def model(**kw):
        return SimpleNamespace(logits=scores)

    expected = trl.RewardTrainer.compute_loss(stub, model, inputs)
    rm = scores.squeeze(-1).view(2, B).T
    got = ours("reward_model", torch.zeros(B, 2, dtype=torch.float64), torch.ones(B, 2, dtype=torch.long),
               rm_rewards=rm, rm_margin=margin or 0.0, center_rewards_coefficient=center)
    assert got.loss.item() == pytest.approx(expected.item(), abs=1e-6)
