"""``vlsft datasets check`` and ``vlsft datasets use``: the dataset dictionary, checked before any GPU starts.

    vlsft datasets check Dataset-Dictionary.json            # dictionary + files + counts
    vlsft datasets check Dataset-Dictionary.json --deep     # + every sample, every media file
    vlsft datasets check Dataset-Dictionary.json --deep --decode   # + open every image / video header
    vlsft datasets check Dataset-Dictionary.json --json     # machine-readable report
    vlsft datasets use Dataset-Dictionary.json              # -> dataset1%5.437,dataset2%56.7
    vlsft datasets use Dataset-Dictionary.json --integer-percent   # official trainer's integer form

``check`` exits 0 when there are no errors (warnings allowed), 1 when there are, 2 when the file is
unusable (missing, empty, not a JSON object). Every problem is one line:
``file:line:col: error: [key] what is wrong (hint: how to fix it)``. Never imports torch/transformers.
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal

import typer

from qwenvl.data.annotations import ScanResult, oneline, scan
from qwenvl.data.dataset_use import format_percent, sample_count
from qwenvl.data.dictionary import DatasetDictionary, DatasetSpec, apply_file_info, load_dictionary
from qwenvl.problems import Problem
from qwenvl.secrets import mask_urls
from vlsft import render
from vlsft.app import datasets_app

CHEAP_COUNT_LIMIT = 100_000  # without --deep, image/video/text-only counts are computed up to this many records
PROGRESS_MIN_RECORDS = 100_000  # show a progress bar for annotation files at least this long
PROGRESS_MIN_BYTES = 20_000_000  # (or at least this big, when the count is not known yet)


@dataclass
class DatasetRow:
    name: str
    spec: DatasetSpec | None
    declared_length: int | None = None
    actual_length: int | None = None
    rate: float | None = None  # percent / 100
    samples_per_epoch: int | None = None
    share: float | None = None
    images: int | None = None
    videos: int | None = None
    text_only: int | None = None
    format: str | None = None  # the annotation format (declared or detected); None: unknown / not read
    grounding: tuple[int, int, int] | None = None  # --deep: (boxes, rescaled, suspicious), None: no boxes
    errors: int = 0
    warnings: int = 0

    def to_json(self) -> dict:
        out = {"name": self.name, "format": self.format, "declared_length": self.declared_length,
               "actual_length": self.actual_length, "rate": self.rate, "samples_per_epoch": self.samples_per_epoch,
               "images": self.images, "videos": self.videos, "text_only": self.text_only}
        if self.grounding is not None:  # only datasets with boxes (--deep) carry the key
            out["grounding"] = dict(zip(("boxes", "rescaled", "suspicious"), self.grounding, strict=True))
        return out


@dataclass
class CheckReport:
    dictionary: DatasetDictionary
    rows: list[DatasetRow] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    deep: bool = False
    decode: bool = False

    @property
    def ok(self) -> bool:
        return not any(p.is_error for p in self.problems)

    def to_json(self) -> dict:
        return {
            "ok": self.ok,
            "problems": [{"severity": p.severity, "file": p.file, "line": p.line, "column": p.column, "key": p.key,
                          "message": p.message, "hint": p.hint} for p in self.problems],
            "datasets": [r.to_json() for r in self.rows],
        }


def build_report(path: str, *, deep: bool = False, progress: bool | None = None, decode: bool = False) -> CheckReport:
    """Load the dictionary, scan the annotation files, and assemble table rows and problems.

    Without ``deep``: :func:`load_dictionary` checks the files (counts, format) and files of up to
    CHEAP_COUNT_LIMIT records get one counting pass. With ``deep``: every file is read once, by the
    scan, whose result also feeds the dictionary-level file checks.
    """
    d = load_dictionary(path, check_files=not deep)
    report = CheckReport(dictionary=d, deep=deep, decode=decode)
    if d.unusable:
        report.problems.extend(d.problems)
        return report
    err_console = render.stderr()
    scans = _Scans(deep, progress if progress is not None else err_console.is_terminal, err_console, decode)
    if deep:
        for name, spec in d.entries.items():
            result = scans.of(name, spec, None)
            apply_file_info(d, name, result.as_probe() if isinstance(result, ScanResult) else result)
        d.problems.sort(key=_file_order(d))
    report.problems.extend(d.problems)
    late = [p for name in d.names if (p := _add_row(report, d, name, scans)) is not None]  # found while counting
    if late:
        report.problems = sorted(report.problems + late, key=_file_order(d))
    total = sum(r.samples_per_epoch or 0 for r in report.rows)
    for r in report.rows:
        if r.samples_per_epoch is not None and total:
            r.share = r.samples_per_epoch / total
    _add_scan_problems(report, scans)
    _add_wrong_data_path(report, scans)
    # two entries may share an annotation file: list each problem once
    report.problems = list(dict.fromkeys(report.problems))
    by_name = {r.name: r for r in report.rows}
    for p in report.problems:
        owner = d.dataset_of.get(p)
        if owner in by_name:
            if p.is_error:
                by_name[owner].errors += 1
            else:
                by_name[owner].warnings += 1
    return report


def _file_order(d: DatasetDictionary):
    """Sort key: the dictionary's own problems first, then by file, line and column."""
    return lambda p: (p.file != d.path, p.file or "", p.line or 0, p.column or 0)


