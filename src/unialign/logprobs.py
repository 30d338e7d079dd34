"""Token and sequence log-probs (docs/data.md, tokenization) without building full-vocabulary logits.

The model runs once over the batch with ``logits_to_keep=1``, so it never returns the
``(N, L, V)`` logits; we take the final hidden state and project only the positions whose next
token is scored. :class:`ChunkedTokenLogps` does that projection chunk by chunk and recomputes each
chunk's logits in backward instead of keeping them, so peak memory grows with the number of scored
tokens × hidden size, not × vocabulary (49k for SmolLM2).
"""

from __future__ import annotations

import torch
from torch import Tensor


class ChunkedTokenLogps(torch.autograd.Function):
    """``log softmax(h·Wᵀ + b)[target]`` for rows of ``h``, computed and differentiated in chunks.

    Two ways to differentiate. When the head is trained (full fine-tuning), backward recomputes each
    chunk's logits, because the head's gradient needs the upstream gradient and the softmax together.
    When only ``h`` needs a gradient (a frozen head: LoRA, or a frozen reference), each output is a
    scalar per row, so its gradient with respect to ``h`` is ``g · (onehot(t) − softmax)·W``: forward
    computes that Jacobian row (``(rows, hidden)``, small) from the logits it already has, and
    backward only scales it, saving the recompute (one ``rows × hidden × vocab`` matmul).
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_size: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        jacobian_first = need_h and not need_w and not (need_b and bias is not None)
        jacobian = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device) if jacobian_first else None
        for start in range(0, hidden.shape[0], chunk_size):
            chunk_targets = targets[start : start + chunk_size, None]
            logits = _chunk_logits(hidden[start : start + chunk_size], weight, bias)
            picked = logits.gather(1, chunk_targets).squeeze(1)
            normalizer = torch.logsumexp(logits, dim=-1)
            out[start : start + chunk_size] = picked - normalizer
            if jacobian is not None:
                # onehot(t) − softmax, built in place over the logits: d(logit_t − logsumexp)/d logits
                grad_logits = logits.sub_(normalizer[:, None]).exp_().neg_()
                grad_logits.scatter_add_(1, chunk_targets, torch.ones_like(chunk_targets, dtype=grad_logits.dtype))
                jacobian[start : start + chunk_size] = grad_logits @ weight.float()
        if jacobian is not None:
            ctx.save_for_backward(jacobian)
        else:
            ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size, ctx.jacobian_first, ctx.hidden_dtype = chunk_size, jacobian is not None, hidden.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.jacobian_first:
            (jacobian,) = ctx.saved_tensors
            return (jacobian * grad_out.float()[:, None]).to(ctx.hidden_dtype), None, None, None, None
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = None  # the first chunk's product is written fresh (no zero-filled vocab × hidden buffer)
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b and bias is not None else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            end = start + ctx.chunk_size
            h = hidden[start:end]
            g = grad_out[start:end].float()
            # d(logit_t − logsumexp)/d logits = onehot(t) − softmax
            grad_logits = torch.softmax(_chunk_logits(h, weight, bias), dim=-1).mul_(-g[:, None])
            grad_logits.scatter_add_(1, targets[start:end, None], g[:, None])
            if need_h:
                grad_h[start:end] = (grad_logits @ weight.float()).to(hidden.dtype)
            if need_w:
                grad_w = grad_logits.t() @ h.float() if grad_w is None else grad_w.addmm_(grad_logits.t(), h.float())
            if grad_b is not None:
                grad_b += grad_logits.sum(0)
        cast = lambda t, like: None if t is None else t.to(like.dtype)
        return grad_h, cast(grad_w, weight), cast(grad_b, bias) if bias is not None else None, None, None


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    logits = hidden.float() @ weight.float().t()
    return logits + bias.float() if bias is not None else logits


def final_hidden_and_head(
    model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor | None = None, model_kwargs=None
) -> tuple[Tensor, torch.nn.Module]:
    """The last hidden state (what the LM head reads) and the LM head, from one forward pass."""
    extra = dict(model_kwargs or {})
    if position_ids is not None:
        extra["position_ids"] = position_ids
    outputs = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        output_hidden_states=True,
        logits_to_keep=1,
        use_cache=False,
        **extra,
    )
    return outputs.hidden_states[-1], unwrap(model).get_output_embeddings()


def token_logps(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    target_mask: Tensor,
    *,
    impl: str = "chunked",
    chunk_size: int = 1024,
    position_ids: Tensor | None = None,
    source_index: Tensor | None = None,
    model_kwargs: dict | None = None,
) -> Tensor:
    """Log-prob of each token marked in ``target_mask`` given the tokens before it; 0 elsewhere.

    Args:
        target_mask: ``(N, L)`` bool, true at the positions whose token is scored (never position 0).
        impl: ``chunked`` (hidden states × LM head on scored positions only) or ``full`` (plain
            logits; for models whose head is not a plain linear map, or sharded engines).
        attention_mask: ``(N, L)`` padding mask, or a 4D ``(N, 1, L, L)`` additive mask (packed rows).
        position_ids: ``(N, L)`` positions for packed rows (default: the model's ``0..L-1``).
        source_index: ``(N, L)`` column whose hidden state predicts each position (default: the
            previous column). Packed rows use it so that every completion is predicted from the end
            of its prompt, not from the end of the completion packed before it.
        model_kwargs: further keyword arguments of the model's forward (the segment plan of packed rows,
            which reaches the attention function).
    Returns:
        ``(N, L)`` float32 tensor.
    """
    rows, cols = target_mask[:, 1:].nonzero(as_tuple=True)
    cols = cols + 1
    sources = cols - 1 if source_index is None else source_index[rows, cols]
    targets = input_ids[rows, cols]
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
    if impl == "full":
        extra = dict(model_kwargs or {})
        if position_ids is not None:
            extra["position_ids"] = position_ids
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **extra).logits
        picked = logits[rows, sources].float().log_softmax(-1)
        values = picked.gather(1, targets[:, None]).squeeze(1)
    else:
        hidden, head = final_hidden_and_head(model, input_ids, attention_mask, position_ids, model_kwargs)
        values = ChunkedTokenLogps.apply(
            hidden[rows, sources], head.weight, getattr(head, "bias", None), targets, chunk_size
        )
    out[rows, cols] = values
    return out


def sequence_logps(token_values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Summed log-probs and token counts per sequence over ``mask``: ``((N,), (N,))``."""
    return (token_values * mask).sum(-1), mask.sum(-1)


def strip_wrappers(model):
    """The model inside DDP/accelerate wrappers (a PEFT model stays a PEFT model)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def unwrap(model):
    """The underlying transformers model inside DDP/accelerate and PEFT wrappers."""
    model = strip_wrappers(model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def chunked_head_is_exact(model) -> bool:
    """Whether projecting the last hidden state with the LM head reproduces the model's logits.

    False for heads that post-process logits (soft-capping, scaling); the trainer then uses the
    plain ``full`` path.
    """
    device = next(model.parameters()).device
    ids = torch.arange(1, 9, device=device)[None] % unwrap(model).config.vocab_size
    mask = torch.ones_like(ids)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        hidden, head = final_hidden_and_head(model, ids, mask)
        projected = head(hidden)
    return torch.allclose(projected.float(), logits.float(), atol=1e-4, rtol=1e-4)
