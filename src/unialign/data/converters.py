"""Converters between feedback formats (docs/methods.md, data formats).

Every converter is a pure function ``rows -> ConversionResult``: input rows are never modified, the
output rows use the TRL column names (docs/methods.md), and every row that cannot be used is counted in
``ConversionResult.dropped`` under a reason (a drop is never silent). Malformed rows (a missing
field, a non-numeric or out-of-range score, NaN rewards, lists of different lengths) raise
:class:`~unialign.data.errors.DataError` naming the row and the field.

Ranking rule used everywhere: completions are ordered by reward, highest first; equal rewards keep
their original order (a stable sort), so on a tie the earlier completion ranks higher.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from unialign.data.errors import DataError
from unialign.data.formats import ENDED_SUFFIX

logger = logging.getLogger(__name__)

Row = dict[str, Any]

FORMATS = ("listwise", "pairwise", "binary", "score", "triple", "sft", "prompt")
SOURCES = ("ultrafeedback", "helpsteer2") + FORMATS
LISTWISE_ENDED = "completions" + ENDED_SUFFIX
HELPSTEER2_ATTRIBUTES = ("helpfulness", "correctness", "coherence")
UF_SCORE_RANGES = {"fine-grained_score": (1.0, 5.0), "overall_score": (1.0, 10.0)}


@dataclass
class ConversionResult:
    """Converted rows plus what was dropped and why.

    ``dropped`` maps a reason to the number of input rows (or prompt groups, for HelpSteer2 pairs)
    dropped for it. ``reward_range`` is the declared range of the scores/rewards in ``rows`` when
    known (e.g. (1, 5) for UltraFeedback fine-grained scores, (0, 1) for normalized scores).
    """

    rows: list[Row]
    source: str
    target: str
    dropped: Counter = field(default_factory=Counter)
    reward_range: tuple[float, float] | None = None

    @property
    def n_dropped(self) -> int:
        """Total number of dropped rows over all reasons."""
        return sum(self.dropped.values())

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        return iter(self.rows)

    def __getitem__(self, i):
        return self.rows[i]

    def summary(self) -> str:
        """One line for logs: ``source -> target: N rows, M dropped (reason: k, ...)``."""
        reasons = ", ".join(f"{r}: {k}" for r, k in sorted(self.dropped.items()))
        return (f"{self.source} -> {self.target}: {len(self.rows)} rows, {self.n_dropped} dropped"
                + (f" ({reasons})" if reasons else ""))


# ----------------------------------------------------------------------------------------- checks

def _require(row: Any, i: int, name: str) -> Any:
    if not isinstance(row, dict):
        raise DataError(f"expected a dict row, got {type(row).__name__}", row=i)
    if name not in row or row[name] is None:
        raise DataError("missing field", row=i, field=name)
    return row[name]


def _text(row: Row, i: int, name: str) -> str | list:
    """A text field: a string, or a conversation (list of {role, content} messages)."""
    value = _require(row, i, name)
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return value
    raise DataError("expected a string or a list of {role, content} messages, got "
                    f"{type(value).__name__}", row=i, field=name)


def _number(value: Any, i: int, name: str, bounds: tuple[float, float] | None = None) -> float:
    """A finite float, optionally inside ``bounds`` (inclusive)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value) if isinstance(value, str) else None
        except ValueError:
            value = None
        if value is None:
            raise DataError("expected a number", row=i, field=name)
    value = float(value)
    if not math.isfinite(value):
        raise DataError(f"expected a finite number, got {value}", row=i, field=name)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise DataError(f"score {value} is outside the declared range {list(bounds)}", row=i, field=name)
    return value


