"""Test-only switch: let accelerate set up DeepSpeed or FSDP on CPU processes over gloo.

accelerate (1.15) selects DeepSpeed or FSDP only for an accelerator's process group: on a machine
without one it either trains the processes as plain DDP (``use_cpu``) or as separate single
processes. The multi-process engine tests of this repository run on CPU machines, so this module
changes exactly one decision of accelerate's: the backend and distributed type chosen for a
``torchrun``/``accelerate launch`` process without an accelerator become gloo and the
multi-device type, on which accelerate then puts DeepSpeed (``ACCELERATE_USE_DEEPSPEED``) or FSDP
(``ACCELERATE_USE_FSDP``) exactly as it does on GPUs. Devices stay CPU (``ACCELERATE_TORCH_DEVICE``),
DeepSpeed picks its CPU accelerator (``DS_ACCELERATOR=cpu``). Nothing in ``unialign`` imports this.
"""

import os


def enable() -> None:
    """Install the switch in this process; call it before unialign builds a config."""
    os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import torch
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    if torch.accelerator.is_available():
        return  # a real accelerator: accelerate's own choice is the right one
    original = PartialState._prepare_backend

    def prepare_backend(self, cpu=False, sagemaker_dp=False, backend=None):
        if not cpu and int(os.environ.get("LOCAL_RANK", -1)) != -1:
            return "gloo", DistributedType.MULTI_GPU
        return original(self, cpu, sagemaker_dp, backend)

    PartialState._prepare_backend = prepare_backend
