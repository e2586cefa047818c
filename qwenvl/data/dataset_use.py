"""The ``--dataset_use`` grammar (torch-free; the one source of truth for qwenvl and vlsft).

``name[%percent],name[%percent],...``

* ``percent`` is a non-negative decimal (``%5.437``, ``%50``, ``%250``). An entry records whether a percent was
  written (:attr:`DatasetUseEntry.written`): without one the dataset dictionary's ``sampling_rate`` /
  ``repeat_time`` applies (100 when it has neither), so ``docs`` and ``docs%100`` differ when ``docs`` has a rate.
* Below 100 a seeded subset of ``round(n * percent / 100)`` samples is drawn (without replacement).
* 100 or more means ``floor(percent / 100)`` whole copies plus a seeded sample of the remainder:
  ``%250`` = 2 copies + a random 50 %.

:func:`resolve_selection` is the one resolver (dictionary rates + selection -> datasets with their percents),
used by the launch plan (``vlsft print-args``) and the trainer (``qwenvl.data.registry.resolve_sources``);
what a name listed twice means is its ``duplicates`` argument.

The official trainer accepts only integer percents and ignores anything above 100.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Literal

from qwenvl.problems import UserError

_ENTRY = re.compile(r"^(?P<name>[^%,]+?)(?:%(?P<pct>[0-9]+(?:\.[0-9]*)?|\.[0-9]+))?$")


class DatasetUseError(UserError, ValueError):
    """A malformed ``--dataset_use`` string."""


@dataclass(frozen=True)
class DatasetUseEntry:
    """One ``name[%percent]`` item. ``written``: the percent was given (``DatasetUseEntry("a", 100.0)``, ``a%100``);
    without it (``DatasetUseEntry("a")``, ``a``) ``percent`` reads 100 and the dictionary's rate applies."""

    name: str
    percent: float = None  # type: ignore[assignment]  # None (not given) becomes 100.0, written=False
    written: bool = None  # type: ignore[assignment]  # default: whether a percent was given

    def __post_init__(self) -> None:
        if self.written is None:
            object.__setattr__(self, "written", self.percent is not None)
        if self.percent is None:
            object.__setattr__(self, "percent", 100.0)

    @property
    def rate(self) -> float:
        return self.percent / 100.0

    def format(self) -> str:
        """``name`` when no percent was written and it is 100, else ``name%percent`` (reads back the same)."""
        if self.percent == 100.0 and not self.written:
            return self.name
        return f"{self.name}%{format_percent(self.percent)}"


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


MAX_PERCENT = 100_000_000.0  # 1,000,000 repeats (qwenvl.data.dictionary.MAX_REPEAT): index arrays would not fit


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
        pct = float(m.group("pct")) if m.group("pct") is not None else None
        if pct is not None and pct <= 0:
            raise DatasetUseError(f"{item!r}: percent must be > 0")
        if pct is not None and pct > MAX_PERCENT:
            raise DatasetUseError(f"{item!r}: above {MAX_PERCENT:,.0f} % ({MAX_PERCENT / 100:,.0f} repeats per epoch): "
                                  "a typo? for more passes raise num_train_epochs")
        entries.append(DatasetUseEntry(m.group("name").strip(), pct))
    return entries


def format_dataset_use(entries: list[DatasetUseEntry]) -> str:
    return ",".join(e.format() for e in entries)


def sample_count(n: int, percent: float) -> int:
    """Samples per epoch that ``name%percent`` yields from a dataset of ``n`` records."""
    whole, frac = divmod(percent / 100.0, 1.0)
    return int(whole) * n + int(round(n * frac))


def held_out_count(n: int, fraction: float) -> int:
    """Records of an ``n``-record dataset held out for evaluation by ``eval_split = fraction``: ``round(n *
    fraction)``, at least 1 when ``fraction > 0`` and ``n > 1``, never all of them (0 for ``n <= 1``)."""
    if fraction <= 0 or n <= 1:
        return 0
    return min(max(int(round(n * fraction)), 1), n - 1)