class _Scans:
    """Each annotation file scanned once (two entries may share one), owned by the first dataset that asked."""

    def __init__(self, deep: bool, show_progress: bool, console, decode: bool) -> None:
        self.deep, self.show_progress, self.console, self.decode = deep, show_progress, console, decode
        self.results: dict[tuple[str, str | None], ScanResult | BaseException] = {}
        self.owner: dict[tuple[str, str | None], str] = {}

    def of(self, name: str, spec: DatasetSpec, records: int | None) -> ScanResult | BaseException:
        key = (spec.annotation_path, spec.data_path)
        if key not in self.results:
            self.results[key] = _scan_one(name, spec, records, self.deep, self.show_progress, self.console,
                                          self.decode)
            self.owner[key] = name
        return self.results[key]


def _add_row(report: CheckReport, d: DatasetDictionary, name: str, scans: _Scans) -> Problem | None:
    """The table row of dataset ``name`` (counts, media kinds, samples per epoch); a warning when it contributes no
    samples."""
    spec = d.datasets.get(name)
    row = DatasetRow(name=name, spec=spec)
    report.rows.append(row)
    if spec is None:
        return None
    row.declared_length = spec.length
    # the rate as written (percent / 100 would add float noise: 56.7 / 100 = 0.5670000000000001)
    raw_rate = spec.sampling_rate if spec.sampling_rate is not None else spec.repeat_time
    row.rate = 1.0 if raw_rate is None else float(raw_rate)
    row.actual_length = d.record_counts.get(name)
    row.format = d.formats.get(name)
    if row.actual_length is None:
        return None
    result = None
    if scans.deep or row.actual_length <= CHEAP_COUNT_LIMIT:
        got = scans.of(name, spec, row.actual_length)
        result = got if isinstance(got, ScanResult) else None
    if result is not None:
        # (for a packed .json these count the samples inside the packs)
        row.images, row.videos, row.text_only = result.images, result.videos, result.text_only
        if result.boxes:
            row.grounding = (result.boxes, result.boxes_rescaled, result.boxes_suspicious)
    row.samples_per_epoch = sample_count(row.actual_length, spec.percent)
    if row.samples_per_epoch == 0 and row.actual_length > 0:
        key = "sampling_rate" if spec.sampling_rate is not None else "repeat_time"
        line, col = d.key_positions.get((name, key), d.positions.get(name, (None, None)))
        problem = Problem("warning", f"dataset '{name}' contributes no samples: {format_percent(spec.percent)}% "
                          f"of {render.plural(row.actual_length, 'record')} rounds to 0", d.path, line, col, key,
                          f"raise {key} to at least {_min_rate(row.actual_length)} or remove the dataset")
        d.dataset_of[problem] = name
        return problem
    return None