def _listwise_row(row: Row, i: int) -> tuple[Any, list, list[float]]:
    """Validated (prompt, completions, rewards) of a listwise row (its ``completions_ended`` checked too)."""
    prompt = _text(row, i, "prompt")
    completions, rewards = _require(row, i, "completions"), _require(row, i, "rewards")
    if not isinstance(completions, list):
        raise DataError("expected a list", row=i, field="completions")
    if not isinstance(rewards, list):
        raise DataError("expected a list", row=i, field="rewards")
    if len(completions) != len(rewards):
        raise DataError(f"{len(completions)} completions but {len(rewards)} rewards", row=i, field="rewards")
    for j, c in enumerate(completions):
        _text({f"completions[{j}]": c}, i, f"completions[{j}]")
    rewards = [_number(r, i, f"rewards[{j}]") for j, r in enumerate(rewards)]
    ended = row.get(LISTWISE_ENDED)
    if ended is not None and (not isinstance(ended, list) or len(ended) != len(completions)
                              or not all(isinstance(e, bool) for e in ended)):
        raise DataError(f"expected a list of {len(completions)} true/false values", row=i, field=LISTWISE_ENDED)
    return prompt, completions, rewards


def _slots(row: Row, named: dict[str, int]) -> Row:
    """Output columns for listwise completions picked by index: ``{slot: text}`` plus ``{slot}_ended``
    where the listwise row says which completions ended, so an unfinished completion stays marked."""
    ended = row.get(LISTWISE_ENDED)
    out = {name: row["completions"][j] for name, j in named.items()}
    if ended is not None:
        out.update({name + ENDED_SUFFIX: ended[j] for name, j in named.items()})
    return out


def _carry(row: Row, source: str, target: str) -> Row:
    """Copy ``{source}_ended`` to ``{target}_ended`` when present (pairwise -> binary / sft)."""
    flag = row.get(source + ENDED_SUFFIX)
    return {} if flag is None else {target + ENDED_SUFFIX: flag}


def _ranking(rewards: list[float]) -> list[int]:
    """Indices from best to worst; stable, so on equal rewards the earlier completion ranks higher."""
    return sorted(range(len(rewards)), key=lambda j: -rewards[j])


def _key(text: Any) -> str:
    """A hashable key for a string or conversation (for grouping and de-duplication)."""
    return text if isinstance(text, str) else json.dumps(text, sort_keys=True)


def _finish(rows: list[Row], source: str, target: str, dropped: Counter,
            reward_range: tuple[float, float] | None = None) -> ConversionResult:
    result = ConversionResult(rows, source, target, dropped, reward_range)
    if result.n_dropped:
        logger.warning(result.summary())
    return result


# ------------------------------------------------------------------------------ external datasets

def ultrafeedback_to_listwise(rows: list[Row], score_field: str = "auto") -> ConversionResult:
    """UltraFeedback rows (``instruction``, ``completions[]`` with ``response`` and scores) -> listwise.

    ``score_field`` picks the reward: ``"fine-grained_score"`` (mean of the four aspect ratings,
    range 1–5), ``"overall_score"`` (the critique's rating, range 1–10), or ``"auto"`` (default):
    fine-grained_score when every completion of the data set has it, otherwise overall_score.
    When both exist, auto therefore uses fine-grained_score: HuggingFaceH4/ultrafeedback_binarized
    moved to the mean of the aspect ratings after finding overall_score unreliable.
    The chosen field's range is returned as ``reward_range``. Rows with an empty completion list are
    dropped (reason ``"no completions"``).
    """
    if score_field == "auto":
        score_field = _pick_uf_field(rows)
    if score_field not in UF_SCORE_RANGES:
        raise DataError(f"score_field must be 'auto' or one of {sorted(UF_SCORE_RANGES)}, "
                        f"got {score_field!r}")
    out, dropped = [], Counter()
    for i, row in enumerate(rows):
        instruction = _text(row, i, "instruction")
        completions = _require(row, i, "completions")
        if not isinstance(completions, list):
            raise DataError("expected a list of completions", row=i, field="completions")
        if not completions:
            dropped["no completions"] += 1
            continue
        texts, rewards = [], []
        for j, c in enumerate(completions):
            where = f"completions[{j}]"
            if not isinstance(c, dict):
                raise DataError("expected a dict with 'response' and a score", row=i, field=where)
            texts.append(_text({f"{where}.response": c.get("response")}, i, f"{where}.response"))
            name = f"{where}.{score_field}"
            rewards.append(_number(_require({name: c.get(score_field)}, i, name), i, name,
                                   UF_SCORE_RANGES[score_field]))
        out.append({"prompt": instruction, "completions": texts, "rewards": rewards})
    return _finish(out, "ultrafeedback", "listwise", dropped, UF_SCORE_RANGES[score_field])


