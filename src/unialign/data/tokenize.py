"""Tokenization (SPEC §1): prompt and completions separately, chat templates, truncation, drops.

Prompt and completion are tokenized on their own and concatenated, so no token merges across the
boundary. Conversation prompts go through the chat template with ``add_generation_prompt=True``; a
completion is its text plus EOS. Truncation keeps the end of the prompt and the start of each
completion and never leaves a completion empty; a row whose prompt alone fills the budget is
dropped and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from unialign.data.errors import DataError, PromptTooLong
from unialign.data.formats import Example, validate_row

logger = logging.getLogger(__name__)


@dataclass
class TokenizedExample:
    """Token ids of one row plus its feedback; reference log-probs are filled in when precomputed."""

    prompt_ids: list[int]
    completion_ids: list[list[int]]
    row: int
    labels: list[float] | None = None
    scores: list[float] | None = None
    rewards: list[float] | None = None
    kl_completion_ids: list[int] | None = None
    ref_logps: list[float] | None = None
    ref_prompt_logps: float | None = None
    ref_kl_logps: float | None = None


@dataclass
class DropReport:
    """Rows left out of training, counted by reason, with the first few row numbers of each."""

    total: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, list[int]] = field(default_factory=dict)

    def add(self, reason: str, row: int) -> None:
        """Count one dropped row."""
        self.reasons[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(row + 1)

    @property
    def dropped(self) -> int:
        """How many rows were dropped."""
        return sum(self.reasons.values())

    def summary(self) -> str:
        """One line per reason, for logs and the run directory."""
        if not self.dropped:
            return f"kept all {self.total} rows"
        parts = [f"{count} × {reason} (rows {self.examples[reason]}…)" for reason, count in self.reasons.items()]
        return f"dropped {self.dropped} of {self.total} rows: " + "; ".join(parts)


def encode_prompt(prompt: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a prompt: chat template with the generation prompt for conversations."""
    if isinstance(prompt, list):
        from jinja2.exceptions import TemplateError

        try:
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        except TemplateError as err:  # e.g. a template that requires user/assistant alternation
            raise DataError(f"the tokenizer's chat template refuses this conversation: {err}", field="prompt") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def encode_completion(completion: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of a completion: the assistant text followed by EOS."""
    text = completion[0]["content"] if isinstance(completion, list) else completion
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def tokenize_example(
    example: Example, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int | None
) -> TokenizedExample:
    """Tokenize and truncate one validated row.

    Raises:
        DataError: when the prompt alone leaves no room for a completion token (a counted drop).
    """
    prompt_ids = encode_prompt(example.prompt, tokenizer)
    if not prompt_ids:
        raise DataError("tokenizes to no tokens; a prompt needs at least one", row=example.row, field="prompt")
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        prompt_ids = prompt_ids[-max_prompt_length:]
    budget = max_length - len(prompt_ids)
    if budget < 1:
        raise PromptTooLong(
            f"prompt alone has {len(prompt_ids)} tokens, over max_length={max_length}", row=example.row, field="prompt"
        )
    completions = [encode_completion(c, tokenizer)[:budget] for c in example.completions]
    return TokenizedExample(
        prompt_ids, completions, example.row, labels=example.labels, scores=example.scores, rewards=example.rewards
    )


def tokenize_rows(
    rows: list[dict[str, Any]],
    fmt: str,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_length: int,
    max_prompt_length: int | None,
    source: str = "dataset",
    on_bad_row: str = "error",
    score_range: tuple[float, float] | None = None,
) -> tuple[list[TokenizedExample], DropReport]:
    """Validate and tokenize every row.

    Over-long prompts are always dropped and counted (SPEC §1). Other bad rows raise a
    :class:`DataError` naming source, row and field, or, with ``on_bad_row="drop"``, are counted.
    """
    report = DropReport(total=len(rows))
    examples = []
    for index, row in enumerate(rows):
        result = tokenize_one(row, fmt, index, source, tokenizer, max_length, max_prompt_length, score_range)
        if isinstance(result, TokenizedExample):
            examples.append(result)
        elif is_fatal(result, on_bad_row):
            raise result
        else:
            report.add(drop_reason(result), index)
    if report.dropped:
        logger.warning("%s: %s", source, report.summary())
    if not rows:
        raise DataError("has no rows", source=source)
    if not examples:
        raise DataError(f"no usable rows ({report.summary()})", source=source)
    return examples, report


def attach_kl_pairs(examples: list[TokenizedExample], max_length: int) -> None:
    """Give each row the first completion of the next row with a different prompt, for KTO's KL estimate.

    Pairing by dataset order rather than within a batch makes the estimate independent of batch
    size and lets reference log-probs of the pairs be precomputed. Rows that share a prompt (the
    chosen and rejected halves of a converted pair sit next to each other) are skipped, so every
    pair really is mismatched.
    """
    count = len(examples)
    for index, example in enumerate(examples):
        other = next(
            (
                examples[(index + step) % count]
                for step in range(1, count)
                if examples[(index + step) % count].prompt_ids != example.prompt_ids
            ),
            None,
        )
        if other is None:
            raise DataError(
                "KTO's KL estimate pairs each prompt with another prompt's completion; "
                "the dataset needs at least two different prompts"
            )
        example.kl_completion_ids = other.completion_ids[0][: max_length - len(example.prompt_ids)]


# Bump when the token ids tokenize_example produces for the same row and settings change: it is part of
# the fingerprint of every tokenized-dataset cache (unialign.data.tokenized), so old caches are not reused.
TOKENIZATION_VERSION = "1"


def tokenize_one(
    row: Any,
    fmt: str,
    index: int,
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None,
    score_range: tuple[float, float] | None = None,
) -> TokenizedExample | DataError:
    """Validate and tokenize one row; a bad row is returned (not raised) as its :class:`DataError`.

    The error names ``source`` and the row. :func:`is_fatal` tells a counted drop from a stop.
    """
    try:
        example = validate_row(row, fmt, index, source, score_range)
        return tokenize_example(example, tokenizer, max_length, max_prompt_length)
    except PromptTooLong as err:
        return err
    except DataError as err:
        if err.source is None:
            return DataError(err.problem, source=source, row=index, field=err.field)
        return err


def is_fatal(error: DataError, on_bad_row: str) -> bool:
    """Whether a bad row stops the run: over-long prompts never do, other bad rows unless ``on_bad_row="drop"``."""
    return not isinstance(error, PromptTooLong) and on_bad_row == "error"


def drop_reason(error: DataError) -> str:
    """The :class:`DropReport` reason a dropped row is counted under."""
    if isinstance(error, PromptTooLong):
        return "prompt longer than max_length"
    return f"{error.field}: {error.problem.split(';')[0]}"
