"""Annotation files, checking: every sample of a file, media existence, in parallel (torch-free).

:func:`scan` is the engine of ``vlsft datasets check --deep``: it parses every record (orjson when
installed), applies :func:`qwenvl.data.sample_rules.record_problems` (the rule the trainer's sample
builder applies too: an error here is a sample the trainer skips, with the same ``kind``), counts
image / video / text-only samples and checks that every media file is a regular readable file with one
directory listing per folder (local) or per prefix (S3, :func:`qwenvl.storage.existing`), never one
request per file; http(s) media get one HEAD request each. Problems of one kind are capped per file
(the rest are counted) so that a million broken samples do not produce a million lines. Long files are
split into chunks checked by forked workers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from qwenvl import storage
from qwenvl.data import formats, hf_source
from qwenvl.data.annotation_read import (
    _LIST_HINT,
    ProbeInfo,
    _json_error,
    _json_item_lines,
    _json_list_in_jsonl,
    _JSONError,
    _line_error,
    _load_json_document,
    _loads,
    _no_gc,
    _read,
    _relative,
    _text,
    _utf16_jsonl,
    annotation_format,
    format_of,
    jsonl_head,
    oneline,
)
from qwenvl.data.media_exist import check_http, check_local, frame_folder_missing
from qwenvl.data.sample_rules import (
    PLAIN_AWAY,
    SHOWN_MAX,
    is_path,
    kind_of,
    plain_media,
    plain_tags,
    record_problems,
    shown,
)
from qwenvl.problems import Problem
from qwenvl.secrets import mask_url

MAX_PER_KIND = 20  # problems of one kind reported per annotation file (the rest are counted)
#: warnings about the dataset's way of writing its samples, not about one sample: one line per annotation file
ONCE_PER_DATASET = frozenset({"part_keys_not_applied"})


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
    decoded_media: int = 0  # distinct local media files opened by --decode
    undecodable_media: int = 0  # of which would not decode
    problems: list[Problem] = field(default_factory=list)
    suppressed: dict[str, int] = field(default_factory=dict)  # code -> problems not listed
    # reason class of each problem (BadSample.kind for errors: the trainer skips that sample for that reason)
    kinds: dict[Problem, str] = field(default_factory=dict, repr=False)
    media_line: int | None = None  # line of the first sample with a media path relative to data_path
    first_media: Any = field(default=None, repr=False, compare=False)  # its locator (internal)
    unusable: bool = False  # the file is not a JSON list / does not parse at all (see problems)
    packed: bool = False  # a .json with at least one official pre-packed list of samples
    fmt_info: ProbeInfo = field(default_factory=ProbeInfo, repr=False, compare=False)  # the format settled
    # grounding (--deep, qwenvl.data.grounding): boxes/points in 'objects' and in answer texts, how many the
    # Qwen2.5-VL resize rescales (at the default max_pixels), how many look wrong
    boxes: int = 0
    boxes_rescaled: int = 0
    boxes_suspicious: int = 0
    grounded: list = field(default_factory=list, repr=False, compare=False)  # (locator, record) with objects
    video_media: set = field(default_factory=set, repr=False, compare=False)  # media paths named as videos (internal)

    @property
    def format(self) -> str | None:
        return self.fmt_info.format

    def as_probe(self) -> ProbeInfo:
        """What :func:`probe` would have said, so a full scan need not read the file twice."""
        if self.unusable:
            return ProbeInfo(records=None, problems=list(self.problems))
        f = self.fmt_info
        return ProbeInfo(records=self.samples, media_line=self.media_line, packed=self.packed,
                         top_level=self.records if annotation_format(self.path) == "json" else None,
                         format=f.format, format_found=f.format_found, format_line=f.format_line, unread=f.unread,
                         refused=f.refused)


class _Sink:
    """Collects problems for one file, capped per code; locators are resolved to lines at the end."""

    def __init__(self, path: str, max_per_kind: int):
        self.path = path
        self.max = max_per_kind
        self.counts: dict[str, int] = {}  # every problem, by code
        self.kept: dict[str, int] = {}  # listed problems, by code
        # (locator, code, severity, message, key, hint, column, reason kind)
        self.items: list[tuple[Any, str, str, str, str | None, str | None, int | None, str]] = []

    def add(self, loc: Any, code: str, severity: str, message: str, key: str | None = None,
            hint: str | None = None, column: int | None = None, kind: str | None = None) -> None:
        self.counts[code] = self.counts.get(code, 0) + 1
        self.keep((loc, code, severity, message, key, hint, column, kind or code))

    def keep(self, item: tuple) -> None:
        kind = item[1]
        k = self.kept.get(kind, 0)
        if k < self.max:
            self.kept[kind] = k + 1
            self.items.append(item)


def _check_formatted(rec: Any, loc: Any, sink: _Sink, deep: bool, media: dict[str, Any] | None, res: Any,
                     fmt: formats.FormatSpec) -> None:
    """:func:`_check_record` for a record of another format: normalised first (the builder's own path)."""
    internal, _, problems = formats.sample_problems(rec, fmt)
    if type(internal) is dict:
        img, vid = internal.get("image"), internal.get("video")
        imgs = (img,) if type(img) is str else (img if type(img) is list else ())
        vids = (vid,) if type(vid) is str else (vid if type(vid) is list else ())
        frames = [f for v in vids if type(v) is tuple for f in v]
        if imgs or vids:
            res.images += bool(imgs)
            res.videos += bool(vids)
            if res.first_media is None and (_relative(imgs) or _relative([v for v in vids if type(v) is str])
                                            or _relative(frames)):
                res.first_media = loc
        else:
            res.text_only += 1
        if deep and media is not None:
            for p in (*imgs, *[v for v in vids if type(v) is str], *frames):
                if p.__class__ is str and p not in media and is_path(p) and p[:5] != "data:":  # inline: no file
                    media[p] = loc
            res.video_media.update(v for v in vids if type(v) is str)  # a folder of frames is a video's only
            if res.video_paths is not None:
                for p in vids:
                    if p.__class__ is str:
                        res.video_paths.setdefault(p, loc)
                for p in (*imgs, *frames):
                    if p.__class__ is str:
                        res.image_paths.setdefault(p, loc)
    elif type(rec) is dict:
        res.text_only += 1
    if not deep:
        return
    if type(internal) is dict and ("objects" in internal or _answer_boxes(internal)):
        res.grounded.append((loc, internal))
    for severity, kind, code, message, key, hint in problems:
        sink.add(loc, code, severity, message, key, hint, None, kind)


def _answer_boxes(rec: dict) -> bool:
    """A literal ``bbox_2d`` in a turn of an official-shaped record (checked against the resized image)."""
    conv = rec.get("conversations")
    if type(conv) is not list:
        return False
    for t in conv:
        if type(t) is dict:
            v = t.get("content") if "role" in t and "content" in t else t.get("value")
            if type(v) is str and "bbox_2d" in v:
                return True
    return False


def _plain_official(rec: dict, loc: Any, media: dict[str, Any] | None, res: Any) -> bool:
    """The fast path of ``--deep`` for an official record: when it is plainly clean (:func:`plain_tags` and
    :func:`plain_media` agree, no key of :data:`PLAIN_AWAY`), count it, note its media and return True
    (:func:`record_problems` would find nothing); otherwise do nothing and return False (the full path judges it)."""
    tags = plain_tags(rec.get("conversations"))
    if tags is None or not rec.keys().isdisjoint(PLAIN_AWAY):  # images/videos/objects/a frame rate: the full rule
        return False
    return _note_plain(rec.get("image"), rec.get("video"), tags, loc, media, res)


def _plain_formatted(rec: dict, loc: Any, media: dict[str, Any] | None, res: Any, f: formats.FormatSpec,
                     keys: frozenset) -> bool:
    """:func:`_plain_official` for a messages / sharegpt / prompt_completion record (``f``: the dataset's spec with
    its keys filled in): only the keys in ``keys`` (messages, media, ``id``), messages of exactly role + content
    alternating from the first user tag to the first assistant tag, no ``bbox_2d`` (answer boxes: the grounding
    check's); :func:`qwenvl.data.formats.sample_problems` would then find nothing and read the media as listed."""
    if not rec.keys() <= keys:
        return False
    if f.name == "prompt_completion":  # TRL: read as prompt + completion; the completion must hold an answer
        prompt, completion = rec.get("prompt"), rec.get("completion")
        if prompt.__class__ is not list or completion.__class__ is not list or not prompt or not completion or not (
                len(completion) > 1 or len(prompt) % 2):
            return False
        conv = prompt + completion
    else:
        conv = rec.get(f.messages_key)
    ckey = f.content_key
    tags = plain_tags(conv, f.role_key, ckey, f.user_tags[0], f.assistant_tags[0])
    if tags is None:
        return False
    for m in conv:
        if "bbox_2d" in m[ckey]:
            return False
    img = rec.get(f.images_key)
    vid = rec.get(f.videos_key)
    for p in (img,) if img.__class__ is str else img if img.__class__ is list else ():
        if p.__class__ is str and len(p) > formats.BARE_BASE64_MIN:  # perhaps bare base64 bytes: the full path
            return False
    return _note_plain(None if img == [] else img, None if vid == [] else vid, tags, loc, media, res)


def _plain_keys(fmt: formats.FormatSpec | None) -> tuple[formats.FormatSpec, frozenset] | None:
    """(the spec with its keys, the keys a plain record may hold) of a format :func:`_plain_formatted` reads."""
    if fmt is None or fmt.name not in ("messages", "sharegpt", "prompt_completion") or fmt.train_on != "all":
        return None
    f = fmt.keys()
    if f.role_key == f.content_key or f.assistant_tags[0] in f.user_tags:
        return None
    msgs = ("prompt", "completion") if f.name == "prompt_completion" else (f.messages_key,)
    return f, frozenset((*msgs, f.images_key, f.videos_key, "id"))


def _note_plain(img: Any, vid: Any, tags: tuple[int, int], loc: Any, media: dict[str, Any] | None, res: Any) -> bool:
    """A plainly clean sample counted and its media noted (True), when its media are plain paths as many as its
    tags; else False, nothing done."""
    if vid is None and img.__class__ is str:  # one image (the common case), by the shortest path
        if tags[0] != 1 or tags[1] or not img or img.isspace() or img[:5] == "data:":
            return False
        res.images += 1
        if res.first_media is None and img[0] != "/" and "://" not in img:  # relative (annotation_read._relative)
            res.first_media = loc
        if media is not None:
            if img not in media:
                media[img] = loc
            if res.image_paths is not None:
                res.image_paths.setdefault(img, loc)
        return True
    if img is None:
        if vid is None:
            if tags[0] or tags[1]:
                return False
            res.text_only += 1
            return True
        if tags[0]:
            return False
    elif (1 if img.__class__ is str and img and not img.isspace() and img[:5] != "data:" else plain_media(img)) != tags[0]:
        return False  # (a path inline: the common case)
    if (0 if vid is None else plain_media(vid)) != tags[1]:
        return False
    imgs = () if img is None else (img,) if img.__class__ is str else img
    vids = () if vid is None else (vid,) if vid.__class__ is str else vid
    if imgs:
        res.images += 1
    if vids:
        res.videos += 1
    if res.first_media is None and (_relative(imgs) or _relative(vids)):
        res.first_media = loc
    if media is not None:
        for p in imgs:
            if p not in media:
                media[p] = loc
        for p in vids:
            if p not in media:
                media[p] = loc
            res.video_media.add(p)  # a folder of frames is a video's only
        if res.video_paths is not None:  # --decode opens each as what the sample names it
            for p in vids:
                res.video_paths.setdefault(p, loc)
            for p in imgs:
                res.image_paths.setdefault(p, loc)
    return True


def _check_record(rec: Any, loc: Any, sink: _Sink, deep: bool, media: dict[str, Any] | None,
                  res: Any, fmt: formats.FormatSpec | None = None) -> None:
    """Count one sample and (``deep``) check it with the trainer's rule. Kept flat: this runs a million times."""
    if fmt is not None:
        if fmt.name != "official" or fmt.train_on != "all":
            return _check_formatted(rec, loc, sink, deep, media, res, fmt)
    if type(rec) is not dict:
        if not deep:
            if type(rec) is list and type(loc) is int:  # a .jsonl line holding a list
                sink.add(loc, "not_object", "error", "the line is a JSON list, not a JSON object (one sample)",
                         hint="a .jsonl line is one sample {...}; a file that is one JSON list must be named .json",
                         kind="not_object")
            else:
                sink.add(loc, "not_object", "error", f"sample is {kind_of(rec)}, not a JSON object",
                         hint='each sample is {"image": ..., "conversations": [...]}', kind="not_object")
            return
    else:
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
                if p.__class__ is str and p not in media and is_path(p) and p[:5] != "data:":  # inline: no file
                    media[p] = loc
            for p in vids:
                if p.__class__ is str and p not in media and is_path(p) and p[:5] != "data:":
                    media[p] = loc
                if p.__class__ is str:
                    res.video_media.add(p)  # a folder of frames is a video's only
            if res.video_paths is not None:  # --decode opens each as what the sample names it
                for p in vids:
                    if p.__class__ is str:
                        res.video_paths.setdefault(p, loc)
                for p in imgs:
                    if p.__class__ is str:
                        res.image_paths.setdefault(p, loc)
    problems = record_problems(rec)
    if type(rec) is dict and "objects" in rec:  # literal answer boxes: found by _scan_chunk (a bytes search)
        res.grounded.append((loc, rec))
    if problems:
        for severity, kind, code, message, key, hint in problems:
            if code == "not_object" and type(rec) is list and type(loc) is int:
                message = "the line is a JSON list, not a JSON object (one sample)"
                hint = "a .jsonl line is one sample {...}; a file that is one JSON list must be named .json"
            sink.add(loc, code, severity, message, key, hint, None, kind)


PARALLEL_MIN_RECORDS = 50_000  # files at least this long are checked by several processes (fork, Linux)
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
    video_paths: dict | None = None  # media path -> first locator, under 'video' (only for --decode)
    image_paths: dict | None = None  # ... under 'image' (a file may be named under both)
    grounded: list = field(default_factory=list)  # (locator, internal record) of samples with 'objects'
    video_media: set = field(default_factory=set)  # media paths named as videos
    newlines: int = 0  # JSONL: the newlines of the chunk (its lines are counted from 1: see _shift)


def _scan_chunk(bounds: tuple) -> _Part:
    lo, hi = bounds[0], bounds[1]
    job = _JOB
    deep = job["deep"]
    sink = _Sink(job["path"], job["max_per_kind"])
    part = _Part(media={} if job["media"] else None, video_paths={} if job.get("decode") else None,
                 image_paths={} if job.get("decode") else None)
    media = part.media
    check = _check_record
    fmt = job.get("fmt")
    if fmt is not None and fmt.name == "official" and fmt.train_on == "all":
        fmt = None  # the official format as it is: the fast path
    plain = _plain_official if deep and fmt is None else None  # plainly clean records: counted, nothing to report
    keyed = _plain_keys(fmt) if deep else None
    if keyed is not None:
        plain = partial(_plain_formatted, f=keyed[0], keys=keyed[1])
    items = job["items"]
    if job["fmt_kind"] == "jsonl":
        # bounds are (first byte, end byte): each worker splits its own bytes and counts lines from 1 (the lines
        # before its chunk are added when the parts are merged, in order: nobody counts a file's lines twice)
        first_line = 1
        loads = _loads
        blank = 0
        line = first_line - 1
        data = items[lo:hi]
        boxes = deep and fmt is None and b"bbox_2d" in data  # literal answer boxes: searched per line only if any
        for line, raw in enumerate(data.split(b"\n"), first_line):
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
            if plain is None or rec.__class__ is not dict or not plain(rec, line, media, part):
                check(rec, line, sink, deep, media, part, fmt)
            if boxes and b"bbox_2d" in raw and type(rec) is dict and "objects" not in rec:
                part.grounded.append((line, rec))
        part.records = part.samples = line - first_line + 1 - blank
        part.newlines = line - first_line
    else:
        for i in range(lo, hi):
            item = items[i]
            part.records += 1
            if type(item) is list:
                for j, rec in enumerate(item):
                    part.samples += 1
                    check(rec, (i, j), sink, deep, media, part, fmt)
            else:
                part.samples += 1
                if plain is None or item.__class__ is not dict or not plain(item, (i, None), media, part):
                    check(item, (i, None), sink, deep, media, part, fmt)
                if deep and fmt is None and type(item) is dict and "objects" not in item and _answer_boxes(item):
                    part.grounded.append(((i, None), item))
    part.items = sink.items
    part.counts = sink.counts
    return part



def _byte_chunks(data: bytes, size: int) -> list[tuple[int, int]]:
    """``(start, end)`` byte ranges of about ``size`` bytes, cut after a newline."""
    out = []
    start = 0
    n = len(data)
    while start < n:
        end = data.find(b"\n", min(n, start + max(1, size)))
        end = n if end < 0 else end + 1
        out.append((start, end))
        start = end
    return out


class _FileBytes:
    """A local file's bytes, read on demand (``os.pread``): a JSONL scan slices its chunks from it in the forked
    workers, in parallel, and this process never reads the whole file. Slicing gives bytes; ``find`` reads windows."""

    WINDOW = 1 << 20

    def __init__(self, path: str, size: int):
        self.path = path
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, cut: slice) -> bytes:
        lo, hi, _ = cut.indices(self.size)
        if hi <= lo:
            return b""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            parts = []
            while lo < hi:  # (pread may return less than asked)
                got = os.pread(fd, hi - lo, lo)
                if not got:
                    break  # the file shrank while being checked: what is there
                parts.append(got)
                lo += len(got)
            return b"".join(parts)
        finally:
            os.close(fd)

    def find(self, sub: bytes, start: int = 0) -> int:
        while start < self.size:
            window = self[start:start + self.WINDOW + len(sub)]
            at = window.find(sub)
            if at >= 0:
                return start + at
            start += self.WINDOW
        return -1


