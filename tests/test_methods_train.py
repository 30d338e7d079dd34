"""Every registered method trains on the tiny model; methods without a reference never run one."""

import json

import pytest
import torch

import unialign
from tests.conftest import conversation
from unialign.data.errors import DataError
from unialign.losses.registry import all_methods

TOPICS = ["cats", "tea", "rain", "maps"]


def _rows(fmt: str) -> list[dict]:
    rows = []
    for i, t in enumerate(TOPICS):
        prompt = conversation(f"Tell me about {t}.")
        good, bad, best = f"{t.capitalize()} are nice.", f"No {t} today.", f"{t.capitalize()} are nice and calm."
        rows.append(
            {
                "pairwise": {
                    "prompt": prompt,
                    "chosen": good,
                    "rejected": bad,
                    "chosen_score": 0.8,
                    "rejected_score": 0.2,
                },
                "binary": {"prompt": prompt, "completion": good if i % 2 else bad, "label": bool(i % 2)},
                "score": {"prompt": prompt, "completion": good, "score": 0.25 * i},
                "triple": {"prompt": prompt, "reference": best, "chosen": good, "rejected": bad},
                "listwise": {
                    "prompt": prompt,
                    "completions": [best, good, bad][: 3 - i % 2],
                    "rewards": [0.9, 0.6, 0.1][: 3 - i % 2],
                },
                "sft": {"prompt": prompt, "completion": good},
            }[fmt]
        )
    return rows


def _train(method, tiny_model_dir, tmp_path, fmt=None, **extra):
    fmt = fmt or method.formats[0]
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / f"{fmt}.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in _rows(fmt)))
    config = dict(
        model_name_or_path=tiny_model_dir,
        dataset=str(data),
        loss_type=method.name,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        report_to="none",
        disable_tqdm=True,
        output_dir=str(tmp_path / "run"),
        max_length=64,
        seed=0,
        lr_scheduler_type="constant",
    )
    config.update(extra)
    return unialign.train(config)


def _train_one_step(tiny_model_dir, data, loss_type, tmp_path):
    """One step of ``loss_type`` on a hand-written data file (for tests that expect it to be refused)."""
    return unialign.train(
        dict(
            model_name_or_path=tiny_model_dir,
            dataset=str(data),
            loss_type=loss_type,
            output_dir=str(tmp_path / "r"),
            max_steps=1,
            report_to="none",
        )
    )


def _losses(tmp_path):
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [x for x in lines if "loss" in x]


# Online methods sample their own completions from a reward source; tests/test_online.py trains them.
@pytest.mark.parametrize("method", [m for m in all_methods() if not m.online], ids=lambda m: m.name)
def test_method_trains_and_lowers_its_loss_on_a_fixed_batch(method, tiny_model_dir, tmp_path):
    # beta large enough that the tiny model's small log-prob changes register in beta-scaled losses
    result = _train(method, tiny_model_dir, tmp_path, beta=1.0 if method.name != "simpo" else 2.0)
    logs = _losses(tmp_path)
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in logs)
    assert logs[-1]["loss"] < logs[0]["loss"], [x["loss"] for x in logs]
    if method.model_kind == "causal_lm" and "pairwise" in method.formats[:1]:
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
            assert key in logs[0], key
    if not method.needs_reference:
        assert result.trainer.reference_forwards == 0 and result.trainer.ref_model is None


@pytest.mark.parametrize(
    "name,fmt",
    [
        ("una_binary", "pairwise"),
        ("una_score", "pairwise"),
        ("kto", "pairwise"),
        ("una_score", "listwise"),
        ("sft", "triple"),
    ],
)
def test_methods_accept_their_secondary_formats(name, fmt, tiny_model_dir, tmp_path):
    method = unialign.losses.get_method(name)
    _train(method, tiny_model_dir, tmp_path, fmt=fmt, max_steps=1, score_range=[0, 1])
    assert _losses(tmp_path)