def _pick_uf_field(rows: list[Row]) -> str:
    def everywhere(name: str) -> bool:
        return all(isinstance(c, dict) and c.get(name) is not None
                   for r in rows if isinstance(r, dict) for c in (r.get("completions") or []))
    return "fine-grained_score" if everywhere("fine-grained_score") else "overall_score"


def helpsteer2_score(row: Row, i: int = 0) -> float:
    """HelpSteer2 score ``(0.65·helpfulness + 0.8·correctness + 0.45·coherence) / 7.6`` in [0, 1]."""
    h, c, k = (_number(_require(row, i, a), i, a, (0.0, 4.0)) for a in HELPSTEER2_ATTRIBUTES)
    return (0.65 * h + 0.8 * c + 0.45 * k) / 7.6


def helpsteer2_to_score(rows: list[Row]) -> ConversionResult:
    """HelpSteer2 rows (``prompt``, ``response``, attributes on 0–4) -> score rows with the weighted score.

    complexity and verbosity are not part of the formula and are not copied.
    """
    out = [{"prompt": _text(row, i, "prompt"), "completion": _text(row, i, "response"),
            "score": helpsteer2_score(row, i)} for i, row in enumerate(rows)]
    return _finish(out, "helpsteer2", "score", Counter(), (0.0, 1.0))


def helpsteer2_to_listwise(rows: list[Row]) -> ConversionResult:
    """Group HelpSteer2 rows by prompt (first-seen order) into listwise rows with rewards = scores."""
    groups: dict[str, Row] = {}
    for i, row in enumerate(rows):
        prompt = _text(row, i, "prompt")
        group = groups.setdefault(_key(prompt), {"prompt": prompt, "completions": [], "rewards": []})
        group["completions"].append(_text(row, i, "response"))
        group["rewards"].append(helpsteer2_score(row, i))
    return _finish(list(groups.values()), "helpsteer2", "listwise", Counter(), (0.0, 1.0))


def helpsteer2_to_pairwise(rows: list[Row]) -> ConversionResult:
    """HelpSteer2 rows -> pairs: rows sharing a prompt make a pair, the higher score is chosen.

    HelpSteer2 has two responses per prompt. With more than two, the pair is the highest versus the
    lowest score (ties: the earlier row ranks higher), so each prompt gives at most one pair. A prompt
    with a single row is dropped (``"no second response"``), and a prompt whose responses all have
    the same score is dropped (``"all rewards tied"``); ``dropped`` counts prompts, not rows.
    """
    grouped = helpsteer2_to_listwise(rows)
    result = listwise_to_pairwise(grouped.rows, mode="best_vs_worst")
    dropped = Counter({("no second response" if r == "fewer than 2 completions" else r): k
                       for r, k in result.dropped.items()})
    return _finish(result.rows, "helpsteer2", "pairwise", dropped, (0.0, 1.0))


# ------------------------------------------------------------------------------- from listwise

