"""The single trainer: batch → log-probs → method loss → metrics.

A :class:`~unialign.losses.registry.Method` declares what its loss reads; this trainer computes
exactly that: policy log-probs always, reference log-probs only when ``needs_reference`` (from a
frozen model, the PEFT base with adapters disabled, or values precomputed into the dataset),
prompt log-probs only for the methods that read them (RAO, ORPO over prompt and completion),
mismatched pairs only for KTO.
"""

from __future__ import annotations

import inspect
import logging
import math
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate.utils import gather_object
from torch import Tensor
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length

from unialign.allocator import keep_freed_memory, process_is_owned
from unialign.attention import (
    SEGMENT_ATTENTION,
    can_use_segment_attention,
    placeholder_mask,
    use_segment_attention,
)
from unialign.checkpointing import save_attention_in_checkpoints
from unialign.checkpoints import (
    data_fingerprint,
    is_complete,
    last_checkpoint_hint,
    mark_complete,
    training_settings,
)
from unialign.data.collate import (
    Batch,
    PackedBatch,
    SegmentBatch,
    has_shared_prompts,
    pack_segments,
    pack_shared_prefix,
    split_kl_rows,
)
from unialign.data.tokenize import TokenizedExample
from unialign.data.tokenized import TokenizedDataset, store_values
from unialign.distributed import BUCKET_KEYS, gather_rows, prepare_reference, release_gathered, size_buckets_to_model
from unialign.logprobs import chunked_head_is_exact, sequence_logps, strip_wrappers, token_logps, unwrap
from unialign.losses.base import MethodInputs
from unialign.losses.registry import Method
from unialign.models import compile_blocks
from unialign.rundir import storage_errors

logger = logging.getLogger(__name__)

# Attention implementations that honour a custom 4D mask (transformers' masking_utils passes it through);
# packed log-probs and gradients equal the plain layout's with both (tests/test_attention.py).
PACKED_ATTENTION = ("sdpa", "eager", SEGMENT_ATTENTION)
# Why prefix sharing is switched off under the others (the plain layout is used instead).
UNPACKED_ATTENTION = {
    "flash_attention_2": "flash-attn kernels take no custom 4D mask (only padding or position ids), so the block "
    "mask would be ignored",
    "flex_attention": "transformers turns a dense 4D mask into a FlexAttention score_mod over the whole mask; on "
    "CPU torch's kernel crashed on it (segfault), so it is not used",
}


@dataclass
class LogProbs:
    """Summed log-probs of a batch's sequences under one model.

    Attributes:
        seq / lengths: ``(N,)`` completion log-prob sums and token counts, per sequence.
        prompt / prompt_lengths: ``(B,)`` the prompt tokens after the first, per row (when the batch
            marks them).
        kl: ``(B,)`` KTO's mismatched sequences, per row (when the batch has them).
    """

    seq: Tensor
    lengths: Tensor
    prompt: Tensor | None = None
    prompt_lengths: Tensor | None = None
    kl: Tensor | None = None


