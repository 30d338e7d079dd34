"""Tokenization (docs/data.md, tokenization): prompt and completions separately, chat templates, truncation, drops.

Prompt and completion are tokenized on their own and concatenated, so no token merges across the
boundary. Conversation prompts go through the chat template with ``add_generation_prompt=True``; a
completion is its text plus EOS. Truncation keeps the end of the prompt and the start of each
completion and never leaves a completion empty; a row whose prompt alone fills the budget is
dropped and counted.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from jinja2.exceptions import TemplateError
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


# Bump when the token ids produced for the same rows and settings change: cached tokenized datasets
# carry it in their fingerprint, so a change here invalidates them.
TOKENIZATION_VERSION = "2"


def encode_prompt(prompt: Any, tokenizer: PreTrainedTokenizerBase, split_special_tokens: bool = True) -> list[int]:
    """Token ids of a prompt: chat template with the generation prompt for conversations.

    With ``split_special_tokens`` (the default) a special token's text inside the data (a user who
    writes ``<|im_end|>``) is tokenized as plain text; only the template's own markers are control tokens.
    """
    if isinstance(prompt, list):
        return render_prompt(prompt, tokenizer, split_special_tokens).ids()
    return tokenizer(prompt, add_special_tokens=True, split_special_tokens=split_special_tokens)["input_ids"]


@dataclass
class RenderedPrompt:
    """A conversational prompt rendered once: its shielded messages, its text with the generation
    prompt, and the :class:`Shield` that holds its special-token text; completions render after it."""

    shield: Shield
    messages: list[dict]
    head: str

    def ids(self) -> list[int]:
        """The prompt's token ids."""
        return self.shield.encode(self.head)


def render_prompt(prompt: list[dict], tokenizer: PreTrainedTokenizerBase, split_special_tokens: bool = True
                  ) -> RenderedPrompt:
    """Render a conversational prompt with the generation prompt (see :func:`encode_prompt`)."""
    shield = Shield(tokenizer, split_special_tokens)
    messages = shield.messages(prompt)
    return RenderedPrompt(shield, messages, render(messages, tokenizer, add_generation_prompt=True))


class Shield:
    """Keeps special-token text inside message contents from becoming control tokens.

    Each such occurrence is swapped for a private-use placeholder before the template renders, and
    the placeholder is tokenized as the original text afterwards (``split_special_tokens``), so the
    template's own markers stay control tokens. Rows without such text take the plain path unchanged.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, active: bool = True):
        self.tokenizer, self.table = tokenizer, []
        self.pattern = _special_pattern(tokenizer) if active else None

    def messages(self, messages: list[dict]) -> list[dict]:
        """``messages`` with special-token text in their contents replaced by placeholders."""
        if self.pattern is None or not any(self.pattern.search(m.get("content") or "") for m in messages):
            return messages
        return [{**m, "content": self.pattern.sub(self._hold, m["content"])} if m.get("content") else m
                for m in messages]

    def _hold(self, match) -> str:
        self.table.append(match.group(0))
        return f"{_OPEN}{len(self.table) - 1}{_CLOSE}"

    def encode(self, text: str) -> list[int]:
        """Token ids of rendered ``text``, each placeholder as its original text."""
        if not self.table:
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = []
        for index, piece in enumerate(_PLACEHOLDER.split(text)):
            if index % 2:
                ids += self.tokenizer(self.table[int(piece)], add_special_tokens=False, split_special_tokens=True)[
                    "input_ids"
                ]
            elif piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
        return ids


_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def _special_pattern(tokenizer: PreTrainedTokenizerBase) -> re.Pattern:
    ids = special_ids(tokenizer)
    cached = _SPECIAL_PATTERNS.get(tokenizer)
    if cached is None or cached[0] is not ids:  # built once per tokenizer (and vocabulary): this runs per row
        texts = sorted(tokenizer.convert_ids_to_tokens(sorted(ids)), key=len, reverse=True)
        cached = (ids, re.compile("|".join(re.escape(t) for t in texts if t)))
        _SPECIAL_PATTERNS[tokenizer] = cached
    return cached[1]


_SPECIAL_PATTERNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def render(messages: list[dict], tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages``; a template that refuses them is a :class:`DataError`."""
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError as err:  # e.g. a template that requires user/assistant alternation
        raise DataError(f"the tokenizer's chat template refuses this conversation: {err}", field="prompt") from None
    except ValueError as err:  # transformers: the tokenizer has no chat template at all
        raise DataError(f"cannot apply a chat template: {err}", field="prompt") from None


