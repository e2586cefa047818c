"""Annotation files: reading records fast, with line numbers, and checking every sample (torch-free).

Formats (as the official trainer reads them):

* ``.jsonl``: one JSON object per line (blank lines ignored);
* ``.json``: a JSON list of samples, or a list of lists of samples (the official pre-packed format).

A sample: ``{"image": str | [str], "video": str | [str], "conversations": [{"from": "human"|"gpt",
"value": str}, ...]}`` (turns may also be ``{"role": "user"|"assistant"|"system", "content": str}``).
Each ``<image>`` / ``<video>`` tag in a human turn consumes the next media item.

:func:`scan` is the engine of ``vlsft datasets check --deep``: it parses every record (orjson when
installed, else :mod:`json`), checks it, counts image / video / text-only samples and checks that every
media file exists with one directory listing per folder (:func:`qwenvl.storage.existing`), never one
``stat`` per file. Problems of one kind are capped per file (the rest are counted) so that a million
broken samples do not produce a million lines.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import posixpath
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from qwenvl import storage
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
MAX_PER_KIND = 20  # problems of one kind reported per annotation file (the rest are counted)
_SIDES = {"human": 0, "user": 0, "gpt": 1, "assistant": 1, "system": 2}
_MISSPELT = {"images": "image", "videos": "video"}


def oneline(text: str | None) -> str | None:
    """``text`` with control characters escaped (``\\n``), so that a problem stays one line."""
    if text is None or text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def annotation_format(path: str) -> str | None:
    """``"jsonl"``, ``"json"`` or None (by extension, case-insensitive)."""
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
    """The bytes of an annotation file, without a UTF-8 byte order mark (the trainer's json reads past it)."""
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


def _kind_of(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "a boolean", type(None): "null"}.get(type(value), type(value).__name__)


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


def _relative(paths: Any) -> bool:
    """Whether ``paths`` (a path or a list) holds a path that resolves against data_path."""
    for p in (paths,) if type(paths) is str else (paths if type(paths) in (list, tuple) else ()):
        if type(p) is str and p and p[0] != "/" and "://" not in p:
            return True
    return False


def _references_media(rec: Any) -> bool:
    """Whether a sample names a media file relative to data_path (absolute paths and URLs need none)."""
    return type(rec) is dict and any(_relative(rec.get(k)) for k in ("image", "video", "images", "videos"))


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


def probe(path: str, limit: int | None = None) -> ProbeInfo:
    """Count records and look for media references in the first ``limit`` records (default PROBE_LIMIT).

    Raises OSError if the file cannot be read.
    """
    with _no_gc():
        return _probe(path, PROBE_LIMIT if limit is None else limit)


def _probe(path: str, limit: int) -> ProbeInfo:
    info = ProbeInfo()
    fmt = annotation_format(path)
    data = _read(path)
    if fmt == "jsonl":
        wrong = _utf16_jsonl(data, path) or _json_list_in_jsonl(data, path)
        if wrong is not None:
            info.problems.append(wrong)
            return info
        info.records = _count_jsonl(data)
        head = data[: data.find(b"\n", min(len(data), limit * 400)) % (len(data) + 1)] if limit else b""
        for count, (line, raw) in enumerate(_nonblank_jsonl(head), 1):
            if count > limit:
                break
            try:
                if _references_media(_loads(raw)):
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
    seen = 0
    for i, item in enumerate(doc):
        for rec in item if type(item) is list else (item,):
            seen += 1
            if _references_media(rec):
                info.media_line = _json_item_lines(_text(data), {(i, None)}).get((i, None))
                return info
            if seen >= limit:
                return info
    return info


def count_records(path: str) -> int:
    """Samples the trainer reads: non-blank lines of a ``.jsonl``; items of a ``.json`` list, the samples
    inside official pre-packed lists counted one by one (the trainer flattens them)."""
    info = probe(path, limit=0)
    if info.records is None:
        raise ValueError(info.problems[0].render() if info.problems else f"{path}: unreadable annotation file")
    return info.records


# ---------------------------------------------------------------------------------------------
# Scan: per-sample checks + counts + media existence
# ---------------------------------------------------------------------------------------------


@dataclass
class ScanResult:
    path: str
    records: int = 0  # top-level records (packs count once)
    samples: int = 0  # samples (packs flattened)
    images: int = 0  # samples with at least one image
    videos: int = 0  # samples with at least one video
    text_only: int = 0  # samples with neither
    media_files: int = 0  # distinct media paths referenced
    missing_media: int = 0  # distinct media paths that do not exist
    relative_media: int = 0  # distinct media paths relative to data_path (not absolute, not URLs)
    unresolved_media: int = 0  # distinct relative media paths that cannot be resolved (no data_path)
    problems: list[Problem] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)  # kind -> problems not listed
    media_line: int | None = None  # line of the first sample with a media path relative to data_path
    first_media: Any = field(default=None, repr=False, compare=False)  # its locator (internal)
    unusable: bool = False  # the file is not a JSON list / does not parse at all (see problems)
    packed: bool = False  # a .json with at least one official pre-packed list of samples

    def as_probe(self) -> ProbeInfo:
        """What :func:`probe` would have said, so a full scan need not read the file twice."""
        if self.unusable:
            return ProbeInfo(records=None, problems=list(self.problems))
        return ProbeInfo(records=self.samples, media_line=self.media_line, packed=self.packed,
                         top_level=self.records if annotation_format(self.path) == "json" else None)


