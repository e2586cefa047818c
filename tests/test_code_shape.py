"""Every function of src/vlsft and qwenvl fits on one screen: at most MAX_LINES lines from its ``def`` to the last
line of its body (docstring included; nested functions count on their own too). A longer function is split into
named steps, as build_plan and train.run are."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = (REPO / "src" / "vlsft", REPO / "qwenvl")
MAX_LINES = 80
#: "path::name" -> why it may stay longer for now; an entry that is no longer needed fails the test
ALLOWED: dict[str, str] = {
}


def function_lengths(root: Path, base: Path = REPO) -> dict[str, int]:
    """``"path::name"`` -> lines from ``def`` to the end of the body (the longest, for a name defined twice)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(base).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                key = f"{rel}::{node.name}"
                out[key] = max(out.get(key, 0), node.end_lineno - node.lineno + 1)
    return out


def test_no_function_over_the_limit():
    lengths = {k: v for root in ROOTS for k, v in function_lengths(root).items()}
    assert len(lengths) > 500 and "src/vlsft/plan.py::build_plan" in lengths
    long = {k: v for k, v in lengths.items() if v > MAX_LINES and k not in ALLOWED}
    shown = ", ".join(f"{k} ({v} lines)" for k, v in sorted(long.items(), key=lambda kv: -kv[1]))
    assert not long, f"split these into named steps (<= {MAX_LINES} lines each): {shown}"
    stale = [k for k in ALLOWED if lengths.get(k, 0) <= MAX_LINES]
    assert not stale, f"no longer over {MAX_LINES} lines (or gone): remove from ALLOWED: {stale}"


def test_the_count_runs_from_def_to_the_last_body_line(tmp_path):
    (tmp_path / "m.py").write_text('@decorator\ndef f(\n    a,\n):\n    """Doc."""\n    def g():\n        pass\n'
                                   '    return a\n\n\nx = 1\n')
    assert function_lengths(tmp_path, tmp_path) == {"m.py::f": 7, "m.py::g": 2}  # not the decorator, not after
