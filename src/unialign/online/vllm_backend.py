"""Sampling online rollouts with a vLLM engine living in the training process ("colocated").

The engine is created once from the policy's starting weights and, before each rollout that
follows an optimizer step, receives the policy's current weights (LoRA merged in) under the
plain model's parameter names. Completions come back as :class:`~unialign.generation.Generation`
objects, exactly as the transformers backend returns them, so the rest of the step is unchanged.

Scope: one training process per engine (``world_size`` 1). Tensor-parallel engines, ZeRO-3 and
FSDP parameter gathering are not handled; :func:`check_vllm_setup` refuses those setups by name.
"""

# Deferred imports: vllm (an optional engine, imported only when generation_backend is vllm).

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from unialign.data.tokenize import stop_token_ids
from unialign.generation import Generation, GenerationConfig, to_generation
from unialign.trainer import unwrap_peft


def _plain_name(name: str) -> str | None:
    """The parameter's name in the plain model, or None for adapter-only parameters."""
    if ".lora_" in name or ".original_module." in name:
        return None
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


@contextmanager
def merged_weights(model) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The model's current weights as ``(plain name, tensor)`` pairs, with LoRA adapters merged in.

    For a PEFT model the adapters are merged for the duration of the ``with`` block and unmerged
    after it, so training continues on the unmerged adapter. The tensors alias the live weights:
    copy them out (vLLM's ``load_weights`` does) before leaving the block.
    """
    peft = unwrap_peft(model)
    if peft is None:
        yield [(name, param.data) for name, param in model.named_parameters()]
        return
    peft.merge_adapter()
    try:
        pairs = []
        for name, param in peft.named_parameters():
            plain = _plain_name(name)
            if plain is not None:
                pairs.append((plain, param.data))
        yield pairs
    finally:
        peft.unmerge_adapter()


def check_vllm_setup(world_size: int, deepspeed_stage: int | None, fsdp: bool) -> None:
    """Refuse distributed setups the colocated engine does not handle, naming what to change."""
    if world_size > 1:
        raise ValueError(
            f"generation_backend: vllm runs one colocated engine in one process; this run has {world_size} "
            "processes. Launch a single process, or use generation_backend: transformers for multi-process runs."
        )
    if (deepspeed_stage or 0) >= 3 or fsdp:
        raise ValueError(
            "generation_backend: vllm needs the full policy weights in one process, which ZeRO-3 and FSDP shard; "
            "use ZeRO-2 or no sharding, or generation_backend: transformers"
        )


class VLLMGenerator:
    """A colocated vLLM engine that samples like :func:`unialign.generation.generate_from_ids`.

    Args:
        model_path: a folder (or hub id) in the Hugging Face layout holding the policy's architecture
            and starting weights; the engine loads it once.
        gpu_memory_utilization: the share of GPU memory vLLM may take (weights + KV cache); the rest
            is left to training.
        max_model_len: the longest prompt + completion the engine must hold.
        seed: the engine's sampling seed.
        dtype: the engine's dtype (``auto`` follows the checkpoint).
    """

    def __init__(self, model_path: str, *, gpu_memory_utilization: float, max_model_len: int, seed: int,
                 dtype: str = "auto"):
        # The engine must live in this process so that its model object can receive the policy's weights.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        self.llm = LLM(model=model_path, gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       seed=seed, dtype=dtype, enable_prefix_caching=True)
        self.synced_step: int | None = None

    def _engine_model(self):
        return self.llm.llm_engine.model_executor.driver_worker.model_runner.model

    def sync_weights(self, model, step: int) -> bool:
        """Push ``model``'s current weights into the engine unless they were pushed at this ``step``.

        Returns whether weights were pushed. Prefix-cache entries computed with the old weights are dropped.
        """
        if self.synced_step == step:
            return False
        with merged_weights(model) as pairs:
            self._engine_model().load_weights(pairs)
        self.llm.reset_prefix_cache()
        self.synced_step = step
        return True

    def generate(self, prompt_ids: list[list[int]], config: GenerationConfig, tokenizer) -> list[list[Generation]]:
        """``config.num_return_sequences`` samples per prompt, as :class:`Generation` lists in prompt order."""
        from vllm import SamplingParams

        stops = stop_token_ids(tokenizer)
        params = SamplingParams(
            n=config.num_return_sequences,
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_new_tokens,
            repetition_penalty=1.0 if config.repetition_penalty is None else config.repetition_penalty,
            stop_token_ids=stops,
            seed=config.seed,
        )
        outputs = self.llm.generate([{"prompt_token_ids": list(ids)} for ids in prompt_ids], params, use_tqdm=False)
        return [[to_generation(_with_stop(sample, stops, tokenizer), tokenizer, stops) for sample in output.outputs]
                for output in outputs]


def _with_stop(sample, stops: list[int], tokenizer) -> list[int]:
    """A vLLM sample's ids ending in the stop token it stopped on: vLLM may or may not list that token.

    ``stop_reason`` is the stop token's id for ``stop_token_ids`` and ``None`` for the model's own EOS.
    """
    ids = list(sample.token_ids)
    if sample.finish_reason == "stop" and not any(t in stops for t in ids):
        reason = getattr(sample, "stop_reason", None)
        ids.append(reason if isinstance(reason, int) else tokenizer.eos_token_id)
    return ids
