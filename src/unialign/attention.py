"""Segment attention: packed rows whose attention is confined per segment, with memory linear in the row.

A packed row holds several sequences end to end (``padding_free``), or one prompt followed by the
completions that share it (``prefix_sharing``), or both. The dense way to keep them apart is a
``(rows, 1, W, W)`` mask, quadratic in the row width ``W``. Here each row carries a list of
:class:`Segment` s instead, and the attention runs one ``scaled_dot_product_attention`` call per
segment over the slices it may see:

* a sequence or a prompt: its own queries and keys, ``is_causal`` (no mask at all);
* a completion after a shared prompt: its queries against the prompt's keys and its own, never the
  other completions packed between them (a key slice spanning those with a mask hiding them would
  have the kernel score them all: work quadratic in K).

On CPU a layer's segments run in one autograd function over the CPU flash kernel's own forward and
backward ops (:class:`_SegmentAttentionCPU`): a completion after a shared prompt is two unmasked calls,
over the prompt's keys and over its own (``is_causal``), merged by their log-sum-exps; every segment
writes into the one output; backward keeps only the layer's query, key and value, that output and a
log-sum-exp per segment. Elsewhere (a GPU, attention dropout) each segment is one SDPA call, over the
prompt's keys joined to its own with a small ``C × (P + C)`` mask, where PyTorch picks its fused
kernels per call. Nothing of size ``W × W`` is built on either path.

The function is registered with transformers' ``AttentionInterface`` as ``unialign_sdpa``; a model
switched to it (:func:`use_segment_attention`) behaves exactly as under ``sdpa`` unless a forward
passes ``unialign_segments``, so generation, the plain layout and gradient-checkpoint recomputation
need nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

SEGMENT_ATTENTION = "unialign_sdpa"


@dataclass(frozen=True)
class Segment:
    """Queries ``[start, end)`` of a row attend keys ``[key_start, prefix_end)`` (a shared prompt) and,
    causally, ``[start, end)``. A plain sequence or a prompt has ``key_start == prefix_end == start``."""

    key_start: int
    prefix_end: int
    start: int
    end: int

    @property
    def prefix_keys(self) -> int:
        """How many shared-prompt keys the segment attends before its own (0 for a plain sequence or a prompt)."""
        return self.prefix_end - self.key_start

    @property
    def has_prefix(self) -> bool:
        return self.prefix_keys > 0

    @property
    def mask_shape(self) -> tuple[int, int]:
        """Queries × (the prefix's keys, then the segment's own): the shape of its mask after a shared prompt."""
        queries = self.end - self.start
        return queries, self.prefix_keys + queries


@dataclass
class SegmentPlan:
    """The segments of every row of a packed batch; the small masks of those after a shared prompt are made
    only by the path that reads them (not the CPU function, which needs none), once per batch and device.

    :attr:`masks` ``[r][i]`` is ``None`` for a segment without a prefix, else a
    ``(end − start, (prefix_end − key_start) + (end − start))`` bool tensor over the prefix's keys then
    the segment's own (true where a query may attend a key).
    """

    rows: list[list[Segment]]
    _masks: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def build(cls, rows: list[list[Segment]]) -> SegmentPlan:
        """Check that every segment is ordered ``key_start <= prefix_end <= start < end``."""
        for segments in rows:
            for seg in segments:
                if not (seg.key_start <= seg.prefix_end <= seg.start < seg.end):
                    raise ValueError(f"segment {seg} is not ordered key_start <= prefix_end <= start < end")
        return cls(rows)

    def to(self, device, non_blocking: bool = False) -> SegmentPlan:
        """The plan itself: it holds no tensors until a path asks for masks on its own device."""
        return self

    @property
    def masks(self) -> list[list[Tensor | None]]:
        """The boolean masks on the CPU (see the class docstring)."""
        return self._made(torch.bool, torch.device("cpu"))

    def additive_masks(self, dtype: torch.dtype, device) -> list[list[Tensor | None]]:
        """The masks as additive ``0 / -inf`` tensors of ``dtype`` on ``device``, made once and kept.

        Every layer attends with the same masks. A boolean mask is converted by
        ``scaled_dot_product_attention`` inside each call, and autograd keeps each layer's converted
        copy for the backward pass (in float32 ``4 ×`` the mask's elements, per layer); one additive
        mask shared by all layers is kept once.
        """
        return self._made(dtype, torch.device(device))

    def _made(self, dtype: torch.dtype, device: torch.device) -> list[list[Tensor | None]]:
        if (dtype, device) not in self._masks:
            self._masks[(dtype, device)] = [
                [_prefix_mask(seg, dtype, device) if seg.has_prefix else None for seg in row] for row in self.rows]
        return self._masks[(dtype, device)]

    def mask_elements(self) -> int:
        """Elements in all masks together: linear in the row width (the test of "no W × W tensor")."""
        return sum(math.prod(s.mask_shape) for row in self.rows for s in row if s.has_prefix)


def _prefix_mask(seg: Segment, dtype: torch.dtype, device) -> Tensor:
    """Queries × (prefix keys, then the segment's own keys): all of the prefix, causally its own; a bool
    mask (true = may attend) or, for a float ``dtype``, an additive one (0 / −inf)."""
    allowed = torch.ones(seg.mask_shape, dtype=torch.bool, device=device)
    prefix = seg.prefix_keys
    allowed[:, prefix:] = allowed[:, prefix:].tril()
    if dtype == torch.bool:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))


def segment_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """transformers' attention-function signature: ``(B, H, T, D)`` query, ``(B, H_kv, T, D)`` key/value →
    ``(B, T, H, D)`` output. Without ``unialign_segments`` in ``kwargs`` this is transformers' sdpa."""
    plan: SegmentPlan | None = kwargs.pop("unialign_segments", None)
    if plan is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    dropout = dropout if module.training else 0.0
    if query.device.type == "cpu" and not dropout and _HAS_CPU_FLASH_OPS:
        if torch.is_autocast_enabled("cpu"):
            # what autocast does to an SDPA call (RoPE may have left query and key in float32, value in bf16);
            # the kernel's own ops are not on autocast's lists, so they would get the mixed dtypes
            query, key, value = (t.to(torch.get_autocast_dtype("cpu")) for t in (query, key, value))
        return _SegmentAttentionCPU.apply(query, key, value, plan.rows, scaling), None
    masks = plan.additive_masks(query.dtype, query.device)
    batch, heads, width, head_dim = query.shape
    grouped = heads != key.shape[1]  # grouped-query attention: each key/value head serves several query heads
    # PyTorch's CPU flash kernel takes grouped heads with or without a mask; CUDA's fused kernels only without one
    repeat = grouped and query.device.type != "cpu"
    if repeat:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    gqa = {"enable_gqa": True} if grouped and not repeat else {}
    # written in the (B, T, H, D) layout transformers expects, so no transposed copy of the whole output follows;
    # positions in no segment (row padding) read 0
    out = query.new_zeros((batch, width, heads, head_dim))
    for row, (segments, row_masks) in enumerate(zip(plan.rows, masks)):
        for seg, mask in zip(segments, row_masks):
            q = query[row : row + 1, :, seg.start : seg.end]
            k, v = _segment_keys(key, value, row, seg)
            piece = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None,
                                                   scale=scaling, **gqa)
            out[row, seg.start : seg.end] = piece[0].transpose(0, 1)
    return out, None


def _segment_keys(key: Tensor, value: Tensor, row: int, seg: Segment) -> tuple[Tensor, Tensor]:
    """The keys and values ``seg``'s queries attend (:func:`_key_parts`) as one tensor each: its own slice (a
    view), or after a shared prompt the prompt's joined to its own (the completions packed between them are
    not computed at all; a key slice spanning them with a mask hiding them would have the kernel score them
    all, work quadratic in K)."""
    parts = [cols for cols, _ in _key_parts(seg)]
    if len(parts) == 1:
        return key[row : row + 1, :, parts[0]], value[row : row + 1, :, parts[0]]
    return tuple(torch.cat([t[row : row + 1, :, cols] for cols in parts], dim=2) for t in (key, value))


_HAS_CPU_FLASH_OPS = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward")


def _key_parts(seg: Segment) -> list[tuple[slice, bool]]:
    """The key ranges ``seg``'s queries attend, each with whether it is causal: its own (causal), after the
    shared prompt's (all of it) when there is one. No mask is needed for either."""
    own = (slice(seg.start, seg.end), True)
    return [(slice(seg.key_start, seg.prefix_end), False), own] if seg.has_prefix else [own]


def _flash(q: Tensor, key: Tensor, value: Tensor, row: int, cols: slice, causal: bool, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, key[row : row + 1, :, cols], value[row : row + 1, :, cols], 0.0, causal, scale=scale)


def merge_by_lse(first: tuple[Tensor, Tensor], second: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Attention over two key sets from the calls over each: ``(output (B, H, T, D), log-sum-exp (B, H, T))``
    pairs merged as the softmax over both sets is, the two partial softmaxes weighted by their log-sum-exps
    (summed in float32, returned in the outputs' dtype)."""
    (out_a, lse_a), (out_b, lse_b) = first, second
    lse = torch.logaddexp(lse_a, lse_b)
    out = out_a.float() * (lse_a - lse).exp().unsqueeze(-1) + out_b.float() * (lse_b - lse).exp().unsqueeze(-1)
    return out.to(out_a.dtype), lse


class _SegmentAttentionCPU(torch.autograd.Function):
    """A layer's segment attention on CPU, keeping for backward only what it cannot do without.

    Through ``scaled_dot_product_attention`` autograd would keep, per segment, the call's output (its
    backward needs it) besides the assembled output ``o_proj`` reads — one ``W × hidden`` tensor more
    per layer than one call over the row — and, after a shared prompt, the joined copy of the keys and
    values, ``(P + C) × 2 × H_kv × D`` per completion (1.4 GB over SmolLM2-135M at P = 4096, K = 8).
    Here each segment runs the CPU flash kernel's own forward op and writes into the one output; a
    completion after a shared prompt runs it twice, over the prompt's keys (no mask) and over its own
    (``is_causal``, so the kernel skips the upper triangle a mask would have it compute), merged by
    their log-sum-exps. Backward runs the kernel's backward op per part with the merged output's slice
    and log-sum-exp. Kept are the layer's query, key and value (kept anyway), the output (which
    ``o_proj`` keeps anyway) and each segment's log-sum-exp; no mask is used at all.
    """

    @staticmethod
    def forward(ctx, query, key, value, rows, scale):
        batch, heads, width, head_dim = query.shape
        out = query.new_zeros((batch, width, heads, head_dim))
        lses = []
        for row, segments in enumerate(rows):
            for seg in segments:
                q = query[row : row + 1, :, seg.start : seg.end]
                parts = [_flash(q, key, value, row, cols, causal, scale) for cols, causal in _key_parts(seg)]
                piece, lse = parts[0] if len(parts) == 1 else merge_by_lse(*parts)
                out[row, seg.start : seg.end] = piece[0].transpose(0, 1)
                lses.append(lse)
        ctx.save_for_backward(query, key, value, out, *lses)
        ctx.rows, ctx.scale = rows, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        query, key, value, out, *lses = ctx.saved_tensors
        grads = [torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)]
        lse = iter(lses)
        for row, segments in enumerate(ctx.rows):
            for seg in segments:
                own = slice(seg.start, seg.end)
                grad, done = (t[row : row + 1, own].transpose(1, 2).contiguous() for t in (grad_out, out))
                seg_lse = next(lse)
                for cols, causal in _key_parts(seg):
                    # each part's backward with the whole softmax's output and log-sum-exp gives that part's
                    # share of the gradients exactly (the kernel's row term dO·O and probabilities use them)
                    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                        grad, query[row : row + 1, :, own], key[row : row + 1, :, cols], value[row : row + 1, :, cols],
                        done, seg_lse, 0.0, causal, scale=ctx.scale)
                    grads[0][row : row + 1, :, own] += dq
                    grads[1][row : row + 1, :, cols] += dk
                    grads[2][row : row + 1, :, cols] += dv
        return *grads, None, None


# A packed forward passes this 4D stand-in as its attention mask: transformers returns a 4D mask as it is, so it
# builds no (rows, 1, W, W) mask of its own; the segment plan alone confines attention. It is NaN, so a kernel
# that applied it instead of the plan (a model not switched to segment attention) gives NaN, never plausible
# wrong values (an all-false boolean mask would not do: PyTorch's kernels return 0 for fully masked rows).
def placeholder_mask(rows: int, device, dtype=torch.float32) -> Tensor:
    """The ``(rows, 1, 1, 1)`` NaN stand-in mask of a packed forward."""
    return torch.full((rows, 1, 1, 1), float("nan"), dtype=dtype, device=device)


AttentionInterface.register(SEGMENT_ATTENTION, segment_attention_forward)
AttentionMaskInterface.register(SEGMENT_ATTENTION, sdpa_mask)  # unpacked forwards get sdpa's own masks


def can_use_segment_attention(model) -> bool:
    """Whether a transformers model runs ``sdpa`` or segment attention (what :func:`use_segment_attention` takes)."""
    return getattr(model.config, "_attn_implementation", None) in ("sdpa", SEGMENT_ATTENTION)


def use_segment_attention(model) -> None:
    """Switch a transformers model (running ``sdpa``) to :data:`SEGMENT_ATTENTION`; a no-op when already switched.

    The switch is kept (not undone per forward) because gradient checkpointing recomputes each layer
    during backward, after any per-forward switch would have been undone.
    """
    if model.config._attn_implementation != SEGMENT_ATTENTION:
        model.set_attn_implementation(SEGMENT_ATTENTION)