def listwise_to_pairwise(rows: list[Row], mode: str = "best_vs_worst", seed: int = 0) -> ConversionResult:
    """Listwise -> one pair per row: the best completion versus the worst, or versus a random other.

    ``best_vs_random`` (the RAO paper's UltraFeedback recipe) draws the rejected completion uniformly
    among those with a strictly lower reward, with ``random.Random(seed)`` so it is reproducible.
    Rows with fewer than two completions, or whose rewards are all equal, are dropped and counted.
    ``chosen_score`` / ``rejected_score`` carry the rewards.
    """
    if mode not in ("best_vs_worst", "best_vs_random"):
        raise DataError(f"mode must be 'best_vs_worst' or 'best_vs_random', got {mode!r}")
    rng, out, dropped = random.Random(seed), [], Counter()
    for i, row in enumerate(rows):
        prompt, completions, rewards = _listwise_row(row, i)
        if len(completions) < 2:
            dropped["fewer than 2 completions"] += 1
            continue
        order = _ranking(rewards)
        best = order[0]
        lower = [j for j in order if rewards[j] < rewards[best]]
        if not lower:
            dropped["all rewards tied"] += 1
            continue
        worst = lower[-1] if mode == "best_vs_worst" else lower[rng.randrange(len(lower))]
        out.append({"prompt": prompt, **_slots(row, {"chosen": best, "rejected": worst}),
                    "chosen_score": rewards[best], "rejected_score": rewards[worst]})
    return _finish(out, "listwise", "pairwise", dropped)


def listwise_to_binary(rows: list[Row], mode: str = "best_worst", threshold: float | None = None
                       ) -> ConversionResult:
    """Listwise -> unpaired binary rows (``prompt``, ``completion``, ``label``).

    ``threshold``: every completion becomes a row with ``label = reward >= threshold`` (required).
    ``best_worst``: the best completion with label True and the worst with label False; rows with
    fewer than two completions or all-equal rewards are dropped and counted.
    """
    if mode not in ("threshold", "best_worst"):
        raise DataError(f"mode must be 'threshold' or 'best_worst', got {mode!r}")
    if mode == "threshold" and threshold is None:
        raise DataError("mode='threshold' needs a threshold")
    if mode == "best_worst":
        pairs = listwise_to_pairwise(rows, "best_vs_worst")
        return _finish(_pairs_to_binary(pairs.rows), "listwise", "binary", pairs.dropped)
    out = []
    for i, row in enumerate(rows):
        prompt, completions, rewards = _listwise_row(row, i)
        out += [{"prompt": prompt, **_slots(row, {"completion": j}), "label": bool(r >= threshold)}
                for j, r in enumerate(rewards)]
    return _finish(out, "listwise", "binary", Counter())


def listwise_to_score(rows: list[Row], reward_range: tuple[float, float] | None = None) -> ConversionResult:
    """Listwise -> one score row per completion, ``score = (reward − lo) / (hi − lo)`` in [0, 1].

    ``reward_range`` = (lo, hi) declares the rewards' range; a reward outside it raises DataError.
    Without a range the rewards must already lie in [0, 1] (they are then copied unchanged).
    """
    lo, hi = reward_range if reward_range is not None else (0.0, 1.0)
    if not hi > lo:
        raise DataError(f"reward_range must have hi > lo, got {reward_range}")
    out = []
    for i, row in enumerate(rows):
        prompt, completions, rewards = _listwise_row(row, i)
        for j, r in enumerate(rewards):
            if not lo <= r <= hi:
                hint = "" if reward_range is not None else "; pass reward_range=(lo, hi) to normalize"
                raise DataError(f"reward {r} is outside the range [{lo}, {hi}]{hint}", row=i,
                                field=f"rewards[{j}]")
            out.append({"prompt": prompt, **_slots(row, {"completion": j}), "score": (r - lo) / (hi - lo)})
    return _finish(out, "listwise", "score", Counter(), (0.0, 1.0))