class _Sink:
    """Collects problems for one file, capped per kind; locators are resolved to lines at the end."""

    def __init__(self, path: str, max_per_kind: int):
        self.path = path
        self.max = max_per_kind
        self.counts: dict[str, int] = {}  # every problem, by kind
        self.kept: dict[str, int] = {}  # listed problems, by kind
        # (locator, kind, severity, message, key, hint, column)
        self.items: list[tuple[Any, str, str, str, str | None, str | None, int | None]] = []

    def add(self, loc: Any, kind: str, severity: str, message: str, key: str | None = None,
            hint: str | None = None, column: int | None = None) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.keep((loc, kind, severity, message, key, hint, column))

    def keep(self, item: tuple) -> None:
        kind = item[1]
        k = self.kept.get(kind, 0)
        if k < self.max:
            self.kept[kind] = k + 1
            self.items.append(item)


def _check_record(rec: Any, loc: Any, sink: _Sink, deep: bool, media: dict[str, Any] | None,
                  res: Any) -> None:
    """Count one sample and (``deep``) check it. Kept flat: this runs a million times."""
    if type(rec) is not dict:
        if type(rec) is list and type(loc) is int:  # a .jsonl line holding a list
            sink.add(loc, "not_object", "error", "the line is a JSON list, not a JSON object (one sample)",
                     hint="a .jsonl line is one sample {...}; a file that is one JSON list must be named .json")
        else:
            sink.add(loc, "not_object", "error", f"sample is {_kind_of(rec)}, not a JSON object",
                     hint='each sample is {"image": ..., "conversations": [...]}')
        return
    img = rec.get("image")
    vid = rec.get("video")
    imgs = (img,) if type(img) is str else (img if type(img) is list else ())
    vids = (vid,) if type(vid) is str else (vid if type(vid) is list else ())
    if imgs or vids:
        if imgs:
            res.images += 1
        if vids:
            res.videos += 1
        if res.first_media is None and (_relative(imgs) or _relative(vids)):
            res.first_media = loc
    else:
        res.text_only += 1
    if not deep:
        return
    if media is not None:
        for p in imgs:
            if p.__class__ is str and p:
                if p not in media:
                    media[p] = loc
            else:
                sink.add(loc, "media_type", "error", f"image entry {p!r} is not a path", key="image",
                         hint="each entry is a file path string, relative to data_path or absolute")
        for p in vids:
            if p.__class__ is str and p:
                if p not in media:
                    media[p] = loc
            else:
                sink.add(loc, "media_type", "error", f"video entry {p!r} is not a path", key="video",
                         hint="each entry is a file path string, relative to data_path or absolute")
    if (img is not None and not imgs) or (vid is not None and not vids):
        _bad_media_value(rec, loc, sink)
    if img is not None and type(img) is not str and type(img) is not list:
        sink.add(loc, "media_type", "error", f"'image' must be a path or a list of paths, found {_kind_of(img)}",
                 key="image")
    if vid is not None and type(vid) is not str and type(vid) is not list:
        sink.add(loc, "media_type", "error", f"'video' must be a path or a list of paths, found {_kind_of(vid)}",
                 key="video")
    if "images" in rec or "videos" in rec:
        bad = "images" if "images" in rec else "videos"
        if _MISSPELT[bad] in rec:
            sink.add(loc, "misspelt_media_key", "warning", f"key '{bad}' is ignored: the sample uses "
                     f"'{_MISSPELT[bad]}'", key=bad, hint=f"delete '{bad}'")
        else:
            sink.add(loc, "misspelt_media_key", "error",
                     f"key '{bad}' is not read by the trainer: the sample would silently train as text-only", key=bad,
                     hint=f"rename '{bad}' to '{_MISSPELT[bad]}'")
    conv = rec.get("conversations")
    if type(conv) is not list or not conv:
        if conv is None:
            other = next((k for k in ("conversation", "messages", "Conversations", "conversations ", "dialog")
                          if k in rec), None)
            hint = (f"rename '{other}' to 'conversations'" if other else
                    'add "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]')
            sink.add(loc, "no_conversations", "error", "sample has no 'conversations'", key="conversations", hint=hint)
        else:
            sink.add(loc, "bad_conversations", "error", "'conversations' must be a non-empty list of turns",
                     key="conversations",
                     hint='write [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}]')
        return
    n_img = 0
    n_vid = 0
    prev = -1
    first_side = -1
    has_answer = False
    sides = _SIDES
    for turn in conv:
        try:
            spk = turn.get("from")
            if spk is None:
                spk = turn.get("role")
                val = turn.get("content")
            else:
                val = turn.get("value")
            side = sides.get(spk)
        except AttributeError:  # not a dict
            sink.add(loc, "bad_turn", "error", f"a turn is {_kind_of(turn)}, not an object", key="conversations",
                     hint='write {"from": "human", "value": "..."}')
            if first_side < 0:
                first_side = 3  # unknown: no "first turn" warning after a broken one
            continue
        except TypeError:  # unhashable speaker
            side = None
        if side is None:
            _bad_speaker(turn, loc, sink)
            if first_side < 0:
                first_side = 3
            continue
        if side == prev:
            if side != 2:
                sink.add(loc, "no_alternation", "warning", "two turns in a row from the same speaker",
                         key="conversations", hint="alternate human and gpt turns")
        elif first_side < 0:
            first_side = side
        prev = side
        if type(val) is not str or not val or val.isspace():
            _bad_value(turn, val, loc, sink)
            continue
        if side == 1:
            has_answer = True
            if "<" in val and ("<image>" in val or "<video>" in val):
                sink.add(loc, "tag_in_gpt", "error", "a gpt turn contains an <image>/<video> tag; it is not replaced",
                         key="value" if "value" in turn else "content", hint="media tags belong in human turns")
        elif "<" in val:
            if side == 0:
                n_img += val.count("<image>")
                n_vid += val.count("<video>")
            elif "<image>" in val or "<video>" in val:
                sink.add(loc, "tag_in_system", "error", "a system turn contains an <image>/<video> tag; it is not "
                         "replaced", key="value" if "value" in turn else "content", hint="media tags belong in human turns")
    if first_side == 1:
        if type(conv[0]) is dict and conv[0].get("from") == "gpt":
            sink.add(loc, "gpt_first", "warning", "the first turn is from gpt; the trainer drops it",
                     key="conversations", hint="start with a human turn")
        else:
            sink.add(loc, "gpt_first", "warning", "the conversation starts with an assistant turn",
                     key="conversations", hint="start with a user turn")
    if n_img != len(imgs):
        sink.add(loc, "image_tags", "error", f"{n_img} <image> tag(s) for {len(imgs)} image(s)", key="image",
                 hint="put one <image> tag in a human turn per image, in order")
    if n_vid != len(vids):
        sink.add(loc, "video_tags", "error", f"{n_vid} <video> tag(s) for {len(vids)} video(s)", key="video",
                 hint="put one <video> tag in a human turn per video, in order")
    if not has_answer and first_side >= 0:
        sink.add(loc, "no_answer", "error", "no gpt turn with text: nothing to train on", key="conversations",
                 hint='add the answer: {"from": "gpt", "value": "..."}')