# --------------------------------------------------------------------------- selection -> datasets

Duplicates = Literal["separate", "reject"]
"""What a name listed twice means: ``separate`` = each listing is its own entry with its own draw (``a,a``, the
official way to up-sample; the trainer's ``--dataset_use``); ``reject`` = a problem on the second listing
(``data.use`` in a run YAML, where ``a%200`` says it once)."""


@dataclass(frozen=True)
class SelectedDataset:
    """A dataset chosen by a selection, at the percent it is used with."""

    name: str
    percent: float
    written: bool  # the percent came from the selection (else the dictionary's rate)
    index: int | None  # position in the selection; None when no selection was given (every dataset)

    @property
    def entry(self) -> DatasetUseEntry:
        """The ``--dataset_use`` item that the trainer resolves back to this dataset and percent."""
        return DatasetUseEntry(self.name, self.percent, self.written)


@dataclass(frozen=True)
class SelectionProblem:
    index: int | None  # position in the selection the problem belongs to
    message: str
    hint: str | None = None

    def render(self) -> str:
        return self.message + (f" (hint: {self.hint})" if self.hint else "")


@dataclass
class Selection:
    datasets: list[SelectedDataset] = field(default_factory=list)
    problems: list[SelectionProblem] = field(default_factory=list)

    @property
    def dataset_use(self) -> str:
        """The ``--dataset_use`` text that resolves to exactly these datasets and percents."""
        return format_dataset_use([d.entry for d in self.datasets])


def resolve_selection(selection: str | Sequence[str] | None, rates: Mapping[str, float], *,
                      duplicates: Duplicates, source: str = "the dataset dictionary") -> Selection:
    """Resolve a selection against the dictionary's percents (``name -> percent``, in dictionary order).

    ``selection``: ``--dataset_use`` text, a list of single ``name[%percent]`` items (``data.use``), or None /
    blank text for every dataset at its own rate. A written percent wins over the dictionary's rate, per entry.
    Problems (unknown name, a malformed list item, a doubled name under ``duplicates="reject"``) are
    collected, not raised; a malformed ``--dataset_use`` text raises :class:`DatasetUseError`.
    """
    if duplicates not in ("separate", "reject"):
        raise ValueError(f"duplicates must be 'separate' or 'reject', got {duplicates!r}")
    out = Selection()
    if selection is None or (isinstance(selection, str) and not selection.strip()):
        out.datasets = [SelectedDataset(name, float(pct), False, None) for name, pct in rates.items()]
        return out
    if isinstance(selection, str):
        items: list[DatasetUseEntry | None] = list(parse_dataset_use(selection))
    else:
        items = []
        if not selection:
            out.problems.append(SelectionProblem(None, "empty list: name at least one dataset, or give none to "
                                                 "use them all"))
        for index, text in enumerate(selection):
            try:
                if "," in text:
                    raise DatasetUseError(f"{text!r} holds a comma; give one dataset per list item")
                (entry,) = parse_dataset_use(text)
                items.append(entry)
            except DatasetUseError as exc:
                out.problems.append(SelectionProblem(index, str(exc), "write 'name' or 'name%percent', e.g. docs%12.5"))
                items.append(None)
    first_index: dict[str, int] = {}
    for index, entry in enumerate(items):
        if entry is None:
            continue
        name = entry.name
        if name not in rates:
            from qwenvl.problems import did_you_mean

            hint = did_you_mean(name, rates) or ("known: " + ", ".join(rates) if rates else "it holds no dataset")
            out.problems.append(SelectionProblem(index, f"dataset {name!r} is not in {source}", hint))
            continue
        if name in first_index and duplicates == "reject":
            out.problems.append(SelectionProblem(
                index, f"dataset {name!r} is listed twice (also item {first_index[name]})",
                f"list it once; for more copies write a percent above 100, e.g. {name}%200"))
            continue
        first_index.setdefault(name, index)
        percent = entry.percent if entry.written else float(rates[name])
        out.datasets.append(SelectedDataset(name, percent, entry.written, index))
    return out