def _add_scan_problems(report: CheckReport, scans: _Scans) -> None:
    """The problems each scan found (each owned by the dataset that asked for the scan)."""
    d = report.dictionary
    for key, result in scans.results.items():
        if isinstance(result, ScanResult) and not result.unusable:  # unusable: reported via apply_file_info
            for p in result.problems:
                d.dataset_of[p] = scans.owner[key]
            report.problems.extend(result.problems)
        elif not scans.deep and isinstance(result, BaseException):  # vanished between the load and the scan
            problem = Problem("error", f"dataset '{scans.owner[key]}': cannot read annotations: {result}", key[0])
            report.problems.append(problem)
            d.dataset_of[problem] = scans.owner[key]


def _add_wrong_data_path(report: CheckReport, scans: _Scans) -> None:
    """Every media file missing: the data_path itself is most likely wrong; say so once, at data_path."""
    d = report.dictionary
    extra: list[Problem] = []
    for key, result in scans.results.items():
        name = scans.owner[key]
        spec = d.datasets.get(name)
        if (scans.deep and isinstance(result, ScanResult) and spec is not None and spec.data_path is not None
                and result.relative_media >= 10 and result.missing_media == result.media_files):
            line, col = d.key_positions.get((name, "data_path"), d.positions.get(name, (None, None)))
            problem = Problem("error", f"none of the {result.media_files:,} media files of dataset '{name}' exist "
                              f"under data_path {spec.data_path}", d.path, line, col, "data_path",
                              "check data_path: media paths in the annotations are relative to it")
            extra.append(problem)
            d.dataset_of[problem] = name
    if extra:
        cut = next((i for i, p in enumerate(report.problems) if p.file != d.path), len(report.problems))
        head = sorted(report.problems[:cut] + extra, key=lambda p: (p.line or 0, p.column or 0))
        report.problems = head + report.problems[cut:]


def _min_rate(n: int) -> str:
    """A sampling rate that keeps at least one of ``n`` records (about 1/n; anything above 0.5/n does)."""
    return f"{1 / n:.2g}" if n > 1 else "1"


def _scan_one(name: str, spec: DatasetSpec, records: int | None, deep: bool, show_progress: bool,
              err_console, decode: bool = False) -> ScanResult | BaseException:
    """Scan one annotation file (progress bar on a terminal for long files); an OSError is returned, not raised.

    On a terminal, listing media folders on object storage (slow: one request per folder) shows its own
    bar, started by the first listing."""
    listing = _ListingBar(name, err_console) if show_progress and deep else None
    decoding = _ListingBar(name, err_console, "decoding media") if show_progress and decode else None
    extra = {"decode": True, "decode_progress": decoding} if decode else {}
    try:
        size = _size_hint(spec.annotation_path)
        long = (records or 0) >= PROGRESS_MIN_RECORDS or size >= PROGRESS_MIN_BYTES
        if show_progress and long:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                          console=err_console, transient=True) as bar:
                task = bar.add_task(f"checking {name}", total=records)
                return scan(spec.annotation_path, spec.data_path, deep=deep, fmt=spec.format_spec,
                            progress=lambda n: bar.advance(task, n), list_progress=listing, **extra)
        if long and deep:
            print(f"checking {name} ...", file=sys.stderr, flush=True)
        return scan(spec.annotation_path, spec.data_path, deep=deep, list_progress=listing, fmt=spec.format_spec,
                    **extra)
    except (OSError, ValueError) as exc:  # StorageError is an OSError
        return exc
    finally:
        for bar in (listing, decoding):
            if bar is not None:
                bar.close()


class _ListingBar:
    """``progress(done, total)`` for :func:`qwenvl.storage.existing`: a transient rich bar, started lazily."""

    def __init__(self, name: str, console, what: str = "listing media folders") -> None:
        self.name = name
        self.what = what
        self.console = console
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if done >= total:  # a single listing: no bar worth drawing
                return
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(f"{self.name}: {self.what}", total=total)
        self.bar.update(self.task, completed=done, total=total)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _size_hint(path: str) -> int:
    try:
        return 0 if "://" in path else os.path.getsize(path)
    except OSError:
        return 0


