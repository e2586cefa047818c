"""Annotation files, reading: records fast and with line numbers, formats, positions, probing (torch-free).

File formats (as the official trainer reads them; the record formats of other tools are
:mod:`qwenvl.data.formats`, settled per dataset by :func:`format_of`):

* ``.jsonl``: one JSON object per line (blank lines ignored);
* ``.json``: a JSON list of samples, or a list of lists of samples (the official pre-packed format).

A sample: ``{"image": str | [str], "video": str | [str], "conversations": [{"from": "human"|"gpt",
"value": str}, ...]}`` (turns may also be ``{"role": "user"|"assistant"|"system", "content": str}``).
Each ``<image>`` / ``<video>`` tag in a human turn consumes the next media item. What makes a record a
valid sample is :mod:`qwenvl.data.sample_rules`; checking whole files is :mod:`qwenvl.data.annotation_check`
(``vlsft datasets check --deep``). :mod:`qwenvl.data.annotations` re-exports both.

Records parse with orjson when installed, else :mod:`json`; line/column positions and the hints of a
parse error say what Python's json (the trainer's reader) would refuse and how to fix it.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import posixpath
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from qwenvl import storage
from qwenvl.data import formats, hf_source
from qwenvl.data.sample_rules import kind_of as _kind_of
from qwenvl.problems import Problem

try:  # orjson parses a JSONL line ~5x faster than json; the scan falls back to json when it is absent
    import orjson as _orjson

    _loads: Callable[[bytes], Any] = _orjson.loads
    _JSONError: tuple[type[Exception], ...] = (_orjson.JSONDecodeError, ValueError)
except ImportError:  # pragma: no cover - orjson is in requirements.txt
    _loads = json.loads
    _JSONError = (ValueError,)

log = logging.getLogger(__name__)

PROBE_LIMIT = 20_000  # records looked at by probe() for media references

def oneline(text: str | None) -> str | None:
    """``text`` with control characters escaped (``\\n``), so that a problem stays one line."""
    if text is None or text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def annotation_format(path: str) -> str | None:
    """``"jsonl"``, ``"json"`` or None (by extension, case-insensitive). A Hugging Face dataset (parquet / arrow /
    a folder, :mod:`qwenvl.data.hf_source`) reads as ``"jsonl"``: :func:`_read` gives its rows as JSON lines."""
    if hf_source.is_arrow_source(path):
        return "jsonl"
    ext = os.path.splitext(posixpath.basename(str(path)))[1].lower()
    return {".jsonl": "jsonl", ".json": "json"}.get(ext)


def _as_list(value: Any) -> list | None:
    if value is None:
        return []
    if type(value) is str:
        return [value]
    if type(value) is list:
        return value
    return None


def sample_media(record: dict) -> tuple[list[str], list[str]]:
    """``(images, videos)`` of a sample; each key may hold a string or a list of strings."""
    images = _as_list(record.get("image")) or []
    videos = _as_list(record.get("video")) or []
    return [str(x) for x in images], [str(x) for x in videos]


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _nonblank_jsonl(data: bytes) -> Iterator[tuple[int, bytes]]:
    for i, raw in enumerate(data.split(b"\n"), 1):
        if raw and not raw.isspace():
            yield i, raw


_BOM = b"\xef\xbb\xbf"


def _read(path: str) -> bytes:
    """The bytes of an annotation file, without a UTF-8 byte order mark (the trainer's json reads past it).
    A Hugging Face dataset gives its rows as JSON lines (row N = line N)."""
    if hf_source.is_arrow_source(path):
        return hf_source.jsonl_bytes(path)
    data = storage.read_bytes(path)
    return data[3:] if data.startswith(_BOM) else data


def _text(data: bytes) -> str:
    """Decoded text of a whole .json file: UTF-8, or UTF-16/32 as Python's json (the trainer's reader) detects it."""
    if data[:1] == b"\x00" or data[1:2] == b"\x00" or data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        try:
            return data.decode(json.detect_encoding(data), "replace").lstrip("\ufeff")
        except LookupError:  # pragma: no cover - detect_encoding names only codecs Python has
            pass
    return data.decode("utf-8", "replace")


def _utf16_jsonl(data: bytes, path: str) -> Problem | None:
    """A .jsonl saved as UTF-16/32 (e.g. Windows "Unicode"): every line would fail; one problem instead."""
    if not (data[:2] in (b"\xff\xfe", b"\xfe\xff") or b"\x00" in data[:4]):
        return None
    return Problem("error", f"the file is {json.detect_encoding(data).upper()} text, not UTF-8: the trainer cannot "
                   "read its lines", path, 1, 1, hint="save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8")


def _position(data: bytes | str, pos: int) -> tuple[int, int]:
    """1-based ``(line, column)`` of offset ``pos`` in ``data``."""
    nl = b"\n" if isinstance(data, bytes) else "\n"
    return data.count(nl, 0, pos) + 1, pos - (data.rfind(nl, 0, pos) + 1) + 1  # type: ignore[arg-type]


def _explain(text: str, pos: int, msg: str, jsonl: bool) -> tuple[int, str, str | None]:
    """Turn a JSON parser's complaint at ``pos`` of ``text`` into ``(pos, message, hint)`` a person can act on."""
    n = len(text)
    at = text[pos] if 0 <= pos < n else ""
    back = pos - 1
    while back >= 0 and text[back] in " \t\r\n":
        back -= 1
    if at in "]}" and at and back >= 0 and text[back] == "," and (msg.startswith("Expecting") or "trailing" in msg):
        return back, f"trailing comma before '{at}'", "remove the comma after the last item"
    if "trailing comma" in msg:
        return pos, "trailing comma", "remove the comma after the last item"
    if at == "'":
        return pos, "strings and keys need double quotes, not single quotes", 'write "..." (JSON is not Python)'
    word = re.match(r"[A-Za-z]+", text[pos:pos + 9]) if at.isalpha() else None
    if word and word.group() in ("True", "False", "None", "nan", "NaN", "Infinity"):
        fix = {"True": "true", "False": "false", "None": "null"}.get(word.group(), "null or a number")
        return pos, f"{word.group()} is not JSON", f"write {fix}"
    if msg.startswith("Extra data") or msg.startswith("unexpected content after document"):
        if jsonl:
            if text.lstrip()[:1] in ("{", "["):
                return pos, "more than one JSON value on the line", "put each sample on its own line"
            return pos, "the line is a piece of an object, not a whole sample", \
                "each .jsonl line is one complete {...}; pretty-printed JSON belongs in a .json file"
        if text.lstrip().startswith("{"):
            return pos, "the file holds one JSON object after another, not a list", \
                "one object per line is JSON Lines: rename the file to .jsonl (or wrap the samples in [ ... ])"
        return pos, "extra data after the end of the list", "a .json annotation file holds exactly one JSON list"
    if not text[:pos].strip() and pos >= n:
        return pos, "the file is empty" if not jsonl else "empty line", None
    if pos >= n or msg.startswith("Unterminated") or "end of data" in msg:
        if jsonl:
            return pos, "the line ends before the sample is complete", \
                "a sample must be on one line (pretty-printed JSON belongs in a .json file); or a closing } ] \" is missing"
        return pos, f"{msg}: the text ends early (a missing closing bracket or quote?)", None
    if msg.startswith("Expecting property name"):
        return pos, "expected a key in double quotes", None
    if "control character" in msg:
        return pos, msg, "write line breaks and tabs inside strings as \\n and \\t"
    return pos, msg, None