def _bad_media_value(rec: dict, loc: Any, sink: _Sink) -> None:
    """``image``/``video`` present but empty: ``[]`` (the trainer rejects the sample) or ``""``/``null``."""
    for key in ("image", "video"):
        value = rec.get(key, 0)
        if value == []:
            sink.add(loc, "media_type", "error", f"'{key}' is an empty list: the trainer skips the sample", key=key,
                     hint=f"drop the '{key}' key for a sample without {key}s")


def _bad_speaker(turn: dict, loc: Any, sink: _Sink) -> None:
    spk = turn.get("from", turn.get("role"))
    if spk is None:
        sink.add(loc, "no_speaker", "error", "a turn has neither 'from' nor 'role'", key="conversations",
                 hint='write {"from": "human"|"gpt", "value": "..."}')
    else:
        low = spk.strip().lower() if type(spk) is str else None
        hint = (f"write '{low}' (lowercase, no spaces)" if low in _SIDES else
                "use 'human' or 'gpt' (or role 'user' / 'assistant')")
        sink.add(loc, "bad_speaker", "error", f"unknown speaker {spk!r}", key="from" if "from" in turn else "role",
                 hint=hint)


def _bad_value(turn: dict, val: Any, loc: Any, sink: _Sink) -> None:
    vkey = "value" if "from" in turn else "content"
    if val is None:
        other = "content" if vkey == "value" else "value"
        hint = (f"'from' goes with 'value', 'role' with 'content': rename '{other}' to '{vkey}'" if other in turn
                else None)
        sink.add(loc, "empty_value", "error", f"a turn has no '{vkey}'", key=vkey, hint=hint)
    elif type(val) is not str:
        hint = ("write the turn's text as one string, with an <image>/<video> tag where each media item goes"
                if type(val) is list else None)
        sink.add(loc, "value_type", "error", f"'{vkey}' must be a string, found {_kind_of(val)}", key=vkey, hint=hint)
    else:
        sink.add(loc, "empty_value", "error", "a turn has an empty value", key=vkey, hint="write the text or remove the turn")


