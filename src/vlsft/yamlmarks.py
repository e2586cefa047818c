"""YAML with line numbers, inside bounds (torch-free).

:func:`parse_yaml_text` reads a run YAML into plain data plus :class:`Marks` (``line``/``column`` of every key
and value, so that any later problem can say ``run.yaml:12:5``), reporting syntax errors and duplicate keys as
:class:`~qwenvl.problems.Problem` records. A run YAML is a few kilobytes: files over :data:`MAX_BYTES`,
nested deeper than :data:`MAX_DEPTH` or whose aliases expand to more than :data:`MAX_VALUES` values are one
problem each, found before anything is built (no ``RecursionError`` traceback, no hang in a renderer that
expands aliases). :func:`load_value` types one override value under the same bounds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from qwenvl.problems import Problem

MAX_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 64
MAX_VALUES = 100_000


class PyYamlLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats such as ``2e-5`` as numbers (PyYAML reads them as strings)."""


class YamlLoader(getattr(yaml, "CSafeLoader", PyYamlLoader)):  # type: ignore[misc]
    """:class:`PyYamlLoader` on libyaml's parser when PyYAML has it (the same nodes, marks and resolvers; the pure
    Python scanner was a tenth of print-args' time). A file it cannot parse is parsed again by
    :class:`PyYamlLoader`, whose messages name what is wrong (a tab, not "a character")."""


for _loader in (PyYamlLoader,) if issubclass(YamlLoader, PyYamlLoader) else (PyYamlLoader, YamlLoader):
    _loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )


@dataclass
class Mark:
    line: int | None
    column: int | None
    origin: str | None = None  # an override "KEY=VALUE" when the value came from the command line


@dataclass
class Marks:
    key: dict[tuple, Mark] = field(default_factory=dict)
    value: dict[tuple, Mark] = field(default_factory=dict)


def location(marks: dict | Marks, source: str, path: tuple, key_mark: bool) -> dict:
    if not isinstance(marks, Marks):
        return {"file": source}
    table = marks.key if key_mark else marks.value
    probe = path
    while probe:
        mark = table.get(probe) or marks.key.get(probe)
        if mark is not None:
            if mark.origin is not None:
                return {"file": f"override '{mark.origin}'"}
            return {"file": source, "line": mark.line, "column": mark.column}
        probe = probe[:-1]
    return {"file": source, "line": 1 if table else None, "column": 1 if table else None}


