"""Feedback formats (docs/data.md): the one validator table, format detection, and row validation.

Every format is a :class:`FeedbackFormat` in :data:`FEEDBACK_FORMATS`: its required and optional
columns, its completion slots (``unialign.feedback.SLOTS``, which the losses index) and the validator
that turns a row into an :class:`Example`: one prompt, the completions in slot order and the per-slot
feedback. Loading (``tokenize``, ``pipeline``, online prompts), converting (``converters``) and
building (``builder``) all validate rows here, so a row is accepted or refused with the same message
everywhere. Text fields are plain strings or conversations (lists of ``{"role", "content"}``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from unialign.data.errors import DataError
from unialign.feedback import FORMATS, SLOTS, rescale

ROLES = ("system", "user", "assistant", "tool")
COMPLETION_ROLES = ("assistant", "tool")
# Column that marks a completion as unfinished (sampled up to a length cap, not stopped by the model):
# ``<slot>_ended`` beside each completion column (``chosen_ended``, ``completion_ended``, ...), and
# ``completions_ended`` (a list) beside a listwise row's ``completions``. Absent means ended.
ENDED_SUFFIX = "_ended"
LISTWISE_ENDED = "completions" + ENDED_SUFFIX
# What an out-of-range score's message tells the user to do; the same words for loading and converting.
RANGE_HINT = "declare its range: score_range in a config, reward_range when converting"

Row = dict[str, Any]
ErrorFactory = Callable[[str, str], DataError]


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


# A format's row check: (row with every required column present and non-null, the checked prompt,
# the row's index, its error factory, the declared score range) -> Example.
RowValidator = Callable[[Row, Any, int, ErrorFactory, "tuple[float, float] | None"], Example]


@dataclass(frozen=True)
class FeedbackFormat:
    """One feedback format: the columns a row has, the completion slots, and the row's validator.

    ``without_prompt`` names the columns that identify the format in rows that have no ``prompt``
    column (TRL's implicit-prompt pairs, SFT ``messages``), and ``split`` derives the prompt from them.
    """

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...]
    check: RowValidator
    without_prompt: tuple[str, ...] = ()
    split: Callable[[Row, int, str], Row] | None = None

    @property
    def slots(self) -> tuple[str, ...]:
        """The completion columns in slot order (empty for listwise and prompt-only rows)."""
        return SLOTS[self.name]


def row_errors(source: str | None, index: int) -> ErrorFactory:
    """``err(problem, field)``: the :class:`DataError` for one field of row ``index`` of ``source``."""

    def err(problem: str, name: str) -> DataError:
        return DataError(problem, source=source, row=index, field=name)

    return err


def detect_format(columns: Iterable[str], source: str = "dataset") -> str:
    """Name the feedback format whose required columns the dataset has (see :data:`FEEDBACK_FORMATS`).

    Formats are tried in the table's order and the first whose required columns are all present wins;
    rows without a ``prompt`` column are matched on ``without_prompt`` first.
    """
    columns = set(columns)
    if "prompt" not in columns:
        for spec in FEEDBACK_FORMATS.values():
            if spec.without_prompt and set(spec.without_prompt) <= columns:
                return spec.name
    for spec in FEEDBACK_FORMATS.values():
        if set(spec.required) <= columns:
            return spec.name
    raise DataError(
        f"cannot tell the feedback format from the columns {sorted(columns)}; expected one of "
        + "; ".join(f"{n}: {', '.join(c)}" for n, c in FORMAT_COLUMNS.items()),
        source=source,
    )


def columns_of(rows: Iterable[Any], limit: int = 50) -> set[str]:
    """The columns of the first ``limit`` rows, for :func:`detect_format`.

    The union, so that one row missing a column is validated against the format the others show and
    reported by row and field, rather than changing the detected format. Rows that are not objects
    are skipped here; :func:`validate_row` names them.
    """
    columns: set[str] = set()
    for i, row in enumerate(rows):
        if i >= limit:
            break
        if isinstance(row, dict):
            columns |= set(row)
    return columns


def validate_row(
    row: Row, fmt: str, index: int, source: str | None, score_range: tuple[float, float] | None = None
) -> Example:
    """Check one row of format ``fmt`` and return it as an :class:`Example`.

    ``score_range`` declares the range of score columns (``score``, ``chosen_score`` /
    ``rejected_score``, listwise ``rewards``); scores are normalized from it onto [0, 1].

    Raises:
        DataError: naming the source, the row and the field at fault.
    """
    spec = FEEDBACK_FORMATS.get(fmt)
    if spec is None:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    err = row_errors(source, index)
    row = check_object(row, index, source)
    if spec.split is not None and "prompt" not in row and any(c in row for c in spec.without_prompt):
        row = spec.split(row, index, source)
    for name in spec.required:
        require(row, name, err, fmt)
    prompt = check_text(row["prompt"], "prompt", err, role="prompt")
    return spec.check(row, prompt, index, err, score_range)


def check_object(row: Any, index: int, source: str | None) -> Row:
    """``row`` itself, which must be an object with named fields (a dict)."""
    if not isinstance(row, dict):
        raise DataError(
            f"a row must be an object with named fields, got {type(row).__name__}", source=source, row=index
        )
    return row


def require(row: Row, name: str, err: ErrorFactory, what: str) -> Any:
    """``row[name]``, which must be present and not null; ``what`` names the data in the message."""
    if name not in row:
        raise err(f"missing required column for {what} data", name)
    if row[name] is None:
        raise err(f"is null; {what} data needs a value here", name)
    return row[name]


def _prompt_only(row, prompt, index, err, score_range) -> Example:
    return Example(prompt, [], index)


def _preference(names: tuple[str, ...]) -> RowValidator:
    """Pairwise and triple rows: every slot but the last is preferred; the last two must differ."""

    def check(row, prompt, index, err, score_range) -> Example:
        completions = completion_texts(row, names, prompt, err)
        if completions[-2] == completions[-1]:
            raise err(f"is identical to '{names[-2]}'; a preference pair needs two different completions", names[-1])
        example = Example(
            prompt, completions, index, labels=[1.0] * (len(names) - 1) + [0.0],
            ended=check_ended(row, names, err), names=names,
        )
        score_names = ("chosen_score", "rejected_score")
        if names == SLOTS["pairwise"] and all(row.get(n) is not None for n in score_names):
            raw = [check_number(row[n], n, err) for n in score_names]
            example.rewards = raw
            if score_range is not None or all(0.0 <= r <= 1.0 for r in raw):
                example.scores = [normalize_score(r, score_range, n, err) for r, n in zip(raw, score_names)]
        return example

    return check


def _single(fmt, row, prompt, index, err, **feedback) -> Example:
    """Binary, score and SFT rows: one ``completion``."""
    names = SLOTS[fmt]
    texts = completion_texts(row, names, prompt, err)
    return Example(prompt, texts, index, ended=check_ended(row, names, err), names=names, **feedback)


def _binary(row, prompt, index, err, score_range) -> Example:
    return _single("binary", row, prompt, index, err, labels=[check_label(row["label"], "label", err)])


def _score(row, prompt, index, err, score_range) -> Example:
    raw = check_number(row["score"], "score", err)
    score = normalize_score(raw, score_range, "score", err)
    return _single("score", row, prompt, index, err, scores=[score], rewards=[raw])


def _sft(row, prompt, index, err, score_range) -> Example:
    return _single("sft", row, prompt, index, err)


def _listwise(row, prompt, index, err, score_range) -> Example:
    completions, rewards = row["completions"], row["rewards"]
    if not isinstance(completions, list) or not completions:
        raise err("must be a non-empty list of completions", "completions")
    if not isinstance(rewards, list):
        raise err("must be a list of numbers, one per completion", "rewards")
    if len(rewards) != len(completions):
        got = f"{len(rewards)} values for {len(completions)} completions"
        raise err(f"must have one value per completion; got {got}", "rewards")
    names = tuple(f"completions[{i}]" for i in range(len(completions)))
    texts = completion_texts(dict(zip(names, completions)), names, prompt, err)
    raw = [check_number(r, f"rewards[{i}]", err) for i, r in enumerate(rewards)]
    scores = None
    if score_range is not None:
        scores = [normalize_score(r, score_range, f"rewards[{i}]", err) for i, r in enumerate(raw)]
    ended = None
    flags = row.get(LISTWISE_ENDED)
    if flags is not None:
        if not isinstance(flags, list) or len(flags) != len(texts):
            raise err(f"must be a list of {len(texts)} true/false values, one per completion", LISTWISE_ENDED)
        ended = [_flag(f, f"{LISTWISE_ENDED}[{i}]", err) for i, f in enumerate(flags)]
    return Example(prompt, texts, index, rewards=raw, scores=scores, ended=ended, names=names)


def completion_texts(row: Row, names: tuple[str, ...], prompt: Any, err: ErrorFactory) -> list[Any]:
    """The checked completions ``row[name]`` for ``names``; a conversation needs a conversational prompt."""
    texts = []
    for name in names:
        texts.append(check_text(row[name], name, err, role="completion"))
        if isinstance(texts[-1], list) and not isinstance(prompt, list):
            raise err("a conversational completion needs a conversational prompt (a list of messages)", name)
    return texts


def check_ended(row: Row, names: tuple[str, ...], err: ErrorFactory) -> list[bool] | None:
    """The ``<slot>_ended`` flags of a row's completions, or ``None`` when the row has none (all ended)."""
    columns = [name + ENDED_SUFFIX for name in names]
    if all(row.get(column) is None for column in columns):
        return None
    return [True if row.get(column) is None else _flag(row[column], column, err) for column in columns]


def _flag(value: Any, name: str, err: ErrorFactory) -> bool:
    if not isinstance(value, bool):
        raise err(f"must be true or false; got {_show(value)}", name)
    return value


def check_label(value: Any, name: str, err: ErrorFactory) -> float:
    """A binary label: ``true``/``false`` (TRL's KTO rows), or the integers 1/0 (parquet and pandas often
    store a bool column that way); anything else, ``"yes"``, ``0.5`` or ``2``, is refused."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return float(value)
    raise err(f"label must be true or false; got {_show(value)}", name)


def check_text(value: Any, name: str, err: ErrorFactory, role: str) -> Any:
    """A non-empty string or a well-formed conversation; returns it unchanged."""
    if isinstance(value, str):
        check_unicode(value, name, err)
        if role == "completion" and not value.strip():
            raise err("is empty; a completion needs at least one token of text", name)
        return value
    if isinstance(value, list):
        check_conversation(value, name, err, role)
        return value
    if value is None:
        raise err("is null; a text or a conversation is needed here", name)
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


def check_in_range(
    value: float, bounds: tuple[float, float] | None, name: str, err: ErrorFactory, hint: str = RANGE_HINT
) -> float:
    """``value`` unchanged when it lies in ``bounds`` (``None``: [0, 1]), else an error naming the field."""
    low, high = (float(b) for b in bounds) if bounds is not None else (0.0, 1.0)
    if not low <= value <= high:
        advice = f" ({hint})" if hint else ""
        raise err(f"is outside the declared score range [{low}, {high}]; got {value}{advice}", name)
    return value


def normalize_score(
    value: float, bounds: tuple[float, float] | None, name: str, err: ErrorFactory, hint: str = RANGE_HINT
) -> float:
    """A score mapped from its declared range (``None``: [0, 1]) onto [0, 1] with
    :func:`unialign.feedback.rescale`; a score outside the range is an error naming the field."""
    return rescale(check_in_range(value, bounds, name, err, hint), bounds if bounds is not None else (0.0, 1.0))


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



# The validator table, in detection order: the first format whose required columns a dataset has wins
# (a triple also has the pairwise columns; listwise, pairwise, binary and score need three each; an SFT
# row is any prompt with a completion, a prompt-only row any row with a prompt).
FEEDBACK_FORMATS: dict[str, FeedbackFormat] = {
    spec.name: spec
    for spec in (
        FeedbackFormat(
            "triple", ("prompt", *SLOTS["triple"]), tuple(n + ENDED_SUFFIX for n in SLOTS["triple"]),
            _preference(SLOTS["triple"]),
        ),
        FeedbackFormat("listwise", ("prompt", "completions", "rewards"), (LISTWISE_ENDED,), _listwise),
        FeedbackFormat(
            "pairwise", ("prompt", *SLOTS["pairwise"]),
            ("chosen_score", "rejected_score", *(n + ENDED_SUFFIX for n in SLOTS["pairwise"])),
            _preference(SLOTS["pairwise"]), without_prompt=SLOTS["pairwise"], split=split_implicit_prompt,
        ),
        FeedbackFormat("binary", ("prompt", *SLOTS["binary"], "label"), ("completion_ended",), _binary),
        FeedbackFormat("score", ("prompt", *SLOTS["score"], "score"), ("completion_ended",), _score),
        FeedbackFormat(
            "sft", ("prompt", *SLOTS["sft"]), ("completion_ended",), _sft,
            without_prompt=("messages",), split=split_messages,
        ),
        FeedbackFormat("prompt", ("prompt",), (), _prompt_only),
    )
}
# Columns each format requires (derived from the table, for messages and tests).
FORMAT_COLUMNS: dict[str, tuple[str, ...]] = {name: spec.required for name, spec in FEEDBACK_FORMATS.items()}
