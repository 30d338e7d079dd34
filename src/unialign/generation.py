"""Batched generation with transformers ``generate``: left padding, KV cache, stop on EOS.

Shared by the dataset builder, evaluation and online training. Prompts go through the same
:func:`~unialign.data.tokenize.encode_prompt` as training, so what is sampled is what is scored.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from unialign.data.tokenize import encode_prompt, stop_token_ids


@dataclass
class GenerationConfig:
    """Sampling settings; ``temperature=0`` means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 1.0
    num_return_sequences: int = 1
    batch_size: int = 16
    seed: int | None = 0
    # None keeps the model's generation_config value; online training sets 1.0 so that samples come
    # from the policy's own distribution.
    repetition_penalty: float | None = None
    # Record each sampled token's entropy (Generation.entropy) from the logits generate computes anyway.
    record_entropy: bool = False

    def __post_init__(self):
        """Refuse settings ``generate`` would silently misread (a negative temperature decodes greedily)."""
        checks = [
            ("temperature", _is_number(self.temperature) and self.temperature >= 0,
             "at least 0 (0 means greedy decoding)"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "in (0, 1]"),
            ("max_new_tokens", _is_count(self.max_new_tokens), "an integer of at least 1"),
            ("num_return_sequences", _is_count(self.num_return_sequences), "an integer of at least 1"),
            ("batch_size", _is_count(self.batch_size), "an integer of at least 1"),
        ]
        if self.repetition_penalty is not None:
            checks.append(("repetition_penalty", _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
                           "greater than 0"))
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}; got {getattr(self, name)!r}")


def check_distinct_samples(temperature: float, count: int, count_name: str,
                           temperature_name: str = "temperature") -> None:
    """Refuse ``count`` > 1 completions per prompt under greedy decoding (``temperature`` 0).

    Greedy decoding gives the same completion every time, so the copies are not independent samples:
    a standard error over them is meaningless and a builder would write identical completions.
    """
    if count > 1 and temperature == 0:
        raise ValueError(
            f"{count_name} {count} with {temperature_name} 0 (greedy decoding) would give {count} identical "
            f"completions per prompt, not independent samples; set {temperature_name} above 0 or {count_name} 1"
        )


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class Generation:
    """One sampled completion: its text, its token ids (the stop token left out) and whether it stopped.

    ``stop_id`` is the token it stopped on (EOS or the chat template's end of turn), ``None`` when it
    ran into the length cap.
    """

    text: str
    token_ids: list[int]
    ended: bool
    stop_id: int | None = None
    # Per sampled token (the stop token included): the entropy of the distribution it was drawn from,
    # softmax(logits / temperature) before top_p; only when asked for (GenerationConfig.record_entropy).
    entropy: list[float] | None = None

    def __post_init__(self):
        if self.ended and self.stop_id is None:
            raise ValueError("a Generation that ended needs the stop token it ended on (stop_id)")


def generate(model, tokenizer, prompts: list, config: GenerationConfig, progress: bool = True,
             desc: str = "generating") -> list[list[Generation]]:
    """Sample ``num_return_sequences`` completions for each prompt.

    Returns one list of :class:`Generation` per prompt, in prompt order.
    """
    prompt_ids = [encode_prompt(p, tokenizer) for p in prompts]
    return generate_from_ids(model, tokenizer, prompt_ids, config, progress, desc)


