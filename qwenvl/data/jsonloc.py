"""A small position-aware, error-recovering JSON parser (torch-free, pure Python).

Python's :mod:`json` stops at the first syntax error and forgets where values came from
(and silently keeps the last of two duplicate keys). Checking a hand-written dataset
dictionary needs more: every key and value with its ``line:column``, all duplicate keys,
and *recovery* after common mistakes so that later problems are still reported::

    node, errors = parse(text)

``node`` is a :class:`JNode` tree (``None`` only when nothing parseable was found);
``errors`` lists :class:`SyntaxIssue` records (line, column, message, hint), in file order.

Recovered mistakes: trailing commas, missing commas, missing colons, single-quoted strings,
unquoted keys, ``//`` and ``/* */`` comments, Python literals (``True``/``None``), raw
control characters in strings, unclosed brackets, extra data after the top-level value.
``NaN``/``Infinity``/``-Infinity`` parse as floats (Python's json accepts them); the caller
decides whether they are allowed. Meant for small files (dictionaries, configs), not for
gigabytes of annotations.
"""

from __future__ import annotations

import bisect
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 128


class _Invalid:
    """Marker value of a scalar that could not be understood (an error was already reported)."""

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return "<invalid>"


INVALID: Any = _Invalid()


@dataclass
class JKey:
    name: str
    line: int
    column: int


@dataclass
class JNode:
    """A parsed JSON value with its position.

    ``kind`` is one of ``object``, ``array``, ``string``, ``number``, ``bool``, ``null``, ``invalid``.
    For objects ``value`` is a list of ``(JKey, JNode | None)`` pairs in file order (duplicates kept);
    for arrays a list of ``JNode``; otherwise the Python value (``INVALID`` for ``invalid``).
    ``raw`` is the source text of a scalar.
    """

    kind: str
    value: Any
    line: int
    column: int
    raw: str = ""
    members: list = field(default_factory=list, repr=False)

    def to_python(self) -> Any:
        if self.kind == "object":
            return {k.name: (v.to_python() if v is not None else None) for k, v in self.value}
        if self.kind == "array":
            return [v.to_python() for v in self.value]
        return None if self.value is INVALID else self.value

    @property
    def is_nonfinite(self) -> bool:
        return self.kind == "number" and isinstance(self.value, float) and not math.isfinite(self.value)


@dataclass(frozen=True)
class SyntaxIssue:
    line: int
    column: int
    message: str
    hint: str | None = None