def _local_jsonl(path: str) -> _FileBytes | None:
    """A local JSON Lines file of 1 MiB or more that starts as one (``{``, no NUL: no BOM, not UTF-16, not a JSON
    list), to be read by the workers (:class:`_FileBytes`); None for anything else, which :func:`_read` reads."""
    if storage.is_url(path) or hf_source.is_arrow_source(path):
        return None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(4)
    except OSError:
        return None  # _read raises what there is to say
    if size < (1 << 20) or head[:1] != b"{" or b"\x00" in head:
        return None
    return _FileBytes(path, size)


def _shift(part: _Part, lines: int) -> None:
    """A JSONL part's locators (lines counted from its chunk's first line) as lines of the file, ``lines`` before it."""
    if not lines:
        return
    part.items = [(item[0] + lines, *item[1:]) for item in part.items]
    if part.first_media is not None:
        part.first_media += lines
    part.grounded = [(loc + lines, rec) for loc, rec in part.grounded]
    for located in (part.media, part.video_paths, part.image_paths):
        for key in located or ():
            located[key] += lines


def _workers(total: int, requested: int | None) -> int:
    if requested is None:
        env = os.environ.get("VLSFT_CHECK_WORKERS")
        if env and env.isdigit():
            requested = int(env)
        elif total < PARALLEL_MIN_RECORDS:
            return 1
        else:
            requested = _cpus()
    if requested <= 1 or sys.platform != "linux":
        return 1
    return requested


