"""Dataset builder (resumable, split by prompt), bundled data, presets and `unialign data convert`."""

import glob
import json

import pytest

from unialign.cli import main
from unialign.config import load_config
from unialign.data.builder import build_dataset, in_heldout
from unialign.data.sources import read_rows
from unialign.generation import GenerationConfig
from unialign.models import load_model, load_tokenizer
from unialign.rewards.sources import load_reward


def length_reward(prompts, completions):
    """A deterministic reward for tests: longer completions score higher."""
    return [float(len(c)) for c in completions]


def test_builder_writes_every_format_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    prompts = [{"id": f"p{i}", "prompt": f"Question number {i}?"} for i in range(6)]
    model, tokenizer = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    reward = load_reward("callable:tests.test_builder:length_reward")
    gen = GenerationConfig(max_new_tokens=6, temperature=1.0)
    counts = build_dataset(
        prompts[:4], model, tokenizer, reward, tmp_path, k=3, generation=gen, heldout_fraction=0.5, progress=False
    )
    raw = read_rows(str(tmp_path / "listwise.all.jsonl"))
    assert [r["id"] for r in raw] == ["p0", "p1", "p2", "p3"]
    assert all(len(r["completions"]) == 3 and r["rewards"] == [float(len(c)) for c in r["completions"]] for r in raw)
    assert counts["listwise.train"] + counts["listwise.test"] == 4

    calls = []
    original = reward.function
    monkeypatch.setattr(reward, "function", lambda p, c: calls.append(len(c)) or original(p, c))
    build_dataset(
        prompts, model, tokenizer, reward, tmp_path, k=3, generation=gen, heldout_fraction=0.5, progress=False
    )
    assert sum(calls) == 2 * 3  # only the two new prompts were sampled and scored
    assert [r["id"] for r in read_rows(str(tmp_path / "listwise.all.jsonl"))] == [f"p{i}" for i in range(6)]
    test_ids = {r["id"] for r in read_rows(str(tmp_path / "listwise.test.jsonl"))}
    train_ids = {r["id"] for r in read_rows(str(tmp_path / "listwise.train.jsonl"))}
    assert not test_ids & train_ids and test_ids | train_ids == {f"p{i}" for i in range(6)}
    assert test_ids == {f"p{i}" for i in range(6) if in_heldout(f"p{i}", 0.5)}
    for fmt in ("pairwise", "binary", "score", "triple", "sft", "prompt"):
        assert (tmp_path / f"{fmt}.train.jsonl").exists()
    # Whether each sample ended travels from the raw file into every split and derived format.
    ended = {r["id"]: r["ended"] for r in read_rows(str(tmp_path / "listwise.all.jsonl"))}
    shipped = read_rows(str(tmp_path / "listwise.train.jsonl")) + read_rows(str(tmp_path / "listwise.test.jsonl"))
    assert {r["id"]: r["completions_ended"] for r in shipped} == ended
    assert not all(flag for flags in ended.values() for flag in flags)  # 6 new tokens of a random model rarely end
    for row in read_rows(str(tmp_path / "pairwise.train.jsonl")):
        assert isinstance(row["chosen_ended"], bool) and isinstance(row["rejected_ended"], bool)


def test_heldout_split_is_stable_and_near_the_fraction():
    ids = [f"prompt-{i}" for i in range(2000)]
    share = sum(in_heldout(i, 0.2) for i in ids) / len(ids)
    assert 0.17 < share < 0.23
    assert [in_heldout(i, 0.2) for i in ids] == [in_heldout(i, 0.2) for i in ids]


@pytest.mark.parametrize("path", sorted(glob.glob("examples/*.yaml")))
def test_every_preset_validates(path):
    cfg = load_config(path, use_cpu=True)  # presets are GPU-sized (bf16); use_cpu lets them validate here
    assert cfg.loss_type and cfg.learning_rate > 0


def test_data_convert_cli(tmp_path, capsys):
    rows = [{"prompt": "p", "completions": ["a", "b", "c"], "rewards": [0.1, 0.9, 0.5]}]
    src = tmp_path / "l.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["data", "convert", str(src), str(tmp_path / "pairs.jsonl"), "--to", "pairwise"]) == 0
    out = read_rows(str(tmp_path / "pairs.jsonl"))
    assert out[0]["chosen"] == "b" and out[0]["rejected"] == "a"
    assert "0 dropped" in capsys.readouterr().out


def test_data_build_cli_resumes(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) for i in range(3)))
    args = [
        "data",
        "build",
        "--prompts",
        str(prompts),
        "--model",
        tiny_model_dir,
        "--k",
        "2",
        "--max-new-tokens",
        "4",
        "--reward",
        "callable:tests.test_builder:length_reward",
        "--out",
        str(tmp_path / "out"),
        "--heldout",
        "0.34",
    ]
    assert main(args + ["--limit", "2"]) == 0
    assert main(args) == 0
    assert len(read_rows(str(tmp_path / "out" / "listwise.all.jsonl"))) == 3
    out = capsys.readouterr().out
    assert "listwise.train" in out and "pairwise.test" in out
