"""Feedback formats (docs/methods.md, data formats): detect a dataset's format from its columns and validate each row.

Every valid row becomes an :class:`Example`: one prompt, the completions in the format's slot order
(see ``unialign.losses.base.SLOTS``) and the per-slot feedback. Text fields are plain strings or
conversations (lists of ``{"role", "content"}``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from unialign.data.errors import DataError

# Columns each format requires, checked in this order (the first full match wins).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "triple": ("prompt", "reference", "chosen", "rejected"),
    "listwise": ("prompt", "completions", "rewards"),
    "pairwise": ("prompt", "chosen", "rejected"),
    "binary": ("prompt", "completion", "label"),
    "score": ("prompt", "completion", "score"),
    "sft": ("prompt", "completion"),
    "prompt": ("prompt",),
}
ROLES = ("system", "user", "assistant", "tool")
COMPLETION_ROLES = ("assistant", "tool")
# Column that marks a completion as unfinished (sampled up to a length cap, not stopped by the model):
# ``<slot>_ended`` beside each completion column (``chosen_ended``, ``completion_ended``, ...), and
# ``completions_ended`` (a list) beside a listwise row's ``completions``. Absent means ended.
ENDED_SUFFIX = "_ended"


@dataclass
class Example:
    """One validated row in slot order.

    ``labels`` are 1/0 per slot (preferred or not), ``scores`` are explicit scores normalized to
    [0, 1], ``rewards`` are the raw explicit values; each is ``None`` when the row has none.
    """

    prompt: Any
    completions: list[Any]
    row: int
    labels: list[float] | None = None
    scores: list[float] | None = None
    rewards: list[float] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    ended: list[bool] | None = None  # per slot; None means every completion ended
    names: tuple[str, ...] = ()  # the completion columns, for messages naming the field


def detect_format(columns: set[str] | list[str], source: str = "dataset") -> str:
    """Name the feedback format whose required columns the dataset has."""
    columns = set(columns)
    if "messages" in columns and "prompt" not in columns:
        return "sft"
    if {"chosen", "rejected"} <= columns and "prompt" not in columns:
        return "pairwise"  # TRL's implicit-prompt form: the prompt is the shared conversation prefix
    for name, required in FORMAT_COLUMNS.items():
        if set(required) <= columns:
            return name
    raise DataError(
        f"cannot tell the feedback format from the columns {sorted(columns)}; expected one of "
        + "; ".join(f"{n}: {', '.join(c)}" for n, c in FORMAT_COLUMNS.items()),
        source=source,
    )


def validate_row(
    row: dict[str, Any], fmt: str, index: int, source: str, score_range: tuple[float, float] | None = None
) -> Example:
    """Check one row of format ``fmt`` and return it as an :class:`Example`.

    Raises:
        DataError: naming the source, the row and the field at fault.
    """

    def err(problem: str, name: str) -> DataError:
        return DataError(problem, source=source, row=index, field=name)

    if not isinstance(row, dict):
        raise DataError(
            f"a row must be an object with named fields, got {type(row).__name__}", source=source, row=index
        )
    if fmt == "pairwise" and "prompt" not in row:
        row = split_implicit_prompt(row, index, source)
    if fmt == "sft" and "messages" in row and "prompt" not in row:
        row = split_messages(row, index, source)
    for name in FORMAT_COLUMNS[fmt]:
        if name not in row:
            raise err(f"missing required column for {fmt} data", name)
        if row[name] is None:
            raise err(f"is null; {fmt} data needs a value here", name)
    prompt = check_text(row["prompt"], "prompt", err, role="prompt")
    range_ = tuple(score_range) if score_range else (0.0, 1.0)

    if fmt == "prompt":
        return Example(prompt, [], index)
    if fmt in ("pairwise", "triple"):
        names = ("reference", "chosen", "rejected") if fmt == "triple" else ("chosen", "rejected")
        completions = [check_text(row[n], n, err, role="completion") for n in names]
        if completions[-2] == completions[-1]:
            raise err(f"is identical to '{names[-2]}'; a preference pair needs two different completions", "rejected")
        example = Example(
            prompt, completions, index, labels=[1.0] * (len(names) - 1) + [0.0],
            ended=check_ended(row, names, err), names=names,
        )
        if fmt == "pairwise" and row.get("chosen_score") is not None and row.get("rejected_score") is not None:
            raw = [check_number(row[n], n, err) for n in ("chosen_score", "rejected_score")]
            example.rewards = raw
            if score_range is not None or all(0.0 <= r <= 1.0 for r in raw):
                example.scores = [normalize(r, range_, n, err) for r, n in zip(raw, ("chosen_score", "rejected_score"))]
        return example
    if fmt == "binary":
        label = row["label"]
        if isinstance(label, bool) or (isinstance(label, int) and label in (0, 1)):
            return Example(
                prompt,
                [check_text(row["completion"], "completion", err, role="completion")],
                index,
                labels=[float(label)],
                ended=check_ended(row, ("completion",), err),
                names=("completion",),
            )
        raise err(f"label must be true or false; got {_show(label)}", "label")
    if fmt == "score":
        raw = check_number(row["score"], "score", err)
        return Example(
            prompt,
            [check_text(row["completion"], "completion", err, role="completion")],
            index,
            scores=[normalize(raw, range_, "score", err)],
            rewards=[raw],
            ended=check_ended(row, ("completion",), err),
            names=("completion",),
        )
    if fmt == "sft":
        return Example(
            prompt,
            [check_text(row["completion"], "completion", err, role="completion")],
            index,
            ended=check_ended(row, ("completion",), err),
            names=("completion",),
        )
    if fmt == "listwise":
        return _listwise(row, prompt, index, err, score_range)
    raise ValueError(f"unknown format {fmt!r}")


def _listwise(row, prompt, index, err, score_range) -> Example:
    completions, rewards = row["completions"], row["rewards"]
    if not isinstance(completions, list) or not completions:
        raise err("must be a non-empty list of completions", "completions")
    if not isinstance(rewards, list):
        raise err("must be a list of numbers, one per completion", "rewards")
    if len(rewards) != len(completions):
        got = f"{len(rewards)} values for {len(completions)} completions"
        raise err(f"must have one value per completion; got {got}", "rewards")
    texts = [check_text(c, f"completions[{i}]", err, role="completion") for i, c in enumerate(completions)]
    raw = [check_number(r, f"rewards[{i}]", err) for i, r in enumerate(rewards)]
    scores = None
    if score_range is not None:
        scores = [normalize(r, tuple(score_range), f"rewards[{i}]", err) for i, r in enumerate(raw)]
    names = tuple(f"completions[{i}]" for i in range(len(texts)))
    ended = None
    flags = row.get("completions" + ENDED_SUFFIX)
    if flags is not None:
        if not isinstance(flags, list) or len(flags) != len(texts):
            raise err(f"must be a list of {len(texts)} true/false values, one per completion", "completions_ended")
        ended = [_flag(f, f"completions_ended[{i}]", err) for i, f in enumerate(flags)]
    return Example(prompt, texts, index, rewards=raw, scores=scores, ended=ended, names=names)


def check_ended(row: dict[str, Any], names: tuple[str, ...], err) -> list[bool] | None:
    """The ``<slot>_ended`` flags of a row's completions, or ``None`` when the row has none (all ended)."""
    columns = [name + ENDED_SUFFIX for name in names]
    if all(row.get(column) is None for column in columns):
        return None
    return [True if row.get(column) is None else _flag(row[column], column, err) for column in columns]


