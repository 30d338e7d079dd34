"""One training process of the engine tests: ``driver.py CONFIG_JSON`` under ``accelerate launch`` or alone.

Installs the CPU engine switch (:mod:`tests.dist.cpu_engines`) unless ``UNIALIGN_TEST_NO_SWITCH`` is set,
then trains with ``unialign.train(config)``; the run folder's ``metrics.jsonl`` and ``model/`` are what
the tests compare.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

torch.set_num_threads(1)

if not os.environ.get("UNIALIGN_TEST_NO_SWITCH"):
    import cpu_engines  # noqa: E402

    cpu_engines.enable()

import unialign  # noqa: E402

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
}
with open(os.path.join(config["output_dir"] + ".report", f"rank{state.process_index}.json"), "w") as handle:
    json.dump(report, handle)
