"""``attn_implementation`` reaches from_pretrained; prefix sharing is exact where used, else off with a reason.

Prefix sharing confines attention by segment attention under ``sdpa`` and by a dense 4D block mask
under ``eager`` (tests/test_segments.py covers segments in depth). Measured on the tiny model per
implementation that runs on CPU: both are exact (packed log-probs and gradients equal the plain
layout's to float32 rounding, checked below). ``flex_attention`` gets it from transformers as a
score_mod over the whole mask, which crashed torch's CPU kernel (segfault), and has no backward on
CPU at all; ``flash_attention_2`` takes no custom mask. Under those two the trainer logs why and uses
the plain layout.
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import pytest
import torch

from tests.test_prefix_sharing import _examples, _run, _trainer
from unialign.config import ConfigError, load_config
from unialign.data.collate import PreferenceCollator
from unialign.losses.registry import get_method
from unialign.models import load_model
from unialign.run import build_models


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_prefix_sharing_is_exact_under(implementation, tiny_model_dir, tmp_path):
    model = load_model(tiny_model_dir, attn_implementation=implementation)
    assert model.config._attn_implementation == implementation
    batch = PreferenceCollator(0, 3, with_prompt_logps=True)(_examples(3))
    plain_out, plain_grads = _run(_trainer(model, tmp_path, loss_type="rao"), model, batch)
    packed_trainer = _trainer(model, tmp_path, loss_type="rao", prefix_sharing=True)
    assert packed_trainer._shares_prefix(model)
    packed_out, packed_grads = _run(packed_trainer, model, batch)
    for key in plain_out:
        torch.testing.assert_close(packed_out[key], plain_out[key], atol=1e-5, rtol=1e-5, msg=key)
    assert plain_out["seq"].abs().min() > 1.0
    for name, grad in plain_grads.items():
        assert (packed_grads[name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name


def test_eager_and_sdpa_agree(tiny_model_dir, tmp_path):
    batch = PreferenceCollator(0, 2)(_examples(2))
    values = []
    for implementation in ("eager", "sdpa"):
        model = load_model(tiny_model_dir, attn_implementation=implementation)
        with torch.no_grad():
            values.append(_trainer(model, tmp_path, prefix_sharing=True)._logps(model, dataclasses.replace(batch)).seq)
    torch.testing.assert_close(values[0], values[1], atol=1e-5, rtol=1e-5)


def test_flex_attention_uses_the_plain_layout_and_says_why(tiny_model_dir, tmp_path, caplog, monkeypatch):
    """A model running flex_attention (forward only: no backward on CPU) is scored one sequence per completion."""
    eager = load_model(tiny_model_dir, attn_implementation="eager")
    flex = load_model(tiny_model_dir, attn_implementation="eager")
    flex.config._attn_implementation = "flex_attention"  # what from_pretrained sets; loading it is refused on CPU
    batch = PreferenceCollator(0, 2)(_examples(2))
    trainer = _trainer(flex, tmp_path, prefix_sharing=True)
    monkeypatch.setattr(trainer, "_packed_logps", lambda *a: pytest.fail("packed layout used under flex_attention"))
    with caplog.at_level(logging.WARNING, logger="unialign.trainer"), torch.no_grad():
        out = trainer._logps(flex, dataclasses.replace(batch))
        trainer._logps(flex, dataclasses.replace(batch))
        expected = _trainer(eager, tmp_path)._logps(eager, dataclasses.replace(batch))
    warnings = [r.getMessage() for r in caplog.records if "prefix_sharing is off" in r.getMessage()]
    assert warnings == [
        "prefix_sharing is off for this model: attn_implementation flex_attention: transformers turns a dense 4D "
        "mask into a FlexAttention score_mod over the whole mask; on CPU torch's kernel crashed on it (segfault), "
        "so it is not used (sdpa and eager are supported); each completion gets its own prompt"
    ]  # once per trainer, not once per batch
    torch.testing.assert_close(out.seq, expected.seq, atol=1e-5, rtol=1e-5)


def test_flash_attention_switches_prefix_sharing_off_with_the_reason(tiny_model_dir, tmp_path, caplog):
    model = load_model(tiny_model_dir)
    flash = SimpleNamespace(config=SimpleNamespace(_attn_implementation="flash_attention_2"), forward=model.forward)
    trainer = _trainer(model, tmp_path, prefix_sharing=True)
    with caplog.at_level(logging.WARNING, logger="unialign.trainer"):
        assert not trainer._shares_prefix(flash)
    assert caplog.records[-1].getMessage().startswith(
        "prefix_sharing is off for this model: attn_implementation flash_attention_2: flash-attn kernels take no "
        "custom 4D mask"
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusals are for machines without CUDA")
@pytest.mark.parametrize(
    "implementation,message",
    [
        (
            "flash_attention_2",
            "config key 'attn_implementation' is flash_attention_2, which needs a CUDA GPU and the flash-attn package; "
            "this machine has no CUDA device: use sdpa (the default) or eager",
        ),
        (
            "flex_attention",
            "config key 'attn_implementation' is flex_attention, which cannot train on CPU: torch's FlexAttention has "
            "no backward on CPU; use sdpa (the default) or eager here, flex_attention on a GPU",
        ),
    ],
)
def test_cpu_refuses_gpu_only_attention_before_loading(implementation, message, tiny_model_dir, tmp_path):
    cfg = load_config(None, {"model_name_or_path": tiny_model_dir, "output_dir": str(tmp_path), "report_to": "none",
                             "attn_implementation": implementation})
    with pytest.raises(ConfigError) as err:
        build_models(cfg, get_method("dpo"))
    assert str(err.value) == message


def test_unknown_attention_is_a_config_error():
    with pytest.raises(ConfigError, match="'attn_implementation' is 'flash'; allowed values: sdpa, eager, "
                                          "flash_attention_2, flex_attention"):
        load_config(None, {"output_dir": "x", "report_to": "none", "attn_implementation": "flash"})


def test_policy_and_reference_load_with_the_configured_attention(tiny_model_dir, tmp_path):
    cfg = load_config(None, {"model_name_or_path": tiny_model_dir, "output_dir": str(tmp_path), "report_to": "none",
                             "attn_implementation": "eager"})
    policy, reference = build_models(cfg, get_method("dpo"))
    assert policy.config._attn_implementation == reference.config._attn_implementation == "eager"
    default, _ = build_models(load_config(None, {"model_name_or_path": tiny_model_dir, "output_dir": str(tmp_path),
                                                 "report_to": "none"}), get_method("simpo"))
    assert default.config._attn_implementation == "sdpa"  # transformers' choice when the key is unset
