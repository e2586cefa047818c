"""The suite runs on a fresh clone with nothing beside it: no test module reaches outside the repository.

Static check over every ``tests/**/*.py`` (AST, so comments and docstrings are free to mention ``../shared``):
* a string holding ``../shared``, ``shared/golden`` or an absolute path of this machine's work tree;
* a path built from ``__file__`` that climbs above the repository root (``parents[2]``, ``.parent`` x 3,
  ``REPO.parent`` where ``REPO`` was built from ``__file__``, a ``".."`` joined onto such a path).
The in-repo golden data lives in ``tests/golden/`` (see its README).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
BAD_TEXT = ("../shared", "..\\shared", "shared/golden", "/work/")


def _is_docstring(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """A bare string statement (docstring): text, not a path anything opens."""
    return isinstance(parents.get(node), ast.Expr)


def _levels(node: ast.AST, names: dict[str, int]) -> int | None:
    """How many folders above the module's own file ``node`` points (its folder = 1); None if not a file path."""
    if isinstance(node, ast.Name):
        return 0 if node.id == "__file__" else names.get(node.id)
    if isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("Path", "PurePath") and node.args:
            return _levels(node.args[0], names)
        if isinstance(func, ast.Attribute) and func.attr in ("resolve", "absolute", "expanduser"):
            return _levels(func.value, names)
        if isinstance(func, ast.Attribute) and func.attr == "dirname":  # os.path.dirname(x)
            inner = _levels(node.args[0], names) if node.args else None
            return None if inner is None else inner + 1
        return None
    if isinstance(node, ast.Attribute) and node.attr == "parent":
        inner = _levels(node.value, names)
        return None if inner is None else inner + 1
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "parents":
        inner = _levels(node.value.value, names)
        index = node.slice
        if inner is None or not (isinstance(index, ast.Constant) and isinstance(index.value, int)):
            return inner
        return inner + index.value + 1
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
        inner = _levels(node.left, names)
        if inner is None:
            return None
        right = node.right
        if isinstance(right, ast.Constant) and isinstance(right.value, str):
            parts = [p for p in right.value.replace("\\", "/").split("/") if p not in ("", ".")]
            for part in parts:
                inner = inner + 1 if part == ".." else inner - 1
        else:
            inner -= 1
        return inner
    return None


def problems_in(source: str, path: Path) -> list[str]:
    """Every reference to a path outside the repository in one test module (``file:line: what``)."""
    tree = ast.parse(source, filename=str(path))
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    try:
        depth = len(path.resolve().relative_to(REPO).parts) - 1  # folders between the file and the repo root
    except ValueError:
        depth = len(path.relative_to(path.anchor).parts) - 1 if path.is_absolute() else 1
    out: list[str] = []
    names: dict[str, int] = {}
    for node in ast.walk(tree):  # names bound to __file__-rooted paths (REPO, HERE, ...), in source order
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            levels = _levels(node.value, names)
            if levels is not None:
                names[node.targets[0].id] = levels
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not _is_docstring(node, parents):
            for bad in BAD_TEXT:
                if bad in node.value:
                    out.append(f"{path}:{node.lineno}: string {node.value!r} points outside the repository")
                    break
        if isinstance(node, ast.Attribute | ast.Subscript | ast.BinOp | ast.Call):
            levels = _levels(node, names)
            if levels is not None and levels > depth + 1:
                out.append(f"{path}:{node.lineno}: {ast.unparse(node)} climbs {levels - depth - 1} folder(s) above "
                           "the repository root")
    return sorted(set(out))


def test_no_test_module_reads_outside_the_repository():
    modules = sorted(TESTS.rglob("*.py"))
    assert TESTS / "conftest.py" in modules and TESTS / "s3server.py" in modules
    modules.remove(Path(__file__).resolve())  # this module spells the bad patterns out to test the check
    found = [line for path in modules for line in problems_in(path.read_text(encoding="utf-8"), path)]
    assert found == [], "test modules reach outside the repository (put the data under tests/golden/):\n" + \
        "\n".join(found)


def test_golden_data_is_in_the_repository(golden_dir):
    assert golden_dir.resolve().is_relative_to(REPO)
    for rel in ("README.md", "annotations/public_a.json", "annotations/public_b.jsonl", "expected/index.json",
                "media/images/tiny_28x28.png", "media/videos/clip_4s_24fps_160x120.mp4"):
        assert (golden_dir / rel).is_file(), rel
    head = REPO / "tests" / "golden" / "official-qwen3vl-head"
    assert (head / "README.md").is_file() and (head / "expected" / "index.json").is_file()


@pytest.mark.parametrize("line", [
    'SHARED = REPO.parent / "shared"',
    'GOLDEN_MEDIA = Path(__file__).resolve().parents[2] / "shared" / "golden" / "official-qwen25" / "media"',
    'X = Path(__file__).parent.parent.parent / "data"',
    'X = Path(__file__).resolve().parents[1] / ".." / "shared"',
    'X = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))',
    'open("../shared/golden/x.json")',
    'p = "/work/shared/golden/official-qwen25"',
])
def test_the_check_catches_outside_paths(line):
    """The patterns the suite used before the golden data moved in (and their cousins) are caught."""
    source = "import os\nfrom pathlib import Path\nREPO = Path(__file__).resolve().parents[1]\n" + line + "\n"
    assert problems_in(source, TESTS / "test_example.py"), line


@pytest.mark.parametrize("line", [
    'GOLDEN = REPO / "tests" / "golden" / "official-qwen25"',
    'MEDIA = Path(__file__).resolve().parent / "golden" / "official-qwen25" / "media"',
    'CONFIGS = Path(__file__).resolve().parents[1] / "configs"',
    'sub = {"data_path": "../media"}',
    '"""A docstring may mention ../shared."""',
])
def test_the_check_allows_paths_inside(line):
    source = "from pathlib import Path\nREPO = Path(__file__).resolve().parents[1]\n" + line + "\n"
    assert problems_in(source, TESTS / "test_example.py") == [], line
