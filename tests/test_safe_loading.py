"""Safe loading: no remote code unless asked, safetensors unless pickle is allowed, configs through yaml.safe_load."""

from __future__ import annotations

import inspect
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from unialign.config import UnialignConfig, load_config, parse_overrides
from unialign.models import load_model, load_tokenizer, model_config


def test_trust_remote_code_and_allow_pickle_default_to_false(tmp_path):
    cfg = load_config(None, {"output_dir": str(tmp_path)})
    assert cfg.trust_remote_code is False and cfg.allow_pickle is False
    assert UnialignConfig.__dataclass_fields__["trust_remote_code"].default is False
    for function in (load_model, load_tokenizer, model_config):
        assert inspect.signature(function).parameters["trust_remote_code"].default is False
    assert inspect.signature(load_model).parameters["allow_pickle"].default is False


@pytest.fixture
def pickle_only_dir(tiny_model_dir, tmp_path):
    """The tiny model saved the old way: config.json plus a pickled pytorch_model.bin, no safetensors."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(f"{tiny_model_dir}/config.json", folder / "config.json")
    torch.save(load_file(f"{tiny_model_dir}/model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_are_refused_unless_allowed(pickle_only_dir, tiny_model_dir):
    assert sorted(p.name for p in pickle_only_dir.iterdir()) == ["config.json", "pytorch_model.bin"]
    with pytest.raises(OSError, match="allow_pickle") as info:
        load_model(str(pickle_only_dir))
    assert str(pickle_only_dir) in str(info.value) and "no safetensors weights" in str(info.value)
    model = load_model(str(pickle_only_dir), allow_pickle=True)
    expected = load_model(tiny_model_dir)
    for (name, value), (_, reference) in zip(model.state_dict().items(), expected.state_dict().items()):
        assert torch.equal(value, reference), name


def test_remote_code_is_not_run_without_trust_remote_code(tmp_path):
    marker = tmp_path / "remote-code-ran"
    code = f"open({str(marker)!r}, 'w').close()\nfrom transformers import PretrainedConfig\n"
    (tmp_path / "configuration_evil.py").write_text(
        code + "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "evil",
                "auto_map": {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "x.EvilModel"},
            }
        )
    )
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(tmp_path))
    with pytest.raises(ValueError, match="trust_remote_code"):
        model_config(str(tmp_path))
    assert not marker.exists()


def test_config_yaml_with_python_tags_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"loss_type: dpo\nbeta: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ValueError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not a valid YAML config: line 2: ")
    assert "!!python/object are refused" in message and "yaml.safe_load" in message
    assert not marker.exists()


def test_broken_yaml_config_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("loss_type: dpo\nbeta: [0.1\n")
    with pytest.raises(ValueError, match=rf"^{path}: not a valid YAML config: .*line 3"):
        load_config(path)
    path.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ValueError, match=rf"^{path}: a config must be a mapping"):
        load_config(path)


def test_overrides_are_parsed_safely(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(ValueError, match=r"override .beta=.*: not a valid YAML value: line 1: tags such as !!python"):
        parse_overrides([f"beta=!!python/object/apply:os.system ['touch {marker}']"])
    with pytest.raises(ValueError, match=r"override 'beta=\[0.1': not a valid YAML value"):
        parse_overrides(["beta=[0.1"])
    assert not marker.exists()
    assert parse_overrides(["beta=0.2", "use_peft=true"]) == {"beta": 0.2, "use_peft": True}
