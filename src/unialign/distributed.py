"""Sharded training engines (DeepSpeed ZeRO, FSDP2 through accelerate): what was asked, what runs, what is refused.

Three jobs, each small, kept here so that ``trainer.py`` and ``run.py`` only call them:

- :func:`check_engine`: a user who asks for DeepSpeed or FSDP (``accelerate launch --config_file
  examples/accelerate/...``, or the ``deepspeed``/``fsdp`` config keys) and would get plain DDP or
  one process instead gets a :class:`~unialign.config.ConfigError` before anything loads.
- :func:`check_combination`: method × engine × reference mode combinations that cannot run are
  refused up front, naming the combination.
- :func:`prepare_reference`: a separate frozen reference model is handed to the engine (ZeRO-3
  shards it inference-only, FSDP2 shards it), instead of sitting whole on every process.

docs/distributed.md lists what is tested on CPU processes and what only a GPU run shows.
"""

# Deferred imports: deepspeed accelerate (DeepSpeed is an optional extra; both load only for a sharded run).

from __future__ import annotations

import copy
import json
import logging
import os

import torch
from transformers import TrainerCallback

from unialign.config import ConfigError

logger = logging.getLogger(__name__)

def _env_flag(name: str) -> bool:
    return os.environ.get(name, "false").lower() in ("1", "true", "yes")


def requested_engine(cfg=None) -> str | None:
    """``"deepspeed"``, ``"fsdp"`` or ``None``: the engine the launch (accelerate's env) or the config asks for."""
    if _env_flag("ACCELERATE_USE_DEEPSPEED") or (cfg is not None and getattr(cfg, "deepspeed", None)):
        return "deepspeed"
    if _env_flag("ACCELERATE_USE_FSDP") or (cfg is not None and getattr(cfg, "fsdp", None)):
        return "fsdp"
    return None


def describe_engine(cfg=None) -> str:
    """The requested engine as messages name it: ``"DeepSpeed ZeRO-3"``, ``"FSDP2"``, ...; ``""`` when none."""
    engine = requested_engine(cfg)
    if engine == "deepspeed":
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
        if stage is None:  # a DeepSpeed JSON: accelerate's deepspeed_config_file, or the config's deepspeed key
            stage = _deepspeed_config_stage(os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
        if stage is None and cfg is not None:
            stage = _deepspeed_config_stage(cfg.deepspeed)
        return f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed"
    if engine == "fsdp":
        version = os.environ.get("FSDP_VERSION") or (getattr(cfg, "fsdp_config", None) or {}).get("version", 1)
        return f"FSDP{version}" if str(version) == "2" else "FSDP"
    return ""


def _deepspeed_config_stage(deepspeed) -> int | None:
    if isinstance(deepspeed, dict):
        return (deepspeed.get("zero_optimization") or {}).get("stage")
    if isinstance(deepspeed, str) and os.path.isfile(deepspeed):

        try:
            with open(deepspeed, encoding="utf-8") as handle:
                return (json.load(handle).get("zero_optimization") or {}).get("stage")
        except (OSError, ValueError):
            return None
    return None


def shut_down() -> None:
    """End this process's part in the process group, if one was started (the CLI calls this after training:
    leaving it to interpreter exit can abort a process in gloo's or DeepSpeed's C++ teardown)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def check_engine(cfg) -> None:
    """Refuse a run that asked for DeepSpeed or FSDP but would train without it.

    accelerate puts DeepSpeed or FSDP only on an accelerator's process group. On a machine without
    one it trains the processes as plain DDP (``use_cpu``), or each process alone, without a word;
    a single process cannot shard at all. Both are refused here, before any model loads.
    """
    engine = requested_engine(cfg)
    if engine is None:
        return

    state = getattr(cfg, "distributed_state", None)
    kind = getattr(getattr(state, "distributed_type", None), "name", "NO")
    processes = getattr(state, "num_processes", 1) if state is not None else 1
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if kind == "MULTI_CPU":
        got = f"plain DDP over {processes} CPU processes (use_cpu)"
    elif processes != launched:
        # Without an accelerator accelerate sets up no process group, yet under a DeepSpeed launch it still calls
        # the state DEEPSPEED: each process would train alone, all in the same run folder.
        got = f"each of the {launched} processes alone"
    elif kind == "NO" and not torch.accelerator.is_available():
        got = "a single CPU process"
    else:
        return
    name = describe_engine(cfg)
    key = "deepspeed" if engine == "deepspeed" and getattr(cfg, "deepspeed", None) else (
        "fsdp" if getattr(cfg, "fsdp", None) else "use_cpu")
    raise ConfigError(
        key,
        f"asks for {name}, but accelerate would train {got} on this machine, without {name}: it needs an "
        "accelerator (accelerate launch --num_processes N on GPUs). Launch without "
        "the DeepSpeed/FSDP config to train with DDP, or see docs/distributed.md",
    )


def engine_of(accelerator) -> str | None:
    """``"deepspeed"``, ``"fsdp"`` or ``None``: the engine accelerate actually set up."""
    kind = accelerator.state.distributed_type.name
    return {"DEEPSPEED": "deepspeed", "FSDP": "fsdp"}.get(kind)


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of a DeepSpeed run, else ``None``."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None else None


def shards_weights(accelerator) -> bool:
    """Whether the weights are split over several processes (ZeRO-3, FSDP), so that every forward is a collective."""
    if accelerator.num_processes < 2:
        return False
    engine = engine_of(accelerator)
    return engine == "fsdp" or (engine == "deepspeed" and zero_stage(accelerator) == 3)


# DeepSpeed's own defaults for these are fixed sizes (reduce_bucket_size 5e8 elements: a 2 GB fp32 gradient bucket
# allocated whole on every process), meant for billion-parameter models. Hugging Face's "auto" sizes them from the
# model's hidden size, but accelerate's YAML keys (examples/accelerate/*.yaml) cannot say "auto".
BUCKET_KEYS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")


def size_buckets_to_model(accelerator) -> list[str]:
    """Under DeepSpeed, set the bucket sizes the launch left unset to ``"auto"``; the keys it set are kept.

    ``Trainer`` then fills them from the model's hidden size ``h`` when the engine starts (``h²``, ``0.9·h²``,
    ``10·h``), as in the DeepSpeed JSONs of the Hugging Face docs. Measured on the 135M model under ZeRO-3
    (docs/distributed.md): without this every process held a 1907 MiB bucket, 3.7× its share of the weights.
    Returns the keys it set.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return []
    zero = plugin.deepspeed_config.setdefault("zero_optimization", {})
    keys = BUCKET_KEYS if zero.get("stage") == 3 else BUCKET_KEYS[:1]
    added = [key for key in keys if key not in zero]
    for key in added:
        zero[key] = "auto"
    return added


