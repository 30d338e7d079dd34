"""Build a reward source from a short spec string, the one way every command names a reward.

Specs: ``offline`` (the offline judge), ``callable:module:function`` (imported only when named),
``reward-model:PATH`` (a sequence-classification checkpoint).
"""

from __future__ import annotations

import importlib

import torch

from unialign.rewards.base import Prompt, RewardSource, check_lengths, prompt_text


class CallableReward(RewardSource):
    """Wraps a Python function ``f(prompts, completions) -> list[float]``."""

    def __init__(self, function, name: str, bounds: tuple[float, float] | None = None):
        self.function, self.name, self.bounds = function, name, bounds

    def __call__(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        check_lengths(prompts, completions)
        values = [float(v) for v in self.function(prompts, completions)]
        if len(values) != len(completions):
            raise ValueError(
                f"reward function {self.name} returned {len(values)} values for {len(completions)} completions"
            )
        return values


class RewardModel(RewardSource):
    """A sequence-classification checkpoint scoring (prompt, completion) with its own tokenizer and chat template."""

    def __init__(self, path: str, batch_size: int = 8, trust_remote_code: bool = False):
        from unialign.models import load_model, load_tokenizer

        self.name, self.bounds, self.batch_size = f"reward-model:{path}", None, batch_size
        self.tokenizer = load_tokenizer(path, trust_remote_code)
        self.model = load_model(path, kind="sequence_classifier", trust_remote_code=trust_remote_code).eval()

    @torch.no_grad()
    def __call__(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        from unialign.data.tokenize import encode_completion, encode_prompt

        check_lengths(prompts, completions)
        scores = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(prompts), self.batch_size):
            seqs = [
                encode_prompt(p, self.tokenizer) + encode_completion(c, self.tokenizer)
                for p, c in zip(prompts[start : start + self.batch_size], completions[start : start + self.batch_size])
            ]
            width = max(map(len, seqs))
            ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
            mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, 0]
            scores.extend(logits.float().tolist())
        return scores


def load_reward(spec: str | RewardSource) -> RewardSource:
    """Turn a spec string into a reward source (a RewardSource passes through)."""
    if isinstance(spec, RewardSource):
        return spec
    kind, _, rest = spec.partition(":")
    if kind == "offline":
        from unialign.rewards.offline_judge import OfflineJudge

        return OfflineJudge()
    if kind == "callable":
        module, _, function = rest.rpartition(":")
        if not module:
            raise ValueError(f"reward spec {spec!r}: write callable:module.path:function")
        return CallableReward(getattr(importlib.import_module(module), function), name=rest)
    if kind == "reward-model":
        return RewardModel(rest)
    raise ValueError(f"unknown reward spec {spec!r}; use offline, callable:module:function or reward-model:PATH")


__all__ = ["CallableReward", "RewardModel", "load_reward", "prompt_text"]
