"""Converters between feedback formats (docs/methods.md, data formats).

Every converter is a pure function ``rows -> ConversionResult``: input rows are never modified, the
output rows use the TRL column names (docs/methods.md), and every row that cannot be used is counted in
``ConversionResult.dropped`` under a reason (a drop is never silent). Input rows of a feedback format
are checked by that format's validator in :mod:`unialign.data.formats`, the one training uses, so a
malformed row (a missing field, a non-numeric or out-of-range score, NaN rewards, lists of different
lengths) raises the same :class:`~unialign.data.errors.DataError`, naming the row and the field, as
loading it would. This module parses only what is its own: UltraFeedback and HelpSteer2 fields.

Ranking rule used everywhere: completions are ordered by reward, highest first; equal rewards keep
their original order (a stable sort), so on a tie the earlier completion ranks higher.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from unialign.data.errors import DataError
from unialign.data.formats import (
    ENDED_SUFFIX,
    Example,
    check_in_range,
    check_number,
    check_object,
    check_text,
    columns_of,
    detect_format,
    require,
    row_errors,
    validate_row,
)
from unialign.feedback import FORMATS, rescale

logger = logging.getLogger(__name__)

Row = dict[str, Any]

EXTERNAL = ("ultrafeedback", "helpsteer2")  # datasets with their own columns, parsed here
SOURCES = EXTERNAL + FORMATS
PAIRWISE_MODES = ("best_vs_worst", "best_vs_random")
BINARY_MODES = ("best_worst", "threshold")
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

def _examples(rows: list[Row], fmt: str, score_range: tuple[float, float] | None = None) -> list[Example]:
    """Every row checked by the ``fmt`` validator training uses (``unialign.data.formats``)."""
    return [validate_row(row, fmt, i, None, score_range) for i, row in enumerate(rows)]


def _bounds(reward_range: Any) -> tuple[float, float]:
    """A declared ``reward_range`` as two floats, ``low < high``, or a DataError naming the option."""
    try:
        rescale(0.0, reward_range)
    except ValueError as err:
        raise DataError(f"reward_range: {err}") from None
    return float(reward_range[0]), float(reward_range[1])


def _nested(item: dict, key: str, where: str, err, what: str) -> Any:
    """``item[key]`` of an object inside a column, named ``where.key`` in messages."""
    name = f"{where}.{key}"
    return require({name: item[key]} if key in item else {}, name, err, what)


def _slots(example: Example, named: dict[str, int]) -> Row:
    """Output columns for listwise completions picked by index: ``{slot: text}`` plus ``{slot}_ended``
    where the listwise row says which completions ended, so an unfinished completion stays marked."""
    out = {name: example.completions[j] for name, j in named.items()}
    if example.ended is not None:
        out.update({name + ENDED_SUFFIX: example.ended[j] for name, j in named.items()})
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
        row, err = check_object(row, i, None), row_errors(None, i)
        instruction = check_text(require(row, "instruction", err, "UltraFeedback"), "instruction", err, role="prompt")
        completions = require(row, "completions", err, "UltraFeedback")
        if not isinstance(completions, list):
            raise err("must be a list of completions", "completions")
        if not completions:
            dropped["no completions"] += 1
            continue
        texts, rewards = [], []
        for j, c in enumerate(completions):
            where = f"completions[{j}]"
            if not isinstance(c, dict):
                raise err("must be an object with 'response' and a score", where)
            response = _nested(c, "response", where, err, "UltraFeedback")
            texts.append(check_text(response, f"{where}.response", err, role="completion"))
            name = f"{where}.{score_field}"
            score = check_number(_nested(c, score_field, where, err, "UltraFeedback"), name, err)
            rewards.append(check_in_range(score, UF_SCORE_RANGES[score_field], name, err, hint=""))
        out.append({"prompt": instruction, "completions": texts, "rewards": rewards})
    return _finish(out, "ultrafeedback", "listwise", dropped, UF_SCORE_RANGES[score_field])


def _pick_uf_field(rows: list[Row]) -> str:
    def everywhere(name: str) -> bool:
        return all(isinstance(c, dict) and c.get(name) is not None
                   for r in rows if isinstance(r, dict) for c in (r.get("completions") or []))
    return "fine-grained_score" if everywhere("fine-grained_score") else "overall_score"


def helpsteer2_score(row: Row, i: int = 0) -> float:
    """HelpSteer2 score ``(0.65·helpfulness + 0.8·correctness + 0.45·coherence) / 7.6`` in [0, 1]."""
    row, err = check_object(row, i, None), row_errors(None, i)
    h, c, k = (check_in_range(check_number(require(row, a, err, "HelpSteer2"), a, err), (0.0, 4.0), a, err, hint="")
               for a in HELPSTEER2_ATTRIBUTES)
    return (0.65 * h + 0.8 * c + 0.45 * k) / 7.6


def _helpsteer2_texts(row: Row, i: int) -> tuple[Any, Any]:
    """A HelpSteer2 row's checked (prompt, response)."""
    row, err = check_object(row, i, None), row_errors(None, i)
    prompt = check_text(require(row, "prompt", err, "HelpSteer2"), "prompt", err, role="prompt")
    return prompt, check_text(require(row, "response", err, "HelpSteer2"), "response", err, role="completion")