def _json_error(exc: BaseException, data: bytes | str) -> tuple[int | None, int | None, str, str | None]:
    """``(line, column, message, hint)`` of a failed parse of a whole ``.json`` document."""
    if isinstance(exc, UnicodeDecodeError) and isinstance(data, bytes):
        line, col = _position(data, exc.start)
        return line, col, f"not UTF-8 text (byte 0x{data[exc.start]:02x})", "save the file as UTF-8"
    if isinstance(exc, RecursionError):
        return None, None, "nested too deeply", None
    pos = getattr(exc, "pos", None)
    msg = getattr(exc, "msg", None) or str(exc).split(":")[0]
    if not isinstance(pos, int) or pos < 0:
        return None, None, msg, _JSON_HINT
    text = exc.doc if isinstance(getattr(exc, "doc", None), str) else (
        data.decode("utf-8", "replace") if isinstance(data, bytes) else data)
    pos, msg, hint = _explain(text, pos, msg, jsonl=False)
    line, col = _position(text, pos)
    return line, col, msg, hint or _JSON_HINT


def _line_error(raw: bytes) -> tuple[Any, int | None, str, str | None]:
    """A ``.jsonl`` line orjson refused: ``(record, None, "", None)`` when Python's json (which the trainer
    uses) reads it after all (``NaN``), else ``(None, column, message, hint)``."""
    try:
        return json.loads(raw), None, "", None
    except UnicodeDecodeError as exc:
        col = len(raw[:exc.start].decode("utf-8", "replace")) + 1
        return None, col, f"line is not UTF-8 text (byte 0x{raw[exc.start]:02x})", "save the file as UTF-8"
    except json.JSONDecodeError as exc:
        pos, msg, hint = _explain(exc.doc, exc.pos, exc.msg, jsonl=True)
        return None, pos + 1, f"line is not valid JSON: {msg}", \
            hint or "each line of a .jsonl file is one complete JSON object"
    except (ValueError, RecursionError) as exc:
        return None, None, f"line is not valid JSON: {str(exc).split(':')[0] or 'nested too deeply'}", None


