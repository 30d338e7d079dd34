"""Converters (SPEC §2) on hand-written UltraFeedback-, HelpSteer2- and listwise-shaped rows."""

from __future__ import annotations

import math

import pytest

from unialign.data.converters import (
    convert,
    detect_source,
    helpsteer2_score,
    helpsteer2_to_pairwise,
    helpsteer2_to_score,
    listwise_to_binary,
    listwise_to_pairwise,
    listwise_to_prompts,
    listwise_to_score,
    listwise_to_sft,
    listwise_to_triple,
    ultrafeedback_to_listwise,
)
from unialign.data.errors import DataError


def uf_row(instruction, scores, overall=None):
    """An UltraFeedback row with one completion per fine-grained score."""
    overall = overall or [s * 2 for s in scores]
    return {"instruction": instruction, "models": ["m"] * len(scores),
            "completions": [{"response": f"{instruction} answer {j}", "fine-grained_score": s,
                             "overall_score": o, "critique": "..."}
                            for j, (s, o) in enumerate(zip(scores, overall))]}


def hs_row(prompt, response, h, c, k, complexity=2, verbosity=2):
    return {"prompt": prompt, "response": response, "helpfulness": h, "correctness": c, "coherence": k,
            "complexity": complexity, "verbosity": verbosity}


LISTWISE = [
    {"prompt": "p0", "completions": ["a", "b", "c", "d"], "rewards": [2.0, 4.0, 1.0, 3.0]},
    {"prompt": "p1", "completions": ["a", "b", "c"], "rewards": [3.0, 3.0, 1.0]},  # tie for best
    {"prompt": "p2", "completions": ["a", "b"], "rewards": [2.0, 2.0]},  # all tied
    {"prompt": "p3", "completions": ["a"], "rewards": [5.0]},  # single completion
]


# ------------------------------------------------------------------------------- UltraFeedback

def test_ultrafeedback_to_listwise_uses_fine_grained_by_default():
    rows = [uf_row("Say hi", [4.5, 2.0, 3.25, 1.0], overall=[6, 9, 5, 2])]
    result = ultrafeedback_to_listwise(rows)
    assert result.rows == [{"prompt": "Say hi", "completions": [f"Say hi answer {j}" for j in range(4)],
                            "rewards": [4.5, 2.0, 3.25, 1.0]}]
    assert result.reward_range == (1.0, 5.0)
    assert result.n_dropped == 0


def test_ultrafeedback_overall_score_parameter_and_fallback():
    rows = [uf_row("Say hi", [4.5, 2.0, 3.25, 1.0], overall=[6, 9, 5, 2])]
    overall = ultrafeedback_to_listwise(rows, score_field="overall_score")
    assert overall.rows[0]["rewards"] == [6.0, 9.0, 5.0, 2.0] and overall.reward_range == (1.0, 10.0)
    for c in rows[0]["completions"]:
        del c["fine-grained_score"]
    assert ultrafeedback_to_listwise(rows).rows[0]["rewards"] == [6.0, 9.0, 5.0, 2.0]


def test_ultrafeedback_to_pairwise_and_triple_via_convert():
    rows = [uf_row("Q1", [4.5, 2.0, 3.25, 1.0]), uf_row("Q2", [3.0, 3.0, 3.0, 3.0])]
    pairs = convert(rows, to="pairwise")
    assert pairs.source == "ultrafeedback" and pairs.target == "pairwise"
    assert pairs.rows == [{"prompt": "Q1", "chosen": "Q1 answer 0", "rejected": "Q1 answer 3",
                           "chosen_score": 4.5, "rejected_score": 1.0}]
    assert pairs.dropped == {"all rewards tied": 1}
    triples = convert(rows, to="triple")
    assert triples.rows == [{"prompt": "Q1", "reference": "Q1 answer 0", "chosen": "Q1 answer 2",
                             "rejected": "Q1 answer 3"}]
    assert triples.dropped == {"chosen and rejected tied": 1}