def walk(node: yaml.Node, path: tuple, marks: Marks, problems: list[Problem], source: str,
          seen_nodes: set[int] | None = None) -> None:
    # An alias (*name) shares its node with the anchor: visit each node once, or a "billion laughs" file
    # (aliases of aliases) would take forever. Values reached through an alias point at their parent key.
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.value)
            here = path + (key,)
            line, col = key_node.start_mark.line + 1, key_node.start_mark.column + 1
            if key in seen:
                problems.append(Problem("error", f"duplicate key (first defined on line {seen[key]}); YAML keeps "
                                        "only the last one", file=source, line=line, column=col,
                                        key=".".join(map(str, here)), hint="delete one of them"))
            seen[key] = line
            marks.key[here] = Mark(line, col)
            marks.value[here] = Mark(value_node.start_mark.line + 1, value_node.start_mark.column + 1)
            walk(value_node, here, marks, problems, source, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            here = path + (index,)
            marks.key[here] = marks.value[here] = Mark(item.start_mark.line + 1, item.start_mark.column + 1)
            walk(item, here, marks, problems, source, seen_nodes)


def parse_yaml_text(text: str, source: str, sections: tuple[str, ...] = ()) -> tuple[dict, Marks, list[Problem]]:
    """Parse a run YAML into (data, marks, problems); problems include syntax errors, duplicate keys and files
    over the size / nesting / alias-expansion limits. ``sections`` names the top-level keys for a hint."""
    problems: list[Problem] = []
    marks = Marks()
    limit = _over_limits(text, source)
    if limit is not None:
        return {}, marks, [limit]
    loader = None
    try:
        try:
            loader = YamlLoader(text)
            node = loader.get_single_node()
        except yaml.YAMLError:
            if YamlLoader is PyYamlLoader:
                raise
            loader = PyYamlLoader(text)  # the pure-Python parser's words for what is wrong
            node = loader.get_single_node()
        if node is None:
            problems.append(Problem("error", "the file is empty (no sections)", file=source, line=1, column=1,
                                    hint="start from a copy of configs/qwen2.5-vl-7b.yaml"))
            return {}, marks, problems
        expanded = expanded_size(node)
        if expanded > MAX_VALUES:
            return {}, marks, [Problem("error", f"aliases expand to {expanded:,} values (limit {MAX_VALUES:,})",
                                       file=source, line=node.start_mark.line + 1, column=1,
                                       hint="a run YAML needs no nested aliases of aliases; write the values out")]
        walk(node, (), marks, problems, source)
        data = loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        what = " ".join(" ".join(str(x).split()) for x in (exc.context, exc.problem) if x) or "invalid YAML"
        problems.append(Problem("error", f"YAML syntax error: {what}", file=source,
                                line=mark.line + 1 if mark else None, column=mark.column + 1 if mark else None,
                                hint="YAML indents with spaces, never tabs" if "\\t" in what or "\t" in what
                                else "a run YAML is one document: delete the '---' line and what follows, or "
                                "merge it" if "single document" in what
                                else "check indentation, colons and quotes around this spot"))
        return {}, marks, problems
    except yaml.YAMLError as exc:
        problems.append(Problem("error", "YAML error: " + " ".join(str(exc).split()), file=source,
                                hint="save the file as plain UTF-8 text"))
        return {}, marks, problems
    finally:
        if loader is not None:
            loader.dispose()
    if not isinstance(data, dict):
        problems.append(Problem("error", f"the top level must be a mapping of sections, got {type(data).__name__}",
                                file=source, line=1, column=1,
                                hint=("sections: " + ", ".join(sections)) if sections else None))
        return {}, marks, problems
    return data, marks, problems


def _over_limits(text: str, source: str) -> Problem | None:
    """The first bound ``text`` breaks (size, then nesting depth from the event stream, which PyYAML parses
    without recursion), or None."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        return Problem("error", f"the file is {size / (1 << 20):.1f} MiB; a run YAML is at most "
                       f"{MAX_BYTES >> 20} MiB", file=source, hint="keep data out of the run YAML (lists of samples "
                       "belong in annotation files named by the dataset dictionary)")
    depth = 0
    try:
        for event in yaml.parse(text, Loader=YamlLoader):
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    mark = event.start_mark
                    return Problem("error", f"nested more than {MAX_DEPTH} levels deep", file=source,
                                   line=mark.line + 1, column=mark.column + 1,
                                   hint="a run YAML is a few levels of sections and keys; check the brackets")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
    except yaml.YAMLError:
        return None  # the real parse below reports syntax errors with their position
    return None


def _children(n: yaml.Node) -> list[yaml.Node]:
    if isinstance(n, yaml.MappingNode):
        return [x for kv in n.value for x in kv]
    if isinstance(n, yaml.SequenceNode):
        return list(n.value)
    return []


def expanded_size(node: yaml.Node) -> int:
    """How many values ``node`` holds once every alias is expanded (computed without expanding)."""
    memo: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(node, False)]
    while stack:  # iterative post-order over the node graph (aliases share nodes; no recursion)
        n, children_done = stack.pop()
        if id(n) in memo:
            continue
        if children_done:
            memo[id(n)] = 1 + sum(memo.get(id(c), 1) for c in _children(n))
            continue
        stack.append((n, True))
        stack.extend((c, False) for c in _children(n) if id(c) not in memo)
    return memo[id(node)]


def load_value(text: str) -> Any:
    """One YAML value (a command-line override) under the same bounds; ValueError names the broken bound."""
    problem = _over_limits(text, "<override>")
    if problem is not None:
        raise ValueError(problem.message)
    loader = YamlLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if expanded_size(node) > MAX_VALUES:
            raise ValueError(f"aliases expand to more than {MAX_VALUES:,} values")
        return loader.construct_document(node)
    finally:
        loader.dispose()