_LIST_START = re.compile(rb"[ \t\r\n]*\[")


def _json_list_in_jsonl(data: bytes, path: str) -> Problem | None:
    """A ``.jsonl`` that is really one JSON list (a pretty-printed ``.json``): one problem, not one per line.

    Costs nothing for a real JSON Lines file (its first character is '{')."""
    if not _LIST_START.match(data):
        return None
    first = next((raw for _, raw in _nonblank_jsonl(data[:data.find(b"\n", 1 << 16) % (len(data) + 1)])), b"")
    try:
        _loads(first)
        return None  # a list on one line: reported line by line ("the line is a JSON list")
    except _JSONError:
        pass
    try:
        doc = _load_json_document(data)
    except (ValueError, RecursionError):
        return None  # lines that happen to start with '[': checked line by line
    if not isinstance(doc, list):
        return None
    return Problem("error", f"the file is one JSON list of {len(doc):,} items, not JSON Lines (one sample per line)",
                   path, 1, 1, hint="rename it to .json, or write one sample object per line")


def _load_json_document(data: bytes) -> Any:
    """Parse a whole ``.json`` file; on error re-raise json's error (which carries line/column)."""
    try:
        return _loads(data)
    except _JSONError:
        return json.loads(data)  # raises json.JSONDecodeError with lineno/colno


def iter_records(path: str) -> Iterator[tuple[int | None, Any]]:
    """Yield ``(line, record)`` for every sample of an annotation file (packed lists are flattened).

    A line that does not parse yields ``(line, ValueError)``. ``.json`` files yield the line where
    each record starts.
    """
    data = _read(path)
    if annotation_format(path) == "jsonl":
        for line, raw in _nonblank_jsonl(data):
            try:
                yield line, _loads(raw)
            except _JSONError:
                rec, _, msg, _ = _line_error(raw)
                yield line, (ValueError(msg) if msg else rec)
        return
    doc = _load_json_document(data)
    if not isinstance(doc, list):
        raise ValueError(f"{path}: the top level must be a list of samples")
    lines = _json_item_lines(_text(data))
    for i, item in enumerate(doc):
        if type(item) is list:
            for j, sub in enumerate(item):
                yield lines.get((i, j)), sub
        else:
            yield lines.get((i, None)), item


