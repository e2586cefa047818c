"""Imports run one way: no cycle among the module-level imports of vlsft and qwenvl, those under
``if TYPE_CHECKING:`` included (a type-only import is still a dependency; function-level imports, used to keep
torch out of the fast CLI paths, are not edges)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROOTS = {"vlsft": REPO / "src" / "vlsft", "qwenvl": REPO / "qwenvl"}


def _modules() -> dict[str, Path]:
    out = {}
    for root in ROOTS.values():
        for path in root.rglob("*.py"):
            rel = path.relative_to(root.parent).with_suffix("")
            name = ".".join(rel.parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _edges(name: str, path: Path, known: set[str]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in tree.body:  # module level only; imports under `if TYPE_CHECKING:` count too
        for sub in ast.walk(node) if isinstance(node, ast.If | ast.Try) else [node]:
            if isinstance(sub, ast.Import):
                targets = [a.name for a in sub.names]
            elif isinstance(sub, ast.ImportFrom) and sub.module and sub.level == 0:
                targets = [sub.module] + [f"{sub.module}.{a.name}" for a in sub.names]
            else:
                continue
            found |= {t for t in targets if t in known and t != name}
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, trail + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


def test_no_import_cycle():
    mods = _modules()
    graph = {name: _edges(name, path, set(mods)) for name, path in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    assert len(graph) > 40 and graph["vlsft.config"] >= {"vlsft.schema", "vlsft.yamlmarks", "vlsft.overrides"}


def test_the_check_sees_a_cycle(tmp_path):
    (tmp_path / "a.py").write_text("from vlsft.b import x\n")
    (tmp_path / "b.py").write_text("import vlsft.a\n")
    known = {"vlsft.a", "vlsft.b"}
    graph = {"vlsft.a": _edges("vlsft.a", tmp_path / "a.py", known), "vlsft.b": _edges("vlsft.b", tmp_path / "b.py", known)}
    assert find_cycle(graph) == ["vlsft.a", "vlsft.b", "vlsft.a"]
    assert find_cycle({"vlsft.a": {"vlsft.b"}, "vlsft.b": set()}) is None


def test_type_checking_imports_are_edges(tmp_path):
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vlsft.b import X\n")
    assert _edges("vlsft.a", tmp_path / "a.py", {"vlsft.a", "vlsft.b"}) == {"vlsft.b"}
