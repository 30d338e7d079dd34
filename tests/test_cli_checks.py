"""Arguments are checked before any model loads; every refusal is one line and exit code 1 (issue #17).

``unialign.models.load_model`` is replaced by a function that fails the test, so each refusal is
shown to happen before a model would load.
"""

from __future__ import annotations

import json
import math

import pytest

import unialign.models
from tests.conftest import strict_json
from unialign.cli import main
from unialign.data.builder import build_dataset
from unialign.evaluate import EvalReport, PairStats, SideStats, WinTieLoss, evaluate, write_report
from unialign.generation import GenerationConfig


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(unialign.models, "load_model", refuse)


def run(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0][len("error: "):]


# ----------------------------------------------------------------------------- GenerationConfig
@pytest.mark.parametrize(
    "field,value,message",
    [
        ("temperature", -1.0, "temperature must be at least 0 (0 means greedy decoding); got -1.0"),
        ("temperature", math.nan, "temperature must be at least 0 (0 means greedy decoding); got nan"),
        ("top_p", 0.0, "top_p must be in (0, 1]; got 0.0"),
        ("top_p", 1.5, "top_p must be in (0, 1]; got 1.5"),
        ("max_new_tokens", 0, "max_new_tokens must be an integer of at least 1; got 0"),
        ("num_return_sequences", 0, "num_return_sequences must be an integer of at least 1; got 0"),
        ("batch_size", 0, "batch_size must be an integer of at least 1; got 0"),
        ("batch_size", 2.5, "batch_size must be an integer of at least 1; got 2.5"),
    ],
)
def test_generation_config_refuses_settings_generate_would_misread(field, value, message):
    with pytest.raises(ValueError) as info:
        GenerationConfig(**{field: value})
    assert str(info.value) == message


def test_generation_config_accepts_the_edges():
    GenerationConfig(temperature=0, top_p=1.0, max_new_tokens=1, num_return_sequences=1, batch_size=1)


# ----------------------------------------------------------------------------- unialign eval
def test_eval_with_zero_prompts_is_an_error_before_any_model_loads(tmp_path, no_model, capsys):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("\n")
    code, err = run(["eval", "some-model", "--reference", "ref", "--prompts", str(empty),
                     "--out", str(tmp_path / "eval")], capsys)
    assert code == 1
    assert one_line_error(err) == f"{empty}: has no rows; evaluation needs at least one prompt"
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--temperature", "-1", "--samples-per-prompt", "2"],
         "temperature must be at least 0 (0 means greedy decoding); got -1.0"),
        (["--samples-per-prompt", "2"],
         "--samples-per-prompt 2 with --temperature 0 (greedy decoding) would give 2 identical completions per "
         "prompt, not independent samples; set --temperature above 0 or --samples-per-prompt 1"),
        (["--samples-per-prompt", "0", "--temperature", "1"], "--samples-per-prompt must be at least 1; got 0"),
        (["--limit", "0"], "--limit must be at least 1; got 0"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer of at least 1; got 0"),
        (["--batch-size", "0"], "batch_size must be an integer of at least 1; got 0"),
    ],
)
def test_eval_refuses_bad_sampling_flags_before_any_model_loads(flags, message, tmp_path, no_model, capsys):
    code, err = run(["eval", "some-model", "--reference", "ref", "--out", str(tmp_path / "eval"), *flags], capsys)
    assert code == 1
    assert one_line_error(err) == message


def test_evaluate_api_refuses_zero_prompts_and_greedy_repeats(tiny_model_dir):
    model = object()  # never reached: the checks come first
    with pytest.raises(ValueError, match=r"^no prompts to evaluate; evaluation needs at least one prompt$"):
        evaluate(model, model, None, [], lambda p, c: [])
    with pytest.raises(ValueError, match=r"^samples_per_prompt 3 with temperature 0 \(greedy decoding\)"):
        evaluate(model, model, None, ["hi"], lambda p, c: [], samples_per_prompt=3)


def test_eval_json_is_valid_json_when_numbers_are_not_finite(tmp_path):
    nan = math.nan
    report = EvalReport(
        num_prompts=1, reward_name="r", policy=SideStats(nan, nan, 1.0, 1.0), reference=SideStats(1.0, 0.0, 1.0, 1.0),
        outcomes=WinTieLoss(0, 0, 0), kl=math.inf, beta=0.1, pairs=PairStats(1, nan, -math.inf),
        samples=[{"prompt": "p", "policy": "a", "reference": "b", "policy_reward": nan, "reference_reward": 1.0}],
    )
    json_path, _ = write_report(report, tmp_path)
    data = strict_json(json_path.read_text(encoding="utf-8"))
    assert data["policy"]["mean_reward"] is None and data["kl"] is None and data["win_rate"] is None
    assert data["pairs"] == {"num_pairs": 1, "accuracy": None, "mean_margin": None}
    assert data["samples"][0]["policy_reward"] is None and data["reference"]["mean_reward"] == 1.0