def special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids of the tokenizer's special tokens, the added control tokens (``<|im_end|>``, ``<end_of_turn>``) included."""
    # Asked for every row, so kept per tokenizer (and vocabulary size, in case tokens are added later)
    # outside the tokenizer object: an attribute on it would change its hash, and with it dataset caches.
    size, ids = _SPECIAL_IDS.get(tokenizer, (None, None))
    if size != len(tokenizer):
        added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
        size, ids = len(tokenizer), frozenset(set(tokenizer.all_special_ids) | added)
        _SPECIAL_IDS[tokenizer] = (size, ids)
    return ids


_SPECIAL_IDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_completion(
    prompt: Any,
    completion: Any,
    tokenizer: PreTrainedTokenizerBase,
    ended: bool = True,
    name: str = "completion",
    split_special_tokens: bool = True,
) -> list[int]:
    """Token ids of one completion of ``prompt`` (docs/data.md, tokenization).

    Conversational prompt: what the chat template renders for the completion's message(s) after the
    generation prompt, up to and including the end-of-turn token that closes the last message; a
    plain-string completion is one assistant message. Separators the template writes after that
    token (ChatML's newline) are left out: generation stops at the end of turn, so the model never
    produces them. Plain-string prompt: the text followed by EOS (TRL's rule). An unfinished
    completion (``ended=False``) gets no terminator. ``split_special_tokens``: as :func:`encode_prompt`.

    Raises:
        DataError: when the template does not render the prompt as the start of prompt + completion
            (the completion's tokens would then be undefined), or a conversational completion
            follows a plain-string prompt.
    """
    return encode_completions(prompt, [completion], tokenizer, [ended], [name], split_special_tokens)[0]


def encode_completions(
    prompt: Any,
    completions: list[Any],
    tokenizer: PreTrainedTokenizerBase,
    ended: list[bool],
    names: list[str],
    split_special_tokens: bool = True,
    rendered: RenderedPrompt | None = None,
) -> list[list[int]]:
    """:func:`encode_completion` for every completion of one prompt, rendering the prompt once.

    ``rendered``: the conversational prompt already rendered by :func:`render_prompt` with the same
    ``split_special_tokens``, when the caller has it.
    """
    if not isinstance(prompt, list):
        out = []
        for completion, done, name in zip(completions, ended, names):
            if isinstance(completion, list):
                raise DataError("a conversational completion needs a conversational prompt (a list of messages)",
                                field=name)
            ids = tokenizer(completion, add_special_tokens=False, split_special_tokens=split_special_tokens)
            out.append(ids["input_ids"] + [tokenizer.eos_token_id] if done else ids["input_ids"])
        return out
    rendered = rendered or render_prompt(prompt, tokenizer, split_special_tokens)
    shield, prompt, head = rendered.shield, rendered.messages, rendered.head
    out = []
    for completion, done, name in zip(completions, ended, names):
        messages = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        try:
            full = render(prompt + shield.messages(messages), tokenizer, add_generation_prompt=False)
        except DataError as err:
            raise DataError(err.problem, field=name) from None
        if not full.startswith(head):
            at = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
            raise DataError(
                "the chat template renders the prompt differently when the completion follows it (they differ at "
                f"character {at}: {head[at:at + 30]!r} vs {full[at:at + 30]!r}), so the completion's tokens are "
                "not defined; use a template that renders a conversation's start the same way in both cases",
                field=name,
            )
        out.append(end_of_turn(shield.encode(full[len(head) :]), tokenizer, done))
    return out


def end_of_turn(ids: list[int], tokenizer: PreTrainedTokenizerBase, ended: bool) -> list[int]:
    """Cut a rendered completion after its end-of-turn token (``ended``) or before it (unfinished).

    The end of turn is the first special token of the trailing run of special and blank tokens
    (``<|im_end|>`` of ``…<|im_end|>\\n``, ``<|end|>`` of Phi-3's ``…<|end|>\\n<|endoftext|>``). A
    template that closes a turn with no special token gets EOS appended, as a plain-string row would.
    """
    special = special_ids(tokenizer)
    cut = len(ids)
    while cut > 0 and (ids[cut - 1] in special or not tokenizer.decode([ids[cut - 1]]).strip()):
        cut -= 1
    terminator = next((i for i in range(cut, len(ids)) if ids[i] in special), None)
    if terminator is None:
        return ids[:cut] + [tokenizer.eos_token_id] if ended else ids[:cut]
    return ids[: terminator + 1] if ended else ids[:terminator]


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Tokens that end a generated answer: EOS and the chat template's end of turn (``<|eot_id|>``, ...)."""
    ids = [tokenizer.eos_token_id]
    if getattr(tokenizer, "chat_template", None):
        probe = [{"role": "user", "content": "Hi"}]
        try:
            rendered = encode_completion(probe, "Hello", tokenizer)
        except DataError:
            return ids
        if rendered and rendered[-1] in special_ids(tokenizer) and rendered[-1] not in ids:
            ids.append(rendered[-1])
    return ids


