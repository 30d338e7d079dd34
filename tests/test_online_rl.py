"""PPO, GRPO and RLOO end to end on the tiny model, on online UNA's rollout path."""

import json

import pytest

import unialign
from tests.test_online import _config, _logs


def _rl_config(tiny_model_dir, tmp_path, method, **extra):
    return _config(tiny_model_dir, tmp_path, loss_type=method, learning_rate=1e-2, **extra)


def test_grpo_smoke(tiny_model_dir, tmp_path):
    result = unialign.train(_rl_config(tiny_model_dir, tmp_path, "grpo", max_steps=2))
    logs = _logs(tmp_path / "run")
    print(json.dumps(logs, indent=1))
    assert result.trainer.reference_forwards == 2


@pytest.mark.parametrize("method", ["rloo", "ppo"])
def test_smoke(tiny_model_dir, tmp_path, method):
    unialign.train(_rl_config(tiny_model_dir, tmp_path, method, max_steps=2))
    logs = _logs(tmp_path / "run")
    print(json.dumps(logs, indent=1))
