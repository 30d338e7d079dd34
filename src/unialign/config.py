"""One flat, TRL-style config for every method, loadable from YAML with ``key=value`` overrides.

``UnialignConfig`` extends :class:`transformers.TrainingArguments`, so every Trainer option
(``report_to``, ``deepspeed``, ``fsdp``, ``save_steps``, ``bf16``, ...) works under its usual name.
Method hyperparameters follow TRL's names (``beta``, ``loss_type``, ``label_smoothing``,
``max_length``, ``max_prompt_length``, ``precompute_ref_log_probs``). Fields a method has paper
defaults for (``beta``, ``learning_rate``, ...) stay ``None`` until the method fills them in.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import TrainingArguments

from unialign.feedback import FORMATS as FEEDBACK_FORMATS
from unialign.losses.grpo import SCALE_REWARDS
from unialign.losses.policy_gradient import AGGREGATIONS
from unialign.losses.reference_free import ORPO_NLL_SCOPES
from unialign.losses.registry import get_method
from unialign.losses.una import UNA_LOSSES
from unialign.losses.una_online import NORMALIZATIONS, RATIO_BASES, SPACES

# Written here (not imported from models.py, which imports this module's ConfigError).
ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flex_attention")
FOUR_BIT_QUANT_TYPES = ("nf4", "fp4")

DEFAULT_MODEL = "smollm2-135m-instruct"
FORMATS = ("auto", *FEEDBACK_FORMATS)

# Fields whose values must be one of a fixed set: checked with a message naming the choices.
CHOICES: dict[str, tuple[str, ...]] = {
    "dataset_format": FORMATS,
    "una_loss": UNA_LOSSES,
    "on_bad_row": ("error", "drop"),
    "logprob_impl": ("auto", "chunked", "full"),
    "packed_attention": ("segments", "dense"),
    "torch_dtype": ("float32", "bfloat16", "float16", "auto"),
    "on_nonfinite": ("stop", "skip"),
    "una_space": SPACES,
    "reward_normalization": NORMALIZATIONS,
    "ratio_base": RATIO_BASES,
    "generation_backend": ("transformers", "vllm"),
    "orpo_nll_scope": ORPO_NLL_SCOPES,
    "scale_rewards": SCALE_REWARDS,
    "grpo_loss_type": AGGREGATIONS,
    "bnb_4bit_quant_type": FOUR_BIT_QUANT_TYPES,
    "bnb_4bit_compute_dtype": ("bfloat16", "float16", "float32"),
}

# Numeric keys and the values they may take: (lowest, lowest allowed itself?, highest, highest allowed itself?).
# None leaves that side open. Checked after method defaults are filled in.
RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    "beta": (0.0, False, None, False),
    "learning_rate": (0.0, True, None, False),
    "max_length": (1, True, None, False),
    "max_prompt_length": (1, True, None, False),
    "label_smoothing": (0.0, True, 0.5, False),
    "alpha": (0.0, True, None, False),
    "gamma": (0.0, True, None, False),
    "reward_scale": (0.0, False, None, False),
    "desirable_weight": (0.0, False, None, False),
    "undesirable_weight": (0.0, False, None, False),
    "rm_margin": (0.0, True, None, False),
    "lora_r": (1, True, None, False),
    "lora_alpha": (0.0, False, None, False),
    "lora_dropout": (0.0, True, 1.0, False),
    "logprob_chunk_size": (1, True, None, False),
    "num_generations": (1, True, None, False),
    "max_completion_length": (1, True, None, False),
    "temperature": (0.0, True, None, False),
    "top_p": (0.0, False, 1.0, True),
    "num_iterations": (1, True, None, False),
    "vllm_gpu_memory_utilization": (0.0, False, 1.0, True),
    "per_device_train_batch_size": (1, True, None, False),
    "per_device_eval_batch_size": (1, True, None, False),
    "gradient_accumulation_steps": (1, True, None, False),
    "num_train_epochs": (0.0, True, None, False),
    "weight_decay": (0.0, True, None, False),
    "max_grad_norm": (0.0, True, None, False),
    "dataset_num_proc": (1, True, None, False),
    "epsilon": (0.0, True, None, False),
    "epsilon_high": (0.0, True, None, False),
    "num_ppo_epochs": (1, True, None, False),
    "num_mini_batches": (1, True, None, False),
    "cliprange": (0.0, True, None, False),
    "cliprange_value": (0.0, True, None, False),
    "vf_coef": (0.0, True, None, False),
    "kl_coef": (0.0, True, None, False),
    "lam": (0.0, True, 1.0, True),
    "num_completions_to_print": (1, True, None, False),
    "log_completions_steps": (1, True, None, False),
}


class ConfigError(ValueError):
    """A config value that is of the wrong type, out of range or inconsistent; names the key (and its file)."""

    def __init__(self, key: str, problem: str, origin: str | None = None):
        self.key, self.problem, self.origin = key, problem, origin
        super().__init__(f"{origin}: config key {key!r} {problem}" if origin else f"config key {key!r} {problem}")


@dataclass
class UnialignConfig(TrainingArguments):
    """Everything one training run needs. See docs/config.md for the full list."""

    # --- what to train
    loss_type: str = field(default="dpo", metadata={"help": "method name; `unialign methods` lists them"})
    model_name_or_path: str = field(
        default=DEFAULT_MODEL, metadata={"help": "HF id, local dir, .gguf file or smollm2-135m-instruct"}
    )
    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "separate reference model (default: the policy's initial weights)"}
    )
    torch_dtype: str = field(default="float32", metadata={"help": "weights dtype"})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "sdpa | eager | flash_attention_2 | flex_attention, passed to from_pretrained (None: "
            "transformers' choice, sdpa for most models); prefix_sharing needs sdpa or eager"
        },
    )
    trust_remote_code: bool = False
    allow_pickle: bool = field(default=False, metadata={"help": "allow loading .bin/.pt weights (unsafe pickle)"})
    # --- data
    dataset: Any = field(
        default=None,
        metadata={
            "help": "jsonl/json/parquet file, datasets dir, bundled:<format>, hub owner/name; in Python also a "
            "Path, a list of row dicts or a datasets.Dataset"
        },
    )
    dataset_format: str = "auto"
    eval_dataset: Any = None
    dataset_num_proc: int | None = field(
        default=None, metadata={"help": "processes that tokenize the dataset (datasets.map num_proc); None: one"}
    )
    max_length: int = 512
    max_prompt_length: int | None = None  # None: the prompt may use all but one token of max_length
    on_bad_row: str = field(
        default="error", metadata={"help": "error: stop at the first bad row; drop: skip, count and report it"}
    )
    score_range: list[float] | None = field(
        default=None, metadata={"help": "[low, high] of the score column, e.g. [0, 4]"}
    )
    split_special_tokens: bool = field(
        default=True,
        metadata={
            "help": "tokenize special-token text inside the data (a literal <|im_end|>) as text; false: as "
            "control tokens, for data that embeds template markers on purpose"
        },
    )
    # --- method hyperparameters (None = the method's paper default)
    beta: float | None = None
    label_smoothing: float | None = None
    una_loss: str = "mse"
    z0: float | None = None
    reward_scale: float = 1.0
    reward_shift: float = 0.0
    alpha: float | None = None
    gamma: float | None = None
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    rm_margin: float = 0.0
    center_rewards_coefficient: float | None = None
    orpo_nll_scope: str = field(
        default=ORPO_NLL_SCOPES[0],
        metadata={"help": "prompt_and_completion (the ORPO paper's and TRL's NLL) or completion (the chosen only)"},
    )
    # --- reference
    precompute_ref_log_probs: bool = False
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "switch off every dropout in the policy and the reference (modules, attention dropout, LoRA "
            "dropout), so that the policy at step 0 equals its reference"
        },
    )
    # --- LoRA
    use_peft: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | str = "all-linear"
    # --- QLoRA (TRL's and transformers' BitsAndBytesConfig names)
    load_in_4bit: bool = field(
        default=False,
        metadata={"help": "load the policy's linear layers in 4 bits with bitsandbytes and train LoRA on them (QLoRA)"},
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "nf4 (QLoRA's NormalFloat) or fp4"})
    bnb_4bit_compute_dtype: str = field(
        default="bfloat16", metadata={"help": "dtype of the 4-bit layers' matmuls: bfloat16, float16 or float32"}
    )
    bnb_4bit_use_double_quant: bool = field(
        default=False, metadata={"help": "quantize the quantization constants too (about 0.4 bits per weight saved)"}
    )
    save_merged: bool = field(
        default=True, metadata={"help": "save LoRA runs merged into full weights (False: adapter only)"}
    )
    # --- speed
    logprob_impl: str = field(
        default="auto", metadata={"help": "chunked: never build full-vocab logits; full: plain logits"}
    )
    logprob_chunk_size: int = 1024
    prefix_sharing: bool = field(
        default=True,
        metadata={
            "help": "compute each row's prompt once for all its completions (packed rows with a block attention "
            "mask); used for causal LMs with sdpa or eager attention, position ids and no sliding window"
        },
    )
    packed_attention: str = field(
        default="segments",
        metadata={
            "help": "how packed rows keep sequences apart. segments: one attention call per sequence or completion "
            "over the slices it may see, memory linear in the row (sdpa models); dense: a (rows, 1, W, W) block mask "
            "(sdpa or eager; prefix_sharing only). Under eager, segments falls back to dense with a logged reason"
        },
    )
    padding_free: bool = field(
        default=False,
        metadata={
            "help": "pack the micro-batch's sequences (or, with prefix_sharing, its packed rows) end to end in one "
            "row with position ids restarting per sequence and attention confined to each: no padding tokens are "
            "computed. Needs packed_attention: segments and an sdpa model; refused otherwise"
        },
    )
    compile_layers: bool = field(
        default=False,
        metadata={
            "help": "compile each transformer block in place with torch.compile (regional compilation, dynamic "
            "shapes): fuses norms, activations and rotary embeddings; the first step pays the compilation"
        },
    )
    activation_checkpointing_save_attention: bool = field(
        default=False,
        metadata={
            "help": "with activation_checkpointing: keep each layer's attention output (the fused attention kernel's, "
            "about the size of the layer's input) instead of recomputing the attention in backward (PyTorch's "
            "selective checkpointing; needs use_reentrant: false, the default)"
        },
    )
    cpu_keep_freed_memory: bool | None = field(
        default=None,
        metadata={
            "help": "on CPU, keep freed memory in the process for reuse (glibc malloc: no per-block mmap, no "
            "trimming) instead of page-faulting large tensors anew every step; resident memory then stays at its "
            "peak. Process-wide: unset, it is on under the unialign command and off when unialign is imported"
        },
    )
    # --- reliability (docs/reliability.md)
    resume: bool = field(
        default=False, metadata={"help": "continue from the newest complete checkpoint in output_dir, if any"}
    )
    on_nonfinite: str = field(
        default="stop",
        metadata={"help": "stop: save the last good step and stop with a message; skip: skip the batch and count it"},
    )
    resume_force: bool = field(
        default=False,
        metadata={"help": "resume even when settings that change what is trained differ from the checkpoint's"},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "write the run into a folder holding files unialign did not write (never replacing them)"},
    )
    # --- online UNA (docs/online.md, docs/online.md); TRL's names where TRL has one
    reward: Any = field(
        default=None,
        metadata={"help": "explicit reward source: offline | callable:MODULE:FN | reward-model:PATH | llm-judge:MODEL, "
                  "or a list of {source: SPEC, weight: W, name: NAME} whose weighted sum is the reward"},
    )
    num_generations: int = field(default=4, metadata={"help": "completions sampled per prompt per step"})
    max_completion_length: int = field(default=64, metadata={"help": "max new tokens per sampled completion"})
    temperature: float = 0.9
    top_p: float = 1.0
    num_iterations: int = field(default=1, metadata={"help": "optimizer passes over each batch of rollouts"})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "subtracted from the reward of completions that do not end in EOS"}
    )
    una_space: str = field(
        default="score", metadata={"help": "score: (sigmoid(r_theta) - s_phi)^2; reward: (r_theta - r_phi)^2"}
    )
    reward_normalization: str = field(
        default="none", metadata={"help": "none | running (mean/std) | range (reward_range to [0, 1])"}
    )
    reward_range: list[float] | None = field(
        default=None, metadata={"help": "[low, high] of a bounded reward source, for reward_normalization: range"}
    )
    ratio_base: str = field(
        default="reference", metadata={"help": "reference (default) or rollout (the authors' code): the ratio's base"}
    )
    generation_backend: str = field(
        default="transformers", metadata={"help": "transformers | vllm (a colocated engine; needs vllm and a GPU)"}
    )
    vllm_gpu_memory_utilization: float = field(
        default=0.3, metadata={"help": "share of GPU memory the vLLM engine may take; training keeps the rest"}
    )
    vllm_max_model_len: int | None = field(
        default=None, metadata={"help": "longest prompt + completion the engine holds (default: max_length)"}
    )
    # --- online RL: GRPO, RLOO, PPO (docs/online.md); TRL's names (GRPOConfig, RLOOConfig, PPOConfig)
    scale_rewards: str = field(default="group", metadata={"help": "GRPO: divide advantages by the group std, "
                               "the batch std, or none"})
    grpo_loss_type: str = field(default="dapo", metadata={"help": "GRPO's aggregation, TRL's loss_type: grpo | bnpo "
                                "| dr_grpo | dapo"})
    epsilon: float = field(default=0.2, metadata={"help": "GRPO/RLOO: lower clipping range of the ratio"})
    epsilon_high: float | None = field(default=None, metadata={"help": "GRPO/RLOO: upper range (default epsilon)"})
    normalize_advantages: bool = field(default=False, metadata={"help": "RLOO: whiten advantages over the batch"})
    num_ppo_epochs: int = field(default=4, metadata={"help": "PPO: passes over each batch of rollouts"})
    num_mini_batches: int = field(default=1, metadata={"help": "PPO: minibatches (optimizer steps) per pass"})
    cliprange: float = field(default=0.2, metadata={"help": "PPO: policy ratio clipping range"})
    cliprange_value: float = field(default=0.2, metadata={"help": "PPO: value clipping range around rollout values"})
    vf_coef: float = field(default=0.1, metadata={"help": "PPO: weight of the value loss"})
    kl_coef: float = field(default=0.05, metadata={"help": "PPO: per-token KL penalty to the reference in the reward"})
    lam: float = field(default=0.95, metadata={"help": "PPO: GAE lambda (gamma is the discount, default 1.0)"})
    whiten_rewards: bool = field(default=False, metadata={"help": "PPO: whiten per-token rewards (mean kept)"})
    whiten_advantages: bool = field(default=True, metadata={"help": "PPO: whiten GAE advantages over the batch"})
    value_model_name_or_path: str | None = field(
        default=None, metadata={"help": "PPO: the value model's backbone (default: the policy's starting weights)"}
    )
    log_completions: bool = field(
        default=False, metadata={"help": "append prompts, completions, rewards, advantages to completions.jsonl"}
    )
    num_completions_to_print: int | None = field(
        default=None, metadata={"help": "completions per logged rollout (default: all)"}
    )
    log_completions_steps: int | None = field(
        default=None, metadata={"help": "log completions every N optimizer steps (default: logging_steps)"}
    )
    # --- TrainingArguments defaults that suit preference training
    learning_rate: float | None = None  # type: ignore[assignment]
    logging_steps: float = 1
    remove_unused_columns: bool = False
    save_strategy: str = "no"
    output_dir: str | None = None

    def __post_init__(self):
        hints = _type_hints()
        for name in config_fields():
            if name in hints:
                setattr(self, name, coerce(name, getattr(self, name), hints[name]))
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(
                    f"config key {name!r} is {getattr(self, name)!r}; allowed values: {', '.join(allowed)}"
                )
        method = get_method(self.loss_type)
        self.loss_type = method.name
        for key, value in method.defaults.items():
            if getattr(self, key, None) is None:
                setattr(self, key, value)
        for key, value in {
            "beta": 0.1,
            "alpha": 1.0,
            "gamma": 0.5,
            "z0": 0.0,
            "label_smoothing": 0.0,
            "learning_rate": 5e-7,
        }.items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.output_dir is None:
            self.output_dir = f"runs/{self.loss_type}"
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            raise ValueError(
                f"config key 'max_prompt_length' ({self.max_prompt_length}) must be smaller than "
                f"'max_length' ({self.max_length}) so every completion keeps at least one token"
            )
        if self.score_range is not None and (len(self.score_range) != 2 or self.score_range[0] >= self.score_range[1]):
            raise ValueError(f"config key 'score_range' must be [low, high] with low < high, got {self.score_range}")
        for name, bounds in (RANGES | method.ranges).items():
            check_range(name, getattr(self, name), bounds)
        if self.attn_implementation is not None and self.attn_implementation not in ATTENTION_IMPLEMENTATIONS:
            raise ConfigError(
                "attn_implementation",
                f"is {self.attn_implementation!r}; allowed values: {', '.join(ATTENTION_IMPLEMENTATIONS)} (or unset)",
            )
        if self.padding_free and self.packed_attention != "segments":
            raise ConfigError(
                "padding_free",
                f"needs packed_attention: segments (got {self.packed_attention}): a dense mask over a whole "
                "padding-free row is quadratic in the micro-batch's total tokens",
            )
        if self.padding_free and self.attn_implementation not in (None, "sdpa"):
            raise ConfigError(
                "padding_free",
                f"needs attn_implementation sdpa (got {self.attn_implementation}): unialign confines attention to each "
                "packed sequence with segment attention over sdpa",
            )
        if self.load_in_4bit and not self.use_peft:
            raise ConfigError(
                "load_in_4bit",
                "needs use_peft: true: 4-bit weights cannot be trained, so a 4-bit model is fine-tuned through LoRA "
                "adapters (QLoRA); set use_peft: true, or load_in_4bit: false for a full fine-tune",
            )
        if self.max_steps <= 0 and self.num_train_epochs == 0:
            raise ConfigError("num_train_epochs", "is 0 and max_steps is not set: the run would train 0 steps")
        deepspeed_asked = self.deepspeed or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true")
        if deepspeed_asked and importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(
                "deepspeed",
                "DeepSpeed was asked for (the deepspeed key, or an accelerate launch with a DeepSpeed config) but is "
                "not installed: pip install 'unialign[dist]' (docs/distributed.md)",
            )
        super().__post_init__()
        if self.activation_checkpointing_save_attention:
            self._check_save_attention()

    def _check_save_attention(self) -> None:
        """``activation_checkpointing_save_attention`` needs checkpointing on, and of the non-reentrant kind."""
        if not self.activation_checkpointing:
            raise ConfigError(
                "activation_checkpointing_save_attention",
                "is true but activation_checkpointing is off: there is no recompute to spare; set "
                "activation_checkpointing: true (or gradient_checkpointing: true)",
            )
        # what transformers' Trainer hands to torch's checkpoint: its own two keys removed, and
        # {use_reentrant: false} in place of an empty dict
        kwargs = {k: v for k, v in (self.activation_checkpointing_kwargs or {}).items()
                  if k not in ("every_n_layers", "offload")}
        if kwargs and kwargs.get("use_reentrant") is not False:
            raise ConfigError(
                "activation_checkpointing_save_attention",
                f"needs non-reentrant checkpointing, but activation_checkpointing_kwargs is {kwargs} (use_reentrant "
                "unset means reentrant to torch): add use_reentrant: false",
            )
        if "context_fn" in kwargs:
            raise ConfigError(
                "activation_checkpointing_save_attention",
                "cannot be combined with a context_fn in activation_checkpointing_kwargs",
            )

    def to_dict(self) -> dict[str, Any]:
        """TrainingArguments' dict, with data given as objects shown as text so ``config.json`` stays JSON."""
        values = super().to_dict()
        for key in ("dataset", "eval_dataset"):
            if values.get(key) is not None and not isinstance(values[key], str):
                values[key] = describe_dataset(values[key])
        return values