def _json_item_lines(text: str, wanted: set | None = None) -> dict[tuple[int, int | None], int]:
    """Line of each top-level item (and of each item of a nested list) of a JSON list document."""
    dec = json.JSONDecoder()
    out: dict[tuple[int, int | None], int] = {}
    n = len(text)
    ws = " \t\r\n"
    line = 1
    last = 0

    def line_at(pos: int) -> int:
        nonlocal line, last
        line += text.count("\n", last, pos)
        last = pos
        return line

    pos = 0
    while pos < n and text[pos] in ws:
        pos += 1
    if pos >= n or text[pos] != "[":
        return out
    pos += 1
    i = 0
    last_wanted = max((k[0] for k in wanted), default=-1) if wanted is not None else None
    while True:
        while pos < n and text[pos] in ws + ",":
            pos += 1
        if pos >= n or text[pos] == "]" or (last_wanted is not None and i > last_wanted):
            return out
        if text[pos] == "[":  # packed: a list of samples
            out[(i, None)] = line_at(pos)
            pos += 1
            j = 0
            while True:
                while pos < n and text[pos] in ws + ",":
                    pos += 1
                if pos >= n:
                    return out
                if text[pos] == "]":
                    pos += 1
                    break
                if wanted is None or (i, j) in wanted:
                    out[(i, j)] = line_at(pos)
                try:
                    _, pos = dec.raw_decode(text, pos)
                except ValueError:
                    return out
                j += 1
        else:
            out[(i, None)] = line_at(pos)
            try:
                _, pos = dec.raw_decode(text, pos)
            except ValueError:
                return out
        i += 1


# ---------------------------------------------------------------------------------------------
# Probe: what load_dictionary needs (count, format, media references)
# ---------------------------------------------------------------------------------------------


_JSON_HINT = "a .json annotation file is one JSON list; use .jsonl for one sample per line"
_LIST_HINT = "wrap the samples in [ ... ] (or use .jsonl, one sample per line)"


@dataclass
class ProbeInfo:
    # samples the trainer reads: non-blank lines of a .jsonl, list items of a .json with the official
    # pre-packed lists flattened (None when the file is unusable)
    records: int | None = None
    packed: bool = False
    top_level: int | None = None  # items of the top-level .json list (packs count once)
    # line of the first sample with a media path relative to data_path (within PROBE_LIMIT); absolute
    # paths and URLs need no data_path
    media_line: int | None = None
    problems: list[Problem] = field(default_factory=list)
    # the annotation format (qwenvl.data.formats): declared in the dictionary or detected from the first records
    format: str | None = "official"
    format_found: str = ""  # an unknown shape: what was found (format is then None)
    format_line: int | None = None  # line of the record that showed the unknown shape
    # media-looking keys the format does not read: key -> (records among the first ones, line of the first)
    unread: dict[str, tuple[int, int | None]] = field(default_factory=dict)
    # records of a known key shape that vlsft cannot train as a whole dataset (TRL plain text, preference pairs),
    # most of the first ones: (what they are, line of the first, the way out); None when they train
    refused: tuple[str, int | None, str] | None = None


#: whole-dataset shapes that look like a format but do not train: (test on a record, what it is, the way out)
_REFUSED_SHAPES = (
    (lambda r: "chosen" in r and "rejected" in r,
     "preference pairs ('chosen' / 'rejected'), which supervised fine-tuning does not train",
     "train them with a preference trainer (TRL's DPOTrainer), or keep the chosen answer as the assistant turn "
     "and drop 'rejected'"),
    (lambda r: "completion" in r and type(r.get("prompt")) is str,
     "TRL's plain-text prompt/completion (strings): language modelling without a chat template, which vlsft does "
     "not train",
     'write "prompt": [{"role": "user", "content": "..."}], "completion": [{"role": "assistant", "content": '
     '"..."}] (TRL\'s conversational form)'),
)


