"""The embedded default model (slow: converts and trains the real 135M SmolLM2)."""

import json
import time

import pytest

import unialign
from unialign.models import load_model, resolve_model_path

pytestmark = pytest.mark.slow


def test_default_model_converts_once_then_loads_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIALIGN_CACHE", str(tmp_path))
    path = resolve_model_path("smollm2-135m-instruct")
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").exists() and path.endswith(
        "smollm2-135m-instruct"
    )
    start = time.perf_counter()
    model = load_model("smollm2-135m-instruct")
    print(f"cached load: {time.perf_counter() - start:.1f}s")
    assert model.config.vocab_size == 49152 and getattr(model.config, "quantization_config", None) is None


def test_lora_dpo_on_the_embedded_model_moves_the_loss(tmp_path, pairwise_rows):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in pairwise_rows))
    result = unialign.train(
        {
            "model_name_or_path": "smollm2-135m-instruct",
            "dataset": str(data),
            "loss_type": "dpo",
            "use_peft": True,
            "lora_r": 8,
            "learning_rate": 5e-4,
            "beta": 0.1,
            "max_steps": 4,
            "per_device_train_batch_size": 4,
            "output_dir": str(tmp_path / "run"),
            "report_to": "none",
            "max_length": 128,
            "max_prompt_length": 96,
            "disable_tqdm": True,
            "seed": 0,
        }
    )
    losses = [
        json.loads(line)["loss"]
        for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
        if "loss" in json.loads(line)
    ]
    print("losses", losses)
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert losses[-1] < losses[0] - 0.01
    reloaded = load_model(str(result.model_dir))
    assert reloaded.config.vocab_size == 49152
