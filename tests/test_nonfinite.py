"""on_nonfinite: a NaN loss or gradient never reaches the weights; `stop` saves the last good step, `skip` skips."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import unialign
import unialign.pipeline
from tests.conftest import strict_json, tiny_dpo_config
from unialign.checkpoints import MARKER
from unialign.losses.base import LossOutput
from unialign.losses.registry import get_method
from unialign.trainer import NonFiniteError, UnialignTrainer


def _config(tiny_model_dir, data_file, output_dir, **extra):
    return tiny_dpo_config(
        tiny_model_dir, data_file, output_dir, **{"max_steps": 3, "lr_scheduler_type": "constant", **extra}
    )


@pytest.fixture
def bad_step(monkeypatch):
    """Make DPO's loss non-finite on the 2nd training call (step 2); ``kind`` picks a NaN loss or NaN gradients.

    Returns the dataset rows (0-based) of the batch that went bad, filled in once it has run.
    """
    seen_rows: list[int] = []
    dpo = get_method("dpo")

    def install(kind: str):
        calls = {"n": 0}

        def loss(inputs, args):
            calls["n"] += 1
            out = dpo.loss(inputs, args)
            if calls["n"] != 2:
                return out
            if kind == "loss":
                return LossOutput(out.loss * float("nan"), out.metrics)
            # finite value, NaN gradient: d/dx [0 * sqrt(x)] at x = 0 is 0 * inf
            zero = (inputs.policy_logps * 0).sum()
            return LossOutput(out.loss + 0 * torch.sqrt(zero), out.metrics)

        monkeypatch.setattr(unialign.pipeline, "get_method", lambda name: dataclasses.replace(dpo, loss=loss))
        compute_loss = UnialignTrainer.compute_loss

        def record(self, model, inputs, *args, **kwargs):
            if calls["n"] == 1:  # this call will be the 2nd
                seen_rows.extend(inputs.row_index.tolist())
            return compute_loss(self, model, inputs, *args, **kwargs)

        monkeypatch.setattr(UnialignTrainer, "compute_loss", record)
        return seen_rows

    return install


def _weights(folder):
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("kind", ["loss", "gradient"])
def test_stop_saves_the_last_good_step_and_names_the_batch(tiny_model_dir, data_file, tmp_path, bad_step, kind):
    one_step = unialign.train(_config(tiny_model_dir, data_file, tmp_path / "one", max_steps=1))
    rows = bad_step(kind)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteError) as caught:
        unialign.train(_config(tiny_model_dir, data_file, out))
    message = str(caught.value)
    if kind == "loss":
        listed = ", ".join(str(r + 1) for r in rows)
        assert f"dpo loss is nan at step 2, batch rows {listed} (dataset rows counted from 1)" in message
    else:
        assert "gradient norm is nan at step 2" in message
    assert f"{out / 'checkpoint-1'} holds the weights of step 1, the last good step" in message
    assert isinstance(caught.value, ValueError)  # the CLI prints it as one line

    assert (out / "checkpoint-1" / MARKER).exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    expected, got = _weights(one_step.model_dir), _weights(out / "checkpoint-1")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=1e-6, rtol=0)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == [1]


def test_skip_counts_the_batch_and_applies_no_update(tiny_model_dir, data_file, tmp_path, bad_step):
    bad_step("loss")
    out = tmp_path / "run"
    result = unialign.train(_config(tiny_model_dir, data_file, out, on_nonfinite="skip"))
    assert result.trainer.nonfinite_skipped == 1
    # metrics.jsonl stays valid JSON: the NaN loss of the skipped step is written as null
    lines = [strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert [line["nonfinite_skipped"] for line in lines] == [0, 1, 1]
    assert lines[1]["loss"] is None and math.isfinite(lines[2]["loss"])  # step 2 had no loss to show
    assert strict_json((out / "config.json").read_text())["on_nonfinite"] == "skip"
    assert "grad_norm" not in lines[1] and "rewards/margins" not in lines[1]  # nor metrics from the bad batch
    assert all(math.isfinite(lines[i]["rewards/margins"]) for i in (0, 2))
    optimizer = result.trainer.optimizer
    steps = {int(optimizer.state[p]["step"]) for group in optimizer.param_groups for p in group["params"]}
    assert steps == {2}  # 3 steps, one skipped: AdamW stepped twice
    weights = _weights(result.model_dir)
    assert all(torch.isfinite(w).all() for w in weights.values())
