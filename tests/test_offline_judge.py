"""The offline judge: degenerate strategies score low, correct beats wrong, determinism, bounds.

Margins asserted below were measured on these completions (offline-judge-1): good answers score
0.83–1.0; empty, prompt copies, endless repetition and garbage score 0.0; cut-off rambling
0.17–0.30; unrelated filler padding 0.17–0.75, always at least 0.19 below the unpadded answer.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest

from unialign.rewards.base import RewardSource, prompt_text
from unialign.rewards.offline_judge import (
    BUNDLED_PROMPTS,
    OfflineJudge,
    check_constraint,
    final_number,
    parse_constraints,
    prompt_arithmetic,
)

ROWS = [json.loads(line) for line in BUNDLED_PROMPTS.read_text(encoding="utf-8").splitlines()]
ARITH = next(r for r in ROWS if r["category"] == "arithmetic")

FILLER = (" Many people have asked similar questions over the years. History shows that ideas change slowly."
          " Some experts prefer one view while others disagree strongly. Weather, culture and money all"
          " shape daily choices. Schools teach these topics in different ways across the world.")

GOOD = {
    "What is the capital of France?": "The capital of France is Paris.",
    ARITH["prompt"]: f"The answer is {ARITH['answer']}.",
    "Give me a tip for sleeping better.":
        "Try to go to bed at the same time every night and avoid screens for an hour before sleep.",
    "Describe the sun in one sentence.": "The sun is a huge, hot star at the center of our solar system.",
    "List three fruits.": "Apple, banana, and cherry.",
}


def degenerate(prompt: str, good: str) -> dict[str, str]:
    return {
        "empty": "",
        "whitespace": "   \n ",
        "echo prompt": prompt,
        "echo prompt x3": " ".join([prompt] * 3),
        "endless repetition": " ".join([good] * 20),
        "word loop": "the best answer " * 60,
        "truncated rambling": good[:-1] + " and also there are many other things that we could say about this"
                              " topic because it is very interesting and the",
        "padding to length": good + FILLER * 2,
        "garbage": "!!!!!!!! ???? ######## ........",
    }


@pytest.fixture(scope="module")
def judge():
    return OfflineJudge()


def scores(judge, pairs):
    return judge([p for p, _ in pairs], [c for _, c in pairs])


def test_interface(judge):
    assert isinstance(judge, RewardSource)
    assert judge.bounds == (0.0, 1.0) and judge.version == "offline-judge-1" and judge.name == "offline_judge"
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        judge(["a", "b"], ["x"])


def test_degenerate_strategies_score_low(judge):
    pairs, labels = [], []
    for prompt, good in GOOD.items():
        pairs.append((prompt, good))
        labels.append((prompt, "good"))
        for name, text in degenerate(prompt, good).items():
            pairs.append((prompt, text))
            labels.append((prompt, name))
    got = dict(zip(labels, scores(judge, pairs)))
    for prompt in GOOD:
        good = got[(prompt, "good")]
        assert good >= 0.8, (prompt, good)
        for name in degenerate(prompt, GOOD[prompt]):
            bad = got[(prompt, name)]
            limit = good - 0.15 if name == "padding to length" else 0.35
            assert bad <= limit, (prompt, name, bad, good)
            if name not in ("truncated rambling", "padding to length", "word loop"):
                assert bad <= 0.05, (prompt, name, bad)


def test_attributes_explain_the_penalties(judge):
    prompt, good = "Give me a tip for sleeping better.", GOOD["Give me a tip for sleeping better."]
    texts = [good, prompt, " ".join([good] * 20), degenerate(prompt, good)["truncated rambling"]]
    a_good, a_echo, a_rep, a_trunc = judge.attributes([prompt] * 4, texts)
    assert a_echo["echo"] == 1.0 and a_rep["repetition"] == 1.0 and a_trunc["truncation"] > 0
    assert a_rep["verbosity"] > a_good["verbosity"]
    for a in (a_good, a_echo, a_rep, a_trunc):
        assert set(a) >= {"helpfulness", "correctness", "coherence", "complexity", "verbosity", "score"}
        assert all(0.0 <= a[k] <= 4.0 for k in ("helpfulness", "correctness", "coherence", "verbosity"))


RIGHT_WRONG = [
    (ARITH["prompt"], f"{ARITH['prompt'].split('?')[0]}? That makes {ARITH['answer']}.",
     f"That makes {ARITH['answer'] + 2}."),
    ("What is (7 + 5) * 3?", "(7 + 5) * 3 = 36", "(7 + 5) * 3 = 26"),  # not bundled: computed from the prompt
    ("What is 144 divided by 12?", "It is twelve.", "It is 14."),
    ("What is the capital of Japan?", "Tokyo is the capital of Japan.", "Kyoto is the capital of Japan."),
    ("How many legs does a spider have?", "A spider has eight legs.", "A spider has six legs."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted it.", "Pablo Picasso painted it."),
    ("Describe a cat in 8 words or fewer.", "A small, soft pet that purrs.",
     "A cat is a small and soft animal that people keep as a pet and it purrs."),
    ("Is the sun a star? Answer yes or no.", "Yes.", "No."),
    ("List four things you can find in a kitchen.", "- a stove\n- a fridge\n- a sink\n- a kettle",
     "- a stove\n- a fridge"),
    ("Give study tips using exactly 5 bullet points.",
     "- Plan your week.\n- Study in short blocks.\n- Sleep well.\n- Test yourself.\n- Take breaks.",
     "Plan your week, study in short blocks, sleep well, test yourself and take breaks."),
    ("Describe a sunny day. Respond in all lowercase letters.", "the sky is clear and the sun feels warm.",
     "The sky is clear and the Sun feels warm."),
    ("How many wheels does a bicycle have? Reply with only a number.", "2", "A bicycle has two wheels."),
    ('Describe the sky. Do not use the word "blue".', "The sky is bright and full of soft clouds.",
     "The sky is blue and full of soft clouds."),
    ('Describe a rainy day. Start your answer with "Today".', "Today the rain taps on every window.",
     "The rain taps on every window today."),
    ("Write a happy birthday wish in all capital letters.", "HAPPY BIRTHDAY, HAVE A GREAT DAY!",
     "Happy birthday, have a great day!"),
    # not bundled: constraints parsed from the text
    ("Explain gravity in two sentences.", "Gravity pulls things together. It keeps us on the ground.",
     "Gravity pulls things toward each other."),
    ("Name three rivers without using any commas.", "The Nile and the Amazon and the Danube.",
     "The Nile, the Amazon, the Danube."),
]


def test_correct_beats_wrong(judge):
    prompts = [p for p, _, _ in RIGHT_WRONG]
    right = judge(prompts, [r for _, r, _ in RIGHT_WRONG])
    wrong = judge(prompts, [w for _, _, w in RIGHT_WRONG])
    failures = [(p, g, b) for p, g, b in zip(prompts, right, wrong) if g - b < 0.15]
    assert not failures


def test_determinism_and_batch_independence(judge):
    prompts = list(GOOD) * 3
    completions = [c for c in GOOD.values()] * 3
    first = judge(prompts, completions)
    assert judge(prompts, completions) == first
    fresh = OfflineJudge()  # new embedding cache, shared model
    single = [fresh([p], [c])[0] for p, c in zip(prompts[:5], completions[:5])]
    assert single == pytest.approx(first[:5], abs=1e-5)


def test_bounds_and_conversation_prompts(judge):
    prompt = "What is the capital of France?"
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": prompt},
                    {"role": "assistant", "content": "Sure."}]
    assert prompt_text(conversation) == prompt
    plain, conv = judge([prompt, conversation], ["Paris.", "Paris."])
    assert plain == conv
    pairs = [(p, c) for p, good in GOOD.items() for c in [good, *degenerate(p, good).values()]]
    assert all(0.0 <= s <= 1.0 for s in scores(judge, pairs))


def test_bundled_prompt_set():
    assert len(ROWS) >= 420
    assert len({r["id"] for r in ROWS}) == len(ROWS) == len({r["prompt"] for r in ROWS})
    counts = Counter(r["category"] for r in ROWS)
    assert counts["instruction"] >= 120 and counts["factual"] >= 110
    assert counts["arithmetic"] >= 100 and counts["format"] >= 90
    for row in ROWS:
        if row["category"] == "arithmetic":
            assert isinstance(row["answer"], int) and row["answer"] >= 0
        if row["category"] == "factual":
            assert row["facts"] and all(isinstance(a, str) for fact in row["facts"] for a in fact)
        # the text parser reads the same constraint the metadata declares (and none elsewhere)
        constraint = {k: v for k, v in row.get("constraint", {}).items() if k != "answer"}
        declared = [constraint] if constraint else []
        assert parse_constraints(row["prompt"]) == declared, row["prompt"]


def test_rule_helpers():
    assert final_number("12 + 5 = 17, so the answer is 17 apples.") == 17
    assert final_number("First 3, then 4, total: 1,200") == 1200
    assert final_number("She has eight.") == 8 and final_number("no idea") is None
    assert prompt_arithmetic("What is 6 times 4?") == 24
    assert prompt_arithmetic("Write a poem in 3-4 lines.") is None
    assert check_constraint({"type": "list", "n": 3}, "Three fruits are apples, pears and plums.")
    assert check_constraint({"type": "list", "n": 3}, "1. Apple 2. Pear 3. Plum")
    assert check_constraint({"type": "sentences", "n": 2, "op": "max"}, "One. Two.")
    assert not check_constraint({"type": "one_word"}, "")