def prepare_reference(accelerator, model):
    """A frozen reference model placed the way the engine needs it, in eval mode, without gradients.

    - DeepSpeed ZeRO-3: handed to DeepSpeed as an inference engine (no optimizer), so its weights are
      sharded like the policy's and gathered layer by layer in its forward. Under ``zero3_init_flag``
      it was loaded sharded already and a plain forward would fail on the empty local shards.
    - DeepSpeed ZeRO-1/2: the same, with ZeRO off (stage 0): those stages shard only optimizer state
      and gradients, which a frozen model has none of, so every process holds it whole, as with DDP.
    - FSDP2: sharded with ``fully_shard`` by accelerate's own FSDP2 preparation (layer-wise units, the
      launch's mixed precision; with ``cpu_ram_efficient_loading`` the weights come from process 0).
    - anything else: moved to the process's device.

    Every process must call this, at the same point (it communicates under the sharded engines).
    """
    model.eval().requires_grad_(False)
    engine = engine_of(accelerator)
    if engine == "deepspeed":
        model = _deepspeed_inference(accelerator, model)
    elif engine == "fsdp":
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        if accelerator.state.fsdp_plugin.fsdp_version != 2:
            raise ConfigError("fsdp_version", "is 1: unialign trains under FSDP2 only (set fsdp_version: 2)")
        model = fsdp2_prepare_model(accelerator, model)
    else:
        return model.to(accelerator.device)
    model.eval()  # DeepSpeedEngine.eval() returns None
    return model


def _deepspeed_inference(accelerator, model):

    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    # No optimizer is handed over, so the training-only blocks go (DeepSpeed would build an optimizer or a
    # scheduler from them).
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if zero.get("stage", 0) != 3:
        zero["stage"] = 0
    hidden = getattr(model.config, "hidden_size", None)
    sizes = {
        "reduce_bucket_size": hidden * hidden if hidden else 5e8,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden) if hidden else 5e8,
        "stage3_param_persistence_threshold": 10 * hidden if hidden else 1e5,
    }
    for key, value in sizes.items():
        if zero.get(key) == "auto":
            zero[key] = value
    # Batch sizes matter to DeepSpeed only for its training bookkeeping; "auto" left by accelerate's plugin
    # before Trainer fills them would be refused.
    micro = accelerator.state.deepspeed_plugin.deepspeed_config.get("train_micro_batch_size_per_gpu")
    if micro in (None, "auto"):
        config["train_micro_batch_size_per_gpu"] = 1
    for key in ("train_batch_size", "gradient_accumulation_steps"):
        if config.get(key) == "auto":
            config.pop(key)
    config = {k: v for k, v in config.items() if v != "auto"}
    engine, *_ = deepspeed.initialize(model=model, config=config)
    return engine