def test_ultrafeedback_to_score_uses_the_field_range():
    result = convert([uf_row("Q", [5.0, 1.0, 3.0])], to="score")
    assert [r["score"] for r in result.rows] == [1.0, 0.0, 0.5]
    assert result.rows[0] == {"prompt": "Q", "completion": "Q answer 0", "score": 1.0}


def test_ultrafeedback_bad_rows():
    with pytest.raises(DataError, match=r"row 2, field 'completions'.*missing") as err:
        ultrafeedback_to_listwise([uf_row("Q", [1.0]), {"instruction": "x"}])
    assert err.value.row == 1 and err.value.field == "completions"
    bad = uf_row("Q", [1.0, 2.0])
    bad["completions"][1]["fine-grained_score"] = "great"
    with pytest.raises(DataError, match=r"row 1, field 'completions\[1\].fine-grained_score'.*number"):
        ultrafeedback_to_listwise([bad], score_field="fine-grained_score")
    bad["completions"][1]["fine-grained_score"] = 7.5
    with pytest.raises(DataError, match=r"outside the declared score range \[1.0, 5.0\]; got 7.5$"):
        ultrafeedback_to_listwise([bad], score_field="fine-grained_score")
    no_response = uf_row("Q", [1.0])
    del no_response["completions"][0]["response"]
    with pytest.raises(DataError, match=r"completions\[0\].response"):
        ultrafeedback_to_listwise([no_response])


def test_ultrafeedback_empty_completions_are_counted():
    result = ultrafeedback_to_listwise([uf_row("Q", [2.0, 1.0]), {"instruction": "E", "completions": []}])
    assert len(result) == 1 and result.dropped == {"no completions": 1}
    assert "1 dropped (no completions: 1)" in result.summary()


# ---------------------------------------------------------------------------------- HelpSteer2

def test_helpsteer2_score_formula():
    assert helpsteer2_score(hs_row("p", "r", 4, 4, 4)) == pytest.approx(1.0)
    assert helpsteer2_score(hs_row("p", "r", 0, 0, 0)) == 0.0
    assert helpsteer2_score(hs_row("p", "r", 3, 2, 4)) == pytest.approx((0.65 * 3 + 0.8 * 2 + 0.45 * 4) / 7.6)


def test_helpsteer2_to_score_rows():
    result = helpsteer2_to_score([hs_row("p", "r1", 3, 2, 4), hs_row("p", "r2", 1, 1, 1)])
    assert result.rows[0] == {"prompt": "p", "completion": "r1",
                              "score": pytest.approx((1.95 + 1.6 + 1.8) / 7.6)}
    assert result.rows[1]["score"] == pytest.approx(1.9 / 7.6)
    assert result.reward_range == (0.0, 1.0) and convert(result.rows, to="score").rows == result.rows


def test_helpsteer2_to_pairwise_pairs_drops_and_groups():
    rows = [hs_row("p1", "worse", 2, 2, 3), hs_row("p1", "better", 4, 3, 4),
            hs_row("p2", "lonely", 4, 4, 4),
            hs_row("p3", "same a", 2, 2, 2), hs_row("p3", "same b", 2, 2, 2),
            hs_row("p4", "mid", 3, 3, 3), hs_row("p4", "top", 4, 4, 4), hs_row("p4", "low", 1, 1, 1)]
    result = helpsteer2_to_pairwise(rows)
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in result.rows] == [
        ("p1", "better", "worse"), ("p4", "top", "low")]
    assert result.rows[0]["chosen_score"] > result.rows[0]["rejected_score"]
    assert result.dropped == {"no second response": 1, "all rewards tied": 1}
    assert convert(rows, to="pairwise").rows == result.rows


def test_helpsteer2_bad_attribute():
    with pytest.raises(DataError, match=r"row 2, field 'correctness': is outside the declared score range \[0.0, 4"):
        helpsteer2_to_score([hs_row("p", "r", 1, 1, 1), hs_row("p", "r", 1, 5, 1)])
    row = hs_row("p", "r", 1, 1, 1)
    del row["coherence"]
    with pytest.raises(DataError, match="field 'coherence'"):
        helpsteer2_to_score([row])