def encode_prompt_capped(
    prompt: Any, tokenizer: PreTrainedTokenizerBase, max_prompt_length: int | None, split_special_tokens: bool = True
) -> list[int]:
    """:func:`encode_prompt`, cut to ``max_prompt_length`` tokens.

    A plain-string prompt keeps its last tokens. A conversation keeps the template's structure (its
    header, every role marker and the generation prompt) and loses text from the start of its
    earliest non-system messages instead, so a capped prompt still begins with the template's own
    first tokens (RAO's shared first token) and ends with the generation prompt.

    Raises:
        PromptTooLong: when the template's structure alone is longer than ``max_prompt_length``.
    """
    ids = encode_prompt(prompt, tokenizer, split_special_tokens)
    if max_prompt_length is None or len(ids) <= max_prompt_length:
        return ids
    if not isinstance(prompt, list):
        return ids[-max_prompt_length:]
    messages = [dict(m) for m in prompt]
    for message in messages:
        if message["role"] == "system":
            continue
        content = tokenizer(message["content"], add_special_tokens=False, split_special_tokens=split_special_tokens)[
            "input_ids"
        ]
        # Re-render after each cut: the template may trim or re-tokenize at the new boundary.
        while content:
            excess = len(ids) - max_prompt_length
            content = content[min(len(content), max(excess, 1)) :]
            message["content"] = tokenizer.decode(content)
            ids = encode_prompt(messages, tokenizer, split_special_tokens)
            if len(ids) <= max_prompt_length:
                return ids
    raise PromptTooLong(
        f"the chat template's own tokens take {len(ids)} tokens with every message emptied, "
        f"over max_prompt_length={max_prompt_length}",
        field="prompt",
    )


def tokenize_example(
    example: Example,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None,
    split_special_tokens: bool = True,
) -> TokenizedExample:
    """Tokenize and truncate one validated row (``split_special_tokens``: see :func:`encode_prompt`).

    Raises:
        PromptTooLong: when the prompt alone leaves no room for a completion token (a counted drop).
        DataError: when a field cannot be tokenized as the format and template require.
    """
    rendered = None
    try:
        if isinstance(example.prompt, list):
            rendered = render_prompt(example.prompt, tokenizer, split_special_tokens)
            prompt_ids = rendered.ids()
        else:
            prompt_ids = encode_prompt(example.prompt, tokenizer, split_special_tokens)
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = encode_prompt_capped(example.prompt, tokenizer, max_prompt_length, split_special_tokens)
    except DataError as err:
        raise type(err)(err.problem, row=example.row, field=err.field) from None
    if not prompt_ids:
        raise DataError("tokenizes to no tokens; a prompt needs at least one", row=example.row, field="prompt")
    budget = max_length - len(prompt_ids)
    if budget < 1:
        raise PromptTooLong(
            f"prompt alone has {len(prompt_ids)} tokens, over max_length={max_length}", row=example.row, field="prompt"
        )
    names = example.names or tuple(f"completions[{i}]" for i in range(len(example.completions)))
    ended = example.ended or [True] * len(example.completions)
    try:
        completions = encode_completions(example.prompt, example.completions, tokenizer, ended, names,
                                         split_special_tokens, rendered)
    except DataError as err:
        raise DataError(err.problem, row=example.row, field=err.field) from None
    completions = [ids[:budget] for ids in completions]
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
    split_special_tokens: bool = True,
) -> tuple[list[TokenizedExample], DropReport]:
    """Validate and tokenize every row.

    Over-long prompts are always dropped and counted (docs/data.md, tokenization). Other bad rows raise a
    :class:`DataError` naming source, row and field, or, with ``on_bad_row="drop"``, are counted.
    """
    report = DropReport(total=len(rows))
    examples = []
    for index, row in enumerate(rows):
        result = tokenize_one(
            row, fmt, index, source, tokenizer, max_length, max_prompt_length, score_range, split_special_tokens
        )
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


def tokenize_one(
    row: Any,
    fmt: str,
    index: int,
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int | None,
    score_range: tuple[float, float] | None = None,
    split_special_tokens: bool = True,
) -> TokenizedExample | DataError:
    """Validate and tokenize one row; a bad row is returned (not raised) as its :class:`DataError`.

    The error names ``source`` and the row. :func:`is_fatal` tells a counted drop from a stop.
    """
    try:
        example = validate_row(row, fmt, index, source, score_range)
        return tokenize_example(example, tokenizer, max_length, max_prompt_length, split_special_tokens)
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