def helpsteer2_to_score(rows: list[Row]) -> ConversionResult:
    """HelpSteer2 rows (``prompt``, ``response``, attributes on 0–4) -> score rows with the weighted score.

    complexity and verbosity are not part of the formula and are not copied.
    """
    out = []
    for i, row in enumerate(rows):
        prompt, response = _helpsteer2_texts(row, i)
        out.append({"prompt": prompt, "completion": response, "score": helpsteer2_score(row, i)})
    return _finish(out, "helpsteer2", "score", Counter(), (0.0, 1.0))


def helpsteer2_to_listwise(rows: list[Row]) -> ConversionResult:
    """Group HelpSteer2 rows by prompt (first-seen order) into listwise rows with rewards = scores."""
    groups: dict[str, Row] = {}
    for i, row in enumerate(rows):
        prompt, response = _helpsteer2_texts(row, i)
        group = groups.setdefault(_key(prompt), {"prompt": prompt, "completions": [], "rewards": []})
        group["completions"].append(response)
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
    A lower-reward completion whose text equals the best one's is no candidate (training refuses
    identical pairs). Rows with fewer than two completions, whose rewards are all equal, or whose
    lower-reward completions all repeat the best one are dropped and counted. ``chosen_score`` /
    ``rejected_score`` carry the rewards.
    """
    if mode not in PAIRWISE_MODES:
        raise DataError(f"mode must be one of {', '.join(PAIRWISE_MODES)}; got {mode!r}")
    rng, out, dropped = random.Random(seed), [], Counter()
    for example in _examples(rows, "listwise"):
        completions, rewards = example.completions, example.rewards
        if len(completions) < 2:
            dropped["fewer than 2 completions"] += 1
            continue
        order = _ranking(rewards)
        best = order[0]
        lower = [j for j in order if rewards[j] < rewards[best]]
        if not lower:
            dropped["all rewards tied"] += 1
            continue
        lower = [j for j in lower if _key(completions[j]) != _key(completions[best])]
        if not lower:
            dropped["rejected identical to chosen"] += 1
            continue
        worst = lower[-1] if mode == "best_vs_worst" else lower[rng.randrange(len(lower))]
        out.append({"prompt": example.prompt, **_slots(example, {"chosen": best, "rejected": worst}),
                    "chosen_score": rewards[best], "rejected_score": rewards[worst]})
    return _finish(out, "listwise", "pairwise", dropped)


def listwise_to_binary(rows: list[Row], mode: str = "best_worst", threshold: float | None = None
                       ) -> ConversionResult:
    """Listwise -> unpaired binary rows (``prompt``, ``completion``, ``label``).

    ``threshold``: every completion becomes a row with ``label = reward >= threshold`` (required).
    ``best_worst``: the best completion with label True and the worst with label False; rows with
    fewer than two completions or all-equal rewards are dropped and counted.
    """
    if mode not in BINARY_MODES:
        raise DataError(f"mode must be one of {', '.join(BINARY_MODES)}; got {mode!r}")
    if mode == "threshold" and threshold is None:
        raise DataError("mode='threshold' needs a threshold")
    if mode == "best_worst":
        pairs = listwise_to_pairwise(rows, "best_vs_worst")
        return _finish(_pairs_to_binary(pairs.rows), "listwise", "binary", pairs.dropped)
    out = []
    for example in _examples(rows, "listwise"):
        out += [{"prompt": example.prompt, **_slots(example, {"completion": j}), "label": bool(r >= threshold)}
                for j, r in enumerate(example.rewards)]
    return _finish(out, "listwise", "binary", Counter())


def listwise_to_score(rows: list[Row], reward_range: tuple[float, float] | None = None) -> ConversionResult:
    """Listwise -> one score row per completion, ``score = (reward − lo) / (hi − lo)`` in [0, 1].

    ``reward_range`` = (lo, hi) declares the rewards' range; a reward outside it raises DataError.
    Without a range the rewards must already lie in [0, 1] (they are then copied unchanged). The
    rewards are normalized by the listwise validator, as ``score_range`` does in training.
    """
    bounds = _bounds(reward_range) if reward_range is not None else (0.0, 1.0)
    out = []
    for example in _examples(rows, "listwise", bounds):
        out += [{"prompt": example.prompt, **_slots(example, {"completion": j}), "score": score}
                for j, score in enumerate(example.scores)]
    return _finish(out, "listwise", "score", Counter(), (0.0, 1.0))


def listwise_to_triple(rows: list[Row]) -> ConversionResult:
    """Listwise -> TPO triples: highest = ``reference``, second highest = ``chosen``, lowest = ``rejected``.

    Completions are de-duplicated by text first (the higher-ranked copy is kept), so chosen never
    equals the reference. Rows with fewer than 3 distinct completions are dropped (``"fewer than 3
    distinct completions"``), and so are rows whose chosen and rejected rewards are equal
    (``"chosen and rejected tied"``), since such a pair carries no preference.
    """
    out, dropped = [], Counter()
    for example in _examples(rows, "listwise"):
        completions, rewards = example.completions, example.rewards
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
        out.append({"prompt": example.prompt,
                    **_slots(example, {"reference": ref, "chosen": chosen, "rejected": rejected})})
    return _finish(out, "listwise", "triple", dropped)


def listwise_to_sft(rows: list[Row]) -> ConversionResult:
    """Listwise -> SFT rows with the best completion (earlier wins ties)."""
    out = [{"prompt": example.prompt, **_slots(example, {"completion": _ranking(example.rewards)[0]})}
           for example in _examples(rows, "listwise")]
    return _finish(out, "listwise", "sft", Counter())


def listwise_to_prompts(rows: list[Row]) -> ConversionResult:
    """Listwise -> prompt-only rows, one per input row (duplicates kept)."""
    return _to_prompts(rows, "listwise")


def listwise_to_listwise(rows: list[Row]) -> ConversionResult:
    """Validate listwise rows and return them unchanged."""
    _examples(rows, "listwise")
    return _finish(list(rows), "listwise", "listwise", Counter())


# ------------------------------------------------------------------------------ other TRL formats

def _to_prompts(rows: list[Row], fmt: str) -> ConversionResult:
    """Rows of any format -> their prompts (an implicit or ``messages`` prompt made explicit)."""
    return _finish([{"prompt": example.prompt} for example in _examples(rows, fmt)], fmt, "prompt", Counter())


def _pairs(rows: list[Row]) -> list[Row]:
    """Validated pairwise rows with an explicit prompt (TRL's implicit-prompt rows split as training splits them)."""
    return [{**row, "prompt": example.prompt, "chosen": example.completions[0], "rejected": example.completions[1]}
            for row, example in zip(rows, _examples(rows, "pairwise"))]


def pairwise_to_binary(rows: list[Row]) -> ConversionResult:
    """Pairwise -> binary: chosen with label True, rejected with label False (two rows per pair)."""
    return _finish(_pairs_to_binary(_pairs(rows)), "pairwise", "binary", Counter())


def _pairs_to_binary(rows: list[Row]) -> list[Row]:
    return [r for p in rows for r in (
        {"prompt": p["prompt"], "completion": p["chosen"], "label": True, **_carry(p, "chosen", "completion")},
        {"prompt": p["prompt"], "completion": p["rejected"], "label": False, **_carry(p, "rejected", "completion")})]


def pairwise_to_sft(rows: list[Row]) -> ConversionResult:
    """Pairwise -> SFT rows with the chosen completion."""
    return _finish([{"prompt": p["prompt"], "completion": p["chosen"], **_carry(p, "chosen", "completion")}
                    for p in _pairs(rows)], "pairwise", "sft", Counter())


# ------------------------------------------------------------------------------------ entry point

def detect_source(rows: list[Row]) -> str:
    """Name the source format of ``rows`` (see ``SOURCES``): UltraFeedback or HelpSteer2 by their own
    columns, else the feedback format :func:`unialign.data.formats.detect_format` finds, as training does."""
    if not rows:
        raise DataError("cannot detect the format of an empty data set; pass source=...")
    columns = set(check_object(rows[0], 0, None))
    if "instruction" in columns and "completions" in columns:
        return "ultrafeedback"
    if "response" in columns and "helpfulness" in columns:
        return "helpsteer2"
    return detect_format(columns_of(rows), source="rows")


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
        raise DataError(f"unknown target format {to!r}; expected one of {', '.join(FORMATS)}")
    source = detect_source(rows) if source == "auto" else source
    if source not in SOURCES:
        raise DataError(f"unknown source format {source!r}; expected one of {', '.join(SOURCES)}")

    if source == "helpsteer2" and to in ("score", "pairwise"):
        return (helpsteer2_to_score if to == "score" else helpsteer2_to_pairwise)(rows, **options)
    if source in EXTERNAL:
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
    unused = sorted(set(options) - ({"reward_range"} if source == to else set()))
    if unused:
        raise DataError(f"option {unused[0]!r} does not apply to converting {source} rows to {to}")
    if source == to:
        bounds = _bounds(options["reward_range"]) if options.get("reward_range") is not None else None
        _examples(rows, to, bounds)  # validated as training validates them, then returned unchanged
        return _finish(list(rows), source, to, Counter(), bounds)
    if source == "pairwise" and to in ("binary", "sft"):
        return (pairwise_to_binary if to == "binary" else pairwise_to_sft)(rows)
    if to == "prompt":
        return _to_prompts(rows, source)
    raise DataError(f"no conversion from {source} to {to}; listwise rows convert to every format")
