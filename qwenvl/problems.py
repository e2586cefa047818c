"""Structured user-facing problems, shared by qwenvl and vlsft (torch-free).

Every check in the project reports :class:`Problem` records instead of raising on the
first error. A problem renders as one line::

    Dataset-Dictionary.json:5:9: error: [sampleing_rate] unknown key (hint: did you mean 'sampling_rate'?)

Layers raise :class:`ProblemsError` (carrying all problems) when they cannot go on, or another
:class:`UserError` subclass with a one-line message; the CLI prints one line per problem and exits
non-zero, never with a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Literal

from qwenvl.secrets import mask_urls

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the user's input: what, where, and how to fix it."""

    severity: Severity
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None
    key: str | None = None
    hint: str | None = None

    def __post_init__(self) -> None:  # a URL's password / signature never reaches a display or a report
        object.__setattr__(self, "message", mask_urls(self.message))
        if self.file:  # a dictionary or annotation given as a URL, an override echoed as typed
            object.__setattr__(self, "file", mask_urls(self.file))
        if self.hint:
            object.__setattr__(self, "hint", mask_urls(self.hint))

    @property
    def is_error(self) -> bool:
        return self.severity == "error"

    def location(self) -> str:
        parts = [self.file or "<input>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)

    def render(self) -> str:
        """One line: ``file:line:col: severity: [key] message (hint: ...)``."""
        key = f"[{self.key}] " if self.key else ""
        hint = f" (hint: {self.hint})" if self.hint else ""
        return f"{self.location()}: {self.severity}: {key}{self.message}{hint}"

    def to_dict(self) -> dict:
        return asdict(self)


class UserError(Exception):
    """A problem with the user's input or environment (not a bug): shown as one line, exit status 2.

    Every user-facing exception of the project derives from it, so the trainer's ``main`` and the CLI
    catch one type. ``every_rank``: the error is found by one rank only (e.g. mid-training), so whichever
    rank raises it reports it, not just rank 0.
    """

    every_rank = False

    def lines(self) -> list[str]:
        """What the user sees: ``error: <message>`` on one line (subclasses may give one line per problem)."""
        text = mask_urls(" ".join(str(self).split())) or type(self).__name__
        return [text if text.startswith("error:") else f"error: {text}"]


class ProblemsError(UserError):
    """Raised when user input cannot be used; carries every problem found."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(p.render() for p in self.problems))

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    def lines(self) -> list[str]:
        return [p.render() for p in self.problems]


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A hint naming the closest known choice, or None if nothing is close."""
    match = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"did you mean '{match[0]}'?" if match else None