PARALLEL_MIN_RECORDS = 200_000  # files at least this long are checked by several processes (fork, Linux)
CHUNK = 65_536  # records per unit of work (and per progress update)

# The job of the current scan, read by _scan_chunk in this process or in forked workers (inherited, not pickled).
_JOB: dict[str, Any] = {}


@dataclass
class _Part:
    records: int = 0
    samples: int = 0
    images: int = 0
    videos: int = 0
    text_only: int = 0
    items: list = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    media: dict | None = None
    first_media: Any = None


def _scan_chunk(bounds: tuple) -> _Part:
    lo, hi = bounds[0], bounds[1]
    job = _JOB
    deep = job["deep"]
    sink = _Sink(job["path"], job["max_per_kind"])
    part = _Part(media={} if job["media"] else None)
    media = part.media
    check = _check_record
    items = job["items"]
    if job["fmt"] == "jsonl":
        # bounds are (first byte, end byte, line number of the first byte): each worker splits its own bytes
        first_line = bounds[2]  # type: ignore[misc]
        loads = _loads
        blank = 0
        line = first_line - 1
        for line, raw in enumerate(items[lo:hi].split(b"\n"), first_line):
            if not raw:
                blank += 1
                continue
            try:
                rec = loads(raw)
            except _JSONError:
                if raw.isspace():  # a blank line (checked only here: rare)
                    blank += 1
                    continue
                rec, col, msg, hint = _line_error(raw)  # Python's json (the trainer's) may still read it
                if msg:
                    sink.add(line, "json", "error", msg, hint=hint, column=col)
                    continue
            check(rec, line, sink, deep, media, part)
        part.records = part.samples = line - first_line + 1 - blank
    else:
        for i in range(lo, hi):
            item = items[i]
            part.records += 1
            if type(item) is list:
                for j, rec in enumerate(item):
                    part.samples += 1
                    check(rec, (i, j), sink, deep, media, part)
            else:
                part.samples += 1
                check(item, (i, None), sink, deep, media, part)
    part.items = sink.items
    part.counts = sink.counts
    return part


_MAYBE_BLANK = re.compile(rb"\n[ \t\r\x0b\x0c\n]")  # a line that may be blank starts like this


def _count_jsonl(data: bytes) -> int:
    """Non-blank lines, at C speed when no line can be blank (the usual case)."""
    if not data:
        return 0
    if not data[:1].isspace() and _MAYBE_BLANK.search(data) is None:
        return data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    return sum(1 for raw in data.split(b"\n") if raw and not raw.isspace())


