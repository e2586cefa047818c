"""The ``--dataset_use`` grammar (torch-free; the one source of truth for qwenvl and vlsft).

``name[%percent],name[%percent],...``

* ``percent`` is a non-negative decimal (``%5.437``, ``%50``, ``%250``); no suffix means 100.
* Below 100 a seeded subset of ``round(n * percent / 100)`` samples is drawn (without replacement).
* 100 or more means ``floor(percent / 100)`` whole copies plus a seeded sample of the remainder:
  ``%250`` = 2 copies + a random 50 %.

The official trainer accepts only integer percents and ignores anything above 100.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from decimal import Decimal

from qwenvl.problems import UserError

_ENTRY = re.compile(r"^(?P<name>[^%,]+?)(?:%(?P<pct>[0-9]+(?:\.[0-9]*)?|\.[0-9]+))?$")


class DatasetUseError(UserError, ValueError):
    """A malformed ``--dataset_use`` string."""


@dataclass(frozen=True)
class DatasetUseEntry:
    name: str
    percent: float = 100.0

    @property
    def rate(self) -> float:
        return self.percent / 100.0

    def format(self) -> str:
        return self.name if self.percent == 100.0 else f"{self.name}%{format_percent(self.percent)}"


def format_percent(percent: float) -> str:
    """Shortest exact decimal text for a percent (``5.437``, ``50``, ``250``)."""
    if not math.isfinite(percent) or percent < 0:
        raise DatasetUseError(f"percent must be a finite number >= 0, got {percent!r}")
    text = repr(float(percent))
    if "e" in text or "E" in text:  # 1e-05 -> 0.00001 (every digit kept: the text reads back exactly)
        text = format(Decimal(text), "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def parse_dataset_use(text: str) -> list[DatasetUseEntry]:
    """Parse ``a%50,b,c%250`` into entries. Whitespace around entries is ignored."""
    if text is None or not text.strip():
        raise DatasetUseError("--dataset_use is empty: name at least one dataset, e.g. 'mydata%50,other'")
    entries: list[DatasetUseEntry] = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise DatasetUseError(f"empty entry in --dataset_use {text!r} (a doubled or trailing comma?)")
        m = _ENTRY.match(item)
        if not m:
            raise DatasetUseError(
                f"cannot parse {item!r} in --dataset_use: expected 'name' or 'name%percent' (e.g. 'mydata%12.5')"
            )
        pct = float(m.group("pct")) if m.group("pct") is not None else 100.0
        if pct <= 0:
            raise DatasetUseError(f"{item!r}: percent must be > 0")
        entries.append(DatasetUseEntry(m.group("name").strip(), pct))
    return entries


def format_dataset_use(entries: list[DatasetUseEntry]) -> str:
    return ",".join(e.format() for e in entries)


def sample_count(n: int, percent: float) -> int:
    """Samples per epoch that ``name%percent`` yields from a dataset of ``n`` records."""
    whole, frac = divmod(percent / 100.0, 1.0)
    return int(whole) * n + int(round(n * frac))