# ------------------------------------------------------------------------------------ listwise

def test_listwise_to_pairwise_best_vs_worst_with_ties():
    result = listwise_to_pairwise(LISTWISE)
    assert result.rows == [
        {"prompt": "p0", "chosen": "b", "rejected": "c", "chosen_score": 4.0, "rejected_score": 1.0},
        {"prompt": "p1", "chosen": "a", "rejected": "c", "chosen_score": 3.0, "rejected_score": 1.0},
    ]
    assert result.dropped == {"all rewards tied": 1, "fewer than 2 completions": 1}
    assert result.n_dropped == 2


def test_listwise_to_pairwise_best_vs_random_is_seeded_and_strictly_worse():
    rows = [{"prompt": f"p{i}", "completions": ["a", "b", "c", "d"], "rewards": [4.0, 1.0, 2.0, 3.0]}
            for i in range(30)]
    first = listwise_to_pairwise(rows, mode="best_vs_random", seed=3)
    assert first.rows == listwise_to_pairwise(rows, mode="best_vs_random", seed=3).rows
    assert all(r["chosen"] == "a" and r["rejected"] in "bcd" for r in first.rows)
    assert {r["rejected"] for r in first.rows} == {"b", "c", "d"}
    tied = [{"prompt": "p", "completions": ["a", "b", "c"], "rewards": [2.0, 2.0, 1.0]}]
    assert listwise_to_pairwise(tied, mode="best_vs_random").rows[0]["rejected"] == "c"


def test_listwise_to_binary_both_modes():
    result = listwise_to_binary(LISTWISE[:1], mode="threshold", threshold=3.0)
    assert result.rows == [{"prompt": "p0", "completion": c, "label": lab}
                           for c, lab in zip("abcd", [False, True, False, True])]
    assert all(type(r["label"]) is bool for r in result.rows)
    best_worst = listwise_to_binary(LISTWISE)
    assert [(r["completion"], r["label"]) for r in best_worst.rows] == [
        ("b", True), ("c", False), ("a", True), ("c", False)]
    assert best_worst.n_dropped == 2
    with pytest.raises(DataError, match="threshold"):
        listwise_to_binary(LISTWISE, mode="threshold")


def test_listwise_to_score_normalizes_with_declared_range():
    result = listwise_to_score(LISTWISE[:1], reward_range=(0.0, 4.0))
    assert result.rows == [{"prompt": "p0", "completion": c, "score": s}
                           for c, s in zip("abcd", [0.5, 1.0, 0.25, 0.75])]
    with pytest.raises(DataError, match=r"row 1, field 'rewards\[0\]'.*reward_range"):
        listwise_to_score(LISTWISE[:1])  # rewards above 1 need a declared range
    with pytest.raises(DataError, match=r"field 'rewards\[1\]': is outside the declared score range \[0.0, 3.5\]"):
        listwise_to_score(LISTWISE[:1], reward_range=(0.0, 3.5))
    with pytest.raises(DataError, match="reward_range: a range must be"):
        listwise_to_score(LISTWISE[:1], reward_range=(4.0, 0.0))


def test_listwise_to_triple_order_ties_and_distinctness():
    rows = [
        {"prompt": "p0", "completions": ["a", "b", "c", "d"], "rewards": [2.0, 4.0, 1.0, 3.0]},
        {"prompt": "p1", "completions": ["x", "x", "y", "z"], "rewards": [5.0, 4.0, 3.0, 1.0]},  # duplicate
        {"prompt": "p2", "completions": ["x", "x", "y"], "rewards": [5.0, 4.0, 3.0]},  # 2 distinct
        {"prompt": "p3", "completions": ["a", "b", "c"], "rewards": [2.0, 2.0, 2.0]},  # ties
        {"prompt": "p4", "completions": ["a", "b", "c", "d"], "rewards": [3.0, 3.0, 1.0, 1.0]},
    ]
    result = listwise_to_triple(rows)
    assert result.rows == [
        {"prompt": "p0", "reference": "b", "chosen": "d", "rejected": "c"},
        {"prompt": "p1", "reference": "x", "chosen": "y", "rejected": "z"},
        {"prompt": "p4", "reference": "a", "chosen": "b", "rejected": "d"},
    ]
    assert all(r["chosen"] != r["reference"] for r in result.rows)
    assert result.dropped == {"fewer than 3 distinct completions": 1, "chosen and rejected tied": 1}