def refused_shape(pairs: list[tuple[Any, Any]], line_of: Callable[[Any], int | None]) \
        -> tuple[str, int | None, str] | None:
    """A whole-dataset shape vlsft does not train, when most of the first records have it (else None)."""
    records = [(loc, rec) for loc, rec in pairs if type(rec) is dict]
    for test, what, fix in _REFUSED_SHAPES:
        hits = [loc for loc, rec in records if test(rec)]
        if hits and 2 * len(hits) > len(records):
            return f"{len(hits)} of the first {len(records)} records are {what}", line_of(hits[0]), fix
    return None


def _relative(paths: Any) -> bool:
    """Whether ``paths`` (a path or a list) holds a path that resolves against data_path."""
    for p in (paths,) if type(paths) is str else (paths if type(paths) in (list, tuple) else ()):
        if type(p) is str and p and p[0] != "/" and "://" not in p and p[:5] != "data:":
            return True
    return False


def _references_media(rec: Any, fmt: formats.FormatSpec | None = None) -> bool:
    """Whether a sample names a media file relative to data_path (absolute paths, URLs and data: URLs need none)."""
    if fmt is not None and fmt.name not in (None, "official"):
        rec = formats.normalise(rec, fmt)[0]
        return type(rec) is dict and (_relative(rec.get("image")) or any(
            _relative(v) for v in (rec.get("video") if type(rec.get("video")) is list else [rec.get("video")])
            if type(v) in (str, tuple)))
    return type(rec) is dict and any(_relative(rec.get(k)) for k in ("image", "video", "images", "videos"))


def format_of(pairs: list[tuple[Any, Any]], declared: formats.FormatSpec | None, info: ProbeInfo,
              line_of: Callable[[Any], int | None]) -> formats.FormatSpec:
    """Settle a dataset's format from ``(locator, record)`` pairs of its first records (the declared name wins)
    and note in ``info`` an unknown shape and the media-looking keys the format does not read."""
    spec = declared or formats.FormatSpec()
    info.refused = refused_shape(pairs, line_of)
    if spec.name is None:
        found = formats.detect(pairs)
        if found.name is None:
            info.format, info.format_found, info.format_line = None, found.found, line_of(found.line)
            return spec
        spec = spec.with_name(found.name)
    info.format = spec.name
    reads_any = False
    unread: dict[str, list] = {}
    for loc, rec in pairs:
        if type(rec) is not dict:
            continue
        reads_any = reads_any or any(k in rec for k in spec.reads_media)
        for k in formats.unread_media_keys(rec, spec):
            unread.setdefault(k, []).append(loc)
    for k, locs in unread.items():
        # the official format's misspelt 'images' among samples that use 'image' is a per-sample error (--deep)
        if spec.name == "official" and k in ("images", "videos") and reads_any:
            continue
        info.unread[k] = (len(locs), line_of(locs[0]))
    return spec


def jsonl_head(data: bytes) -> list[tuple[int, Any]]:
    """``(line, record)`` of the first :data:`~qwenvl.data.formats.DETECT_RECORDS` records of a JSONL file's bytes
    that parse (what :func:`format_of` settles the format from; a line that does not parse is skipped here and
    reported by the checks)."""
    head = data[: data.find(b"\n", min(len(data), formats.DETECT_RECORDS * 2000)) % (len(data) + 1)]
    pairs = []
    for line, raw in _nonblank_jsonl(head):
        try:
            pairs.append((line, _loads(raw)))
        except _JSONError:
            pass
        if len(pairs) >= formats.DETECT_RECORDS:
            break
    return pairs


@contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic GC while millions of short-lived containers are made (it would cost more than parsing)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def probe(path: str, limit: int | None = None, fmt: formats.FormatSpec | None = None) -> ProbeInfo:
    """Count records, settle the format (``fmt``: as declared in the dictionary; name None = detect) and look for
    media references in the first ``limit`` records (default PROBE_LIMIT).

    Raises OSError if the file cannot be read.
    """
    with _no_gc():
        return _probe(path, PROBE_LIMIT if limit is None else limit, fmt)


def _probe(path: str, limit: int, fmt: formats.FormatSpec | None = None) -> ProbeInfo:
    info = ProbeInfo()
    fmt_kind = annotation_format(path)
    arrow = hf_source.is_arrow_source(path)  # a Hugging Face dataset: its first rows only, the count from metadata
    data = hf_source.jsonl_bytes(path, rows=min(limit, hf_source.PROBE_ROWS)) if arrow else _read(path)
    if fmt_kind == "jsonl":
        wrong = _utf16_jsonl(data, path) or _json_list_in_jsonl(data, path)
        if wrong is not None:
            info.problems.append(wrong)
            return info
        info.records = hf_source.count_rows(path) if arrow else _count_jsonl(data)
        if limit:
            fmt = format_of(jsonl_head(data), fmt, info, lambda loc: loc)
        head = data[: data.find(b"\n", min(len(data), limit * 400)) % (len(data) + 1)] if limit else b""
        for count, (line, raw) in enumerate(_nonblank_jsonl(head), 1):
            if count > limit:
                break
            try:
                if _references_media(_loads(raw), fmt):
                    info.media_line = line
                    break
            except _JSONError:
                pass
        return info
    try:
        doc = _load_json_document(data)
    except (ValueError, RecursionError) as exc:
        line, col, msg, hint = _json_error(exc, data)
        info.problems.append(Problem("error", f"annotation file is not valid JSON: {msg}", path, line, col,
                                     hint=hint))
        return info
    if not isinstance(doc, list):
        info.problems.append(Problem("error", "the top level of a .json annotation file must be a list of "
                                     f"samples, found {_kind_of(doc)}", path, 1, 1, hint=_LIST_HINT))
        return info
    info.top_level = len(doc)
    info.records = sum(len(x) if type(x) is list else 1 for x in doc)
    info.packed = any(type(x) is list for x in doc)
    if limit:
        pairs = []
        for i, item in enumerate(doc):
            for j, rec in (enumerate(item) if type(item) is list else ((None, item),)):
                pairs.append(((i, j), rec))
            if len(pairs) >= formats.DETECT_RECORDS:
                break
        fmt = format_of(pairs, fmt, info, lambda loc: None if loc is None else _json_item_lines(
            _text(data), {loc}).get(loc))
    seen = 0
    for i, item in enumerate(doc):
        for rec in item if type(item) is list else (item,):
            seen += 1
            if _references_media(rec, fmt):
                info.media_line = _json_item_lines(_text(data), {(i, None)}).get((i, None))
                return info
            if seen >= limit:
                return info
    return info


def count_records(path: str) -> int:
    """Samples the trainer reads: non-blank lines of a ``.jsonl``; items of a ``.json`` list, the samples
    inside official pre-packed lists counted one by one (the trainer flattens them); rows of a Hugging Face
    dataset (from the parquet footers / Arrow batches, no row converted)."""
    if hf_source.is_arrow_source(path):
        return hf_source.count_rows(path)
    info = probe(path, limit=0)
    if info.records is None:
        raise ValueError(info.problems[0].render() if info.problems else f"{path}: unreadable annotation file")
    return info.records


_MAYBE_BLANK = re.compile(rb"\n[ \t\r\x0b\x0c\n]")  # a line that may be blank starts like this


def _count_jsonl(data: bytes) -> int:
    """Non-blank lines, at C speed when no line can be blank (the usual case)."""
    if not data:
        return 0
    if not data[:1].isspace() and _MAYBE_BLANK.search(data) is None:
        return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    return sum(1 for raw in data.split(b"\n") if raw and not raw.isspace())