def listwise_to_triple(rows: list[Row]) -> ConversionResult:
    """Listwise -> TPO triples: highest = ``reference``, second highest = ``chosen``, lowest = ``rejected``.

    Completions are de-duplicated by text first (the higher-ranked copy is kept), so chosen never
    equals the reference. Rows with fewer than 3 distinct completions are dropped (``"fewer than 3
    distinct completions"``), and so are rows whose chosen and rejected rewards are equal
    (``"chosen and rejected tied"``), since such a pair carries no preference.
    """
    out, dropped = [], Counter()
    for i, row in enumerate(rows):
        prompt, completions, rewards = _listwise_row(row, i)
        seen, order = set(), []
        for j in _ranking(rewards):
            if _key(completions[j]) not in seen:
                seen.add(_key(completions[j]))
                order.append(j)
        if len(order) < 3:
            dropped["fewer than 3 distinct completions"] += 1
            continue
        ref, chosen, rejected = order[0], order[1], order[-1]
        if rewards[chosen] == rewards[rejected]:
            dropped["chosen and rejected tied"] += 1
            continue
        out.append({"prompt": prompt, **_slots(row, {"reference": ref, "chosen": chosen, "rejected": rejected})})
    return _finish(out, "listwise", "triple", dropped)


def listwise_to_sft(rows: list[Row]) -> ConversionResult:
    """Listwise -> SFT rows with the best completion (earlier wins ties); empty lists are dropped."""
    out, dropped = [], Counter()
    for i, row in enumerate(rows):
        prompt, completions, rewards = _listwise_row(row, i)
        if not completions:
            dropped["no completions"] += 1
            continue
        out.append({"prompt": prompt, **_slots(row, {"completion": _ranking(rewards)[0]})})
    return _finish(out, "listwise", "sft", dropped)


def listwise_to_prompts(rows: list[Row]) -> ConversionResult:
    """Listwise -> prompt-only rows, one per input row (duplicates kept)."""
    return _finish([{"prompt": _text(row, i, "prompt")} for i, row in enumerate(rows)],
                   "listwise", "prompt", Counter())


def listwise_to_listwise(rows: list[Row]) -> ConversionResult:
    """Validate listwise rows and return them unchanged."""
    for i, row in enumerate(rows):
        _listwise_row(row, i)
    return _finish(list(rows), "listwise", "listwise", Counter())


# ------------------------------------------------------------------------------ other TRL formats

_REQUIRED = {
    "pairwise": ("prompt", "chosen", "rejected"),
    "binary": ("prompt", "completion", "label"),
    "score": ("prompt", "completion", "score"),
    "triple": ("prompt", "reference", "chosen", "rejected"),
    "sft": ("prompt", "completion"),
    "prompt": ("prompt",),
}


def _validate(rows: list[Row], fmt: str) -> None:
    for i, row in enumerate(rows):
        if fmt == "sft" and isinstance(row, dict) and "messages" in row:
            _text(row, i, "messages")
            continue
        for name in _REQUIRED[fmt]:
            if name == "label":
                if not isinstance(_require(row, i, name), bool):
                    raise DataError("expected a bool", row=i, field=name)
            elif name == "score":
                _number(_require(row, i, name), i, name)
            else:
                _text(row, i, name)


def pairwise_to_binary(rows: list[Row]) -> ConversionResult:
    """Pairwise -> binary: chosen with label True, rejected with label False (two rows per pair)."""
    _validate(rows, "pairwise")
    return _finish(_pairs_to_binary(rows), "pairwise", "binary", Counter())


def _pairs_to_binary(rows: list[Row]) -> list[Row]:
    return [r for p in rows for r in (
        {"prompt": p["prompt"], "completion": p["chosen"], "label": True, **_carry(p, "chosen", "completion")},
        {"prompt": p["prompt"], "completion": p["rejected"], "label": False, **_carry(p, "rejected", "completion")})]


def pairwise_to_sft(rows: list[Row]) -> ConversionResult:
    """Pairwise -> SFT rows with the chosen completion."""
    _validate(rows, "pairwise")
    return _finish([{"prompt": p["prompt"], "completion": p["chosen"], **_carry(p, "chosen", "completion")}
                    for p in rows], "pairwise", "sft", Counter())


