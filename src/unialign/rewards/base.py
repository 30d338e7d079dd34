"""The reward-source interface shared by online training, dataset building and evaluation (docs/online.md)."""

from __future__ import annotations

from abc import ABC, abstractmethod

Prompt = str | list[dict]


class RewardSource(ABC):
    """Scores completions of prompts: ``source(prompts, completions) -> list[float]``, one per pair.

    ``name`` identifies the source in logs and saved scores. ``bounds`` is the (low, high) range of
    the outputs when known, e.g. (0, 1) for the offline judge; None for unbounded sources such as a
    reward model. Consumers use ``bounds`` to normalize rewards to [0, 1].
    A prompt is a plain string or a conversation (a list of ``{"role", "content"}`` messages).
    """

    name: str = "reward"
    bounds: tuple[float, float] | None = None

    @abstractmethod
    def __call__(self, prompts: list[Prompt], completions: list[str]) -> list[float]:
        """One reward per (prompt, completion) pair; both lists have the same length."""


def prompt_text(prompt: Prompt) -> str:
    """The text a grader should read: the prompt itself, or a conversation's last user message."""
    if isinstance(prompt, str):
        return prompt
    for message in reversed(prompt):
        if message.get("role") == "user":
            return _content(message)
    return _content(prompt[-1]) if prompt else ""


def _content(message: dict) -> str:
    content = message.get("content", "")
    if isinstance(content, list):  # multimodal-style content parts: keep the text parts
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content)


def check_lengths(prompts: list, completions: list) -> None:
    """Raise ValueError when prompts and completions differ in length."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
