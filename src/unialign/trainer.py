"""The single trainer: batch → log-probs → method loss → metrics.

A :class:`~unialign.losses.registry.Method` declares what its loss reads; this trainer computes
exactly that: policy log-probs always, reference log-probs only when ``needs_reference`` (from a
frozen model, the PEFT base with adapters disabled, or values precomputed into the dataset),
prompt log-probs only for RAO, mismatched pairs only for KTO.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import torch
from torch import Tensor
from transformers import Trainer

from unialign.data.tokenize import TokenizedExample
from unialign.logprobs import chunked_head_is_exact, sequence_logps, strip_wrappers, token_logps
from unialign.losses.base import MethodInputs
from unialign.losses.registry import Method

logger = logging.getLogger(__name__)


class UnialignTrainer(Trainer):
    """``transformers.Trainer`` driven by a registered method.

    Args:
        method: the registry entry whose loss is minimized.
        ref_model: a frozen reference model, or ``None`` (adapter-disabled PEFT base, precomputed
            values, or a method that needs no reference).
        Everything else is passed to ``transformers.Trainer``; ``args`` is a ``UnialignConfig``.
    """

    def __init__(self, *args, method: Method, ref_model=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method = method
        self.model_accepts_loss_kwargs = False  # our loss is a per-micro-batch mean: let Trainer scale it
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.reference_forwards = 0
        self.ref_model = None
        if ref_model is not None:
            self.ref_model = ref_model.to(self.accelerator.device).eval().requires_grad_(False)
        impl = self.args.logprob_impl
        if method.model_kind != "causal_lm":
            impl = "full"  # a classifier head scores whole sequences; there are no token log-probs
        elif impl == "auto":
            sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
            impl = "full" if sharded or not chunked_head_is_exact(self.model) else "chunked"
        self.logprob_impl = impl

    # ----------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The method's loss on one micro-batch; its metrics are kept for the next log line."""
        output = self.method.loss(self.method_inputs(model, inputs), self.args)
        if not torch.isfinite(output.loss):
            raise FloatingPointError(
                f"{self.method.name} loss is {output.loss.item()} at step {self.state.global_step}"
            )
        self._store_metrics(output.metrics, "train" if model.training else "eval")
        return (output.loss, output.metrics) if return_outputs else output.loss

    def method_inputs(self, model, batch: dict) -> MethodInputs:
        """Compute the tensors the method declared, in one policy forward (and one reference forward)."""
        slot_seq = batch["slot_seq"]
        completion_mask = slot_seq >= 0
        if self.method.model_kind == "sequence_classifier":
            scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
            lengths = gather_slots(batch["target_mask"].sum(-1).float(), slot_seq)
            return MethodInputs(
                policy_logps=torch.zeros_like(lengths),
                lengths=lengths,
                completion_mask=completion_mask,
                rm_rewards=gather_slots(scores.float(), slot_seq),
                targets=self._targets(batch),
                rewards=batch.get("rewards"),
            )
        policy = self._logps(model, batch)
        inputs = MethodInputs(
            policy_logps=gather_slots(policy["seq"], slot_seq),
            lengths=gather_slots(policy["len"], slot_seq),
            completion_mask=completion_mask,
            targets=self._targets(batch),
            rewards=batch.get("rewards"),
            prompt_logps=policy.get("prompt"),
            kl_logps=policy.get("kl"),
        )
        if self.method.needs_reference:
            if "ref_logps" in batch:
                inputs.ref_logps = batch["ref_logps"]
                inputs.ref_prompt_logps = batch.get("ref_prompt_logps")
                inputs.ref_kl_logps = batch.get("ref_kl_logps")
            else:
                ref = self.reference_logps(batch)
                inputs.ref_logps = gather_slots(ref["seq"], slot_seq)
                inputs.ref_prompt_logps, inputs.ref_kl_logps = ref.get("prompt"), ref.get("kl")
        return inputs

    def _targets(self, batch: dict) -> Tensor | None:
        """Per-slot targets in [0, 1]: normalized scores when the method wants them and rows have them, else labels."""
        want = self.method.targets_from
        if want is None:
            return None
        if want == "scores" and "scores" in batch:
            return batch["scores"]
        if "labels" in batch:
            return batch["labels"]
        raise ValueError(f"{self.method.name} needs per-completion {want} but the batch has none")

    def _logps(self, model, batch: dict) -> dict[str, Tensor]:
        mask = batch["target_mask"]
        scored = mask | batch["prompt_target_mask"] if "prompt_target_mask" in batch else mask
        values = token_logps(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            scored,
            impl=self.logprob_impl,
            chunk_size=self.args.logprob_chunk_size,
        )
        seq, length = sequence_logps(values, mask)
        out = {"seq": seq, "len": length.float()}
        if "prompt_target_mask" in batch:
            out["prompt"] = (values * batch["prompt_target_mask"]).sum(-1)[batch["prompt_seq"]]
        if "kl_seq" in batch:
            out["kl"] = seq[batch["kl_seq"]]
        return out

    @torch.no_grad()
    def reference_logps(self, batch: dict) -> dict[str, Tensor]:
        """Reference log-probs of a batch: frozen model, or the policy with its adapters disabled."""
        self.reference_forwards += 1
        if self.ref_model is not None:
            return self._logps(self.ref_model, batch)
        policy = unwrap_peft(self.model)
        if policy is None:
            raise RuntimeError(
                f"{self.method.name} needs a reference, but there is no reference model and no PEFT adapter to disable"
            )
        was_training = self.model.training
        self.model.eval()
        try:
            with policy.disable_adapter():
                return self._logps(self.model, batch)
        finally:
            self.model.train(was_training)

    def precompute_reference(self, examples: list[TokenizedExample], batch_size: int) -> None:
        """Fill ``ref_logps`` (and prompt/KL reference terms) into every example, once.

        Afterwards no reference forward runs during training, and a separate reference model is freed.
        """
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = self._prepare_inputs(self.data_collator(chunk))
            ref = self.reference_logps(batch)
            per_slot = gather_slots(ref["seq"], batch["slot_seq"]).cpu()
            for row, example in enumerate(chunk):
                example.ref_logps = per_slot[row, : len(example.completion_ids)].tolist()
                if "prompt" in ref:
                    example.ref_prompt_logps = float(ref["prompt"][row])
                if "kl" in ref:
                    example.ref_kl_logps = float(ref["kl"][row])

    def release_reference_model(self) -> None:
        """Drop the separate reference model (after precomputing, nothing needs it)."""
        self.ref_model = None

    # ----------------------------------------------------------------- eval and logging
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the same loss and metrics; there are no logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _store_metrics(self, metrics: dict[str, Tensor], split: str) -> None:
        for key, value in metrics.items():
            value = value.detach().float().reshape(1)
            self._metrics[split][key].append(self.accelerator.gather_for_metrics(value).mean().item())

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the method's metrics, averaged since the last log line, to Trainer's logs."""
        split = "train" if "loss" in logs else "eval"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._metrics[split].items():
            logs[prefix + key] = sum(values) / len(values)
        self._metrics[split].clear()
        super().log(logs, *args, **kwargs)


def gather_slots(per_sequence: Tensor, slot_seq: Tensor) -> Tensor:
    """``(B, K)`` view of per-sequence values; empty slots (index −1) read as 0."""
    values = per_sequence[slot_seq.clamp(min=0)]
    return torch.where(slot_seq >= 0, values, torch.zeros_like(values))


def unwrap_peft(model):
    """The PEFT model inside any wrappers, or ``None`` when the model has no adapters."""
    model = strip_wrappers(model)
    return model if hasattr(model, "disable_adapter") else None
