"""Docs that run: every code block of README.md and docs/*.md marked ``<!-- runnable -->`` is executed.

A marked block is a ``python`` block (run with ``exec``) or a ``bash`` block of ``unialign ...`` commands
(run through ``unialign.cli.main``, so a wrong flag is argparse's exit code 2). Each runs in a temporary
working directory holding the files the snippets name (``pairs.jsonl``, ``prompts.jsonl``,
``config.yaml``, ``uf.jsonl``, ``examples/quickstart.yaml``, a ``my_rewards`` module).

What the harness changes, and nothing else:

- the text ``smollm2-135m-instruct`` (the embedded 135M model) becomes the tiny random model's folder;
- every training call, from Python (``unialign.train``) or the command line (``unialign train``), gets
  ``INJECTED`` on top of its own keys: the tiny model, one step, small batches and online samples.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

import unialign
import unialign.pipeline
from unialign.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = "<!-- runnable -->"
EMBEDDED_MODEL = "smollm2-135m-instruct"
# Files that must hold at least one runnable block, so that unmarking them is a visible change.
MUST_RUN = {"README.md", "docs/config.md", "docs/online.md", "docs/methods.md", "docs/data.md"}


def injected(model_dir: str) -> dict:
    """The keys put on top of every training call: small enough to run in seconds on a CPU."""
    return {
        "model_name_or_path": model_dir,
        "max_steps": 1,
        "per_device_train_batch_size": 2,
        "num_generations": 2,  # online methods: samples per prompt
        "max_completion_length": 8,
        "report_to": "none",
        "disable_tqdm": True,
    }


@dataclass
class Snippet:
    """One marked code block: where it is, its language and its text."""

    path: Path
    line: int
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def runnable_snippets(paths: list[Path]) -> list[Snippet]:
    """The blocks of ``paths`` whose fence follows a ``<!-- runnable -->`` line."""
    found = []
    for path in paths:
        lines = path.read_text(encoding="utf-8").splitlines()
        for index, text in enumerate(lines):
            if text.strip() != MARKER:
                continue
            fence = lines[index + 1] if index + 1 < len(lines) else ""
            match = re.fullmatch(r"```(\w+)\s*", fence)
            assert match, f"{path.name}:{index + 1}: {MARKER} must be followed by a fenced block with a language"
            end = next(i for i in range(index + 2, len(lines)) if lines[i].startswith("```"))
            found.append(Snippet(path, index + 2, match.group(1), "\n".join(lines[index + 2 : end])))
    return found


SNIPPETS = runnable_snippets(DOCS)


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a bash block: ``\\``-continued lines joined, comments dropped, one argv each."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        argv = shlex.split(line, comments=True)
        if argv:
            commands.append(argv)
    return commands


UF_ROW = {
    "instruction": "Name a colour.",
    "completions": [
        {"response": "Blue.", "overall_score": 8.0},
        {"response": "I do not know.", "overall_score": 2.0},
    ],
}


@pytest.fixture
def workdir(tmp_path, monkeypatch, tiny_model_dir, pairwise_rows):
    """A working directory with the files the snippets name; training calls get ``injected``."""
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in pairwise_rows) + "\n")
    prompts = [{"prompt": f"Question {i}: what is {i} plus {i}?"} for i in range(4)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(p) for p in prompts) + "\n")
    (tmp_path / "uf.jsonl").write_text(json.dumps(UF_ROW) + "\n")
    (tmp_path / "config.yaml").write_text(
        f"loss_type: dpo\nmodel_name_or_path: {EMBEDDED_MODEL}\ndataset: pairs.jsonl\nmax_length: 64\n"
        "output_dir: runs/config\n"
    )
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions):\n    return [-len(c.split()) / 100 for c in completions]\n"
    )
    (tmp_path / "examples").mkdir()
    shutil.copy(ROOT / "examples" / "quickstart.yaml", tmp_path / "examples" / "quickstart.yaml")
    for name in ("config.yaml", "examples/quickstart.yaml"):
        path = tmp_path / name
        path.write_text(path.read_text().replace(EMBEDDED_MODEL, tiny_model_dir))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))

    results = []
    real_train = unialign.pipeline.train

    def small_train(config, **overrides):
        result = real_train(config, **{**overrides, **injected(tiny_model_dir)})
        results.append(result)
        return result

    # unialign.train for Python snippets; unialign.pipeline.train is what `unialign train` calls.
    monkeypatch.setattr(unialign, "train", small_train)
    monkeypatch.setattr(unialign.pipeline, "train", small_train)
    return tmp_path, results


def run_snippet(snippet: Snippet, model_dir: str) -> None:
    """Run ``snippet``; raise (or fail the test) if it does not run cleanly."""
    code = snippet.code.replace(EMBEDDED_MODEL, model_dir)
    if snippet.language == "python":
        exec(compile(code, snippet.name, "exec"), {"__name__": "__docs__"})
        return
    assert snippet.language in ("bash", "sh"), f"{snippet.name}: cannot run a {snippet.language} block"
    for argv in shell_commands(code):
        assert argv[0] == "unialign", f"{snippet.name}: a runnable shell block may only run unialign, got {argv}"
        try:
            code_ = main(argv[1:])
        except SystemExit as exit_:  # argparse: an unknown flag or a missing argument
            code_ = exit_.code
        assert code_ == 0, f"{snippet.name}: `{shlex.join(argv)}` exited with {code_}"
        if argv[1:3] == ["data", "convert"]:
            assert Path(argv[4]).is_file(), f"{snippet.name}: `{shlex.join(argv)}` wrote no {argv[4]}"


def test_the_docs_mark_runnable_blocks_where_expected():
    marked = {str(s.path.relative_to(ROOT)) for s in SNIPPETS}
    assert MUST_RUN <= marked, f"no runnable block in {sorted(MUST_RUN - marked)}"


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[s.name for s in SNIPPETS])
def test_runnable_snippet_runs(snippet, workdir, tiny_model_dir):
    folder, results = workdir
    trains = snippet.code.count("unialign.train(") + sum(
        argv[:2] == ["unialign", "train"] for argv in (shell_commands(snippet.code) if snippet.language != "python"
                                                       else [])
    )
    run_snippet(snippet, tiny_model_dir)
    assert len(results) == trains, f"{snippet.name}: expected {trains} training runs, saw {len(results)}"
    for result in results:  # every training call left a model and its metrics in the working directory
        assert (Path(result.model_dir) / "config.json").is_file()
        assert (Path(result.output_dir) / "metrics.jsonl").is_file()
        assert Path(result.output_dir).resolve().is_relative_to(folder.resolve())


def test_a_wrong_flag_or_function_in_a_snippet_fails(workdir, tiny_model_dir):
    """The harness would catch a stale doc: a flag or a function that does not exist is an error."""
    readme = ROOT / "README.md"
    with pytest.raises(AssertionError, match="exited with 2"):
        run_snippet(Snippet(readme, 0, "bash", "unialign data convert uf.jsonl out.jsonl --format pairwise"),
                    tiny_model_dir)
    with pytest.raises(AttributeError, match="train_model"):
        run_snippet(Snippet(readme, 0, "python", "import unialign\nunialign.train_model({})"), tiny_model_dir)
