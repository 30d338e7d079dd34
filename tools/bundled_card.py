"""The bundled dataset's card: how it was made and statistics regenerated from the shipped rows.

``python -m tools.bundled_card`` (or ``python tools/bundled_card.py``), run from a checkout, rewrites
``src/unialign/data/bundled/CARD.md`` from the files, so the numbers can never drift from the data
(``tests/test_bundled.py`` fails when they do). It loads the SmolLM2 tokenizer to count tokens.
"""

from __future__ import annotations

import statistics
import sys
from collections import Counter
from pathlib import Path

from unialign.data.io import read_jsonl
from unialign.feedback import SLOTS

# The checkout's bundled folder: a maintainer tool rewrites the source tree, not an installed copy.
FOLDER = Path(__file__).resolve().parent.parent / "src" / "unialign" / "data" / "bundled"
REGENERATE_COMMAND = "python -m tools.bundled_card"

BUILD_COMMAND = (
    "unialign data build --prompts src/unialign/data/bundled/prompts.jsonl --model smollm2-135m-instruct "
    "--reward offline --k 4 --max-new-tokens 256 --temperature 0.9 --top-p 0.95 --heldout 0.2 --seed 0 "
    "--batch-prompts 32 --out build/bundled"
)


# The derived formats whose slots the card reports the ended fraction of.
SLOT_FORMATS = {fmt: SLOTS[fmt] for fmt in ("pairwise", "triple", "sft")}