def describe_dataset(value: Any) -> str:
    """How a ``dataset`` value reads in ``config.json``, logs and model cards.

    Strings are themselves; paths their text; a list ``"<list: 8 rows>"``; a ``datasets.Dataset``
    ``"<datasets.Dataset: 1000 rows>"``; a ``DatasetDict`` its splits' sizes.
    """
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, list):
        return f"<list: {len(value)} rows>"
    kind = f"{type(value).__module__.split('.')[0]}.{type(value).__name__}"
    rows = getattr(value, "num_rows", None)
    if isinstance(rows, int):
        return f"<{kind}: {rows} rows>"
    if isinstance(rows, dict):
        return f"<{kind}: " + ", ".join(f"{split} {count} rows" for split, count in rows.items()) + ">"
    return f"<{kind}>"


def _type_hints() -> dict[str, Any]:
    global _HINTS
    if _HINTS is None:
        _HINTS = typing.get_type_hints(UnialignConfig)
    return _HINTS


_HINTS: dict[str, Any] | None = None
_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the declared type of ``key``, or a :class:`ConfigError` naming key and value.

    Numbers written as strings (``"1e-5"``: YAML reads an exponent without a dot as text) become
    numbers; booleans must be booleans or one of true/false, yes/no, on/off; a ``None`` is allowed
    only where the key's type allows it. Types this does not know (enums, dicts) are passed on to
    ``TrainingArguments``, which checks them itself.
    """
    members = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if Any in members:
        return value
    if value is None:
        if type(None) in members:
            return None
        raise ConfigError(key, f"must be set; got null (expected {_type_name(members)})")
    known = [m for m in members if m in (bool, int, float, str) or typing.get_origin(m) is list]
    if len(known) < len([m for m in members if m is not type(None)]):
        return value  # a type outside the simple ones: TrainingArguments validates it
    for member in known:  # an exact match first: "str | bool" keeps a string a string
        if member is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return _finite(key, float(value))
        if member is not float and type(value) is member:
            return value
        if typing.get_origin(member) is list and isinstance(value, list):
            (item,) = typing.get_args(member)
            return [coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    for member in known:
        converted = _convert(value, member)
        if converted is not None:
            return _finite(key, converted) if isinstance(converted, float) else converted
    raise ConfigError(key, f"must be {_type_name(members)}; got {value!r}")


def _convert(value: Any, member: Any) -> Any:
    """A lossless conversion of ``value`` to ``member``, or None."""
    if member is bool and isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    if member in (int, float) and isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if member is float else (int(number) if number.is_integer() else None)
    if member is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if typing.get_origin(member) is list and isinstance(value, (tuple, str)) and typing.get_args(member) == (str,):
        return [value] if isinstance(value, str) else list(value)
    return None


def _finite(key: str, number: float) -> float:
    if not math.isfinite(number):
        raise ConfigError(key, f"must be a finite number; got {number}")
    return number


def _type_name(members: tuple) -> str:
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", type(None): "null"}
    return " or ".join(names.get(m, "a list" if typing.get_origin(m) is list else getattr(m, "__name__", str(m)))
                       for m in members)


def check_range(key: str, value: Any, bounds: tuple[float | None, bool, float | None, bool]) -> None:
    """Refuse a number outside its key's range (see :data:`RANGES`); ``None`` (unset) passes."""
    if value is None:
        return
    low, low_ok, high, high_ok = bounds
    if low is not None and (value < low or (value == low and not low_ok)):
        raise ConfigError(key, f"must be {'>=' if low_ok else '>'} {low}; got {value}")
    if high is not None and (value > high or (value == high and not high_ok)):
        raise ConfigError(key, f"must be {'<=' if high_ok else '<'} {high}; got {value}")