def check_combination(cfg, method) -> None:
    """Refuse, before anything loads, the method × engine × setting combinations that cannot run.

    Named in the message as the combination, e.g. "online UNA (una_online) under DeepSpeed ZeRO-3".
    Every combination this lets through is one that tests/dist trains (docs/distributed.md).
    """
    engine = requested_engine(cfg)
    if engine is None:
        return
    name = describe_engine(cfg)
    if engine == "fsdp":
        version = os.environ.get("FSDP_VERSION") or (getattr(cfg, "fsdp_config", None) or {}).get("version", 1)
        if str(version) != "2":
            raise ConfigError(
                "fsdp_version",
                f"is {version}: unialign trains under FSDP2 only (fsdp_version: 2, as in "
                "examples/accelerate/fsdp.yaml); FSDP1 is not tested",
            )
    if method.needs_value_model:
        raise ConfigError(
            "loss_type",
            f"is {method.name}: {method.name}'s value model trains in a second parameter group of the policy's "
            f"optimizer, outside the model {name} wraps, so the engine would neither shard nor reduce its "
            "gradients; train it with DDP (accelerate launch without the DeepSpeed/FSDP config), or use grpo, "
            "rloo or una_online, which have no value model",
        )
    sharded_weights = engine == "fsdp" or describe_engine(cfg).endswith("ZeRO-3")
    if sharded_weights and cfg.logprob_impl == "chunked":
        raise ConfigError(
            "logprob_impl",
            f"is chunked: under {name} the weights are sharded, and the chunked path calls the LM head outside the "
            "model's forward, where its weight is not gathered; use logprob_impl: auto (full under sharding)",
        )
    if name.endswith("ZeRO-3") and os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "true") != "true":
        raise ConfigError(
            "zero3_save_16bit_model",
            "is false: under DeepSpeed ZeRO-3 the final model/ would then hold no gathered weights, only DeepSpeed's "
            "shards; set zero3_save_16bit_model: true in the accelerate config (as examples/accelerate/"
            "deepspeed_zero3.yaml does)",
        )
    if getattr(cfg, "compile_layers", False):
        raise ConfigError("compile_layers", f"is true: compiling blocks under {name} is untested; switch it off")


def gather_rows(accelerator, values):
    """``(B,)`` tensors of every process, concatenated in process order (``B`` may differ between processes).

    Exact, unlike a mean of per-process means; gradients do not flow through it.
    """

    if accelerator.num_processes == 1:
        return values
    count = torch.tensor([values.shape[0]], device=values.device)
    counts = accelerator.gather(count).tolist()
    padded = accelerator.pad_across_processes(values.detach().contiguous(), dim=0)
    gathered = accelerator.gather(padded).view(len(counts), -1)
    return torch.cat([gathered[i, :n] for i, n in enumerate(counts)])


def release_gathered(model) -> None:
    """Reshard an FSDP2 model whose root stayed gathered after a forward without backward (a reference pass).

    FSDP2 keeps the root unit's weights (embeddings, final norm, head) gathered after the forward,
    expecting a backward; a frozen reference never has one, so they would stay whole on every process.
    """
    try:
        from torch.distributed.fsdp import FSDPModule  # absent from torch builds without FSDP2
    except ImportError:  # torch without FSDP2
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


class AfterEngineStarts(TrainerCallback):
    """A Trainer callback that runs ``action()`` once, when training begins: after the engine wrapped the model.

    Reference log-probs computed before that point would run the policy outside the engine: under
    ZeRO-3 its weights are then empty shards (TRL's "'weight' must be 2-D"), under FSDP2 with
    ``cpu_ram_efficient_loading`` they are not loaded yet on processes other than the first.
    """

    def __init__(self, action):
        self.action = action
        self.done = False

    def on_train_begin(self, args, state, control, **kwargs):
        """Run the action the first time training begins."""
        if not self.done:
            self.done = True
            self.action()
