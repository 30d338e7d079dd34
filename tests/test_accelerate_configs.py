"""The example accelerate configs parse as accelerate reads them, with the expected backend and only known keys."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "accelerate"
EXPECTED = {
    "deepspeed_zero2.yaml": (DistributedType.DEEPSPEED, {"zero_stage": 2}),
    "deepspeed_zero3.yaml": (DistributedType.DEEPSPEED, {"zero_stage": 3, "zero3_save_16bit_model": True}),
    "fsdp.yaml": (DistributedType.FSDP, {"fsdp_version": 2, "fsdp_state_dict_type": "FULL_STATE_DICT"}),
}


def test_every_config_is_covered():
    assert sorted(p.name for p in FOLDER.glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_parses_with_the_expected_backend(name):
    config = ClusterConfig.from_yaml_file(FOLDER / name)  # refuses unknown top-level keys
    distributed_type, settings = EXPECTED[name]
    assert config.distributed_type == distributed_type
    assert config.use_cpu is False and config.num_machines == 1
    section = config.deepspeed_config if distributed_type == DistributedType.DEEPSPEED else config.fsdp_config
    assert {key: section[key] for key in settings} == settings
    # accelerate launch copies each key of these sections onto its own option of the same name; a misspelt key
    # would be silently ignored there, so check every key is a real option.
    options = {action.dest for action in launch_command_parser()._actions}
    assert sorted(set(section) - options) == []