class NonFiniteError(FloatingPointError, ValueError):
    """Training stopped on a non-finite loss or gradient norm (``on_nonfinite: stop``); the message says where."""


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
        if self.data_collator is not None and not isinstance(self.data_collator, RowIndexCollator):
            self.data_collator = RowIndexCollator(self.data_collator)
        self._nonfinite_problem: str | None = None  # the first bad micro-batch of the current optimizer step
        self._nonfinite_in_micro_batch = False
        self._nonfinite_since_log = 0
        self._steps_since_log = 0
        self._data_fingerprint: str | None = None
        if size_buckets_to_model(self.accelerator):
            logger.info("DeepSpeed: bucket sizes the launch left unset are sized to the model (%s)", BUCKET_KEYS)
        if ref_model is not None:
            self.ref_model = prepare_reference(self.accelerator, ref_model)
        impl = self.args.logprob_impl
        if method.model_kind != "causal_lm":
            impl = "full"  # a classifier head scores whole sequences; there are no token log-probs
        elif impl == "auto":
            sharded = self.is_fsdp_enabled or self.is_deepspeed_enabled
            impl = "full" if sharded or not chunked_head_is_exact(self.model) else "chunked"
        self.logprob_impl = impl
        keep = self.args.cpu_keep_freed_memory
        if (process_is_owned() if keep is None else keep) and self.accelerator.device.type == "cpu":
            keep_freed_memory()
        self.segment_attention = self._setup_segment_attention()
        if self.args.activation_checkpointing_save_attention:
            self.add_callback(_SaveAttentionInCheckpoints())
        if self.args.compile_layers:
            compiled = compile_blocks(self.model)
            if self.ref_model is not None:
                compile_blocks(self.ref_model)
            logger.info("compile_layers: %d blocks compiled; the first steps include compilation", compiled)

    def _setup_segment_attention(self) -> bool:
        """Whether packed rows use segment attention (``packed_attention: segments``); switches the models to it.

        Falls back to the dense block mask with a logged reason where segment attention cannot run, except
        under ``padding_free``, which has no dense fallback and is refused with the reason.
        """
        args = self.args
        if not (args.prefix_sharing or args.padding_free) or args.packed_attention != "segments":
            return False
        if self.method.model_kind != "causal_lm":
            if args.padding_free:
                raise ValueError(
                    f"padding_free: loss_type {self.method.name} trains a sequence classifier, which reads padded "
                    "sequences; set padding_free: false"
                )
            return False
        inner = unwrap(self.model)
        attention = getattr(inner.config, "_attn_implementation", None)
        problem = self._packing_problem(inner)
        packs_at_all = problem is None and attention in PACKED_ATTENTION
        if problem is None and attention not in ("sdpa", SEGMENT_ATTENTION):
            problem = f"attn_implementation {attention}: segment attention runs over sdpa"
        if problem is None and args.compile_layers:
            problem = "compile_layers: each batch's segment boundaries would recompile the compiled blocks"
        if problem is None and getattr(inner.config, "attn_logit_softcapping", None):
            problem = "the model soft-caps its attention logits, which sdpa does not"
        if problem is not None:
            if args.padding_free:
                raise ValueError(f"padding_free needs segment attention, which this model cannot use: {problem}")
            if packs_at_all:  # else prefix sharing is off altogether, and _shares_prefix says why
                logger.warning(
                    "packed_attention segments is off for this model: %s; the dense block mask is used", problem
                )
            return False
        use_segment_attention(inner)
        if self.ref_model is not None:
            use_segment_attention(unwrap(self.ref_model))
        return True

    # ----------------------------------------------------------------- sampling
    def _get_train_sampler(self, train_dataset=None):
        """Trainer's sampler; the length-aware strategies read each tokenized row's length.

        ``train_sampling_strategy: group_by_length`` (batches of similar length, less padding) and
        ``batch_rebalance`` look for an ``input_ids`` field that tokenized preference rows do not
        have, so their lengths are given here: see :func:`example_length`.
        """
        dataset = self.train_dataset if train_dataset is None else train_dataset
        strategy = self.args.train_sampling_strategy
        length_aware = strategy in ("group_by_length", "batch_rebalance") and has_length(dataset) and len(dataset) > 0
        if isinstance(dataset, TokenizedDataset) and length_aware:
            lengths = dataset.example_lengths(packed=self.args.prefix_sharing)
        elif length_aware and isinstance(dataset[0], TokenizedExample):
            lengths = [example_length(e, packed=self.args.prefix_sharing) for e in dataset]
        else:
            return super()._get_train_sampler(train_dataset)
        accumulation = self.args.gradient_accumulation_steps
        if strategy == "group_by_length":
            return LengthGroupedSampler(self.args.train_batch_size * accumulation, lengths=lengths)
        world = max(1, self.args.world_size)
        return BatchRebalanceSampler(
            lengths=lengths,
            effective_batch_size=self.args.train_batch_size * accumulation * world,
            dp_size=world,
            grad_accum=accumulation,
            rank=self.args.process_index if world > 1 else 0,
            drop_last=self.args.dataloader_drop_last,
        )

    # ----------------------------------------------------------------- loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The method's loss on one micro-batch; its metrics are kept for the next log line.

        A non-finite training loss is never backpropagated: a zero loss with zero gradients stands in for
        it, and :meth:`_get_grad_norm` then stops or skips the optimizer step (``on_nonfinite``).
        """
        output = self.method.loss(self.method_inputs(model, inputs), self.args)
        loss = output.loss
        finite = bool(torch.isfinite(loss))
        if not finite:
            if not model.training:
                raise NonFiniteError(
                    f"{self.method.name} evaluation loss is {loss.item()} after step {self.state.global_step}"
                    f"{describe_rows(inputs)}"
                )
            self._nonfinite_in_micro_batch = True
            if self._nonfinite_problem is None:
                self._nonfinite_problem = (
                    f"{self.method.name} loss is {loss.item()} at step {self.state.global_step + 1}"
                    f"{describe_rows(inputs)}"
                )
            loss = zero_loss(model)
        self._store_metrics(output.metrics, "train" if model.training else "eval", valid=finite)
        return (loss, output.metrics) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        """Trainer's forward and backward; a micro-batch with a non-finite loss reports NaN.

        Trainer's ``logging_nan_inf_filter`` (on by default) then keeps it out of the logged loss.
        """
        self._nonfinite_in_micro_batch = False
        loss = super().training_step(model, inputs, num_items_in_batch)
        return torch.full_like(loss, float("nan")) if self._nonfinite_in_micro_batch else loss

    def _get_grad_norm(self, model, grad_norm=None):
        """Trainer calls this right before ``optimizer.step()``: where a non-finite update is refused.

        Every process takes the same decision: gradients are already reduced across processes, and
        whether any process saw a non-finite loss is reduced here.
        """
        grad_norm = super()._get_grad_norm(model, grad_norm)
        self._steps_since_log += 1
        problem, self._nonfinite_problem = self._nonfinite_problem, None
        seen = torch.tensor(0.0 if problem is None else 1.0, device=self.args.device)
        anywhere = self.accelerator.reduce(seen, reduction="sum").item() > 0
        norm = float(grad_norm) if grad_norm is not None else 0.0
        if not anywhere and math.isfinite(norm):
            return grad_norm
        step = self.state.global_step + 1
        problems = [p for p in gather_object([problem]) if p] if anywhere else []
        problem = "; ".join(problems) or f"gradient norm is {norm} at step {step}"
        # With no gradients, optimizer.step() leaves every parameter and its optimizer state as they are.
        model.zero_grad(set_to_none=True)
        if self.args.on_nonfinite == "skip":
            self._nonfinite_since_log += 1
            logger.warning("%s: skipped this batch, no optimizer step (on_nonfinite: skip)", problem)
            return None
        folder = self._save_last_good_checkpoint(model)
        raise NonFiniteError(
            f"{problem}: the update was not applied and training stopped (on_nonfinite: stop). {folder} holds the "
            f"weights of step {self.state.global_step}, the last good step; resume from it once the cause is "
            "fixed, or set on_nonfinite: skip to skip such batches"
        )

    def _save_last_good_checkpoint(self, model) -> Path:
        folder = Path(self._get_output_dir(trial=None)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if not is_complete(folder):
            self._save_checkpoint(model, trial=None)
        return folder

    @property
    def nonfinite_skipped(self) -> int:
        """Batches skipped for a non-finite loss or gradient so far, those before a resume included."""
        return self._logged_nonfinite_skipped() + self._nonfinite_since_log

    def _logged_nonfinite_skipped(self) -> int:
        for entry in reversed(self.state.log_history):
            if "nonfinite_skipped" in entry:
                return int(entry["nonfinite_skipped"])
        return 0

    # ----------------------------------------------------------------- checkpoints
    def _save_checkpoint(self, model, trial) -> None:
        """Trainer's checkpoint, made crash-safe: a completion marker is written once every process is done.

        A folder left at the same step (by a save that was killed, or an earlier run) is removed first, so
        old and new files never mix. The marker records every file's size and sha256 and the run's
        settings; resume only picks checkpoints whose marker is there and whose files still match it. A
        full disk or a refused permission removes the partial folder and stops with a :class:`StorageError`.
        """
        folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        main = self.args.should_save
        with storage_errors(
            f"saving checkpoint {folder.name} (step {self.state.global_step})",
            folder,
            lambda: f"the partial checkpoint was removed, and {last_checkpoint_hint(folder.parent)}",
            cleanup=folder if main else None,
        ):
            if main and folder.exists():
                shutil.rmtree(folder)
            self.accelerator.wait_for_everyone()
            super()._save_checkpoint(model, trial)
            self.accelerator.wait_for_everyone()
            if main:
                mark_complete(folder, self.state.global_step, self.data_fingerprint, training_settings(self.args))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Trainer's restore, then the configured learning rate, where it differs from the checkpoint's.

        The restored optimizer and scheduler carry the checkpoint's learning rate; a resume that was told to
        use another one (``resume_force``) gets it from here on, along the same schedule.
        """
        super()._load_optimizer_and_scheduler(checkpoint)
        scheduler = self.lr_scheduler
        if checkpoint is None or not isinstance(scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        wanted = self.args.learning_rate
        if all(base == wanted for base in scheduler.base_lrs):
            return
        scheduler.base_lrs = [wanted] * len(scheduler.base_lrs)
        for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
            group["initial_lr"] = wanted
            group["lr"] = wanted * factor(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]

    @property
    def data_fingerprint(self) -> str | None:
        """:func:`unialign.checkpoints.data_fingerprint` of the training rows (``None`` for other datasets)."""
        data = self.train_dataset
        if self._data_fingerprint is None and isinstance(data, TokenizedDataset) and len(data):
            self._data_fingerprint = data_fingerprint(data)
        elif self._data_fingerprint is None and isinstance(data, list) and data:
            if all(isinstance(e, TokenizedExample) for e in data):
                self._data_fingerprint = data_fingerprint(data)
        return self._data_fingerprint

    def method_inputs(self, model, batch: Batch) -> MethodInputs:
        """Compute the tensors the method declared, in one policy forward (and one reference forward)."""
        slot_seq = batch.slot_seq
        completion_mask = slot_seq >= 0
        if self.method.model_kind == "sequence_classifier":
            scores = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0]
            lengths = gather_slots(batch.target_mask.sum(-1).float(), slot_seq)
            return MethodInputs(
                policy_logps=torch.zeros_like(lengths),
                lengths=lengths,
                completion_mask=completion_mask,
                rm_rewards=gather_slots(scores.float(), slot_seq),
                targets=self._targets(batch),
                rewards=batch.rewards,
            )
        policy = self._logps(model, batch)
        inputs = MethodInputs(
            policy_logps=gather_slots(policy.seq, slot_seq),
            lengths=gather_slots(policy.lengths, slot_seq),
            completion_mask=completion_mask,
            targets=self._targets(batch),
            rewards=batch.rewards,
            reward_targets=batch.reward_targets,
            prompt_logps=policy.prompt,
            prompt_lengths=policy.prompt_lengths,
            kl_logps=policy.kl,
        )
        if self.method.needs_reference:
            if batch.ref_logps is not None:
                inputs.ref_logps = batch.ref_logps
                inputs.ref_prompt_logps, inputs.ref_kl_logps = batch.ref_prompt_logps, batch.ref_kl_logps
            else:
                ref = self.reference_logps(batch)
                inputs.ref_logps = gather_slots(ref.seq, slot_seq)
                inputs.ref_prompt_logps, inputs.ref_kl_logps = ref.prompt, ref.kl
        if inputs.kl_logps is not None and inputs.ref_kl_logps is not None and self.accelerator.num_processes > 1:
            # KTO's reference point z_ref is a mean over the global batch's mismatched pairs, as in one
            # process (and as TRL gathers it); each process alone would see only its share.
            inputs.kl_logps = gather_rows(self.accelerator, inputs.kl_logps)
            inputs.ref_kl_logps = gather_rows(self.accelerator, inputs.ref_kl_logps)
        return inputs

    def _targets(self, batch: Batch) -> Tensor | None:
        """Per-slot targets in [0, 1]: normalized scores when the method wants them and rows have them, else labels."""
        want = self.method.targets_from
        if want is None:
            return None
        if want == "scores" and batch.scores is not None:
            return batch.scores
        if batch.labels is not None:
            return batch.labels
        raise ValueError(f"{self.method.name} needs per-completion {want} but the batch has none")

    def _layout(self, model, batch: Batch) -> str:
        """How ``model`` scores ``batch``: ``segments``, ``dense`` (the block mask) or ``plain``."""
        shared = self._shares_prefix(model) and has_shared_prompts(batch)
        packs = shared or (self.args.padding_free and batch.input_ids.shape[0] > 1)
        if packs and self.segment_attention and can_use_segment_attention(unwrap(model)):
            return "segments"
        return "dense" if shared else "plain"

    def build_layout(self, batch: Batch) -> Batch:
        """Build and keep on ``batch`` the packed layout the policy will be scored with (none for the plain one).

        For harnesses that time layout construction with collation; training builds it on first use.
        """
        layout = self._layout(self.model, batch)
        if layout == "segments":
            shared = self._shares_prefix(self.model) and has_shared_prompts(batch)
            batch.packed = pack_segments(batch, prefix_sharing=shared, padding_free=self.args.padding_free)
        elif layout == "dense":
            batch.packed = pack_shared_prefix(batch)
        return batch

    def _logps(self, model, batch: Batch) -> LogProbs:
        if batch.kl_seq is not None and torch.is_grad_enabled():
            return self._logps_detached_kl(model, batch)
        layout = self._layout(model, batch)
        if layout == "segments":
            # a model handed in later (a reloaded copy) is switched too; the switch changes no other forward
            use_segment_attention(unwrap(model))
            return self._segment_logps(model, batch, self._shares_prefix(model) and has_shared_prompts(batch))
        if layout == "dense":
            return self._packed_logps(model, batch)
        mask, prompt_mask = batch.target_mask, batch.prompt_target_mask
        values = token_logps(
            model,
            batch.input_ids,
            batch.attention_mask,
            mask if prompt_mask is None else mask | prompt_mask,
            impl=self.logprob_impl,
            chunk_size=self.args.logprob_chunk_size,
        )
        seq, length = sequence_logps(values, mask)
        out = LogProbs(seq, length.float())
        if prompt_mask is not None:
            out.prompt = (values * prompt_mask).sum(-1)[batch.prompt_seq]
            out.prompt_lengths = prompt_mask.sum(-1)[batch.prompt_seq].float()
        if batch.kl_seq is not None:
            out.kl = seq[batch.kl_seq]
        return out

    def _logps_detached_kl(self, model, batch: Batch) -> LogProbs:
        """``_logps`` with KTO's KL sequences scored in a separate no-grad pass.

        They reach the loss only through the detached estimate z_ref, so keeping their activations
        for backward would cost memory and give no gradient.
        """
        main, kl_batch = split_kl_rows(batch)
        out = self._logps(model, main)
        with torch.no_grad():
            out.kl = self._logps(model, kl_batch).seq
        return out

    def _shares_prefix(self, model) -> bool:
        """Whether log-probs use the prefix-shared layout: asked for, a causal LM, an attention taking 4D masks."""
        if not getattr(self.args, "prefix_sharing", False) or self.method.model_kind != "causal_lm":
            return False
        inner = unwrap(model)
        # what transformers resolved at load (attn_implementation may be unset, or the model passed in built):
        # the config's private field is the only record of the kernel that will run
        attention = getattr(inner.config, "_attn_implementation", None)
        problem = None
        if attention not in PACKED_ATTENTION:
            reason = UNPACKED_ATTENTION.get(attention, "it does not take a custom 4D mask")
            problem = f"attn_implementation {attention}: {reason} (sdpa and eager are supported)"
        else:
            problem = self._packing_problem(inner)
        if problem is None:
            return True
        if not getattr(self, "_warned_prefix_sharing", False):
            logger.warning("prefix_sharing is off for this model: %s; each completion gets its own prompt", problem)
            self._warned_prefix_sharing = True
        return False

    @staticmethod
    def _mask_dtype(model) -> torch.dtype:
        """The model's floating dtype (float32 for integer-quantized weights): what an additive mask is made of."""
        dtype = next(model.parameters()).dtype
        return dtype if dtype.is_floating_point else torch.float32

    @staticmethod
    def _packing_problem(inner) -> str | None:
        """Why a model cannot score packed rows whatever the attention kernel, or ``None``."""
        if getattr(inner.config, "sliding_window", None) and getattr(inner.config, "use_sliding_window", True):
            return "the model uses sliding-window attention, which a custom 4D mask would replace"
        if "position_ids" not in inspect.signature(inner.forward).parameters:
            return "the model's forward takes no position_ids"
        return None

    def _segment_logps(self, model, batch: Batch, shared: bool) -> LogProbs:
        """``_logps`` on the segment layout (prefix sharing and/or padding-free rows), indexed by plain sequence.

        Nothing of size ``W × W`` is built: attention is confined by the layout's segment plan. The layout
        is built once per batch and kept on it, so the reference forward reuses it.
        """
        if not isinstance(batch.packed, SegmentBatch):
            batch.packed = pack_segments(batch, prefix_sharing=shared, padding_free=self.args.padding_free)
        packed = batch.packed
        seq_index, prompt_index = packed.seq_index, packed.prompt_index
        scored = seq_index >= 0
        values = token_logps(
            model,
            packed.input_ids,
            placeholder_mask(packed.input_ids.shape[0], packed.input_ids.device, self._mask_dtype(model)),
            scored if prompt_index is None else scored | (prompt_index >= 0),
            impl=self.logprob_impl,
            chunk_size=self.args.logprob_chunk_size,
            position_ids=packed.position_ids,
            source_index=packed.source_index,
            model_kwargs={"unialign_segments": packed.plan},
        )
        count = batch.input_ids.shape[0]
        owners = seq_index[scored]
        seq = values.new_zeros(count).index_add(0, owners, values[scored])
        out = LogProbs(seq, torch.bincount(owners, minlength=count).float())
        if prompt_index is not None:
            rows = batch.slot_seq.shape[0]
            in_prompt = prompt_index >= 0
            out.prompt = values.new_zeros(rows).index_add(0, prompt_index[in_prompt], values[in_prompt])
            out.prompt_lengths = torch.bincount(prompt_index[in_prompt], minlength=rows).float()
        if batch.kl_seq is not None:
            out.kl = seq[batch.kl_seq]
        return out

    def _packed_logps(self, model, batch: Batch) -> LogProbs:
        """``_logps`` on the prefix-shared layout; the values are indexed by plain sequence as there.

        The layout is built once per batch and kept on it, so the reference forward reuses it.
        """
        if not isinstance(batch.packed, PackedBatch):
            batch.packed = pack_shared_prefix(batch)
        packed = batch.packed
        dtype = self._mask_dtype(model)
        additive = torch.zeros(packed.allowed.shape, dtype=dtype, device=packed.allowed.device)
        additive.masked_fill_(~packed.allowed, torch.finfo(dtype).min)
        seq_index, prompt_mask = packed.seq_index, packed.prompt_target_mask
        scored = seq_index >= 0
        values = token_logps(
            model,
            packed.input_ids,
            additive,
            scored if prompt_mask is None else scored | prompt_mask,
            impl=self.logprob_impl,
            chunk_size=self.args.logprob_chunk_size,
            position_ids=packed.position_ids,
            source_index=packed.source_index,
        )
        count = batch.input_ids.shape[0]
        owners = seq_index[scored]
        seq = values.new_zeros(count).index_add(0, owners, values[scored])
        out = LogProbs(seq, torch.bincount(owners, minlength=count).float())
        if prompt_mask is not None:
            out.prompt = (values * prompt_mask).sum(-1)
            out.prompt_lengths = prompt_mask.sum(-1).float()
        if batch.kl_seq is not None:
            out.kl = seq[batch.kl_seq]
        return out

    @torch.no_grad()
    def reference_logps(self, batch: Batch) -> LogProbs:
        """Reference log-probs of a batch: frozen model, or the policy with its adapters disabled."""
        self.reference_forwards += 1
        if self.ref_model is not None:
            try:
                return self._logps(self.ref_model, batch)
            finally:
                release_gathered(self.ref_model)
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

    def precompute_reference(self, examples, batch_size: int) -> None:
        """Fill ``ref_logps`` (and prompt/KL reference terms) into every example, once.

        ``examples`` is a list of :class:`TokenizedExample` or a :class:`TokenizedDataset` (whose side
        store then holds the values). With several processes (all must call this), each computes a
        contiguous share of the rows and every process receives the values of all rows. Afterwards no
        reference forward runs during training, and a separate reference model is freed.
        """
        world, rank = self.accelerator.num_processes, self.accelerator.process_index
        values = []
        for indices in precompute_plan(len(examples), world, rank, batch_size):
            if not indices:  # this process's share is done; the forward keeps a sharded engine's collectives in step
                self.reference_logps(self._prepare_inputs(self.data_collator([examples[0]])))
                continue
            chunk = [examples[i] for i in indices]
            batch = self._prepare_inputs(self.data_collator(chunk))
            ref = self.reference_logps(batch)
            per_slot = gather_slots(ref.seq, batch.slot_seq).cpu()
            for row, (index, example) in enumerate(zip(indices, chunk)):
                values.append(
                    (
                        index,
                        per_slot[row, : len(example.completion_ids)].tolist(),
                        None if ref.prompt is None else float(ref.prompt[row]),
                        None if ref.kl is None else float(ref.kl[row]),
                    )
                )
        if world > 1:
            values = gather_object(values)
        indices = [v[0] for v in values]
        store_values(examples, "ref_logps", indices, [v[1] for v in values])
        for position, name in ((2, "ref_prompt_logps"), (3, "ref_kl_logps")):
            known = [(v[0], v[position]) for v in values if v[position] is not None]
            if known:
                store_values(examples, name, [i for i, _ in known], [value for _, value in known])

    def release_reference_model(self) -> None:
        """Drop the separate reference model (after precomputing, nothing needs it)."""
        self.ref_model = None

    def save_companion_models(self, model_dir: Path) -> None:
        """Write models trained beside the policy into ``model_dir`` (the final model's folder); none here."""

    # ----------------------------------------------------------------- batches and transformers.Trainer
    def _prepare_inputs(self, inputs):
        """A :class:`Batch` moves to the device whole; its float fields keep float32 (Trainer's own
        preparation would cast them to DeepSpeed's dtype, rounding precomputed reference log-probs)."""
        if isinstance(inputs, Batch):
            return inputs.to(self.args.device)
        return super()._prepare_inputs(inputs)

    # ----------------------------------------------------------------- eval and logging
    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation computes the same loss and metrics; there are no logits to return."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def _store_metrics(self, metrics: dict[str, Tensor], split: str, valid: bool = True) -> None:
        # One gather for all metrics plus a validity flag: every process gathers the same number of times,
        # and micro-batches whose loss was not finite are left out of the average. A process's micro-batch can
        # lack a metric another has (KTO's rewards/chosen when it holds no desirable row), so the processes agree
        # on the union of keys first, and each key is averaged over the processes that have it.
        keys = sorted(metrics)
        if self.accelerator.num_processes > 1:
            keys = sorted(set().union(*gather_object([keys])))
        if not keys:
            return
        flag = torch.tensor(float(valid), device=self.args.device)
        zero = torch.zeros((), device=flag.device)
        values = [metrics[k].detach().float().reshape(()).to(flag.device) if k in metrics else zero for k in keys]
        present = [torch.ones_like(zero) if k in metrics else zero for k in keys]
        row = torch.stack(values + present + [flag])
        gathered = self.accelerator.gather_for_metrics(row.unsqueeze(0))
        kept = gathered[gathered[:, -1] > 0]
        count = len(keys)
        for i, key in enumerate(keys):
            have = kept[:, count + i] > 0
            if have.any():
                self._metrics[split][key].append(kept[have, i].mean().item())

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the method's metrics, averaged since the last log line, to Trainer's logs."""
        split = "train" if "loss" in logs else "eval"
        prefix = "eval_" if split == "eval" else ""
        for key, values in self._metrics[split].items():
            logs[prefix + key] = sum(values) / len(values)
        self._metrics[split].clear()
        if split == "train" and self.args.on_nonfinite == "skip":
            if self._nonfinite_since_log and self._nonfinite_since_log == self._steps_since_log:
                logs["loss"] = float("nan")  # every step since the last line was skipped: there is no loss to show
            logs["nonfinite_skipped"] = self.nonfinite_skipped
            self._nonfinite_since_log = 0
        if split == "train":
            self._steps_since_log = 0
        super().log(logs, *args, **kwargs)


class _SaveAttentionInCheckpoints(TrainerCallback):
    """``activation_checkpointing_save_attention``: applied once ``Trainer.train`` has switched checkpointing on
    (it does so just before ``on_train_begin``), on every run and every resume."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        layers = save_attention_in_checkpoints(model)
        logger.info("activation_checkpointing_save_attention: %d checkpointed layers keep their attention output",
                    layers)