def _cpus() -> int:
    """The CPUs this process may use (at most 8): the default number of workers."""
    return min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1), 8)


def scan(path: str, data_path: str | None, *, deep: bool = True, check_media: bool = True,
         progress: Callable[[int], None] | None = None, max_per_kind: int = MAX_PER_KIND,
         workers: int | None = None, chunk: int = CHUNK,
         list_progress: Callable[[int, int], None] | None = None, decode: bool = False,
         decode_progress: Callable[[int, int], None] | None = None,
         fmt: formats.FormatSpec | None = None) -> ScanResult:
    """Read every record of one annotation file; count and (``deep``) check each sample.

    Raises OSError when the file cannot be read. Media paths resolve against ``data_path``
    (absolute paths and URLs are kept). Long files are split into chunks checked by
    ``workers`` forked processes (default: one per CPU from PARALLEL_MIN_RECORDS records on;
    ``VLSFT_CHECK_WORKERS`` overrides); the result is the same as a single-process scan.
    ``progress(records)`` follows the records; ``list_progress(done, total)`` the folder listings of
    the media existence check on object storage (:func:`qwenvl.storage.existing`). ``fmt``: the dataset's
    format as declared (None or name None: detected from the first records, as :func:`probe` does); every record
    is then read as the trainer reads it (:func:`qwenvl.data.formats.sample_problems`).
    """
    res = ScanResult(path=path)
    sink = _Sink(path, max_per_kind)
    media: dict[str, Any] | None = {} if (deep and check_media) else None
    fmt_kind = annotation_format(path)
    data = (_local_jsonl(path) if fmt_kind == "jsonl" else None) or _read(path)
    with _no_gc():  # millions of short-lived dicts: the cyclic GC would cost more than the parsing
        prepared = _items_and_chunks(path, data, fmt_kind, fmt, chunk, res)
        if prepared is None:
            res.unusable = True
            return res
        items, total, bounds, fmt = prepared
        if fmt is not None and fmt.name is None and formats.foreign_shape(res.fmt_info.format_found):
            # a known foreign shape (alpaca, query/response, ...): the dataset-level line says it all; per-sample
            # checks would read the records as official ones and hint at the wrong fix ("rename 'images' to 'image'")
            deep, media = False, None
        _JOB.update(path=path, fmt_kind=fmt_kind, fmt=fmt, items=items, deep=deep, media=media is not None, max_per_kind=max_per_kind,
                    decode=decode and media is not None)
        try:
            roles = _scan_chunks(bounds, min(_workers(total, workers), len(bounds)), res, sink, media, progress)
        finally:
            _JOB.clear()
        del prepared, items  # a .json's records freed while the GC still sleeps (else its first pass walks them all)
    gone = _check_media_exist(media, data_path, sink, res, list_progress) if media else set()
    if decode and media is not None:  # (inline data: URL images are decoded even when no file is named)
        _decode_media(roles, data_path, gone, sink, res, decode_progress, fmt)
    if res.grounded:
        _check_grounding(res, sink, data_path, fmt.bbox_format if fmt is not None else "pixel")
    _sink_problems(res, sink, data, path)
    return res


