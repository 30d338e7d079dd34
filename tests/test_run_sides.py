"""benchmarks.run_sides: each side of a comparison in its own process, its RESULT line collected."""

import pytest

from benchmarks import run_sides

CHILD = """
import json, sys
side = sys.argv[sys.argv.index("--child") + 1]
if side == "bad":
    sys.exit(3)
print("noise")
print("RESULT " + json.dumps({"side": side, "argv": sys.argv[1:]}))
"""


def test_each_side_runs_alone_with_the_other_arguments_forwarded(tmp_path, monkeypatch):
    (tmp_path / "fake_side.py").write_text(CHILD)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    forwarded, results = run_sides("fake_side", ["--steps", "2", "--sides", "a,b"], "a,b")
    assert forwarded == ["--steps", "2"]
    assert results == {s: {"side": s, "argv": ["--steps", "2", "--child", s]} for s in ("a", "b")}
    with pytest.raises(SystemExit, match="bad failed \\(exit 3\\)"):
        run_sides("fake_side", [], "a,bad")