def generate_from_ids(model, tokenizer, prompt_ids: list[list[int]], config: GenerationConfig,
                      progress: bool = False, desc: str = "generating",
                      synced: bool | None = None) -> list[list[Generation]]:
    """:func:`generate` for prompts that are already token ids (online training tokenizes them once).

    ``synced``: under ZeRO-3 and FSDP2 a forward gathers weights from every process, so all processes must make
    the same number of forwards: one whose completions have all ended keeps stepping until every process's
    have (transformers' ``synced_gpus``). ``None`` lets transformers guess this from global state; online
    training passes it from the engine it runs under (:func:`unialign.distributed.shards_weights`).

    Returns one list of ``num_return_sequences`` :class:`Generation` per prompt, in prompt order.
    """
    if config.seed is not None:
        torch.manual_seed(config.seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    results: list[list[Generation]] = []
    bar = tqdm(total=len(prompt_ids), desc=desc, disable=not progress, unit="prompt")
    try:
        for start in range(0, len(prompt_ids), config.batch_size):
            batch = prompt_ids[start : start + config.batch_size]
            results.extend(_generate_batch(model, tokenizer, batch, config, device, synced))
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return results


@torch.no_grad()
def _generate_batch(model, tokenizer, prompt_ids: list[list[int]], config: GenerationConfig, device,
                    synced: bool | None = None):
    width = max(len(ids) for ids in prompt_ids)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in prompt_ids], device=device)
    attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids], device=device)
    sample = config.temperature > 0
    stops = stop_token_ids(tokenizer)
    recorder = _EntropyRecorder(config.temperature) if config.record_entropy and sample else None
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention,
        max_new_tokens=config.max_new_tokens,
        do_sample=sample,
        temperature=config.temperature if sample else None,
        top_p=config.top_p if sample else None,
        top_k=None,
        repetition_penalty=config.repetition_penalty,
        num_return_sequences=config.num_return_sequences,
        pad_token_id=pad,
        eos_token_id=stops,
        synced_gpus=synced,
        logits_processor=[recorder] if recorder is not None else None,
    )
    new_tokens = output[:, width:].tolist()
    per_prompt = []
    k = config.num_return_sequences
    for i in range(len(prompt_ids)):
        per_prompt.append([to_generation(ids, tokenizer, stops) for ids in new_tokens[i * k : (i + 1) * k]])
    if recorder is not None:
        entropy = recorder.table().tolist()
        for row, generation in enumerate(g for group in per_prompt for g in group):
            generation.entropy = entropy[row][: len(generation.token_ids) + generation.ended]
    return per_prompt


class _EntropyRecorder:
    """A logits processor that only looks: at each step the entropy of ``softmax(scores / temperature)`` per row.

    transformers runs the processors it is given before its own temperature and top-p warpers, so ``scores``
    are the model's logits (after any repetition penalty, 1.0 in online training).
    """

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        self.steps.append(torch.special.entr(probs).sum(-1))
        return scores

    def table(self) -> torch.Tensor:
        """``(rows, steps)`` entropies; a row's entries after its stop token belong to padding."""
        return torch.stack(self.steps, dim=1).cpu()


def to_generation(ids: list[int], tokenizer, stops: list[int]) -> Generation:
    """A :class:`Generation` from sampled ids: cut at the first stop token, padding after it dropped."""
    stop_at = next((i for i, t in enumerate(ids) if t in stops), None)
    if stop_at is not None:
        stop_id, ids = ids[stop_at], ids[:stop_at]
    else:
        stop_id, ids = None, [t for t in ids if t != tokenizer.pad_token_id]
    return Generation(tokenizer.decode(ids, skip_special_tokens=True).strip(), ids, stop_id is not None, stop_id)


def completion_ids(generation: Generation) -> list[int]:
    """Exactly the sampled tokens: the completion's ids plus the stop token it stopped on (docs/data.md)."""
    return list(generation.token_ids) + ([generation.stop_id] if generation.ended else [])


def check_backend(name: str) -> None:
    """Raise a clear error unless generation backend ``name`` can run here.

    ``transformers`` always can. ``vllm`` needs the ``vllm`` package and a CUDA GPU.
    """
    if name == "transformers":
        return
    if name != "vllm":
        raise ValueError(f"unknown generation_backend {name!r}; use transformers or vllm")
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("the vllm package is not installed (pip install vllm)")
    if not torch.cuda.is_available():
        missing.append("no CUDA GPU is visible")
    if missing:
        raise RuntimeError(
            "generation_backend: vllm cannot run here: " + "; ".join(missing)
            + ". Use generation_backend: transformers."
        )