def _items_and_chunks(path: str, data: bytes, fmt_kind: str, fmt: formats.FormatSpec | None, chunk: int,
                      res: ScanResult):
    """(the records: the JSONL bytes or the .json list, their number (estimated for JSONL), the chunks to check,
    the settled format); None with the problem in ``res`` when the file is unusable."""
    if fmt_kind == "jsonl":
        # (a file read by the workers starts with '{' and holds no NUL: neither can be wrong in these ways)
        wrong = None if isinstance(data, _FileBytes) else _utf16_jsonl(data, path) or _json_list_in_jsonl(data, path)
        if wrong is not None:
            res.problems.append(wrong)
            return None
        total = len(data) // 150  # an estimate is enough to choose the number of workers
        pieces = max(1, -(-len(data) // max(1, chunk * 200)))  # ~200 bytes per record; a multiple of the CPUs, so
        pieces = -(-pieces // _cpus()) * _cpus()  # that no worker idles through the last chunk while another works
        bounds = _byte_chunks(data, -(-len(data) // pieces))
        return data, total, bounds, format_of(jsonl_head(data), fmt, res.fmt_info, lambda loc: loc)
    try:
        items = _load_json_document(data)
    except (ValueError, RecursionError) as exc:
        line, col, msg, hint = _json_error(exc, data)
        res.problems.append(Problem("error", f"annotation file is not valid JSON: {msg}", path, line, col, hint=hint))
        return None
    if not isinstance(items, list):
        res.problems.append(Problem("error", "the top level of a .json annotation file must be a list of "
                                    f"samples, found {kind_of(items)}", path, 1, 1, hint=_LIST_HINT))
        return None
    total = len(items)
    res.packed = list in set(map(type, items))
    pairs = []
    for i, item in enumerate(items[:formats.DETECT_RECORDS]):
        pairs += [((i, j), r) for j, r in (enumerate(item) if type(item) is list else ((None, item),))]
    fmt = format_of(pairs[:formats.DETECT_RECORDS], fmt, res.fmt_info, lambda loc: None if loc is None else
                    _json_item_lines(_text(data), {loc}).get(loc))
    pieces = max(1, -(-total // max(1, chunk)))
    size = -(-total // (-(-pieces // _cpus()) * _cpus()))  # equal chunks, a multiple of the CPUs (as for JSONL)
    return items, total, [(lo, min(lo + size, total)) for lo in range(0, total, max(1, size))], fmt


def _scan_chunks(bounds: list, n_workers: int, res: ScanResult, sink: _Sink, media: dict[str, Any] | None,
                 progress: Callable[[int], None] | None) -> tuple[dict, dict]:
    """Check every chunk of :data:`_JOB` (in forked workers when ``n_workers`` > 1) and merge the parts in order;
    returns (images, videos): path -> first locator, for --decode."""
    roles: tuple[dict, dict] = ({}, {})
    lines = 0  # JSONL: the lines before the next part
    jsonl = _JOB["fmt_kind"] == "jsonl"
    pool = None
    if n_workers > 1:
        import multiprocessing

        pool = multiprocessing.get_context("fork").Pool(n_workers)
    try:
        for part in pool.imap(_scan_chunk, bounds) if pool is not None else map(_scan_chunk, bounds):
            if jsonl:
                _shift(part, lines)
                lines += part.newlines
            _merge(res, sink, media, part)
            _merge_roles(roles, part)
            if progress is not None:
                progress(part.records)
    finally:
        if pool is not None:
            pool.terminate()
    return roles


def _sink_problems(res: ScanResult, sink: _Sink, data: bytes, path: str) -> None:
    """The collected problems with their locators resolved to lines, in file order, each kind over the limit
    closed by one '... and N more like' line."""
    locs = {loc for loc, *_ in sink.items if isinstance(loc, tuple)}
    first_media = res.first_media
    if isinstance(first_media, tuple):
        locs.add((first_media[0], None))
    lines = _json_item_lines(_text(data), locs) if locs else {}
    res.media_line = lines.get((first_media[0], None)) if isinstance(first_media, tuple) else first_media
    first: dict[str, Problem] = {}
    for loc, code, severity, message, key, hint, column, kind in sink.items:
        if code in ONCE_PER_DATASET:  # one line for the whole file: where it is first, how many samples
            if code in first:
                continue
            n = sink.counts.get(code, 1)
            message += f" (first here; {n:,} sample(s) of this dataset)" if n > 1 else ""
        line = lines.get(loc) if isinstance(loc, tuple) else loc
        problem = Problem(severity, oneline(message), path, line, column, oneline(key), oneline(hint))  # type: ignore[arg-type]
        first.setdefault(code, problem)
        res.problems.append(problem)
        res.kinds[problem] = kind
    res.problems.sort(key=lambda p: p.line or 0)  # file order (stable: same line keeps check order)
    for kind, count in sink.counts.items():
        if count > sink.max and kind not in ONCE_PER_DATASET:
            more = count - sink.max
            res.suppressed[kind] = more
            ex = first[kind]
            more_like = Problem(ex.severity, f"... and {more:,} more like: {ex.message}", path, None, None, ex.key,
                                ex.hint)
            res.problems.append(more_like)
            res.kinds[more_like] = res.kinds[ex]


def _check_grounding(res: ScanResult, sink: _Sink, data_path: str | None, bbox_format: str) -> None:
    """The boxes of every sample with ``objects`` (or a literal ``bbox_2d`` answer) against its images' sizes,
    read from the file headers (no decoding): outside the image, another convention than declared, answer boxes
    beyond the image Qwen2.5-VL sees at the default ``max_pixels``/``min_pixels`` (the run's are not known here)."""
    from qwenvl.arguments import DataArguments
    from qwenvl.data import grounding

    d = DataArguments()
    sizes_of: dict[str, tuple[int, int] | None] = {}
    for loc, rec in res.grounded:
        img = rec.get("image")
        paths = [img] if type(img) is str else [p for p in img if type(p) is str] if type(img) is list else []
        sizes = []
        for p in paths:
            if p not in sizes_of:
                full = p if (storage.is_url(p) or os.path.isabs(p) or not data_path) else storage.join(data_path, p)
                sizes_of[p] = grounding.image_size(full) if is_path(p) else None
            sizes.append(sizes_of[p])
        found, counts = grounding.check_sample(rec, sizes, bbox_format, d.min_pixels, d.max_pixels)
        res.boxes += counts["boxes"]
        res.boxes_rescaled += counts["rescaled"]
        res.boxes_suspicious += counts["suspicious"]
        for severity, code, message, hint in found:
            sink.add(loc, code, severity, message, "objects" if code != "answer_box_outside" else "conversations",
                     hint, None, code)
    res.grounded = []


def _merge(res: ScanResult, sink: _Sink, media: dict | None, part: _Part) -> None:
    res.records += part.records
    res.samples += part.samples
    res.images += part.images
    res.videos += part.videos
    res.text_only += part.text_only
    if res.first_media is None:
        res.first_media = part.first_media
    res.grounded += part.grounded
    res.video_media |= part.video_media
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
                       progress: Callable[[int, int], None] | None = None) -> set[str]:
    """Every distinct media path is a regular readable file: one directory listing per local folder or
    S3 prefix (never a stat or a request per file), one HEAD request per http(s) URL. Problems are
    reported at the first sample naming the file. Returns the annotation paths found missing."""
    res.media_files = len(media)
    missing: list[tuple[str, str, str | None]] = []  # (full path, annotation path, why not media)
    case_twin: dict[str, str] = {}  # annotation path -> existing name that differs only in case
    by_parent: dict[str, list[tuple[str, str, str]]] = {}
    if os.sep == "/" and (data_path is None or not storage.is_url(data_path)) and not any(
            "://" in rel for rel in media):
        _group_local(media, data_path, res, by_parent)
        check_local(by_parent, missing, case_twin)
    else:
        remote, http = _group_any(media, data_path, res, by_parent)
        check_local(by_parent, missing, case_twin)
        if remote:
            _check_remote(media, remote, missing, sink, progress)
        if http:
            gone, down = check_http(http)
            missing.extend(gone)
            for host, (url, reason, count) in down.items():
                rel = http[url]
                sink.add(media[rel], "media_unreachable", "error", f"cannot reach {host} for {mask_url(url)} ({reason})"
                         + (f"; {count - 1:,} more media file(s) there not checked" if count > 1 else ""),
                         key="image/video", hint="check the URL and that the server is up: the trainer skips "
                         "these samples", kind="media_unreachable")
    if res.video_media:  # a video may be a folder of frame images: judged by its frames
        missing[:] = frame_folder_missing(missing, res.video_media)
    _report_missing(media, missing, case_twin, sink, res)
    return {rel for _, rel, _ in missing}


def _group_local(media: dict[str, Any], data_path: str | None, res: ScanResult,
                 by_parent: dict[str, list[tuple[str, str, str]]]) -> None:
    """The local fast path (the common case): plain string work instead of os.path calls per file."""
    prefix = None if data_path is None else (data_path if data_path.endswith("/") else data_path + "/")
    if prefix is not None and not os.path.isdir(data_path):  # type: ignore[arg-type]
        prefix = None  # reported once as a data_path problem, not once per media file
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


def _group_any(media: dict[str, Any], data_path: str | None, res: ScanResult,
               by_parent: dict[str, list[tuple[str, str, str]]]) -> tuple[dict[str, str], dict[str, str]]:
    """Local files into ``by_parent``; returns (object-storage URL -> annotation path, http(s) URL -> path)."""
    remote: dict[str, str] = {}
    http: dict[str, str] = {}
    res.relative_media = sum(1 for rel in media if not (storage.is_url(rel) or os.path.isabs(rel)))
    for rel in media:
        if data_path is None and not (storage.is_url(rel) or os.path.isabs(rel)):
            res.unresolved_media += 1
            continue
        full = storage.join(data_path, rel)
        if storage.is_http_url(full):
            http[full] = rel
        elif storage.is_url(full):
            remote[full] = rel
        else:
            parent, name = os.path.split(full)
            by_parent.setdefault(parent, []).append((name, full, rel))
    return remote, http


def _check_remote(media: dict[str, Any], remote: dict[str, str], missing: list, sink: _Sink,
                  progress: Callable[[int, int], None] | None) -> None:
    """Object-storage media by prefix listings; a storage error is one line at the first sample."""
    try:
        found = storage.existing(remote, progress=progress)
        missing.extend((full, rel, None) for full, rel in remote.items() if full not in found)
    except storage.StorageError as e:  # endpoint, bucket or credentials: one line at the first sample
        full, rel = min(remote.items(), key=lambda item: _order(media[item[1]]))
        sink.add(media[rel], "media_unreachable", "error", f"cannot check the {len(remote):,} media file(s) "
                 f"on object storage, first {mask_url(full)}: {e}", key="image/video",
                 hint="the trainer cannot read them either; fix the storage settings or the URLs",
                 kind="media_unreachable")


def _report_missing(media: dict[str, Any], missing: list[tuple[str, str, str | None]], case_twin: dict[str, str],
                    sink: _Sink, res: ScanResult) -> None:
    """One problem per missing media file, in file order, with the likeliest reason as the hint."""
    missing.sort(key=lambda item: _order(media[item[1]]))  # report in file order
    for full, rel, why in missing:
        res.missing_media += 1
        hint = "paths are relative to the dataset's data_path" if full != rel and why in (None, "not found") else None
        if rel in case_twin:
            hint = f"'{case_twin[rel]}' exists: names are case-sensitive here"
        elif rel != rel.strip():
            hint = f"the path {rel!r} has a space (or tab) at its start or end"
        elif "\\" in rel:
            hint = "write paths with / (this looks like a Windows path)"
        # no URL password / signature, no whole base64 payload (bare base64 of no image is a path) in the report
        name = mask_url(full) if len(rel) <= SHOWN_MAX else shown(rel)
        message = f"media file not found: {name}" if why is None or why == "not found" else (
            f"media file not found: {name} ({why})" if why.startswith("HTTP") or why.startswith("no answer")
            or why.startswith("the server") else f"media file {name} is {why}")
        sink.add(media[rel], "missing_media", "error", message, key="image/video", hint=hint, kind="missing_media")


def _merge_roles(roles: tuple[dict, dict], part: _Part) -> None:
    for mine, theirs in zip(roles, (part.image_paths, part.video_paths), strict=True):
        for p, loc in (theirs or {}).items():
            mine.setdefault(p, loc)


def _decode_media(roles: tuple[dict, dict], data_path: str | None, gone: set[str], sink: _Sink,
                  res: ScanResult, progress: Callable[[int, int], None] | None,
                  fmt: formats.FormatSpec | None = None) -> None:
    """``--decode``: open every existing local image / video header (:mod:`qwenvl.data.media_decode`), each as
    what its sample names it (a file named both as an image and as a video is opened both ways)."""
    from qwenvl.data.media_decode import decode_all

    todo: dict[tuple[str, bool], Any] = {}  # (full path, is video) -> locator of the first sample naming it so
    for is_video, paths in enumerate(roles):
        for rel, loc in paths.items():
            if rel[:5] == "data:":  # inline media: decoded from the record itself
                todo[(rel, bool(is_video))] = loc
                continue
            if rel in gone or not is_path(rel) or storage.is_url(rel) or (data_path is None and not os.path.isabs(rel)):
                continue
            full = storage.join(data_path, rel)
            if not storage.is_url(full):
                todo[(full, bool(is_video))] = loc
    bad = decode_all(todo, progress)
    f = fmt.keys() if fmt is not None and fmt.name not in (None, "official") else None
    keys = (f.images_key, f.videos_key) if f is not None else ("image", "video")  # named as the file names them
    res.decoded_media = len(todo)
    for full, is_video in sorted(bad, key=lambda k: _order(todo[k])):
        res.undecodable_media += 1
        sink.add(todo[(full, is_video)], "media_unreadable", "error", f"cannot decode {'video' if is_video else 'image'} "
                 f"{shown(full)}: {bad[(full, is_video)]}", key=keys[is_video],
                 hint="replace or re-encode the file, or drop the sample: the trainer skips it", kind="media_unreadable")


def _order(loc: Any) -> tuple[int, int]:
    return (loc, 0) if isinstance(loc, int) else (loc[0], -1 if loc[1] is None else loc[1])
