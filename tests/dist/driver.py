"""One training process of the engine tests: ``driver.py CONFIG_JSON`` under ``accelerate launch`` or alone.

Installs the CPU engine switch (:mod:`tests.dist.cpu_engines`) unless ``UNIALIGN_TEST_NO_SWITCH`` is set,
then trains with ``unialign.train(config)``; the run folder's ``metrics.jsonl`` and ``model/`` are what
the tests compare.
"""

import gc
import json
import os
import resource
import signal
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)

if not os.environ.get("UNIALIGN_TEST_NO_SWITCH"):
    import cpu_engines  # noqa: E402

    cpu_engines.enable()

import unialign  # noqa: E402
from unialign.allocator import malloc_in_use_bytes  # noqa: E402
from unialign.checkpointing import attention_saving_layers  # noqa: E402
from unialign.distributed import shut_down  # noqa: E402
from unialign.trainer import UnialignTrainer  # noqa: E402

kill_at = os.environ.get("UNIALIGN_TEST_KILL_AT_STEP")
if kill_at is not None:
    # SIGKILL process 0 when it is about to train the step after ``kill_at`` steps: no handler, no cleanup, as an
    # out-of-memory kill or a lost machine would end it. The launcher then ends process 1.
    training_step = UnialignTrainer.training_step

    def killing_step(self, *args, **kwargs):
        if self.state.global_step == int(kill_at) and self.is_world_process_zero():
            os.kill(os.getpid(), signal.SIGKILL)
        return training_step(self, *args, **kwargs)

    UnialignTrainer.training_step = killing_step

def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field (``VmRSS``, ``VmHWM``) in MiB."""
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field)) / 1024


# The peak resident memory of the setup (loading, the engines' wrapping, reference precompute) and, separately, of
# the training steps: at the first training step the setup's peak is read and the kernel's high-water mark reset
# (writing 5 to /proc/self/clear_refs), so VmHWM at the end is the peak over the steps alone.
phases = {}
_step = UnialignTrainer.training_step


def _watch_heap() -> None:
    """Track the peak of the C heap's bytes in use (glibc mallinfo2; RSS also counts freed pages kept for reuse)."""
    while True:
        phases["steps_peak_in_use_mib"] = max(phases.get("steps_peak_in_use_mib", 0.0), malloc_in_use_bytes() / 2**20)
        time.sleep(0.005)


def measured_step(self, *args, **kwargs):
    if "setup_peak_rss_mib" not in phases:
        phases["setup_peak_rss_mib"] = _status_mib("VmHWM")
        phases["rss_at_first_step_mib"] = _status_mib("VmRSS")
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        if malloc_in_use_bytes() is not None:
            phases["in_use_at_first_step_mib"] = malloc_in_use_bytes() / 2**20
            threading.Thread(target=_watch_heap, daemon=True).start()
    return _step(self, *args, **kwargs)


UnialignTrainer.training_step = measured_step

config = json.loads(open(sys.argv[1]).read())
result = unialign.train(config)
trainer = result.trainer
state = trainer.accelerator.state
plugin = getattr(state, "deepspeed_plugin", None)
policy_params = list(trainer.model.parameters())
reference = trainer.ref_model
report = {
    "distributed_type": state.distributed_type.name,
    "num_processes": state.num_processes,
    "zero_stage": plugin.zero_stage if plugin is not None else None,
    "fsdp_version": state.fsdp_plugin.fsdp_version if getattr(state, "fsdp_plugin", None) else None,
    # Elements of the policy this process holds: under ZeRO-3 and FSDP a share, else all of them.
    "policy_local_numel": sum(getattr(p, "ds_tensor", p).numel() if hasattr(p, "ds_tensor") else (
        p.to_local().numel() if hasattr(p, "to_local") else p.numel()) for p in policy_params),
    "reference_type": type(reference).__name__ if reference is not None else None,
    "reference_local_numel": None if reference is None else sum(
        p.ds_tensor.numel() if hasattr(p, "ds_tensor") else (p.to_local().numel() if hasattr(p, "to_local")
                                                              else p.numel()) for p in reference.parameters()),
    "reference_forwards": trainer.reference_forwards,
    # Decoder layers whose checkpoint keeps the attention output (activation_checkpointing_save_attention).
    "attention_saving_layers": attention_saving_layers(trainer.model),
    # The gradient bucket DeepSpeed's ZeRO optimizer allocated (elements), else None.
    "reduce_bucket_size": getattr(getattr(trainer.model_wrapped, "optimizer", None), "reduce_bucket_size", None),
    # Peak resident memory of this process over the whole run (Linux reports KiB; the reset of the high-water mark
    # at the first step can lower ru_maxrss, so the setup's peak is taken too).
    "peak_rss_mib": max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                        phases.get("setup_peak_rss_mib", 0.0)),
    # Resident memory now, after training and the final save (models, optimizer state still held).
    "end_rss_mib": _status_mib("VmRSS"),
    # Peak over the training steps and the final save (see measured_step).
    "steps_peak_rss_mib": _status_mib("VmHWM"),
    # The C heap's bytes in use after training (what the process still holds: weights, optimizer state).
    "end_in_use_mib": (gc.collect(), malloc_in_use_bytes() / 2**20)[1] if malloc_in_use_bytes() is not None else None,
    **phases,
}
with open(os.path.join(config["output_dir"] + ".report", f"rank{state.process_index}.json"), "w") as handle:
    json.dump(report, handle)
shut_down()  # as the CLI does after training