_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r\n]+)
  | (?P<lcomment>//[^\n]*)
  | (?P<bcomment>/\*.*?(?:\*/|\Z))
  | (?P<string>"(?:[^"\\\n]|\\.)*")
  | (?P<badstring>"(?:[^"\\\n]|\\.)*)
  | (?P<sqstring>'(?:[^'\\\n]|\\.)*'?)
  | (?P<number>[-+]?(?:[0-9][0-9A-Za-z_.+-]*|\.[0-9][0-9A-Za-z_.+-]*)%?)
  | (?P<neginf>-Infinity\b)
  | (?P<ident>[A-Za-z_$][A-Za-z0-9_$]*)
  | (?P<punct>[{}\[\]:,])
  | (?P<other>.)
    """,
    re.VERBOSE | re.DOTALL,
)
_STRICT_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?\Z")
_IDENTS: dict[str, tuple[str, Any]] = {
    "true": ("bool", True),
    "false": ("bool", False),
    "null": ("null", None),
    "NaN": ("number", float("nan")),
    "Infinity": ("number", float("inf")),
}
_PYTHONISH = {"True": ("bool", True, "true"), "False": ("bool", False, "false"), "None": ("null", None, "null"),
              "nan": ("number", float("nan"), "NaN"), "inf": ("number", float("inf"), "Infinity")}


@dataclass
class _Tok:
    kind: str  # punct char, 'string', 'number', 'ident', 'eof', 'bad'
    text: str
    pos: int
    value: Any = None


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.errors: list[SyntaxIssue] = []
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.toks = self._tokenize()
        self.i = 0

    # ---- positions / errors -------------------------------------------------------------
    def where(self, pos: int) -> tuple[int, int]:
        idx = bisect.bisect_right(self._line_starts, pos) - 1
        return idx + 1, pos - self._line_starts[idx] + 1

    def err(self, pos: int, message: str, hint: str | None = None) -> None:
        line, col = self.where(pos)
        self.errors.append(SyntaxIssue(line, col, message, hint))

    # ---- tokens -------------------------------------------------------------------------
    def _tokenize(self) -> list[_Tok]:
        toks: list[_Tok] = []
        text = self.text
        pos = 0
        n = len(text)
        while pos < n:
            m = _TOKEN.match(text, pos)
            assert m is not None  # 'other' matches any character
            kind = m.lastgroup
            s = m.group()
            start = pos
            pos = m.end()
            if kind == "ws":
                continue
            if kind in ("lcomment", "bcomment"):
                self.err(start, "comments are not allowed in JSON", "delete the comment")
                if kind == "bcomment" and not s.endswith("*/"):
                    self.err(start, "unterminated /* comment")
                continue
            if kind == "string":
                toks.append(_Tok("string", s, start, self._decode_string(s, start)))
            elif kind == "badstring":
                self.err(start, "unterminated string (missing closing \")", 'close the string with "')
                toks.append(_Tok("string", s, start, self._decode_string(s + '"', start, report=False)))
            elif kind == "sqstring":
                self.err(start, "JSON strings need double quotes, not single quotes", f'write "{s.strip(chr(39))}"')
                inner = s[1:-1] if len(s) >= 2 and s.endswith("'") else s[1:]
                toks.append(_Tok("string", s, start, inner))
            elif kind == "number":
                toks.append(self._number(s, start))
            elif kind == "neginf":
                toks.append(_Tok("number", s, start, float("-inf")))
            elif kind == "ident":
                toks.append(_Tok("ident", s, start))
            elif kind == "punct":
                toks.append(_Tok(s, s, start))
            else:
                shown = s if s.isprintable() else repr(s)
                self.err(start, f"unexpected character {shown!r}")
        toks.append(_Tok("eof", "", n))
        return toks

    def _decode_string(self, s: str, start: int, report: bool = True) -> str:
        try:
            return json.loads(s)
        except (ValueError, RecursionError):
            pass
        # control characters or a bad escape: report once, then decode leniently
        try:
            value = json.loads(s, strict=False)
            if report:
                self.err(start, "string contains a raw control character (e.g. a tab)", "write it as \\t or \\n")
            return value
        except ValueError:
            if report:
                self.err(start, "invalid escape sequence in string", "write a backslash as \\\\")
            return s[1:-1]

    def _number(self, s: str, start: int) -> _Tok:
        if _STRICT_NUMBER.match(s):
            try:
                value: Any = int(s) if re.fullmatch(r"-?[0-9]+", s) else float(s)
            except (ValueError, OverflowError):  # pragma: no cover - regex guarantees validity
                value = INVALID
            return _Tok("number", s, start, value)
        if s.endswith("%") and _STRICT_NUMBER.match(s[:-1].lstrip("+")):  # "sampling_rate": 50%
            fraction = float(s[:-1]) / 100
            self.err(start, f"{s!r} is not a JSON number (no percent signs)",
                     f"write {fraction!r}: rates are fractions (0.5 = 50 %)")
            return _Tok("number", s, start, fraction)
        try:
            value = float(s)
            self.err(start, f"{s!r} is not a valid JSON number", "use plain decimals like 0.5, 12 or 1e-3")
            return _Tok("number", s, start, value)
        except ValueError:
            self.err(start, f"{s!r} is not a valid JSON value")
            return _Tok("bad", s, start)

    # ---- grammar ------------------------------------------------------------------------
    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        if tok.kind != "eof":
            self.i += 1
        return tok

    def node(self, kind: str, value: Any, tok: _Tok) -> JNode:
        line, col = self.where(tok.pos)
        return JNode(kind, value, line, col, tok.text)

    def parse_value(self, depth: int) -> JNode | None:
        tok = self.peek()
        k = tok.kind
        if k in ("{", "["):
            if depth >= MAX_DEPTH:
                self.err(tok.pos, f"nesting deeper than {MAX_DEPTH} levels")
                self._skip_nested()
                return None
            return self.parse_object(depth + 1) if k == "{" else self.parse_array(depth + 1)
        if k == "string":
            self.take()
            return self.node("string", tok.value, tok)
        if k == "number":
            self.take()
            return self.node("number", tok.value, tok)
        if k == "bad":
            self.take()
            return self.node("invalid", INVALID, tok)
        if k == "ident":
            self.take()
            if tok.text in _IDENTS:
                kind, value = _IDENTS[tok.text]
                return self.node(kind, value, tok)
            if tok.text in _PYTHONISH:
                kind, value, fix = _PYTHONISH[tok.text]
                self.err(tok.pos, f"{tok.text!r} is not JSON", f"write {fix}")
                return self.node(kind, value, tok)
            self.err(tok.pos, f"unknown word {tok.text!r}", "strings need double quotes")
            return self.node("invalid", INVALID, tok)
        if k == "eof":
            self.err(tok.pos, "unexpected end of file: a value is missing")
            return None
        # a punctuation character where a value should be; do not consume closers
        self.err(tok.pos, f"expected a value, found {tok.text!r}")
        if k == ":":
            self.take()
        return None

    def _skip_nested(self) -> None:
        level = 0
        while True:
            tok = self.take()
            if tok.kind in ("{", "["):
                level += 1
            elif tok.kind in ("}", "]"):
                level -= 1
                if level <= 0:
                    return
            elif tok.kind == "eof":
                return

    def parse_object(self, depth: int) -> JNode:
        open_tok = self.take()
        obj = self.node("object", [], open_tok)
        members: list = obj.value
        last_comma: _Tok | None = None
        while True:
            tok = self.peek()
            k = tok.kind
            if k == "}":
                self.take()
                if last_comma is not None:
                    self.err(last_comma.pos, "trailing comma before '}'", "remove the comma after the last entry")
                return obj
            if k == "eof":
                line, col = obj.line, obj.column
                self.err(tok.pos, f"'{{' opened at {line}:{col} is never closed", "add the missing '}'")
                return obj
            if k == "]":
                self.err(tok.pos, "']' closes an object", "use '}' to close an object")
                self.take()
                return obj
            if k == ",":
                self.err(tok.pos, "unexpected comma" if members else "comma before the first entry",
                         "remove the extra comma")
                self.take()
                continue
            if members and last_comma is None:
                self.err(tok.pos, "missing comma between entries", "add ',' after the previous value")
            last_comma = None
            # key
            if k == "string":
                self.take()
                line, col = self.where(tok.pos)
                key = JKey(tok.value, line, col)
            elif k == "ident" or k == "number":
                self.take()
                self.err(tok.pos, f"key {tok.text} must be in double quotes", f'write "{tok.text}"')
                line, col = self.where(tok.pos)
                key = JKey(tok.text, line, col)
            else:
                self.err(tok.pos, f"expected a key in double quotes, found {tok.text!r}")
                if k in ("{", "["):
                    self.parse_value(depth)
                else:
                    self.take()
                continue
            # colon
            nxt = self.peek()
            if nxt.kind == ":":
                self.take()
            else:
                self.err(nxt.pos, f"expected ':' after key \"{key.name}\"", "write \"key\": value")
                if nxt.kind in (",", "}", "eof"):
                    members.append((key, None))
                    if nxt.kind == ",":
                        last_comma = self.take()
                    continue
            value = self.parse_value(depth)
            if value is not None and value.kind == "number":
                value = self._thousands(value)
            members.append((key, value))
            nxt = self.peek()
            if nxt.kind == ",":
                last_comma = self.take()
            elif nxt.kind in ("}", "eof", "]"):
                continue
            elif value is None and nxt.kind not in ("string", "ident"):
                self.take()  # guarantee progress after a broken value

    def _thousands(self, value: JNode) -> JNode:
        """``1,000`` / ``1,000,000`` (digit groups after an integer, not followed by ':'): one number, one error."""
        if not isinstance(value.value, int) or not re.fullmatch(r"-?[0-9]{1,3}", value.raw):
            return value
        j = self.i
        groups = []
        toks = self.toks
        while (toks[j].kind == "," and toks[j + 1].kind == "number" and re.fullmatch(r"[0-9]{3}", toks[j + 1].text)
               and toks[j + 1].pos == toks[j].pos + 1 and toks[j + 2].kind != ":"):
            groups.append(toks[j + 1].text)
            j += 2
        if not groups:
            return value
        # the tokens were lexed alone: drop the errors they raised ("'000' is not a valid JSON number")
        first, end = toks[self.i].pos, toks[j - 1].pos + 3
        self.errors = [e for e in self.errors if not (first <= self._offset(e) < end)]
        self.i = j
        number = value.raw + "".join(groups)
        self.err(self._pos_of(value), f"'{value.raw},{','.join(groups)}' is not a JSON number "
                 "(no thousands separators)", f"write {number}")
        return JNode("number", int(number), value.line, value.column, number)

    def _pos_of(self, node: JNode) -> int:
        return self._line_starts[node.line - 1] + node.column - 1

    def _offset(self, e: SyntaxIssue) -> int:
        return self._line_starts[e.line - 1] + e.column - 1

    def parse_array(self, depth: int) -> JNode:
        open_tok = self.take()
        arr = self.node("array", [], open_tok)
        items: list = arr.value
        last_comma: _Tok | None = None
        expect_sep = False
        while True:
            tok = self.peek()
            k = tok.kind
            if k == "]":
                self.take()
                if last_comma is not None:
                    self.err(last_comma.pos, "trailing comma before ']'", "remove the comma after the last item")
                return arr
            if k == "eof":
                self.err(tok.pos, f"'[' opened at {arr.line}:{arr.column} is never closed", "add the missing ']'")
                return arr
            if k == "}":
                self.err(tok.pos, "'}' closes an array", "use ']' to close an array")
                self.take()
                return arr
            if k == ",":
                if not expect_sep:
                    self.err(tok.pos, "unexpected comma", "remove the extra comma")
                self.take()
                last_comma = tok
                expect_sep = False
                continue
            if expect_sep:
                self.err(tok.pos, "missing comma between items", "add ',' after the previous item")
            last_comma = None
            before = self.i
            value = self.parse_value(depth)
            if value is not None:
                items.append(value)
            if self.i == before:
                self.take()
            expect_sep = True


def parse(text: str) -> tuple[JNode | None, list[SyntaxIssue]]:
    """Parse ``text``; return the (possibly partial) tree and every syntax problem found."""
    p = _Parser(text)
    if p.peek().kind == "eof":
        p.errors.sort(key=lambda e: (e.line, e.column))
        return None, p.errors
    root = p.parse_value(0)
    extra = p.peek()
    if extra.kind != "eof":
        p.err(extra.pos, f"extra data after the top-level value: {extra.text!r}",
              "the whole file must be one JSON value; remove what follows or wrap it in the outer object")
    p.errors.sort(key=lambda e: (e.line, e.column))
    return root, p.errors


def loc(text: str, pos: int) -> tuple[int, int]:
    """``(line, column)`` (1-based) of character offset ``pos`` in ``text``."""
    line = text.count("\n", 0, pos) + 1
    start = text.rfind("\n", 0, pos) + 1
    return line, pos - start + 1
