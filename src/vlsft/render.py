"""Terminal rendering shared by vlsft commands (rich; torch-free).

* :func:`stdout` / :func:`stderr`: rich consoles that never wrap a line (a problem stays one line,
  even in a narrow terminal or a CI log) and print no colour when not on a terminal.
* :func:`problem_text`: one coloured line per :class:`~qwenvl.problems.Problem`.
* :func:`summary_text`: ``2 errors, 1 warning`` style summaries.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from qwenvl.problems import Problem

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


def plural(n: int, word: str) -> str:
    return f"{n:,} {word}" if n == 1 else f"{n:,} {word}s"


def summary_text(problems: list[Problem]) -> str:
    errors = sum(1 for p in problems if p.is_error)
    warnings = len(problems) - errors
    return f"{plural(errors, 'error')}, {plural(warnings, 'warning')}"


def markup(text: str) -> str:
    """Escape user text for rich markup."""
    return escape(text)
