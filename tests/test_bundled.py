"""The shipped dataset: every format loads, held-out prompts never reach training, the card is current."""

import pytest

from tools.bundled_card import dataset_statistics, render_card
from unialign.data.bundled import FOLDER, load_bundled
from unialign.data.errors import DataError
from unialign.data.formats import detect_format, validate_row
from unialign.data.io import read_jsonl

EXPECTED = {
    "listwise": "listwise",
    "pairwise": "pairwise",
    "binary": "binary",
    "score": "score",
    "triple": "triple",
    "sft": "sft",
    "prompts": "prompt",
}


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
@pytest.mark.parametrize("split", ["train", "test"])
def test_every_format_loads_and_validates(fmt, split):
    rows = load_bundled(fmt, split)
    assert rows
    assert detect_format(set(rows[0])) == EXPECTED[fmt]
    for index, row in enumerate(rows):
        validate_row(row, EXPECTED[fmt], index, f"bundled:{fmt}")


def _prompt_texts(split):
    return {row["prompt"][0]["content"] for row in load_bundled("listwise", split)}


def test_heldout_prompts_never_appear_in_training():
    train, test = _prompt_texts("train"), _prompt_texts("test")
    assert not train & test
    for fmt in ("pairwise", "binary", "score", "triple", "sft", "prompts"):
        assert not {row["prompt"][0]["content"] for row in load_bundled(fmt, "train")} & test


def test_size_and_split():
    prompts = read_jsonl(FOLDER / "prompts.jsonl")
    train, test = load_bundled("listwise", "train"), load_bundled("listwise", "test")
    assert len(prompts) >= 400 and len(train) + len(test) == len(prompts)
    assert 0.15 < len(test) / len(prompts) < 0.25
    assert all(len(row["completions"]) == 4 and all(0 <= r <= 1 for r in row["rewards"]) for row in train + test)


def test_card_statistics_match_the_files():
    card = (FOLDER / "CARD.md").read_text()
    assert card == render_card(dataset_statistics(FOLDER)), "CARD.md is stale: run `python -m tools.bundled_card`"


def test_unknown_format_or_split_is_a_clear_error():
    with pytest.raises(DataError, match="unknown bundled format 'pairs'"):
        load_bundled("pairs")
    with pytest.raises(DataError, match="unknown split 'dev'"):
        load_bundled("pairwise", "dev")
