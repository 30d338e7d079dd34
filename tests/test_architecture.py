"""The package's shape: no import cycle (imports in functions counted), no harness imported, no code written twice."""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the unialign package."""
    files = {}
    for path in (SRC / "unialign").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """unialign modules ``name`` imports anywhere in its file (function bodies included).

    ``from pkg import x`` counts as importing ``pkg.x`` when that is a module, else ``pkg``. A
    submodule importing its own package's ``__init__`` is not counted: Python runs that first anyway.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_package_has_no_import_cycle():
    files = module_files()
    graph = {name: imports_of(name, path, set(files)) for name, path in files.items()}
    assert graph["unialign.pipeline"] >= {"unialign.online", "unialign.run"}  # the reader sees real edges
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_importing_unialign_loads_neither_torch_nor_transformers():
    import subprocess
    import sys

    code = (
        "import sys, unialign, unialign.data.io, unialign.data.formats\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))\n"
        "unialign.load_config\n"
        "print('transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"  # nothing heavy until a public function is used
    assert out[1] == "True"  # and the names still resolve, loading what they need


# The repository's harnesses and their dependencies: the library a user installs imports none of them.
FORBIDDEN = ("trl", "psutil", "benchmarks", "tools")


def absolute_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level name) of every absolute import in the file, function bodies included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.partition(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.append((node.lineno, node.module.partition(".")[0]))
    return found


def test_absolute_imports_are_read_at_every_level(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os.path\nfrom . import x\n\ndef f():\n    from trl.experimental import cpo\n")
    assert absolute_imports(path) == [(1, "os"), (5, "trl")]


def test_the_package_imports_no_harness_and_no_harness_dependency():
    offenders = [f"{path.relative_to(SRC)}:{line} imports {name}"
                 for path in sorted((SRC / "unialign").rglob("*.py"))
                 for line, name in absolute_imports(path) if name in FORBIDDEN]
    assert offenders == [], "the library must not import the harnesses or their dependencies: " + "; ".join(offenders)


def _code_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, whitespace-folded text) of the lines that carry code: no blank, comment, import or
    lone-punctuation lines (the same rules as the repository's `duplicates` tool, identical runs only)."""
    source = path.read_text(encoding="utf-8")
    comment_at = {
        token.start[0]: token.start[1]
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    kept = []
    for number, raw in enumerate(source.splitlines(), start=1):
        line = " ".join(raw[: comment_at.get(number, len(raw))].split())
        if not line or line.startswith(("import ", "from ")) or not any(c.isalnum() for c in line):
            continue
        kept.append((number, line))
    return kept


def repeated_runs(files: list[Path], run: int = 6) -> list[tuple[str, str]]:
    """Places where ``run`` consecutive code lines stand again, identically, elsewhere (or later in a file)."""
    seen: dict[tuple[str, ...], tuple[Path, int, int]] = {}
    found = []
    for path in files:
        lines = _code_lines(path)
        for i in range(len(lines) - run + 1):
            window = tuple(text for _, text in lines[i : i + run])
            first, last = lines[i][0], lines[i + run - 1][0]
            if window in seen:
                other, other_first, other_last = seen[window]
                if other != path or other_last < first:
                    found.append((f"{other.name}:{other_first}-{other_last}", f"{path.name}:{first}-{last}"))
                continue
            seen[window] = (path, first, last)
    return found


def test_repeated_runs_finds_a_copied_block_and_nothing_else(tmp_path):
    block = "\n".join(f"value_{i} = compute({i}, scale)" for i in range(6)) + "\n"
    (tmp_path / "a.py").write_text("import os\n\ndef f(scale):\n" + block)
    (tmp_path / "b.py").write_text("# a comment\ndef g(scale):\n" + block.replace("value_5", "other"))
    assert repeated_runs([tmp_path / "a.py", tmp_path / "b.py"]) == []  # five lines alike is not a run of six
    (tmp_path / "c.py").write_text("def h(scale):\n    pass\n" + block)
    assert repeated_runs([tmp_path / "a.py", tmp_path / "c.py"]) == [("a.py:4-9", "c.py:3-8")]


def test_the_package_writes_no_code_twice():
    assert repeated_runs(sorted((SRC / "unialign").rglob("*.py"))) == []


DEFERRED = "# Deferred imports:"


def unexplained_local_imports(path: Path) -> list[str]:
    """Imports inside functions with no reason given: no comment on the line or above its block of imports,
    and the module's ``# Deferred imports: a b (why)`` line names neither the module nor a package above it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    declared = next((line.split(":", 1)[1] for line in lines if line.strip().startswith(DEFERRED)), "")
    named = {word.strip(",.()") for word in declared.split()}
    found = []
    for node in ast.walk(ast.parse("\n".join(lines))):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for sub in ast.walk(node):
            if not isinstance(sub, ast.Import | ast.ImportFrom):
                continue
            module = sub.module if isinstance(sub, ast.ImportFrom) else sub.names[0].name
            parts = (module or "").split(".")
            prefixes = {".".join(parts[: i + 1]) for i in range(len(parts))}
            above = sub.lineno - 2  # a comment above a block of imports covers the whole block
            while above > 0 and lines[above].strip().startswith(("import ", "from ")):
                above -= 1
            if "#" in lines[sub.lineno - 1] or lines[above].strip().startswith("#") or prefixes & named:
                continue
            found.append(f"{path.relative_to(SRC)}:{sub.lineno} {module}")
    return found


def test_unexplained_local_imports_are_found(tmp_path):
    path = SRC / "unialign" / "_probe_for_test.py"
    source = f"{DEFERRED} datasets (loads pyarrow)\n\ndef f():\n    import datasets\n    import json\n"
    try:
        path.write_text(source + "\n\ndef g():\n    # torch is optional here\n    import torch\n")
        assert unexplained_local_imports(path) == ["unialign/_probe_for_test.py:5 json"]
    finally:
        path.unlink()


def test_every_import_inside_a_function_says_why():
    found = [hit for path in sorted((SRC / "unialign").rglob("*.py")) for hit in unexplained_local_imports(path)]
    assert found == []
