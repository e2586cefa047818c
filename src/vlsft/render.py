"""Terminal rendering shared by vlsft commands (rich; torch-free).

* :func:`stdout` / :func:`stderr`: rich consoles that never wrap a line (a problem stays one line,
  even in a narrow terminal or a CI log) and print no colour when not on a terminal.
* :func:`problem_text`: one coloured line per :class:`~qwenvl.problems.Problem`.
* :func:`summary_text`: ``2 errors, 1 warning`` style summaries.
* :func:`fail`: the one exit path of the commands for bad input: one line per problem / message on
  stderr (``file:line:col: error: [key] what (hint: how)`` or ``error: what``), then exit status 2.
* :func:`table_lines`: a plain box-drawn table (a rich ``Table`` costs ~2 ms a row: 2 s for a
  1,000-dataset dictionary); cells are lists of ``(text, style)`` segments, never cut or wrapped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import NoReturn

from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from qwenvl.problems import Problem, ProblemsError, UserError

_STYLE = {"error": "bold red", "warning": "yellow"}


def _console(file) -> Console:
    tty = file.isatty() if hasattr(file, "isatty") else False
    return Console(file=file, soft_wrap=True, highlight=False, width=None if tty else 200)


def stdout() -> Console:
    return _console(sys.stdout)


def stderr() -> Console:
    return _console(sys.stderr)


def problem_text(p: Problem) -> Text:
    """``file:line:col: error: [key] message (hint: ...)`` with the severity coloured."""
    text = Text()
    text.append(p.location() + ": ", style="bold")
    text.append(p.severity, style=_STYLE.get(p.severity, ""))
    rest = p.render()[len(p.location()) + 2 + len(p.severity):]
    text.append(rest)
    return text


def print_problems(console: Console, problems: Iterable[Problem]) -> None:
    for p in problems:
        console.print(problem_text(p))


def error_text(line: str) -> Text:
    """An ``error: ...`` / ``warning: ...`` line with its severity coloured (never read as rich markup)."""
    text = Text()
    for severity in ("error", "warning"):
        if line.startswith(severity + ":"):
            text.append(severity, style=_STYLE[severity])
            text.append(line[len(severity):])
            return text
    text.append(line)
    return text


def fail(*items: str | Problem | UserError, code: int = 2) -> NoReturn:
    """Print each item as one line on stderr and exit ``code`` (2: bad input).

    A ``str`` is a message (``error: <message>``), a :class:`Problem` renders itself with its place, a
    :class:`UserError` renders its own lines (a :class:`ProblemsError`: one per problem)."""
    import typer

    console = stderr()
    for item in items:
        if isinstance(item, ProblemsError):
            print_problems(console, item.problems)
        elif isinstance(item, Problem):
            console.print(problem_text(item))
        elif isinstance(item, UserError):
            for line in item.lines():
                console.print(error_text(line))
        else:
            console.print(error_text(item if str(item).startswith("error:") else f"error: {item}"))
    raise typer.Exit(code)


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def summary_text(problems: list[Problem]) -> str:
    errors = sum(1 for p in problems if p.is_error)
    warnings = len(problems) - errors
    return f"{plural(errors, 'error')}, {plural(warnings, 'warning')}"


def markup(text: str) -> str:
    """Escape user text for rich markup."""
    return escape(text)


Cell = list[tuple[str, str]]  # (text, style) segments


def table_lines(headers: list[tuple[str, str]], rows: list[list[Cell]]) -> list[Text]:
    """Header, rule and one line per row: ``a ┃ b`` / ``━━╇━━`` / ``a │ b``; ``headers`` are (title, "left"|"right").

    Columns are as wide as their widest cell (display width: CJK counts 2); nothing is cut.
    """
    plain = [["".join(seg for seg, _ in cell) for cell in row] for row in rows]
    widths = [cell_len(h) for h, _ in headers]
    for row in plain:
        for i, text in enumerate(row):
            n = cell_len(text)
            if n > widths[i]:
                widths[i] = n

    def pad(text: str, i: int) -> tuple[str, str]:
        gap = " " * (widths[i] - cell_len(text))
        return (gap, "") if headers[i][1] == "right" else ("", gap)

    head = Text()
    for i, (title, _) in enumerate(headers):
        left, right = pad(title, i)
        head.append((" ┃ " if i else "") + left)
        head.append(title, style="bold")
        head.append(right)
    out = [head, Text("━╇━".join("━" * w for w in widths))]
    for row, texts in zip(rows, plain, strict=True):
        line = Text()
        for i, cell in enumerate(row):
            left, right = pad(texts[i], i)
            line.append((" │ " if i else "") + left)
            for seg, style in cell:
                line.append(seg, style=style or None)
            line.append(right)
        out.append(line)
    return out