class RowIndexCollator:
    """Wrap a collator to add ``row_index``: the 0-based dataset row of each batch row, for error messages."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, examples: list):
        """The wrapped collator's :class:`Batch`, with ``row_index`` set when every example knows its row."""
        batch = self.collator(examples)
        rows = [getattr(e, "row", None) for e in examples]
        if isinstance(batch, Batch) and rows and all(isinstance(r, int) for r in rows):
            batch.row_index = torch.tensor(rows, dtype=torch.long)
        return batch

    def __getattr__(self, name):
        return getattr(self.collator, name)


def precompute_plan(rows: int, world: int, rank: int, batch_size: int) -> list[range]:
    """The row batches process ``rank`` of ``world`` scores when precomputing reference log-probs.

    Each process takes a contiguous share; every process gets the same number of batches (an empty
    range where its share is done), because under ZeRO-3 or FSDP every forward is a collective that
    all processes must join.
    """
    share = -(-rows // world)
    first, last = min(rows, rank * share), min(rows, (rank + 1) * share)
    count = -(-share // batch_size)
    return [range(min(last, first + b * batch_size), min(last, first + (b + 1) * batch_size)) for b in range(count)]


def example_length(example: TokenizedExample, packed: bool) -> int:
    """The tokens a row costs in a padded batch: its packed row (prompt once, then every completion and
    KTO's mismatched one) with prefix sharing and two or more sequences, else its longest sequence."""
    completions = [c for c in example.completion_ids if c]
    if example.kl_completion_ids:
        completions.append(example.kl_completion_ids)
    if packed and len(completions) > 1:
        return len(example.prompt_ids) + sum(map(len, completions))
    return len(example.prompt_ids) + max(map(len, completions), default=0)


def describe_rows(batch) -> str:
    """``", batch rows 3, 7 (dataset rows counted from 1)"`` from a batch's ``row_index``; ``""`` without one."""
    rows = getattr(batch, "row_index", None)
    if rows is None:
        return ""
    return ", batch rows " + ", ".join(str(r + 1) for r in rows.tolist()) + " (dataset rows counted from 1)"


def zero_loss(model) -> Tensor:
    """A loss of 0 whose gradient is exactly 0 for every trainable parameter.

    Backpropagating it keeps collective operations (DDP's gradient all-reduce) in step across processes.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.stack([p.sum().float() for p in params]).sum() * 0.0


def gather_slots(per_sequence: Tensor, slot_seq: Tensor) -> Tensor:
    """``(B, K)`` view of per-sequence values; empty slots (index −1) read as 0."""
    values = per_sequence[slot_seq.clamp(min=0)]
    return torch.where(slot_seq >= 0, values, torch.zeros_like(values))


def unwrap_peft(model):
    """The PEFT model inside any wrappers, or ``None`` when the model has no adapters."""
    model = strip_wrappers(model)
    return model if hasattr(model, "disable_adapter") else None