def test_wrong_format_is_refused_naming_the_converter(tiny_model_dir, tmp_path):
    method = unialign.losses.get_method("dpo")
    with pytest.raises(
        ValueError, match=r"'dpo' trains on pairwise data, but the dataset is binary; .*convert --to pairwise"
    ):
        _train(method, tiny_model_dir, tmp_path, fmt="binary")


def test_rao_refuses_prompts_without_a_shared_first_token(tiny_model_dir, tmp_path):
    data = tmp_path / "l.jsonl"
    rows = [
        {"prompt": "Alpha question?", "completions": ["a", "b"], "rewards": [1.0, 0.0]},
        {"prompt": "Different start?", "completions": ["a", "b"], "rewards": [1.0, 0.0]},
    ]
    data.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=r"row 2, field 'prompt': prompt starts with token .* shared first token"):
        _train_one_step(tiny_model_dir, data, "rao", tmp_path)


def test_rao_prompt_term_matches_direct_prompt_logps(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    method = unialign.losses.get_method("rao")
    result = _train(method, tiny_model_dir, tmp_path, max_steps=1, learning_rate=0.0)
    trainer = result.trainer
    examples = trainer.train_dataset
    batch = trainer.data_collator(examples)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        got = trainer._logps(model, batch).prompt
        expected = []
        for e in examples:
            ids = torch.tensor([e.prompt_ids])
            logp = model(ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None]).sum()
            expected.append(logp)
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)