def test_listwise_to_sft_and_prompts():
    assert listwise_to_sft(LISTWISE).rows == [
        {"prompt": "p0", "completion": "b"}, {"prompt": "p1", "completion": "a"},
        {"prompt": "p2", "completion": "a"}, {"prompt": "p3", "completion": "a"}]
    assert listwise_to_prompts(LISTWISE).rows == [{"prompt": f"p{i}"} for i in range(4)]


def test_listwise_bad_rows_name_row_and_field():
    cases = [
        ({"prompt": "p", "rewards": [1.0]}, "completions", "missing"),
        ({"prompt": "p", "completions": ["a", "b"], "rewards": [1.0]}, "rewards", "got 1 values for 2 completions"),
        ({"prompt": "p", "completions": ["a"], "rewards": [math.nan]}, "rewards[0]", "finite"),
        ({"prompt": "p", "completions": ["a", "b"], "rewards": [1.0, math.inf]}, "rewards[1]", "finite"),
        ({"prompt": "p", "completions": ["a"], "rewards": ["high"]}, "rewards[0]", "number"),
        ({"prompt": 3, "completions": ["a"], "rewards": [1.0]}, "prompt", "string"),
        ({"prompt": "p", "completions": [None], "rewards": [1.0]}, "completions[0]", "is null"),
    ]
    for bad, name, problem in cases:
        with pytest.raises(DataError) as err:
            listwise_to_pairwise([LISTWISE[0], bad])
        assert err.value.row == 1 and err.value.field == name, bad
        assert "row 2" in str(err.value) and problem in str(err.value)


def test_conversation_fields_pass_through():
    conv = [{"role": "user", "content": "hi"}]
    answer = [{"role": "assistant", "content": "a"}]
    rows = [{"prompt": conv, "completions": [answer, "b"], "rewards": [1, 0]}]
    pair = listwise_to_pairwise(rows).rows[0]
    assert pair["prompt"] == conv and pair["chosen"] == [{"role": "assistant", "content": "a"}]


# --------------------------------------------------------------------------------- entry point

def test_detect_source():
    assert detect_source([uf_row("q", [1.0])]) == "ultrafeedback"
    assert detect_source([hs_row("p", "r", 1, 1, 1)]) == "helpsteer2"
    assert detect_source(LISTWISE) == "listwise"
    assert detect_source([{"prompt": "p", "chosen": "a", "rejected": "b"}]) == "pairwise"
    assert detect_source([{"prompt": "p", "reference": "r", "chosen": "a", "rejected": "b"}]) == "triple"
    assert detect_source([{"prompt": "p", "completion": "a", "label": True}]) == "binary"
    assert detect_source([{"prompt": "p", "completion": "a", "score": 0.5}]) == "score"
    assert detect_source([{"prompt": "p", "completion": "a"}]) == "sft"
    assert detect_source([{"prompt": "p"}]) == "prompt"
    with pytest.raises(DataError, match="cannot tell the feedback format from the columns \\['text'\\]"):
        detect_source([{"text": "x"}])
    with pytest.raises(DataError, match="empty data set"):
        detect_source([])