def test_a_real_eval_writes_strict_json(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say hi."}) + "\n")
    out = tmp_path / "eval"
    code = main(["eval", tiny_model_dir, "--reference", tiny_model_dir, "--prompts", str(prompts),
                 "--judge", "callable:tests.test_evaluate:length_reward", "--max-new-tokens", "3", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    data = strict_json((out / "eval.json").read_text(encoding="utf-8"))
    assert data["num_prompts"] == 1 and data["kl"] == 0.0  # the same model on both sides


# ----------------------------------------------------------------------------- unialign data build
@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(json.dumps({"id": f"q{i}", "prompt": f"Question {i}?"}) for i in range(3)) + "\n")
    return path


def build_args(prompts, out, *extra):
    return ["data", "build", "--prompts", str(prompts), "--model", "some-model", "--out", str(out), *extra]


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--k", "0"], "--k must be an integer of at least 1 (completions sampled per prompt); got 0"),
        (["--heldout", "1.5"], "--heldout must be at least 0 and below 1 (the fraction of prompts held out); got 1.5"),
        (["--heldout", "1"], "--heldout must be at least 0 and below 1 (the fraction of prompts held out); got 1.0"),
        (["--heldout", "-0.1"],
         "--heldout must be at least 0 and below 1 (the fraction of prompts held out); got -0.1"),
        (["--batch-prompts", "0"], "--batch-prompts must be an integer of at least 1; got 0"),
        (["--limit", "0"], "--limit must be at least 1; got 0"),
        (["--temperature", "-1"], "temperature must be at least 0 (0 means greedy decoding); got -1.0"),
        (["--top-p", "0"], "top_p must be in (0, 1]; got 0.0"),
        (["--max-new-tokens", "0"], "max_new_tokens must be an integer of at least 1; got 0"),
        (["--temperature", "0", "--k", "2"],
         "--k 2 with --temperature 0 (greedy decoding) would give 2 identical completions per prompt, not "
         "independent samples; set --temperature above 0 or --k 1"),
    ],
)
def test_data_build_refuses_bad_arguments_before_any_model_loads(flags, message, prompts_file, tmp_path, no_model,
                                                                  capsys):
    out = tmp_path / "out"
    code, err = run(build_args(prompts_file, out, *flags), capsys)
    assert code == 1
    assert one_line_error(err) == message
    assert not out.exists()


def test_data_build_refuses_an_empty_or_missing_prompts_file(tmp_path, no_model, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err = run(build_args(empty, tmp_path / "out"), capsys)
    assert code == 1
    assert one_line_error(err) == f"{empty}: has no rows; the builder needs at least one row with a `prompt`"
    missing = tmp_path / "missing.jsonl"
    code, err = run(build_args(missing, tmp_path / "out"), capsys)
    assert code == 1
    assert one_line_error(err) == f"{missing}: file not found"
    assert not (tmp_path / "out").exists()


def test_data_build_names_the_row_without_a_prompt(tmp_path, no_model, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "Hi?"}) + "\n" + json.dumps({"question": "Hi?"}) + "\n")
    code, err = run(build_args(path, tmp_path / "out"), capsys)
    assert code == 1
    assert one_line_error(err) == f"{path}, row 2, field 'prompt': missing required column for prompt data"


def test_build_dataset_api_checks_its_arguments_before_sampling(tmp_path):
    model = object()  # never reached
    prompts = [{"prompt": "Hi?"}]
    cases = [
        ({"k": 0}, "k must be an integer of at least 1 (completions sampled per prompt); got 0"),
        ({"heldout_fraction": 1.5}, "heldout_fraction must be at least 0 and below 1 (the fraction of prompts held "
                                    "out); got 1.5"),
        ({"prompts_per_batch": 0}, "prompts_per_batch must be an integer of at least 1; got 0"),
        ({"k": 2, "generation": GenerationConfig(temperature=0)},
         "k 2 with temperature 0 (greedy decoding) would give 2 identical completions per prompt, not independent "
         "samples; set temperature above 0 or k 1"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError) as info:
            build_dataset(prompts, model, None, None, tmp_path / "out", progress=False, **options)
        assert str(info.value) == message
    with pytest.raises(ValueError, match=r"^prompts: has no rows; the builder needs at least one row"):
        build_dataset([], model, None, None, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_build_dataset_refuses_a_non_finite_reward(tiny_model_dir, tmp_path):
    from unialign.models import load_model, load_tokenizer
    from unialign.rewards.sources import CallableReward

    reward = CallableReward(lambda p, c: [math.nan if i == 1 else 0.5 for i in range(len(c))], name="nanny")
    with pytest.raises(ValueError) as info:
        build_dataset([{"id": "q0", "prompt": "Hi?"}], load_model(tiny_model_dir), load_tokenizer(tiny_model_dir),
                      reward, tmp_path / "out", k=2, generation=GenerationConfig(max_new_tokens=2, temperature=1.0),
                      progress=False)
    assert str(info.value) == ("reward source nanny returned nan for completion 2 of prompt 'q0'; "
                               "rewards must be finite numbers")
    assert not (tmp_path / "out" / "listwise.all.jsonl").exists()
