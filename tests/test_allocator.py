"""The CPU allocator setting: freed large blocks stay in the process, and the trainer applies it only when asked."""

import subprocess
import sys

import pytest

import unialign
from tests.conftest import tiny_dpo_config
from unialign import allocator
from unialign import trainer as trainer_module

# Prints how much resident memory freeing a touched 256 MiB block gives back to the OS.
RELEASED_BY_FREE = """
import sys
from unialign.allocator import keep_freed_memory, is_applied
if sys.argv[1] == "on":
    assert keep_freed_memory() and is_applied()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
block = bytearray(256 * 2**20)
held = rss()
del block
print((held - rss()) / 2**20)
"""


def _released_mib(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", RELEASED_BY_FREE, mode], capture_output=True, text=True, check=True)
    return float(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc setting")
def test_freed_blocks_stay_in_the_process_only_when_applied():
    assert _released_mib("off") > 200  # glibc's default: the block was its own mmap, unmapped on free
    assert _released_mib("on") < 16  # kept in the heap for the next allocation


@pytest.mark.parametrize(
    "setting,owned,applied",
    [(True, False, True), (False, True, False), (None, True, True), (None, False, False)],
    ids=["asked", "refused-under-cli", "default-under-cli", "default-as-library"],
)
def test_cpu_training_applies_the_setting_when_asked_or_in_unialigns_own_process(
    tiny_model_dir, data_file, tmp_path, monkeypatch, setting, owned, applied
):
    calls = []
    monkeypatch.setattr(trainer_module, "keep_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(allocator, "_owned", owned)
    extra = {} if setting is None else {"cpu_keep_freed_memory": setting}
    unialign.train(tiny_dpo_config(tiny_model_dir, data_file, tmp_path / "run", max_steps=1, **extra))
    assert len(calls) == (1 if applied else 0)


def test_the_command_line_owns_its_process(monkeypatch):
    monkeypatch.setattr(allocator, "_owned", False)
    from unialign.cli import main

    assert main(["methods"]) == 0
    assert allocator.process_is_owned()