def config_fields() -> dict[str, dataclasses.Field]:
    """Every key a config may set."""
    return {f.name: f for f in dataclasses.fields(UnialignConfig) if f.init}


def load_config(
    path: str | Path | None = None, overrides: list[str] | dict[str, Any] | None = None, **kwargs: Any
) -> UnialignConfig:
    """Build a config from a YAML file, ``key=value`` overrides and keyword arguments (in that order).

    Unknown keys are errors that name the key. Relative dataset and model paths in a YAML file are
    resolved against the file's folder, so a config works from any working directory.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        with open(path, encoding="utf-8") as handle:
            try:
                loaded = yaml.safe_load(handle) or {}
            except yaml.YAMLError as err:
                raise ValueError(f"{path}: not a valid YAML config: {_yaml_problem(err)}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of keys to values, got {type(loaded).__name__}")
        values.update(_resolve_paths(loaded, path.parent))
        origins.update(dict.fromkeys(loaded, str(path)))
    if isinstance(overrides, dict):
        values.update(overrides)
        for key in overrides:
            origins.pop(key, None)
    elif overrides:
        values.update(parse_overrides(overrides))
        origins.update(dict.fromkeys(parse_overrides(overrides), "command line"))
    values.update(kwargs)
    for key in kwargs:
        origins.pop(key, None)
    known = config_fields()
    unknown = sorted(set(values) - set(known))
    if unknown:
        hint = _close_matches(unknown[0], known)
        raise ValueError(
            f"unknown config key {unknown[0]!r}{hint}" + (f" (also unknown: {unknown[1:]})" if unknown[1:] else "")
        )
    try:
        return UnialignConfig(**values)
    except ConfigError as err:
        key = err.key.split("[")[0]
        if err.origin is None and key in origins:
            raise ConfigError(err.key, err.problem, origins[key]) from None
        raise


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn ``["beta=0.1", "use_peft=true"]`` into typed values (parsed as YAML scalars)."""
    parsed = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            parsed[key.strip()] = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            raise ValueError(f"override {item!r}: not a valid YAML value: {_yaml_problem(err)}") from None
    return parsed


def _yaml_problem(err: yaml.YAMLError) -> str:
    """The parser's message; tags that would build Python objects get a plain explanation."""
    if isinstance(err, yaml.constructor.ConstructorError) and "python/" in str(err):
        where = f"line {err.problem_mark.line + 1}: " if err.problem_mark else ""
        return (
            f"{where}tags such as !!python/object are refused: configs are read with yaml.safe_load, "
            "which never builds Python objects"
        )
    return " ".join(str(err).split())


_INPUT_PATH_KEYS = ("dataset", "eval_dataset", "model_name_or_path", "ref_model_name_or_path")


def _resolve_paths(values: dict[str, Any], base: Path) -> dict[str, Any]:
    resolved = dict(values)
    for key in _INPUT_PATH_KEYS:
        value = resolved.get(key)
        if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
            resolved[key] = str((base / value).resolve())
    return resolved


def _close_matches(key: str, known: dict[str, Any]) -> str:

    matches = difflib.get_close_matches(key, list(known), n=3)
    return f"; did you mean {', '.join(matches)}?" if matches else "; `unialign train --help` lists the keys"