def dataset_statistics(folder: Path = FOLDER) -> dict:
    """Counts, score distribution, best-vs-worst gaps, lengths and ended fractions per split."""
    from unialign.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    categories = {row["id"]: row.get("category", "?") for row in read_jsonl(folder / "prompts.jsonl")}
    stats = {}
    for split in ("train", "test"):
        rows = read_jsonl(folder / f"listwise.{split}.jsonl")
        texts = [c for row in rows for c in row["completions"]]
        tokens = sorted(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
        ended = [e for row in rows for e in row.get("completions_ended", [True] * len(row["completions"]))]
        rewards = [r for row in rows for r in row["rewards"]]
        gaps = [max(row["rewards"]) - min(row["rewards"]) for row in rows]
        words = [len(c.split()) for row in rows for c in row["completions"]]
        stats[split] = {
            "prompts": len(rows),
            "completions": len(rewards),
            "categories": dict(Counter(categories.get(row["id"], "?") for row in rows)),
            "reward_mean": statistics.fmean(rewards),
            "reward_stdev": statistics.pstdev(rewards),
            "reward_quartiles": statistics.quantiles(rewards, n=4),
            "histogram": histogram(rewards),
            "best_beats_worst": sum(g > 0 for g in gaps) / len(gaps),
            "best_beats_worst_by_0.1": sum(g > 0.1 for g in gaps) / len(gaps),
            "mean_best_minus_worst": statistics.fmean(gaps),
            "words_mean": statistics.fmean(words),
            "words_median": statistics.median(words),
            "token_quantiles": [tokens[int(q * (len(tokens) - 1))] for q in (0.1, 0.25, 0.5, 0.75, 0.9)] + [tokens[-1]],
            "ended": sum(ended) / len(ended),
            "slot_ended": slot_ended_fractions(rows),
        }
    return stats


def slot_ended_fractions(rows: list[dict]) -> dict[str, float]:
    """``format.slot`` -> the fraction of that slot's completions that ended, over the derived rows."""
    from unialign.data.converters import convert

    listwise = [{k: v for k, v in row.items() if k != "id"} for row in rows]
    fractions = {}
    for fmt, slots in SLOT_FORMATS.items():
        derived = convert(listwise, to=fmt).rows
        for slot in slots:
            flags = [row.get(slot + "_ended", True) for row in derived]
            fractions[f"{fmt}.{slot}"] = sum(flags) / len(flags)
    return fractions


def histogram(values: list[float], bins: int = 10) -> list[int]:
    """Counts of values in ``bins`` equal-width bins over [0, 1]."""
    counts = [0] * bins
    for value in values:
        counts[min(bins - 1, max(0, int(value * bins)))] += 1
    return counts


def render_card(stats: dict) -> str:
    """CARD.md text."""
    from unialign.rewards.offline_judge import OfflineJudge

    lines = [
        "# unialign bundled dataset",
        "",
        "Prompts written for unialign (everyday instructions, short factual questions with known answers, "
        "arithmetic word problems with exact answers, format-constrained requests; `prompts.jsonl`, made by "
        "`tools/make_prompts.py`). Each prompt was sent as one user turn through SmolLM2-135M-Instruct's chat "
        "template; "
        "4 completions were sampled from the embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized) and scored "
        f"by the offline judge (`{OfflineJudge.version}`, HelpSteer2-style attributes combined into [0, 1]). "
        "The split is by prompt (a hash of the prompt id, 20% held out), so no held-out prompt appears in training. "
        "The held-out prompts are split once more, by another hash of the id, into `val` (27 prompts, for choosing "
        "hyperparameters) and `eval` (58, for reporting): `bundled:<format>:val` and `bundled:<format>:eval`, whose "
        "union is `bundled:<format>:test`. "
        "Samples were capped at 256 new tokens; `completions_ended` marks each completion that stopped on its own "
        "(false = cut at the cap), and the derived formats carry it as `<slot>_ended`, so tokenization gives a "
        "cut-off completion no end-of-turn token.",
        "",
        "Only the listwise rows ship; `unialign.data.load_bundled(format, split)` derives pairwise (best vs worst), "
        "binary (best = desirable, worst = undesirable), score (reward as score in [0, 1]), triple (1st = reference, "
        "2nd = chosen, 4th = rejected), SFT (best) and prompt-only rows with the library's converters.",
        "",
        f"Made with:\n\n```bash\n{BUILD_COMMAND}\n```\n",
        f"Statistics (regenerate with `{REGENERATE_COMMAND}`):",
        "",
        "| | train | test |",
        "|---|---|---|",
    ]
    rows = [
        ("prompts", "prompts", "{}"),
        ("completions", "completions", "{}"),
        ("judge score mean ± stdev", None, None),
        ("score quartiles", "reward_quartiles", None),
        ("best of 4 beats worst", "best_beats_worst", "{:.1%}"),
        ("best beats worst by > 0.1", "best_beats_worst_by_0.1", "{:.1%}"),
        ("mean best − worst", "mean_best_minus_worst", "{:.3f}"),
        ("completion words (mean / median)", None, None),
        ("completion tokens (p10 / p25 / median / p75 / p90 / max)", "token_quantiles", None),
        ("completions that ended (not cut at the cap)", "ended", "{:.1%}"),
        *[(f"ended: {name}", name, "{:.1%}") for name in stats["train"]["slot_ended"]],
        ("categories", "categories", None),
    ]
    for label, key, fmt in rows:
        cells = []
        for split in ("train", "test"):
            s = stats[split]
            if label.startswith("judge"):
                cells.append(f"{s['reward_mean']:.3f} ± {s['reward_stdev']:.3f}")
            elif label.startswith("completion words"):
                cells.append(f"{s['words_mean']:.1f} / {s['words_median']:.0f}")
            elif key == "reward_quartiles":
                cells.append(" / ".join(f"{q:.3f}" for q in s[key]))
            elif key == "token_quantiles":
                cells.append(" / ".join(str(q) for q in s[key]))
            elif label.startswith("ended: "):
                cells.append(fmt.format(s["slot_ended"][key]))
            elif key == "categories":
                cells.append(", ".join(f"{k} {v}" for k, v in sorted(s[key].items())))
            else:
                cells.append(fmt.format(s[key]))
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    lines += [
        "",
        "Judge score histogram (10 bins over [0, 1]), train: " + str(stats["train"]["histogram"]),
        "test: " + str(stats["test"]["histogram"]),
        "",
    ]
    return "\n".join(lines)


def write_card(folder: Path = FOLDER) -> Path:
    """Recompute the statistics and rewrite ``CARD.md``."""
    path = folder / "CARD.md"
    path.write_text(render_card(dataset_statistics(folder)), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    """Rewrite the card of the bundled folder (or of the folder given as the one argument)."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print("usage: python -m tools.bundled_card [BUNDLED_FOLDER]", file=sys.stderr)
        return 2
    print(f"wrote {write_card(Path(argv[0]) if argv else FOLDER)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
