"""Selective activation checkpointing: keep each layer's attention output instead of recomputing it.

With ``activation_checkpointing`` every decoder layer runs its forward twice, the second time in
backward to rebuild what its backward needs. At long lengths the attention kernel is the costliest
part of that recompute (quadratic in the row), while its output is small: ``tokens × heads × head_dim``
plus a log-sum-exp per query, the same size as the layer's input. This module changes the layers'
checkpoint function so that, under PyTorch's selective checkpointing
(``torch.utils.checkpoint.create_selective_checkpoint_contexts``), the fused attention kernels' outputs
are saved in the forward and reused by the recompute, and everything else is recomputed as before.
Gradients are unchanged: the saved outputs are the values the recompute would produce.

It applies where attention is one kernel call: SDPA's fused kernels (flash, memory-efficient, cuDNN,
the CPU flash kernel), unialign's segment attention (which calls the CPU flash kernel per segment) and
flash-attn's own ops. Under ``eager`` attention there is no such kernel, and nothing is saved.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
from transformers.modeling_layers import GradientCheckpointingLayer

_ATEN_KERNELS = (
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
    "_scaled_dot_product_fused_attention_overrideable",
)
_FLASH_ATTN_KERNELS = ("_flash_attn_forward", "_flash_attn_varlen_forward")


def attention_kernels() -> frozenset:
    """The forward ops of the fused attention kernels this PyTorch has (and flash-attn's, once it is imported)."""
    ops = {getattr(torch.ops.aten, name).default for name in _ATEN_KERNELS if hasattr(torch.ops.aten, name)}
    flash_attn = torch.ops.flash_attn  # a namespace that exists whether or not flash-attn registered ops in it
    ops |= {getattr(flash_attn, name).default for name in _FLASH_ATTN_KERNELS if hasattr(flash_attn, name)}
    return frozenset(ops)


def _save_attention(kernels: frozenset, ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in kernels else CheckpointPolicy.PREFER_RECOMPUTE


def attention_saving_context():
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(use_reentrant=False)``: save the attention kernels'
    outputs, recompute the rest. Called once per checkpointed call, so kernels registered late are seen."""
    return create_selective_checkpoint_contexts(functools.partial(_save_attention, attention_kernels()))


def save_attention_in_checkpoints(model: torch.nn.Module) -> int:
    """Make every checkpointed layer of ``model`` keep its attention output (see the module docstring).

    Call it after ``model.activation_checkpointing_enable(...)``; calling it again changes nothing. Returns the
    number of checkpointed decoder layers. Raises ``ValueError`` when no layer is checkpointed, when the checkpoint
    is the reentrant kind (selective checkpointing needs ``use_reentrant: false``), or when the checkpoint
    already has a ``context_fn`` of its own.
    """
    wrapped: dict[int, functools.partial] = {}
    checkpointed = layers = 0
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is None or not getattr(module, "gradient_checkpointing", False):
            continue
        # the model's top module carries the flag too; only the repeated blocks are counted
        checkpointed += 1
        layers += isinstance(module, GradientCheckpointingLayer)
        keywords = getattr(func, "keywords", {})
        if keywords.get("context_fn") is attention_saving_context:
            continue
        if id(func) not in wrapped:
            if keywords.get("use_reentrant") is not False:  # unset, torch's checkpoint defaults to reentrant
                raise ValueError(
                    "activation_checkpointing_save_attention needs non-reentrant checkpointing: set "
                    "activation_checkpointing_kwargs use_reentrant: false (the default)"
                )
            if "context_fn" in keywords:
                raise ValueError(
                    "activation_checkpointing_save_attention: the checkpoint already has a context_fn of its own"
                )
            wrapped[id(func)] = functools.partial(func, context_fn=attention_saving_context)
        module._gradient_checkpointing_func = wrapped[id(func)]
    if not checkpointed:
        raise ValueError(
            "activation_checkpointing_save_attention: no layer of the model is checkpointed; it needs "
            "activation_checkpointing: true"
        )
    return layers


def attention_saving_layers(model: torch.nn.Module) -> int:
    """How many checkpointed decoder layers of ``model`` keep their attention output: those whose checkpoint
    function carries :func:`attention_saving_context`, set by :func:`save_attention_in_checkpoints` or passed in
    ``activation_checkpointing_kwargs`` (``functools.partial`` flattens, so both read as one keyword)."""
    return sum(
        isinstance(m, GradientCheckpointingLayer)
        and getattr(m, "gradient_checkpointing", False)
        and getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", {}).get("context_fn")
        is attention_saving_context
        for m in model.modules()
    )