def _num(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def print_report(report: CheckReport) -> None:
    out = render.stdout()
    d = report.dictionary
    if report.rows:
        headers = [("dataset", "left"), ("format", "left"), ("declared", "right"), ("samples", "right"), ("rate", "right"),
                   ("per epoch", "right"), ("share", "right"), ("images", "right"), ("videos", "right"),
                   ("text-only", "right"), ("problems", "left")]
        rows = []
        for r in report.rows:
            probs: render.Cell = []
            if r.errors:
                probs.append((render.plural(r.errors, "error"), "red"))
            if r.warnings:
                probs += [(", ", "")] * bool(probs) + [(render.plural(r.warnings, "warning"), "yellow")]
            if not probs and r.spec is not None:
                probs.append(("ok", "green"))
            cells = [
                oneline(r.name) or "",
                "-" if r.actual_length is None else (r.format or "?"),
                _num(r.declared_length),
                _num(r.actual_length),
                "-" if r.spec is None else f"{format_percent(r.spec.percent)}%",
                _num(r.samples_per_epoch),
                "-" if r.share is None else f"{r.share:.1%}",
                _num(r.images),
                _num(r.videos),
                _num(r.text_only),
            ]
            rows.append([[(c, "")] for c in cells] + [probs])
        out.print(f"datasets in {render.markup(d.path)}", highlight=False)
        for line in render.table_lines(headers, rows):
            out.print(line)
        for r in report.rows:  # grounding (qwenvl.data.grounding): one summary line per dataset with boxes
            if r.grounding is not None:
                n, resc, sus = r.grounding
                out.print(f"grounding {render.markup(oneline(r.name) or '')}: {n:,} box{'es' if n != 1 else ''}, {resc:,} "
                          f"rescaled for Qwen2.5-VL (default max_pixels), {sus:,} suspicious", highlight=False)
        if not report.deep and any(r.images is None and r.actual_length is not None for r in report.rows):
            out.print("(image/video/text-only counts of large files: run with --deep)")
    if report.problems:
        out.print()
        render.print_problems(out, report.problems)
    total = sum(r.samples_per_epoch or 0 for r in report.rows)
    # datasets with an error of their own, or no usable entry; a problem of the dictionary file itself (no dataset)
    # makes the whole check fail without naming one
    n_bad = sum(1 for r in report.rows if r.errors or r.spec is None)
    verdict = "[bold green]OK[/bold green]" if report.ok else "[bold red]FAILED[/bold red]"
    depth = "deep check with decoding" if report.decode else ("deep check" if report.deep else "check")
    state = f"{n_bad:,} with errors" if n_bad else "none with errors"
    out.print(f"{verdict} {depth}: {render.plural(len(report.rows), 'dataset')} ({state}), "
              f"{render.plural(total, 'sample')} per epoch; {render.summary_text(report.problems)}")


@datasets_app.command("check")
def check(
    path: str = typer.Argument(..., help="The dataset dictionary (Dataset-Dictionary.json), a local path or URL."),
    deep: bool = typer.Option(False, "--deep", help="Check every sample and that every media file exists."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable JSON report instead of the table."),
    decode: bool = typer.Option(False, "--decode", help="With --deep (implied): also open every local image and "
                                "video header, in parallel, to find corrupt, truncated, empty and oversized files."),
) -> None:
    """Check a dataset dictionary: syntax, keys, files, record counts; with --deep every sample and media file.

    Exit 0 when there are no errors (warnings allowed), 1 when there are, 2 when the file is unusable.
    """
    report = build_report(path, deep=deep or decode, decode=decode)  # progress bars on stderr only on a terminal
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2) + "\n")
    else:
        print_report(report)
    if report.dictionary.unusable:
        raise typer.Exit(2)
    raise typer.Exit(0 if report.ok else 1)


def integer_percent(spec: DatasetSpec) -> int:
    """The tutorial's ``floor(rate*100 + 0.5)`` (for the official trainer, which takes integer percents)."""
    rate = spec.sampling_rate if spec.sampling_rate is not None else spec.repeat_time
    return int(math.floor((1.0 if rate is None else rate) * 100 + 0.5))


def exact_percent(percent: float) -> str:
    """Decimal text that reads back as exactly ``percent`` (format_percent's 12 decimals cut below 1e-12)."""
    text = format_percent(percent)
    if float(text) == percent:
        return text
    return format(Decimal(repr(percent)).normalize(), "f")