def _flag(value: Any, name: str, err) -> bool:
    if not isinstance(value, bool):
        raise err(f"must be true or false; got {_show(value)}", name)
    return value


def check_text(value: Any, name: str, err, role: str) -> Any:
    """A non-empty string or a well-formed conversation; returns it unchanged."""
    if isinstance(value, str):
        check_unicode(value, name, err)
        if role == "completion" and not value.strip():
            raise err("is empty; a completion needs at least one token of text", name)
        return value
    if isinstance(value, list):
        check_conversation(value, name, err, role)
        return value
    raise err(f"must be a string or a list of {{role, content}} messages, got {type(value).__name__}", name)


def check_unicode(text: str, name: str, err) -> None:
    """Refuse lone surrogates (JSON escapes such as ``\\ud800``): they are not text and tokenizers crash on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise err(f"contains an invalid character; {text[error.start]!r} at position {error.start}", name) from None


def check_conversation(messages: list, name: str, err, role: str) -> None:
    """Roles must be known, contents strings; prompts end with a user turn, completions are assistant turns."""
    if not messages:
        raise err("is an empty conversation", name)
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise err(f"message {i} must be an object with 'role' and 'content'", name)
        if message["role"] not in ROLES:
            role_ = _show(message["role"])
            raise err(f"message {i} has an unknown role; role {role_} is not one of {', '.join(ROLES)}", name)
        if not isinstance(message["content"], str):
            raise err(f"message {i} content must be a string", name)
        check_unicode(message["content"], name, err)
        if message["role"] == "system" and i != 0:
            raise err(f"message {i} is a system message; only the first message may be one", name)
    if role == "prompt" and messages[-1]["role"] not in ("user", "tool"):
        raise err("a conversation prompt must end with a user (or tool) message", name)
    if role == "completion":
        roles = [m["role"] for m in messages]
        if any(r not in COMPLETION_ROLES for r in roles) or roles[0] != "assistant" or roles[-1] != "assistant":
            raise err(
                f"a conversation completion holds assistant (and tool) messages, starting and ending with an "
                f"assistant message; got roles {roles}",
                name,
            )
        if not messages[-1]["content"].strip():
            raise err("is empty; a completion needs at least one token of text", name)


def check_number(value: Any, name: str, err) -> float:
    """A finite int or float (booleans and strings are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise err(f"must be a number; got {_show(value)}", name)
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range (JSON allows any number of digits)
        raise err("must be finite; got an integer too large for a float", name) from None
    if not math.isfinite(number):
        raise err(f"must be finite; got {value!r}", name)
    return number


def _show(value: Any, limit: int = 60) -> str:
    """A short repr for messages: huge or deeply nested values must not flood or crash the error."""
    try:
        text = repr(value)
    except RecursionError:
        return f"a deeply nested {type(value).__name__}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def normalize(value: float, range_: tuple[float, float], name: str, err) -> float:
    """Map a score from its declared range onto [0, 1]; out-of-range scores are errors."""
    low, high = range_
    if not low <= value <= high:
        raise err(f"is outside the declared score range [{low}, {high}]; got {value} (set score_range)", name)
    return (value - low) / (high - low)


def split_implicit_prompt(row: dict, index: int, source: str) -> dict:
    """TRL's implicit-prompt rows: the prompt is the longest shared prefix of both conversations."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        raise DataError(
            "missing required column (rows without a prompt need conversational chosen/rejected)",
            source=source,
            row=index,
            field="prompt",
        )
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if shared == 0:
        raise DataError(
            "chosen and rejected share no leading messages to use as the prompt",
            source=source,
            row=index,
            field="prompt",
        )
    return {**row, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


def split_messages(row: dict, index: int, source: str) -> dict:
    """SFT ``messages`` rows: everything up to the last assistant turn is the prompt."""
    messages = row["messages"]
    if (
        not isinstance(messages, list)
        or not messages
        or not isinstance(messages[-1], dict)
        or messages[-1].get("role") != "assistant"
    ):
        raise DataError(
            "must be a conversation ending with an assistant message", source=source, row=index, field="messages"
        )
    return {**row, "prompt": messages[:-1], "completion": messages[-1:]}
