"""PPO's value model: a scalar head on its own copy of a causal-LM backbone, optionally with LoRA adapters.

The model is loaded as a sequence classifier with one label (the backbone of ``value_model_name_or_path``,
by default the policy's starting weights, plus a fresh ``score`` head), as TRL's PPO did, but read at
every position: ``V(s_t)`` for completion token ``t`` is the head applied to the hidden state of the
position before it, the same state the policy's log-prob of that token is read from.
"""

from __future__ import annotations

from torch import Tensor, nn

from unialign.models import apply_lora, disable_dropout, load_model


class ValueModel(nn.Module):
    """Per-position values of a sequence-classification model (possibly a PEFT model around one)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def _inner(self):
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(N, L)`` float32 values: the head on each position's final hidden state."""
        inner = self._inner()
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return inner.score(hidden).squeeze(-1).float()

    def completion_values(self, batch, index: Tensor, mask: Tensor) -> Tensor:
        """``(N, T)`` values of the states before each completion token (``index``: their columns), 0 on padding."""
        values = self(batch.input_ids, batch.attention_mask)
        return values.gather(1, (index - 1).clamp(min=0)) * mask

    def parameter_counts(self) -> dict[str, int]:
        """``{"total": ..., "trainable": ...}`` parameter counts (for the memory account)."""
        params = list(self.parameters())
        return {"total": sum(p.numel() for p in params),
                "trainable": sum(p.numel() for p in params if p.requires_grad)}


def build_value_model(cfg) -> ValueModel:
    """The value model for ``cfg``: ``value_model_name_or_path`` or the policy's checkpoint, LoRA when ``use_peft``."""

    model = load_model(
        cfg.value_model_name_or_path or cfg.model_name_or_path,
        dtype=cfg.torch_dtype,
        kind="sequence_classifier",
        trust_remote_code=cfg.trust_remote_code,
        allow_pickle=cfg.allow_pickle,
        num_labels=1,
    )
    if getattr(model, "score", None) is None:
        raise ValueError(
            f"config key 'value_model_name_or_path': {type(model).__name__} has no 'score' head to read values from"
        )
    if cfg.use_peft:
        model = apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target_modules,
                           task_type="SEQ_CLS")
    if cfg.disable_dropout:
        disable_dropout(model)
    return ValueModel(model)