def test_trl_formats_load_unchanged():
    datasets = {
        "pairwise": [{"prompt": "p", "chosen": "a", "rejected": "b", "chosen_score": 2.0}],
        "binary": [{"prompt": "p", "completion": "a", "label": False}],
        "score": [{"prompt": "p", "completion": "a", "score": 0.25}],
        "triple": [{"prompt": "p", "reference": "r", "chosen": "a", "rejected": "b"}],
        "sft": [{"prompt": "p", "completion": "a"},
                {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
        "prompt": [{"prompt": "p"}],
    }
    for fmt, rows in datasets.items():
        result = convert(rows, to=fmt)
        assert result.source == fmt and result.rows == rows and result.n_dropped == 0
    with pytest.raises(DataError, match=r"row 1, field 'label': label must be true or false; got 'yes'"):
        convert([{"prompt": "p", "completion": "a", "label": "yes"}], to="binary")


def test_convert_listwise_to_every_format_and_pairwise_routes():
    for fmt in ("listwise", "pairwise", "binary", "triple", "sft", "prompt"):
        assert convert(LISTWISE, to=fmt).target == fmt
    assert len(convert(LISTWISE, to="score", reward_range=(0, 5))) == 10
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    assert convert(pairs, to="binary").rows == [{"prompt": "p", "completion": "a", "label": True},
                                                {"prompt": "p", "completion": "b", "label": False}]
    assert convert(pairs, to="sft").rows == [{"prompt": "p", "completion": "a"}]
    assert convert(pairs, to="prompt").rows == [{"prompt": "p"}]
    with pytest.raises(DataError, match="no conversion from binary to pairwise"):
        convert([{"prompt": "p", "completion": "a", "label": True}], to="pairwise")
    with pytest.raises(DataError, match="unknown target"):
        convert(LISTWISE, to="ranking")


def test_inputs_are_not_modified():
    rows = [uf_row("Q", [4.5, 2.0, 3.25, 1.0])]
    snapshot = repr(rows)
    for fmt in ("listwise", "pairwise", "binary", "score", "triple", "sft", "prompt"):
        convert(rows, to=fmt)
    assert repr(rows) == snapshot


ENDED_ROWS = [{"prompt": "p", "completions": ["a", "bb", "ccc", "dddd"], "rewards": [0.4, 0.9, 0.1, 0.6],
               "completions_ended": [True, False, True, False]}]


def test_listwise_converters_carry_which_completions_ended():
    pair = listwise_to_pairwise(ENDED_ROWS).rows[0]
    assert [pair[k] for k in ("chosen", "chosen_ended", "rejected", "rejected_ended")] == ["bb", False, "ccc", True]
    triple = listwise_to_triple(ENDED_ROWS).rows[0]
    assert [triple[f"{s}_ended"] for s in ("reference", "chosen", "rejected")] == [False, False, True]
    assert [(r["completion"], r["completion_ended"]) for r in listwise_to_binary(ENDED_ROWS).rows] == [
        ("bb", False), ("ccc", True)]
    assert [r["completion_ended"] for r in listwise_to_score(ENDED_ROWS).rows] == [True, False, True, False]
    assert listwise_to_sft(ENDED_ROWS).rows[0]["completion_ended"] is False
    by_threshold = convert(ENDED_ROWS, to="binary", mode="threshold", threshold=0.5).rows
    assert [(r["label"], r["completion_ended"]) for r in by_threshold] == [
        (False, True), (True, False), (False, True), (True, False)]


def test_pairwise_converters_carry_the_flags_and_rows_without_them_gain_no_column():
    pairs = [{"prompt": "p", "chosen": "a", "rejected": "b", "rejected_ended": False},
             {"prompt": "q", "chosen": "c", "rejected": "d"}]
    binary = convert(pairs, to="binary").rows
    assert [r.get("completion_ended") for r in binary] == [None, False, None, None]
    assert "completion_ended" not in binary[0]
    assert all("chosen_ended" not in r for r in listwise_to_pairwise([{**ENDED_ROWS[0], "completions_ended": None}]))


@pytest.mark.parametrize("flags,field,problem", [
    ([True, False], "completions_ended", "must be a list of 4 true/false values, one per completion"),
    ("yes", "completions_ended", "must be a list of 4 true/false values, one per completion"),
    ([True, False, 1, True], "completions_ended[2]", "must be true or false; got 1"),
])
def test_a_malformed_completions_ended_is_an_error_naming_the_field(flags, field, problem):
    with pytest.raises(DataError) as err:
        listwise_to_pairwise([{**ENDED_ROWS[0], "completions_ended": flags}])
    assert str(err.value) == f"row 1, field {field!r}: {problem}"