def _padded(sequences: list[list[int]], masked: list[int], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids, attention mask and Hugging Face labels (−100 on padding and the first ``masked`` tokens)."""
    width = max(map(len, sequences))
    ids = torch.full((len(sequences), width), pad_id)
    labels = torch.full((len(sequences), width), -100)
    for i, (seq, cut) in enumerate(zip(sequences, masked)):
        ids[i, : len(seq)] = torch.tensor(seq)
        labels[i, cut : len(seq)] = torch.tensor(seq[cut:])
    attention = torch.arange(width) < torch.tensor([len(s) for s in sequences])[:, None]
    return ids, attention, labels


@pytest.mark.parametrize("prefix_sharing", [True, False])
@pytest.mark.parametrize("scope", ["prompt_and_completion", "completion"])
def test_orpo_logged_nll_is_the_cross_entropy_of_its_scope(scope, prefix_sharing, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    # One micro-batch holds all four rows, so the first logged nll_loss is over the whole dataset.
    result = _train(unialign.losses.get_method("orpo"), tiny_model_dir, tmp_path, max_steps=1,
                    orpo_nll_scope=scope, prefix_sharing=prefix_sharing)
    examples = result.trainer.train_dataset
    first = _losses(tmp_path)[0]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    sequences = [e.prompt_ids + e.completion_ids[0] for e in examples]
    masked = [0 if scope == "prompt_and_completion" else len(e.prompt_ids) for e in examples]
    ids, attention, labels = _padded(sequences, masked, result.trainer.processing_class.pad_token_id)
    with torch.no_grad():  # labels-style: shifted, mean over every labelled token of the batch
        expected = model(input_ids=ids, attention_mask=attention.long(), labels=labels).loss
    assert first["nll_loss"] == pytest.approx(expected.item(), abs=1e-5)


def test_orpo_default_loss_matches_trl_orpo(tiny_model_dir, tmp_path):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    trl_orpo = pytest.importorskip("trl.experimental.orpo")
    result = _train(unialign.losses.get_method("orpo"), tiny_model_dir, tmp_path, max_steps=1)
    examples, pad = result.trainer.train_dataset, result.trainer.processing_class.pad_token_id
    first = _losses(tmp_path)[0]
    batch = {}
    for slot, name in enumerate(("chosen", "rejected")):
        sequences = [e.prompt_ids + e.completion_ids[slot] for e in examples]
        ids, attention, labels = _padded(sequences, [len(e.prompt_ids) for e in examples], pad)
        batch |= {f"{name}_input_ids": ids, f"{name}_attention_mask": attention.long(), f"{name}_labels": labels}
    trainer = trl_orpo.ORPOTrainer
    stub = SimpleNamespace(
        concatenated_inputs=trainer.concatenated_inputs, get_batch_logps=trainer.get_batch_logps,
        is_encoder_decoder=False, padding_value=pad, aux_loss_enabled=False, beta=0.1,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        chosen, rejected, _, _, nll = trainer.concatenated_forward(stub, model, batch)
        odds = trainer.odds_ratio_loss(stub, chosen, rejected)[0]
    assert first["nll_loss"] == pytest.approx(nll.item(), abs=1e-5)
    assert first["loss"] == pytest.approx((nll - odds.mean()).item(), abs=1e-5)


def test_kto_kl_pairs_never_share_a_prompt(tokenizer):
    from unialign.data.tokenize import attach_kl_pairs, tokenize_rows

    rows = [
        {"prompt": p, "completion": c, "label": lab}
        for p in ("a?", "b?", "c?")
        for c, lab in (("x", True), ("y", False))
    ]
    examples, _ = tokenize_rows(rows, "binary", tokenizer, max_length=32, max_prompt_length=None)
    attach_kl_pairs(examples, 32)
    for i, e in enumerate(examples):
        partner = next(o for o in examples[i + 1 :] + examples[: i + 1] if o.prompt_ids != e.prompt_ids)
        assert e.kl_completion_ids == partner.completion_ids[0]
        assert partner.prompt_ids != e.prompt_ids


def test_una_score_without_scores_fails_before_training(tiny_model_dir, tmp_path):
    data = tmp_path / "l.jsonl"
    data.write_text(json.dumps({"prompt": conversation("q"), "completions": ["a", "b"], "rewards": [3.0, 1.0]}))
    with pytest.raises(DataError, match=r"una_score needs a score for every completion: .*score_range"):
        _train_one_step(tiny_model_dir, data, "una_score", tmp_path)


def test_robust_dpo_gets_its_label_smoothing_default():
    from unialign.config import load_config

    assert load_config(None, {"loss_type": "robust_dpo", "output_dir": "x"}).label_smoothing == 0.1
    assert load_config(None, {"loss_type": "dpo", "output_dir": "x"}).label_smoothing == 0.0


def test_tpo_trains_from_an_sft_model(tiny_model_dir, tmp_path):
    sft = _train(unialign.losses.get_method("sft"), tiny_model_dir, tmp_path / "sft", fmt="triple", max_steps=2)
    tpo = _train(unialign.losses.get_method("tpo"), str(sft.model_dir), tmp_path / "tpo", beta=1.0)
    logs = [json.loads(x) for x in (tmp_path / "tpo" / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in logs if "loss" in x]
    assert losses[-1] < losses[0] and "nll_loss" in logs[0]
    assert tpo.trainer.reference_forwards == 0


def test_trained_reward_model_loads_as_a_reward_source(tiny_model_dir, tmp_path):
    from unialign.rewards.sources import load_reward

    result = _train(
        unialign.losses.get_method("reward_model"), tiny_model_dir, tmp_path, max_steps=8, learning_rate=1e-2
    )
    reward = load_reward(f"reward-model:{result.model_dir}")
    rows = _rows("pairwise")
    chosen = reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert reward.bounds is None and len(chosen) == 4
    assert all(c > r for c, r in zip(chosen, rejected))  # it learned the training pairs' order


def test_every_run_directory_gets_plots_and_a_model_card(tiny_model_dir, tmp_path):
    result = _train(unialign.losses.get_method("dpo"), tiny_model_dir, tmp_path, max_steps=2)
    assert (tmp_path / "run" / "plots" / "loss.png").stat().st_size > 0
    card = (result.model_dir / "README.md").read_text()
    assert "**dpo**" in card and "| `beta` | 0.1 |" in card and "pairwise, 4 rows" in card
