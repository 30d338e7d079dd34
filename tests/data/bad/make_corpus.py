"""Write the hostile-input corpus next to this file (run: ``python tests/data/bad/make_corpus.py``).

Files are written as bytes so the invalid-UTF-8, NaN-literal and deeply nested cases come out exactly as
intended; README.md lists what each file must produce and tests/test_hostile_input.py checks it.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def pair(topic: str, **extra) -> dict:
    return {"prompt": user(f"Tell me about {topic}."), "chosen": f"{topic} is nice.", "rejected": "No.", **extra}


def line(row) -> str:
    return json.dumps(row, ensure_ascii=False)  # allow_nan=True: NaN/Infinity come out as JSON-ish literals


def write(name: str, lines: list[str | bytes]) -> None:
    data = b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines)
    (HERE / name).write_bytes(data)


def main() -> None:
    good = [line(pair(t)) for t in ("cats", "tea", "rain", "maps", "bread", "snow")]

    # --- read-level problems: the file cannot be turned into rows (always an error)
    write("malformed_json.jsonl", [good[0], good[1], '{"prompt": "Tell me about rain.", "chosen": "Rain.",', good[3]])
    write("not_an_object.jsonl", [good[0], '["Tell me about tea.", "Tea is nice.", "No."]', good[2]])
    write(
        "invalid_utf8.jsonl",
        [good[0], b'{"prompt": "Tell me about tea.", "chosen": "Tea \xff\xfe is nice.", "rejected": "No."}', good[2]],
    )
    write("too_many_digits.jsonl", [good[0], '{"prompt": "p", "completion": "c", "score": ' + "9" * 5000 + "}"])
    write("deeply_nested.jsonl", [good[0], '{"prompt": ' + "[" * 5000 + "]" * 5000 + "}"])
    (HERE / "not_a_list.json").write_text('{"prompt": "a single object, not a list of rows"}\n', encoding="utf-8")
    (HERE / "not_parquet.parquet").write_bytes(b"PAR1 a text file named .parquet\n")
    write("empty.jsonl", ["", "   "])
    write("unknown_columns.jsonl", [line({"question": "Why?", "answer": "Because."})] * 3)
    # Valid JSON syntax, but a key given twice: Python's json would keep the last value silently.
    write(
        "duplicate_keys.jsonl",
        [
            good[0],
            '{"prompt": "Tell me about tea.", "chosen": "Tea is nice.", "chosen": "No.", "rejected": "Hm."}',
            '{"prompt": [{"role": "user", "content": "Tell me about rain.", "content": "Ignore that."}], '
            '"chosen": "Rain.", "rejected": "No."}',
            good[3],
        ],
    )

    # --- row-level problems: a DataError naming row and field, or a counted drop with on_bad_row="drop"
    write(
        "lone_surrogate.jsonl",
        [good[0], '{"prompt": "Tell me about tea.", "chosen": "Tea \\ud800", "rejected": "No."}'],
    )
    missing = pair("tea")
    del missing["rejected"]
    write("missing_column.jsonl", [good[0], line(missing), good[2], good[3]])
    write("null_value.jsonl", [good[0], good[1], line(pair("rain") | {"rejected": None}), good[3]])
    write(
        "extra_columns.jsonl",
        [
            line({"id": i, **pair(t), "source": "web", "meta": {"tags": ["x", 1], "lang": None}})
            for i, t in enumerate(("cats", "tea", "rain"))
        ],
    )
    write(
        "wrong_types.jsonl",
        [good[0], line(pair("tea") | {"prompt": 42}), good[2], line(pair("maps") | {"chosen": {"text": "Maps."}})],
    )
    score = [line({"prompt": user(f"Rate {t}."), "completion": f"{t}.", "score": 0.5}) for t in ("a", "b", "c")]
    write(
        "nan_score.jsonl",
        [
            score[0],
            '{"prompt": "Rate b.", "completion": "b.", "score": NaN}',
            '{"prompt": "Rate c.", "completion": "c.", "score": Infinity}',
            '{"prompt": "Rate d.", "completion": "d.", "score": -Infinity}',
            '{"prompt": "Rate e.", "completion": "e.", "score": 1e400}',
            score[1],
        ],
    )
    write(
        "out_of_range_score.jsonl",
        [
            score[0],
            line({"prompt": "Rate b.", "completion": "b.", "score": 1.5}),
            line({"prompt": "Rate c.", "completion": "c.", "score": -0.25}),
            line({"prompt": "Rate d.", "completion": "d.", "score": int("9" * 400)}),
            line({"prompt": "Rate e.", "completion": "e.", "score": "0.5"}),
            score[1],
        ],
    )
    write(
        "nan_pairwise_score.jsonl",
        [
            good[0],
            line(pair("tea", chosen_score=0.9, rejected_score=0.1)),
            line(pair("rain", chosen_score=float("nan"), rejected_score=0.1)),
        ],
    )
    write(
        "nan_reward.jsonl",
        [
            line({"prompt": user("Name a fruit."), "completions": ["Apple.", "Rock."], "rewards": [0.9, 0.1]}),
            '{"prompt": "Name a tree.", "completions": ["Oak.", "Car."], "rewards": [0.8, NaN]}',
            '{"prompt": "Name a dog.", "completions": ["Rex.", "Cup."], "rewards": [Infinity, 0.2]}',
            line({"prompt": user("Name a cat."), "completions": ["Tom.", "Bus."], "rewards": [0.7, 0.3]}),
        ],
    )
    binary = [line({"prompt": user(f"Say {t}."), "completion": f"{t}.", "label": t == "yes"}) for t in ("yes", "no")]
    write(
        "bad_label.jsonl",
        [
            binary[0],
            binary[1],
            line({"prompt": user("Say maybe."), "completion": "maybe.", "label": "yes"}),
            line({"prompt": user("Say 1."), "completion": "1.", "label": 1}),
            line({"prompt": user("Say 2."), "completion": "2.", "label": 2}),
            line({"prompt": user("Say half."), "completion": "half.", "label": 0.5}),
            line({"prompt": user("Say list."), "completion": "list.", "label": [True]}),
        ],
    )
    write(
        "empty_strings.jsonl",
        [
            good[0],
            line(pair("tea") | {"chosen": ""}),
            line(pair("rain") | {"rejected": "   \n\t"}),
            line(pair("maps") | {"prompt": ""}),
            line(pair("bread") | {"chosen": [{"role": "assistant", "content": " "}]}),
            good[5],
        ],
    )
    write(
        "identical_pair.jsonl",
        [
            good[0],
            line(pair("tea") | {"rejected": "tea is nice."}),
            line(pair("rain") | {"chosen": [{"role": "assistant", "content": "No."}], "rejected": [
                {"role": "assistant", "content": "No."}]}),
            good[3],
        ],
    )
    write(
        "bad_ended_flag.jsonl",
        [good[0], line(pair("tea", rejected_ended="no")), line(pair("rain", chosen_ended=0)), good[3]],
    )
    write(
        "huge_strings.jsonl",
        [
            line(pair("cats") | {"chosen": "Cats are nice. " * 13334}),  # 200,010 characters: truncated
            line(pair("tea") | {"prompt": "Tea. " * 4000}),  # 20,000 characters: longer than max_length, dropped
            good[2],
        ],
    )
    system = {"role": "system", "content": "Be brief."}
    write(
        "wrong_roles.jsonl",
        [
            good[0],
            line(pair("tea") | {"prompt": [{"role": "human", "content": "Tell me about tea."}]}),
            line(pair("rain") | {"prompt": [*user("Tell me about rain."), system, *user("Go on.")]}),
            line(pair("maps") | {"prompt": [*user("Tell me about maps."), {"role": "assistant", "content": "Maps."}]}),
            line(pair("bread") | {"chosen": [{"role": "user", "content": "Bread is nice."}]}),
            line(pair("snow") | {"prompt": [{"role": "user", "text": "Tell me about snow."}]}),
            line(pair("moss") | {"prompt": []}),
            line(pair("sand")),
        ],
    )
    write(
        "listwise_mismatch.jsonl",
        [
            line({"prompt": user("Name a fruit."), "completions": ["Apple.", "Rock."], "rewards": [0.9, 0.1]}),
            line({"prompt": user("Name a tree."), "completions": ["Oak.", "Car.", "Elm."], "rewards": [0.8, 0.2]}),
            line({"prompt": user("Name a dog."), "completions": [], "rewards": []}),
            line({"prompt": user("Name a cat."), "completions": ["Tom.", "Bus."], "rewards": "0.7, 0.3"}),
            line({"prompt": user("Name a bird."), "completions": ["Tit.", "Pen."], "rewards": [0.6, True]}),
            line({"prompt": user("Name a fish."), "completions": ["Cod.", "Map."], "rewards": [0.9, 0.0]}),
        ],
    )
    write(
        "rao_first_token.jsonl",
        [
            line({"prompt": "Hello! Name a fruit.", "completions": ["Apple.", "Rock."], "rewards": [0.9, 0.1]}),
            line({"prompt": "Hello! Name a tree.", "completions": ["Oak.", "Car."], "rewards": [0.8, 0.2]}),
            line({"prompt": "What is a dog?", "completions": ["A pet.", "A cup."], "rewards": [0.7, 0.3]}),
        ],
    )
    write(
        "long_prompt.jsonl",
        [good[0], line(pair("tea") | {"prompt": user("Tell me about tea. " * 40)}), good[2], good[3]],
    )


if __name__ == "__main__":
    main()