def dataset_use_string(d: DatasetDictionary, integer: bool = False) -> tuple[str, list[str]]:
    """The ``--dataset_use`` value for every dataset (file order) and warnings (integer mode)."""
    warnings: list[str] = []
    if not integer:
        return ",".join(name if spec.percent == 100.0 else f"{name}%{exact_percent(spec.percent)}"
                        for name, spec in d.datasets.items()), warnings
    parts = []
    for name, spec in d.datasets.items():
        exact = spec.percent
        if spec.sampling_rate is None and spec.repeat_time is None:
            parts.append(name)
            continue
        pct = integer_percent(spec)
        parts.append(f"{name}%{pct}")
        if pct == 0:
            warnings.append(f"{name}: {format_percent(exact)}% rounds to %0: the official trainer would use no "
                            "samples of it")
        elif pct != exact:
            note = ""
            half_up = Decimal(format_percent(exact)).quantize(Decimal(1), ROUND_HALF_UP)
            if half_up != pct:  # e.g. 0.145: 0.145*100 = 14.499999999999998 in binary floating point
                note = f"; not %{half_up}: the tutorial's jq computes floor(rate*100+0.5) in floating point too"
            warnings.append(f"{name}: {format_percent(exact)}% rounded to %{pct} (precision lost{note})")
        if pct > 100:
            warnings.append(f"{name}: %{pct} asks for up-sampling, which the official trainer ignores (it uses "
                            "the dataset once, like %100); vlsft's trainer honours it")
    return ",".join(parts), warnings


@datasets_app.command("use")
def use(
    path: str = typer.Argument(..., help="The dataset dictionary (Dataset-Dictionary.json)."),
    integer_percent_: bool = typer.Option(
        False, "--integer-percent",
        help="Round to integer percents, floor(rate*100+0.5), as the official trainer needs; warns what is lost.",
    ),
) -> None:
    """Print the --dataset_use string for every dataset in the dictionary (exact decimal percents).

    Replaces the tutorial's jq one-liner. Refuses (exit 1) when the dictionary has errors, exit 2 when
    the file is unusable (missing, empty, not a JSON object).
    """
    d = load_dictionary(path)
    if not d.ok:
        err = render.stderr()
        render.print_problems(err, d.problems)
        err.print(f"refusing to build --dataset_use: {render.summary_text(d.problems)} "
                  f"(details: vlsft datasets check {mask_urls(str(path))})")
        raise typer.Exit(2 if d.unusable else 1)
    text, warnings = dataset_use_string(d, integer=integer_percent_)
    err = render.stderr()
    for w in d.warnings:
        err.print(render.problem_text(w))
    for w in warnings:
        err.print(f"[yellow]warning[/yellow]: {render.markup(w)}")
    sys.stdout.write(text + "\n")


@datasets_app.command("convert")
def convert(
    path: str = typer.Argument(..., help="The dataset dictionary (a vlsft dictionary or LLaMA-Factory's "
                               "dataset_info.json)."),
    to: str = typer.Option("official", "--to", help="Target format (only 'official')."),
    out: str = typer.Option(..., "--out", help="New (or empty) folder for <name>.jsonl files and "
                            "Dataset-Dictionary.json; nothing existing is overwritten."),
) -> None:
    """Write every dataset as official-format JSONL plus a dataset dictionary (media files stay where they are;
    embedded media - data: URLs, a parquet dataset's image bytes - are written once each to <out>/<name>-media/).

    A sample that is bad (a local media file missing included), or that says what the official format cannot
    (``loss: false`` turns, videos given as frame images or, from another format, as a frame folder), is left out
    and listed; so is a dictionary entry that cannot be read (LLaMA-Factory's alpaca and ranking entries). A system
    prompt shared by every sample of a dataset becomes the dataset's ``"system"``; when only some samples have one
    (or they differ), the dataset is written in the sharegpt layout instead (official-shaped turns, media in
    ``images``/``videos``, each such sample's own ``system`` turn first), which vlsft reads per sample. The folder
    is written whole or not at all (a hidden temporary folder beside it, renamed into place; removed on an error or
    a stop signal). Exit 0 when every sample was written, 1 when some were left out, 2 for unusable input.
    """
    from vlsft import convert as conversion

    left_out = conversion.convert(conversion.inputs(path, to, out), out)
    raise typer.Exit(1 if left_out else 0)