def _byte_chunks(data: bytes, size: int) -> list[tuple[int, int, int]]:
    """``(start, end, first line)`` byte ranges of about ``size`` bytes, cut after a newline."""
    out = []
    start = 0
    line = 1
    n = len(data)
    while start < n:
        end = data.find(b"\n", min(n, start + max(1, size)))
        end = n if end < 0 else end + 1
        out.append((start, end, line))
        line += data.count(b"\n", start, end)
        start = end
    return out


def _workers(total: int, requested: int | None) -> int:
    if requested is None:
        env = os.environ.get("VLSFT_CHECK_WORKERS")
        if env and env.isdigit():
            requested = int(env)
        elif total < PARALLEL_MIN_RECORDS:
            return 1
        else:
            cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            requested = min(cpus, 8)
    if requested <= 1 or sys.platform != "linux":
        return 1
    return requested


def scan(path: str, data_path: str | None, *, deep: bool = True, check_media: bool = True,
         progress: Callable[[int], None] | None = None, max_per_kind: int = MAX_PER_KIND,
         workers: int | None = None, chunk: int = CHUNK,
         list_progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """Read every record of one annotation file; count and (``deep``) check each sample.

    Raises OSError when the file cannot be read. Media paths resolve against ``data_path``
    (absolute paths and URLs are kept). Long files are split into chunks checked by
    ``workers`` forked processes (default: one per CPU from PARALLEL_MIN_RECORDS records on;
    ``VLSFT_CHECK_WORKERS`` overrides); the result is the same as a single-process scan.
    ``progress(records)`` follows the records; ``list_progress(done, total)`` the folder listings of
    the media existence check on object storage (:func:`qwenvl.storage.existing`).
    """
    res = ScanResult(path=path)
    sink = _Sink(path, max_per_kind)
    media: dict[str, Any] | None = {} if (deep and check_media) else None
    data = _read(path)
    fmt = annotation_format(path)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # millions of short-lived dicts: the cyclic GC would cost more than the parsing
    try:
        if fmt == "jsonl":
            wrong = _utf16_jsonl(data, path) or _json_list_in_jsonl(data, path)
            if wrong is not None:
                res.problems.append(wrong)
                res.unusable = True
                return res
            items: Any = data
            total = len(data) // 150  # an estimate is enough to choose the number of workers
            bounds = _byte_chunks(data, chunk * 200)  # ~200 bytes per record
        else:
            try:
                items = _load_json_document(data)
            except (ValueError, RecursionError) as exc:
                line, col, msg, hint = _json_error(exc, data)
                res.problems.append(Problem("error", f"annotation file is not valid JSON: {msg}", path, line, col,
                                            hint=hint))
                res.unusable = True
                return res
            if not isinstance(items, list):
                res.problems.append(Problem("error", "the top level of a .json annotation file must be a list of "
                                            f"samples, found {_kind_of(items)}", path, 1, 1, hint=_LIST_HINT))
                res.unusable = True
                return res
            total = len(items)
            res.packed = any(type(x) is list for x in items)
            bounds = [(lo, min(lo + chunk, total)) for lo in range(0, total, max(1, chunk))]
        _JOB.update(path=path, fmt=fmt, items=items, deep=deep, media=media is not None, max_per_kind=max_per_kind)
        n_workers = min(_workers(total, workers), len(bounds))
        try:
            if n_workers > 1:
                import multiprocessing

                with multiprocessing.get_context("fork").Pool(n_workers) as pool:
                    for part in pool.imap(_scan_chunk, bounds):
                        _merge(res, sink, media, part)
                        if progress is not None:
                            progress(part.records)
            else:
                for b in bounds:
                    part = _scan_chunk(b)
                    _merge(res, sink, media, part)
                    if progress is not None:
                        progress(part.records)
        finally:
            _JOB.clear()
    finally:
        if gc_was_enabled:
            gc.enable()
    del items
    if media:
        _check_media_exist(media, data_path, sink, res, list_progress)
    # resolve locators to lines
    locs = {loc for loc, *_ in sink.items if isinstance(loc, tuple)}
    first_media = res.first_media
    if isinstance(first_media, tuple):
        locs.add((first_media[0], None))
    lines = _json_item_lines(_text(data), locs) if locs else {}
    res.media_line = lines.get((first_media[0], None)) if isinstance(first_media, tuple) else first_media
    first: dict[str, Problem] = {}
    for loc, kind, severity, message, key, hint, column in sink.items:
        line = lines.get(loc) if isinstance(loc, tuple) else loc
        problem = Problem(severity, oneline(message), path, line, column, oneline(key), oneline(hint))  # type: ignore[arg-type]
        first.setdefault(kind, problem)
        res.problems.append(problem)
    res.problems.sort(key=lambda p: p.line or 0)  # file order (stable: same line keeps check order)
    for kind, count in sink.counts.items():
        if count > sink.max:
            more = count - sink.max
            res.suppressed[kind] = more
            ex = first[kind]
            res.problems.append(Problem(ex.severity, f"... and {more:,} more like: {ex.message}", path, None, None,
                                        ex.key, ex.hint))
    return res


def _merge(res: ScanResult, sink: _Sink, media: dict | None, part: _Part) -> None:
    res.records += part.records
    res.samples += part.samples
    res.images += part.images
    res.videos += part.videos
    res.text_only += part.text_only
    if res.first_media is None:
        res.first_media = part.first_media
    for item in part.items:
        sink.keep(item)
    for kind, count in part.counts.items():
        sink.counts[kind] = sink.counts.get(kind, 0) + count
    if media is not None and part.media:
        if not media:
            media.update(part.media)
        else:
            for k, v in part.media.items():
                if k not in media:
                    media[k] = v


def _check_media_exist(media: dict[str, Any], data_path: str | None, sink: _Sink, res: ScanResult,
                       progress: Callable[[int, int], None] | None = None) -> None:
    """Existence of every distinct media path: one directory listing per folder, never a stat per file."""
    res.media_files = len(media)
    missing: list[tuple[str, str]] = []  # (full path, annotation path)
    case_twin: dict[str, str] = {}  # annotation path -> existing name that differs only in case
    if os.sep == "/" and (data_path is None or not storage.is_url(data_path)) and not any(
            "://" in rel for rel in media):
        # local fast path (the common case): plain string work instead of os.path calls per file
        prefix = None if data_path is None else (data_path if data_path.endswith("/") else data_path + "/")
        if prefix is not None and not os.path.isdir(data_path):  # type: ignore[arg-type]
            prefix = None  # reported once as a data_path problem, not once per media file
        by_parent: dict[str, list[tuple[str, str, str]]] = {}
        res.relative_media = sum(1 for rel in media if rel[0] != "/")
        for rel in media:
            if rel[0] == "/":
                full = rel
            elif prefix is None:
                res.unresolved_media += 1  # relative path without data_path
                continue
            else:
                full = prefix + rel
            parent, _, name = full.rpartition("/")
            members = by_parent.get(parent)
            if members is None:
                by_parent[parent] = members = []
            members.append((name, full, rel))
        for parent, members in by_parent.items():
            names = storage.list_names(parent or "/")
            gone = [(full, rel) for name, full, rel in members if name not in names]
            if gone:
                missing.extend(gone)
                folded = {n.casefold(): n for n in names}  # only for folders with missing files
                for name, _, rel in members:
                    if name not in names and name.casefold() in folded:
                        case_twin[rel] = folded[name.casefold()]
    else:
        resolved: dict[str, str] = {}
        res.relative_media = sum(1 for rel in media if not (storage.is_url(rel) or os.path.isabs(rel)))
        for rel in media:
            if data_path is None and not (storage.is_url(rel) or os.path.isabs(rel)):
                res.unresolved_media += 1
                continue
            resolved[storage.join(data_path, rel)] = rel
        found = storage.existing(resolved, progress=progress) if resolved else set()
        missing = [(full, rel) for full, rel in resolved.items() if full not in found]
    def order(item: tuple[str, str]) -> tuple[int, int]:  # report in file order
        loc = media[item[1]]
        return (loc, 0) if isinstance(loc, int) else (loc[0], -1 if loc[1] is None else loc[1])

    missing.sort(key=order)
    for full, rel in missing:
        res.missing_media += 1
        hint = "paths are relative to the dataset's data_path" if full != rel else None
        if rel in case_twin:
            hint = f"'{case_twin[rel]}' exists: names are case-sensitive here"
        elif rel != rel.strip():
            hint = f"the path {rel!r} has a space (or tab) at its start or end"
        elif "\\" in rel:
            hint = "write paths with / (this looks like a Windows path)"
        sink.add(media[rel], "missing_media", "error", f"media file not found: {full}", key="image/video", hint=hint)