# ------------------------------------------------------------------------------------ entry point

def detect_format(rows: list[Row]) -> str:
    """Name the source format of ``rows`` from the first row's columns (see ``SOURCES``)."""
    if not rows:
        raise DataError("cannot detect the format of an empty data set; pass source=...")
    first = rows[0]
    if not isinstance(first, dict):
        raise DataError(f"expected a dict row, got {type(first).__name__}", row=0)
    cols = set(first)
    if "instruction" in cols and "completions" in cols:
        return "ultrafeedback"
    if "response" in cols and "helpfulness" in cols:
        return "helpsteer2"
    if {"completions", "rewards"} <= cols:
        return "listwise"
    if {"reference", "chosen", "rejected"} <= cols:
        return "triple"
    if {"chosen", "rejected"} <= cols:
        return "pairwise"
    if {"completion", "label"} <= cols:
        return "binary"
    if {"completion", "score"} <= cols:
        return "score"
    if "completion" in cols or "messages" in cols:
        return "sft"
    if "prompt" in cols:
        return "prompt"
    raise DataError(f"cannot detect the feedback format from columns {sorted(cols)}", row=0)


_FROM_LISTWISE = {
    "listwise": listwise_to_listwise, "pairwise": listwise_to_pairwise, "binary": listwise_to_binary,
    "score": listwise_to_score, "triple": listwise_to_triple, "sft": listwise_to_sft,
    "prompt": listwise_to_prompts,
}


def convert(rows: list[Row], to: str, source: str = "auto", **options: Any) -> ConversionResult:
    """Convert ``rows`` to the feedback format ``to`` (one of ``FORMATS``).

    ``source`` is detected from the columns when ``"auto"``. Routes: UltraFeedback and HelpSteer2
    go through listwise (HelpSteer2 -> score and -> pairwise use their own converters), listwise
    reaches every format, a TRL format converted to itself is validated and returned unchanged,
    pairwise also reaches binary / sft, and every format reaches prompt-only. ``options`` are passed
    to the final converter (``mode``, ``seed``, ``threshold``, ``reward_range``; ``score_field`` for
    UltraFeedback). For UltraFeedback -> score the range of the chosen score field is used unless
    ``reward_range`` is given. Drop counts of every step are summed in the result.
    """
    if to not in FORMATS:
        raise DataError(f"unknown target format {to!r}; expected one of {list(FORMATS)}")
    source = detect_format(rows) if source == "auto" else source
    if source not in SOURCES:
        raise DataError(f"unknown source format {source!r}; expected one of {list(SOURCES)}")

    if source == "helpsteer2" and to in ("score", "pairwise"):
        return (helpsteer2_to_score if to == "score" else helpsteer2_to_pairwise)(rows, **options)
    if source in ("ultrafeedback", "helpsteer2"):
        if source == "ultrafeedback":
            first = ultrafeedback_to_listwise(rows, options.pop("score_field", "auto"))
        else:
            first = helpsteer2_to_listwise(rows)
        if to == "score":
            options.setdefault("reward_range", first.reward_range)
        second = _FROM_LISTWISE[to](first.rows, **options)
        reward_range = first.reward_range if to == "listwise" else second.reward_range
        return ConversionResult(second.rows, source, to, first.dropped + second.dropped, reward_range)
    if source == "listwise":
        return _FROM_LISTWISE[to](rows, **options)
    if source == to:
        _validate(rows, to)
        return _finish(list(rows), source, to, Counter())
    if source == "pairwise" and to in ("binary", "sft"):
        return (pairwise_to_binary if to == "binary" else pairwise_to_sft)(rows)
    if to == "prompt":
        _validate(rows, source)
        prompts = [{"prompt": _text(row, i, "prompt")} for i, row in enumerate(rows)]
        return _finish(prompts, source, to, Counter())
    raise DataError(f"no conversion from {source} to {to}; listwise rows convert to every format")
