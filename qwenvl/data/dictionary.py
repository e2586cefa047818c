"""The dataset dictionary: ``Dataset-Dictionary.json`` → checked :class:`DatasetSpec` entries (torch-free).

The file maps dataset names to where their data lives and how much of it to use::

    {
        "dataset1": {"data_path": "images/", "annotation_path": "ann1.json", "length": 1000, "sampling_rate": 0.05},
        "dataset2": {"data_path": "s3://bucket/media", "annotation_path": "ann2.jsonl", "repeat_time": 2.5}
    }

* ``data_path``: folder (or ``s3://`` URL) that media paths in the annotations are relative to.
* ``annotation_path``: ``.json`` (a list of samples, or a list of lists = the official pre-packed format)
  or ``.jsonl`` (one sample per line).
* ``length``: the record count you expect (checked against the file).
* ``sampling_rate`` (0 < r ≤ 1, the fraction kept) **or** ``repeat_time`` (> 0; 2.5 = two copies plus a
  random half). Neither means 100 %.

A LLaMA-Factory ``dataset_info.json`` and an InternVL meta JSON (``{"name": {"root": ..., "annotation": ...,
"repeat_time": 1, "length": ...}}``, its datasets read in the ``internvl`` format) are read as dictionaries too.

Relative paths resolve against the dictionary file's folder; a leading ``~`` is expanded to the home
folder (as a shell would). Media paths inside the annotations are not expanded: they are relative
to ``data_path`` unless absolute (or URLs), and a dataset whose media are all absolute needs no
``data_path``. ``length`` of an official pre-packed ``.json`` may count either its samples (what the
trainer reads: packs are flattened) or its packs. :func:`load_dictionary` never raises for
user errors: it returns a :class:`DatasetDictionary` whose ``problems`` lists everything found, each
with file, line, column, key, message and hint (syntax errors are recovered from where possible so
that later problems are still reported).
"""

from __future__ import annotations

import logging
import math
import os
import posixpath
import re
from dataclasses import dataclass, field
from decimal import Decimal

from pydantic import BaseModel, ConfigDict, Field

from qwenvl import storage
from qwenvl.data import annotations as ann
from qwenvl.data import formats, hf_source
from qwenvl.data.jsonloc import INVALID, JKey, JNode, parse
from qwenvl.problems import Problem, did_you_mean

log = logging.getLogger(__name__)

KNOWN_KEYS = ("data_path", "annotation_path", "length", "sampling_rate", "repeat_time", "format", "system", "train_on",
              "bbox_format", "thinking_loss", "reasoning_effort", "frame_fps")
# keys of a LLaMA-Factory dataset_info.json entry (read as a dictionary: see _Loader.lf_pairs)
LF_KEYS = ("file_name", "formatting", "columns", "tags", "ranking", "subset", "split", "folder", "num_samples",
           "hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
# keys of an InternVL meta JSON entry (read as a dictionary: see _Loader.internvl_pairs): root -> data_path,
# annotation -> annotation_path, repeat_time and length as vlsft's; INTERNVL_UNUSED are InternVL's image tiling /
# augmentation settings, which do not apply to a Qwen model (a warning, once per file)
INTERNVL_KEYS = ("root", "annotation", "repeat_time", "length")
INTERNVL_UNUSED = ("data_augment", "max_dynamic_patch", "min_dynamic_patch", "dynamic_image_size", "use_thumbnail",
                   "split_anno_by_rank")
LF_TAGS = {"role_tag": "role_key", "content_tag": "content_key", "user_tag": "user_tags",
           "assistant_tag": "assistant_tags", "system_tag": "system_tags", "observation_tag": "tool_tags",
           "function_tag": "call_tags"}
REQUIRED_KEYS = ("annotation_path",)
MAX_REPEAT = 1_000_000  # repeat_time (and a data.use percent) above this is a typo: index arrays would not fit
ANNOTATION_EXTENSIONS = (".json", ".jsonl")
EXAMPLE_ENTRY = '{"data_path": "images/", "annotation_path": "train.jsonl", "sampling_rate": 0.5}'


class DatasetSpec(BaseModel):
    """One entry of the dataset dictionary, with paths resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    data_path: str | None = Field(
        None, description="Folder (or s3:// URL) that media paths in the annotations are relative to."
    )
    annotation_path: str = Field(
        description=".json file (a list of samples, or a list of lists = official pre-packed) or .jsonl file."
    )
    length: int | None = Field(None, ge=0, description="Declared record count; checked against the real count.")
    sampling_rate: float | None = Field(
        None, gt=0, le=1, description="Fraction of the records kept per epoch (0 < r <= 1)."
    )
    repeat_time: float | None = Field(
        None, gt=0, description="Copies per epoch (> 0); 2.5 = two full copies plus a random half."
    )
    format: str | None = Field(None, description="Annotation format: official, messages, sharegpt, "
                               "prompt_completion or internvl (default: detected from the first records; internvl "
                               "is never detected: an InternVL meta JSON sets it).")
    system: str | None = Field(None, description="System prompt of this dataset (replaces the default one).")
    train_on: str | None = Field(None, description="Assistant turns trained: 'all' (default) or 'last'.")
    bbox_format: str | None = Field(None, description="Coordinates of the records' 'objects' (grounding): pixel "
                                    "(original image pixels, default), norm1000 (0-1000) or norm1 (0-1).")
    format_keys: dict | None = Field(None, description="Record keys and speaker tags (from a LLaMA-Factory "
                                     "dataset_info.json entry's columns/tags).")
    thinking_loss: str | None = Field(None, description="Loss on the reasoning inside an answer's <think> block: "
                                      "'train' (default) or 'mask' (the answer after it is trained either way).")
    reasoning_effort: str | None = Field(None, description="Qwen3.8's reasoning effort for this dataset's samples: "
                                         "xhigh (the template's default), medium, low, or none (thinking off); a "
                                         "record's chat_template_kwargs win.")
    frame_fps: float | None = Field(None, gt=0, description="Frames per second of this dataset's videos given as "
                                    "frame images (a folder or a list; default 2); a record's sample_fps / fps wins.")

    @property
    def format_spec(self):
        """The :class:`qwenvl.data.formats.FormatSpec` of this dataset (name None: detect)."""
        from qwenvl.data.formats import FormatSpec

        return FormatSpec(name=self.format, system=self.system, train_on=self.train_on or "all",
                          bbox_format=self.bbox_format or "pixel", thinking_loss=self.thinking_loss or "train",
                          reasoning_effort=self.reasoning_effort, frame_fps=self.frame_fps,
                          declared=self.format is not None, **(self.format_keys or {}))

    @property
    def percent(self) -> float:
        """The ``--dataset_use`` percent: sampling_rate·100, repeat_time·100, or 100 (exact decimals)."""
        rate = self.sampling_rate if self.sampling_rate is not None else self.repeat_time
        if rate is None:
            return 100.0
        return float(Decimal(repr(float(rate))) * 100)

    @property
    def rate(self) -> float:
        return self.percent / 100.0


@dataclass
class DatasetDictionary:
    """Result of :func:`load_dictionary`. ``datasets`` holds the entries that passed their checks."""

    path: str
    datasets: dict[str, DatasetSpec] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    positions: dict[str, tuple[int, int]] = field(default_factory=dict)
    key_positions: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # every dataset name in file order (also broken entries)
    record_counts: dict[str, int] = field(default_factory=dict)  # real record counts (when files were checked)
    media_referenced: dict[str, bool] = field(default_factory=dict)
    formats: dict[str, str | None] = field(default_factory=dict)  # dataset -> its annotation format (checked files)
    llamafactory: bool = False  # the file is a LLaMA-Factory dataset_info.json
    internvl: bool = False  # the file is an InternVL meta JSON (root / annotation entries)
    unusable: bool = False  # the file could not be read / holds no dictionary at all
    dataset_of: dict[Problem, str] = field(default_factory=dict)  # problem -> dataset it belongs to
    # every entry whose annotation_path could be read, valid or not (unvalidated; for file checks)
    entries: dict[str, DatasetSpec] = field(default_factory=dict)
    raw_annotation_paths: dict[str, str] = field(default_factory=dict)  # as written in the file
    raw_data_paths: dict[str, str] = field(default_factory=dict)  # as written in the file

    @property
    def ok(self) -> bool:
        return not any(p.is_error for p in self.problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_error]


def count_records(annotation_path: str) -> int:
    """Record count of an annotation file: non-blank lines of a ``.jsonl``, list length of a ``.json``.

    Raises ``OSError`` / ``ValueError`` when the file cannot be read or is not a JSON list.
    """
    return ann.count_records(annotation_path)


def _resolve(base_dir: str, path: str) -> str:
    if storage.is_url(path):
        return path
    path = os.path.expanduser(path)
    if os.path.isabs(path):
        return os.path.normpath(path)
    if storage.is_url(base_dir):
        return posixpath.join(base_dir, path)
    return os.path.normpath(os.path.join(base_dir, path))


def _type_name(node: JNode) -> str:
    if node.kind == "number":
        return "an integer" if isinstance(node.value, int) else "a number"
    return {"string": "a string", "bool": "a boolean", "null": "null", "object": "an object",
            "array": "a list", "invalid": "an invalid value"}.get(node.kind, node.kind)


class _Loader:
    def __init__(self, path: str, check_files: bool, base_dir: str | None = None):
        self.path = str(path)
        self.check_files = check_files
        self.given_base = base_dir
        self.result = DatasetDictionary(path=self.path)
        self.current: str | None = None
        self.internvl = False
        self.unused: set[str] = set()  # InternVL meta keys already warned about (once per file)

    def add(self, severity: str, message: str, line: int | None = None, column: int | None = None,
            key: str | None = None, hint: str | None = None, file: str | None = None) -> None:
        problem = _problem(self.result, severity, message, file or self.path, line, column, key, hint)
        self.result.problems.append(problem)
        if self.current is not None:
            self.result.dataset_of[problem] = self.current

    # ------------------------------------------------------------------------------------------
    def load(self) -> DatasetDictionary:
        res = self.result
        try:
            raw = storage.read_bytes(self.path)
        except FileNotFoundError:
            self.add("error", "dataset dictionary not found", hint="check the path (relative paths start at the current folder)")
            res.unusable = True
            return res
        except IsADirectoryError:
            self.add("error", "is a folder, not a dataset dictionary file", hint="point at the .json file inside it")
            res.unusable = True
            return res
        except (OSError, ValueError) as exc:
            self.add("error", f"cannot read the dataset dictionary: {exc}")
            res.unusable = True
            return res
        if raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(raw) > 1 and b"\x00" in raw[:4]):
            self.add("error", "the file is UTF-16 (or UTF-32) text, not UTF-8", 1, 1,
                     hint="save it as UTF-8, e.g. iconv -f UTF-16 -t UTF-8 old.json > new.json")
            res.unusable = True
            return res
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw.count(b"\n", 0, exc.start) + 1
            col = len(raw[raw.rfind(b"\n", 0, exc.start) + 1:exc.start].decode("utf-8", "replace")) + 1
            self.add("error", f"not UTF-8 text (byte 0x{raw[exc.start]:02x})", line, col,
                     hint="save the file as UTF-8")
            text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            self.add("error", "the file is empty", 1, 1, hint=f'write a JSON object: {{"my_dataset": {EXAMPLE_ENTRY}}}')
            res.unusable = True
            return res
        root, issues = parse(text)
        if self.path.lower().endswith((".yaml", ".yml")) and (root is None or root.kind != "object" or issues):
            m = re.search(r"^\s*dictionary:\s*[\"']?([^\s\"'#]+)", text, re.MULTILINE)
            hint = (f"the run YAML names it: vlsft datasets check {m.group(1)} (relative to the YAML's folder)" if m
                    else "pass the dataset dictionary (the JSON file named by data.dictionary in the run YAML)")
            self.add("error", "this is a YAML file, not a dataset dictionary (JSON)", 1, 1, hint=hint)
            res.unusable = True
            return res
        if root is not None and _looks_like_samples(root):
            name = posixpath.basename(self.path)
            self.add("error", "this is an annotation file (samples with conversations), not a dataset dictionary",
                     root.line, root.column, hint=f'list it in a dictionary: {{"my_dataset": {{"data_path": "images/", '
                     f'"annotation_path": "{name}"}}}} and check that file')
            res.unusable = True
            return res
        for issue in issues:
            self.add("error", f"JSON syntax: {issue.message}", issue.line, issue.column, hint=issue.hint)
        if root is None:
            self.add("error", "no JSON value found", 1, 1, hint=f'write a JSON object: {{"my_dataset": {EXAMPLE_ENTRY}}}')
            res.unusable = True
            return res
        if root.kind != "object":
            hint = f'{{"my_dataset": {EXAMPLE_ENTRY}}}'
            if root.kind == "array" and root.value and all(v.kind == "object" for v in root.value):
                hint = ("remove the [ ] around the object" if len(root.value) == 1 else
                        "merge the objects into one: {\"name1\": {...}, \"name2\": {...}}")
            self.add("error", f"the top level must be an object mapping dataset names to entries, found {_type_name(root)}",
                     root.line, root.column, hint=hint)
            res.unusable = True
            return res
        if not root.value:
            self.add("error", "the dictionary holds no datasets", root.line, root.column,
                     hint=f'add an entry: {{"my_dataset": {EXAMPLE_ENTRY}}}')
            res.unusable = True
            return res
        self.base_dir = self._base_dir()
        self.lf = res.llamafactory = _is_llamafactory(root)
        self.internvl = res.internvl = not self.lf and _is_internvl(root)
        seen: dict[str, JKey] = {}
        for key, node in root.value:
            self.current = key.name
            self.entry(key, node, seen)
        self.current = None
        return res

    def _base_dir(self) -> str:
        if self.given_base is not None:  # a copy saved elsewhere resolves as its original did
            return self.given_base if storage.is_url(self.given_base) else os.path.abspath(self.given_base)
        if storage.is_url(self.path):
            return posixpath.dirname(self.path)
        return os.path.dirname(os.path.abspath(self.path))

    # ------------------------------------------------------------------------------------------
    def entry(self, key: JKey, node: JNode | None, seen: dict[str, JKey]) -> None:
        """One dataset of the dictionary: its name, its keys, each key's value; the spec when all are valid."""
        name = key.name
        valid_name = self._check_name(key, seen)
        if node is None:
            return
        if node.kind != "object":
            self.add("error", f"the entry must be an object, found {_type_name(node)}", node.line, node.column, key=name,
                     hint=f"write {EXAMPLE_ENTRY}")
            return
        pairs = node.value
        if self.lf or self.internvl:
            pairs = self.lf_pairs(name, node) if self.lf else self.internvl_pairs(name, node)
            if pairs is None:
                return
        values, ok = self._entry_values(name, node, pairs)
        parsed: dict[str, object] = {}
        for k, v in values.items():
            checker = getattr(self, f"check_{k}")
            result = checker(name, k, v)
            if result is INVALID:
                ok = False
            else:
                parsed[k] = result
        if parsed.get("sampling_rate") is not None and parsed.get("repeat_time") is not None:
            v = values["repeat_time"]
            self.add("error", f"dataset '{name}' sets both sampling_rate and repeat_time", v.line, v.column,
                     key="repeat_time", hint="keep one: sampling_rate for a fraction (<= 1), repeat_time for copies")
            ok = False
        self._keep_entry(name, node, values, parsed, ok and valid_name)

    def _check_name(self, key: JKey, seen: dict[str, JKey]) -> bool:
        """A dataset name defined once, usable in --dataset_use (records its position); False when it is not."""
        res = self.result
        name = key.name
        where = (key.line, key.column)
        valid_name = True
        if name in seen:
            first = seen[name]
            at = f"line {first.line}" if first.line != key.line else f"column {first.column}"
            self.add("error", f"dataset '{name}' is defined twice (first at {at}); plain json would "
                     "silently keep only the last one", *where, key=name, hint="rename one of them or delete the duplicate")
            valid_name = False
        else:
            seen[name] = key
            res.positions[name] = where
            res.names.append(name)
        if not name.strip():
            self.add("error", "empty dataset name", *where, key=name, hint="give the dataset a name such as \"my_data\"")
            valid_name = False
        elif "," in name or "%" in name:
            bad = "," if "," in name else "%"
            self.add("error", f"dataset name contains '{bad}', which cannot appear in --dataset_use", *where, key=name,
                     hint=f"rename it, e.g. '{name.replace(',', '_').replace('%', 'pct')}'")
            valid_name = False
        elif name != name.strip():
            self.add("error", "dataset name has leading or trailing whitespace", *where, key=name,
                     hint=f"rename it to '{name.strip()}'")
            valid_name = False
        elif any(not c.isprintable() for c in name):
            self.add("error", "dataset name contains control characters", *where, key=name, hint="use letters, digits, '_', '-', '.'")
            valid_name = False
        return valid_name

    def _entry_values(self, name: str, node: JNode, pairs) -> tuple[dict[str, JNode], bool]:
        """The entry's known keys -> value nodes; False when a key is doubled, unknown, unreadable or missing."""
        values: dict[str, JNode] = {}
        ok = True
        seen_keys: dict[str, JKey] = {}
        suggested: set[str] = set()  # known keys that unknown keys were suggested as
        for k, v in pairs:
            if k.name in seen_keys:
                first = seen_keys[k.name]
                at = f"line {first.line}" if first.line != k.line else f"column {first.column}"
                self.add("error", f"key '{k.name}' appears twice in dataset '{name}' (first at {at})",
                         k.line, k.column, key=k.name, hint="keep only one")
                ok = False
                continue
            seen_keys[k.name] = k
            self.result.key_positions[(name, k.name)] = (k.line, k.column)
            if k.name not in KNOWN_KEYS and not (self.lf and k.name == "format_keys"):
                hint = _key_hint(k.name)
                suggested.add(hint.split("'")[1] if hint.startswith("did you mean") else "")
                self.add("error", f"unknown key '{k.name}' in dataset '{name}'", k.line, k.column, key=k.name,
                         hint=hint)
                ok = False
                continue
            if v is None:  # syntax error already reported
                ok = False
                continue
            values[k.name] = v
        for req in REQUIRED_KEYS:  # (not again when a misspelt key was just named as this one)
            if req not in values and req not in seen_keys and req not in suggested:
                self.add("error", f"dataset '{name}' has no '{req}'", node.line, node.column, key=req,
                         hint=f'add "{req}": "path/to/annotations.jsonl"')
                ok = False
        return values, ok

    def _keep_entry(self, name: str, node: JNode, values: dict[str, JNode], parsed: dict[str, object],
                    valid: bool) -> None:
        """The spec of a valid entry; the files of any entry with an annotation path (a broken one included:
        everything is reported in one go)."""
        res = self.result
        if valid:
            try:
                spec = DatasetSpec(**parsed)  # type: ignore[arg-type]
                res.datasets[name] = spec
            except Exception as exc:  # a check above should have caught it; never crash on user input
                self.add("error", f"invalid entry: {exc}".splitlines()[0], node.line, node.column, key=name)
        if parsed.get("annotation_path") and name not in res.entries:
            res.entries[name] = DatasetSpec.model_construct(**{k: parsed.get(k) for k in (*KNOWN_KEYS, "format_keys")})
            res.raw_annotation_paths[name] = values["annotation_path"].value
            if "data_path" in values and values["data_path"].kind == "string":
                res.raw_data_paths[name] = values["data_path"].value
            if self.check_files:  # check the files even of a broken entry: report everything in one go
                self.files(name, res.entries[name], values)

    # ---- per-key checks: return the parsed value or INVALID ----------------------------------
    def _wrong_type(self, name: str, k: str, v: JNode, want: str, hint: str | None = None) -> object:
        shown = f" {v.raw}" if v.kind in ("string", "number", "bool") else ""  # not "null null" or "an object {"
        self.add("error", f"'{k}' of dataset '{name}' must be {want}, found {_type_name(v)}{shown}",
                 v.line, v.column, key=k, hint=hint)
        return INVALID

    def _path(self, name: str, k: str, v: JNode, allow_null: bool) -> object:
        if v.kind == "invalid":
            return INVALID
        if v.kind == "null" and allow_null:
            return None
        if v.kind != "string":
            return self._wrong_type(name, k, v, "a path string", hint=f'write "{k}": "path/to/..."')
        if not v.value.strip():
            if allow_null:
                self.add("error", f"'{k}' of dataset '{name}' is empty", v.line, v.column, key=k,
                         hint="give the media folder, or null when the samples have no media")
            else:
                self.add("error", f"'{k}' of dataset '{name}' is empty", v.line, v.column, key=k,
                         hint="give the path of a .json or .jsonl annotation file")
            return INVALID
        return _resolve(self.base_dir, v.value)

    def check_data_path(self, name: str, k: str, v: JNode) -> object:
        return self._path(name, k, v, allow_null=True)

    def check_annotation_path(self, name: str, k: str, v: JNode) -> object:
        path = self._path(name, k, v, allow_null=False)
        if path is INVALID:
            return path
        ext = os.path.splitext(posixpath.basename(str(path)))[1].lower()
        if ext in hf_source.EXTENSIONS or hf_source.is_arrow_source(str(path)):
            return path  # a Hugging Face dataset: parquet / arrow, a folder of shards, a save_to_disk folder
        if ext not in ANNOTATION_EXTENSIONS:
            hint = ("use a .json list of samples or a .jsonl file with one sample per line (or a Hugging Face "
                    ".parquet / .arrow file or dataset folder)")
            if ext.strip() in ANNOTATION_EXTENSIONS:
                hint = f"remove the whitespace at the end: \"{v.value.strip()}\""
            elif ext in (".gz", ".bz2", ".xz", ".zst", ".zip"):
                hint = "compressed annotation files are not read: decompress it to .json / .jsonl"
            self.add("error", f"annotation file of dataset '{name}' must end in .json or .jsonl, got '{ext or '(none)'}'",
                     v.line, v.column, key=k, hint=hint)
            return INVALID
        if "://" not in str(path) and os.path.exists(path) and not os.path.isfile(path) and not os.path.isdir(path):
            self.add("error", f"annotation file of dataset '{name}' is not a regular file (a pipe, socket or "
                     f"device): {path}", v.line, v.column, key=k, hint="point annotation_path at the file itself")
            return INVALID  # reading it would block, or never end
        return path

    def check_length(self, name: str, k: str, v: JNode) -> object:
        if v.kind == "invalid":
            return INVALID
        if v.kind == "null":
            return None
        if v.kind == "string":
            number = _as_number(v.value)
            hint = (f"write {int(number)} without quotes" if number is not None and number.is_integer() and number >= 0
                    else "write the number of records, e.g. 1000")
            return self._wrong_type(name, k, v, "an integer", hint=hint)
        if v.kind != "number":
            return self._wrong_type(name, k, v, "an integer")
        if v.is_nonfinite:
            self.add("error", f"'{k}' of dataset '{name}' is {v.raw}, not a count", v.line, v.column, key=k,
                     hint="write the number of records, e.g. 1000")
            return INVALID
        value = v.value
        if isinstance(value, float):
            if not value.is_integer():
                return self._wrong_type(name, k, v, "a whole number", hint="write the number of records, e.g. 1000")
            value = int(value)
        if value < 0:
            self.add("error", f"'{k}' of dataset '{name}' is negative ({v.raw})", v.line, v.column, key=k,
                     hint="write the number of records")
            return INVALID
        return value

    def _rate(self, name: str, k: str, v: JNode) -> object:
        if v.kind == "invalid":
            return INVALID
        if v.kind == "null":
            return None
        example = "0.5" if k == "sampling_rate" else "2"
        if v.kind == "string":
            number = _as_number(v.value, percent_ok=True)
            shown = None if number is None else (str(int(number)) if number.is_integer() else repr(number))
            hint = f"write {shown} without quotes" if shown is not None else f"write a number, e.g. {example}"
            return self._wrong_type(name, k, v, "a number", hint=hint)
        if v.kind != "number":
            return self._wrong_type(name, k, v, "a number", hint=f"write a number, e.g. {example}")
        value = float(v.value)
        if not math.isfinite(value):
            self.add("error", f"'{k}' of dataset '{name}' is {v.raw}, which is not a usable rate", v.line, v.column, key=k,
                     hint=f"write a finite number, e.g. {example}")
            return INVALID
        if value <= 0:
            self.add("error", f"'{k}' of dataset '{name}' must be > 0, got {v.raw}", v.line, v.column, key=k,
                     hint="remove the dataset from the dictionary (or from data.use) to leave it out")
            return INVALID
        return value

    def check_sampling_rate(self, name: str, k: str, v: JNode) -> object:
        value = self._rate(name, k, v)
        if isinstance(value, float) and value > 1:
            self.add("error", f"sampling_rate of dataset '{name}' is {v.raw}, above 1", v.line, v.column, key=k,
                     hint=f"sampling_rate is a fraction (<= 1); to up-sample write \"repeat_time\": {v.raw}")
            return INVALID
        return value

    def check_repeat_time(self, name: str, k: str, v: JNode) -> object:
        value = self._rate(name, k, v)
        if isinstance(value, float) and value > MAX_REPEAT:
            self.add("error", f"repeat_time of dataset '{name}' is {v.raw}: above {MAX_REPEAT:,} repeats per epoch",
                     v.line, v.column, key=k, hint="a typo? up-sampling repeats a dataset a few times (2, 10, 100); "
                     "for more passes raise training.num_train_epochs")
            return INVALID
        return value

    def check_frame_fps(self, name: str, k: str, v: JNode) -> object:
        if v.kind == "number" and not float(v.value) > 0:
            self.add("error", f"'{k}' of dataset '{name}' must be > 0, got {v.raw}", v.line, v.column, key=k,
                     hint="the rate the frames were taken from the video at, e.g. 1 or 2")
            return INVALID
        return self._rate(name, k, v)

    def _choice(self, name: str, k: str, v: JNode, allowed: tuple[str, ...]) -> object:
        if v.kind == "null":
            return None
        if v.kind != "string" or v.value not in allowed:
            low = v.value.strip().lower() if v.kind == "string" else None
            hint = f"write \"{low}\"" if low in allowed else f"one of: {', '.join(allowed)}"
            self.add("error", f"'{k}' of dataset '{name}' must be one of {', '.join(allowed)}, found "
                     f"{v.raw if v.kind in ('string', 'number', 'bool') else _type_name(v)}", v.line, v.column,
                     key=k, hint=hint)
            return INVALID
        return v.value

    def check_format(self, name: str, k: str, v: JNode) -> object:
        from qwenvl.data.formats import FORMATS

        return self._choice(name, k, v, FORMATS)

    def check_train_on(self, name: str, k: str, v: JNode) -> object:
        from qwenvl.data.formats import TRAIN_ON

        return self._choice(name, k, v, TRAIN_ON)

    def check_bbox_format(self, name: str, k: str, v: JNode) -> object:
        from qwenvl.data.grounding import BBOX_FORMATS

        return self._choice(name, k, v, BBOX_FORMATS)

    def check_thinking_loss(self, name: str, k: str, v: JNode) -> object:
        from qwenvl.data.formats import THINKING_LOSS

        return self._choice(name, k, v, THINKING_LOSS)

    def check_reasoning_effort(self, name: str, k: str, v: JNode) -> object:
        from qwenvl.data.formats import REASONING_EFFORTS

        return self._choice(name, k, v, REASONING_EFFORTS)

    def check_system(self, name: str, k: str, v: JNode) -> object:
        if v.kind == "null":
            return None
        if v.kind != "string":
            return self._wrong_type(name, k, v, "a string (the system prompt)")
        return v.value

    def check_format_keys(self, name: str, k: str, v: JNode) -> object:
        return v.value

    # ---- LLaMA-Factory dataset_info.json ------------------------------------------------------
    def lf_pairs(self, name: str, node: JNode) -> list | None:
        """A dataset_info.json entry as vlsft keys (``file_name`` -> annotation_path, the file's folder as
        data_path = LLaMA-Factory's default media_dir, ``formatting``/``columns``/``tags`` -> format and keys).
        None after an error that leaves nothing to check."""
        got = {k.name: (k, v) for k, v in node.value if v is not None}
        for k, _v in node.value:
            if k.name not in LF_KEYS and k.name not in KNOWN_KEYS:
                hint = did_you_mean(k.name, LF_KEYS) or f"dataset_info.json keys read: {', '.join(LF_KEYS[:4])}"
                self.add("error", f"unknown key '{k.name}' in dataset '{name}'", k.line, k.column, key=k.name,
                         hint=hint)
                return None
        hub = next((key for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
                    if key in got), None)
        if hub and "file_name" not in got:
            got = self.lf_hub(name, hub, got)
            if got is None:
                return None
        if "file_name" not in got:
            self.add("error", f"dataset '{name}' has no 'file_name'", node.line, node.column, key="file_name",
                     hint='add "file_name": "my_data.json" (relative to the folder of dataset_info.json)')
            return None
        ranking = got.get("ranking")
        if ranking and ranking[1].value is True:
            k, v = ranking
            self.add("error", f"dataset '{name}' is a preference (ranking) dataset: vlsft trains supervised "
                     "fine-tuning data only", k.line, k.column, key="ranking", hint="remove it from the dictionary")
            return None
        fm = got.get("formatting")
        formatting = fm[1].value if fm else "alpaca"
        if formatting != "sharegpt":
            at = fm[0] if fm else node
            self.add("error", f"dataset '{name}' uses LLaMA-Factory's '{formatting}' formatting, which vlsft does not "
                     "read", at.line, at.column, key="formatting", hint="vlsft reads sharegpt-formatted data "
                     "(conversations or messages with images/videos); convert the file to that")
            return None
        keys: dict = {"messages_key": "conversations", "images_key": "", "videos_key": "", "system_key": None}
        cols = got.get("columns")
        if cols and cols[1].kind == "object":
            for ck, cv in cols[1].value:
                if cv is None or cv.kind != "string":
                    continue
                target = {"messages": "messages_key", "images": "images_key", "videos": "videos_key",
                          "system": "system_key", "tools": "tools_key"}.get(ck.name)
                if target:
                    keys[target] = cv.value
                elif ck.name in ("audios", "chosen", "rejected", "kto_tag"):
                    self.add("error", f"column '{ck.name}' of dataset '{name}' is not read by vlsft", ck.line,
                             ck.column, key=ck.name, hint="vlsft trains text, images and videos; drop the column")
                    return None
        tags = got.get("tags")
        if tags and tags[1].kind == "object":
            for tk, tv in tags[1].value:
                if tv is None or tv.kind != "string" or tk.name not in LF_TAGS:
                    continue
                target = LF_TAGS[tk.name]
                keys[target] = (tv.value,) if target.endswith("_tags") else tv.value
        for skipped in ("subset", "split", "folder", "num_samples"):
            if skipped in got:
                k, _ = got[skipped]
                self.add("warning", f"'{skipped}' of dataset '{name}' is not applied by vlsft", k.line, k.column,
                         key=skipped, hint="use sampling_rate / repeat_time in a vlsft dictionary to sample"
                         if skipped == "num_samples" else None)
        k, v = got["file_name"]
        out = [(JKey("annotation_path", k.line, k.column), v),
               (JKey("format", fm[0].line, fm[0].column), JNode("string", "sharegpt", fm[0].line, fm[0].column,
                                                               '"sharegpt"')),
               (JKey("format_keys", node.line, node.column), JNode("lf", keys, node.line, node.column))]
        if not any(k2.name == "data_path" for k2, _ in node.value):  # the entry's own data_path wins over
            out.insert(1, (JKey("data_path", node.line, node.column),  # LLaMA-Factory's default media_dir: the
                           JNode("string", ".", node.line, node.column, '"."')))  # folder of dataset_info.json
        out += [(k2, v2) for k2, v2 in node.value if k2.name in KNOWN_KEYS and k2.name not in ("format",)]
        return out

    def lf_hub(self, name: str, hub: str, got: dict) -> dict | None:
        """An ``hf_hub_url`` entry read from the Hugging Face cache (:mod:`qwenvl.data.hub_datasets`): ``got`` with
        the snapshot folder as its ``file_name``; None after an error (another hub, not cached)."""
        import json

        from qwenvl.data import hub_datasets

        k, v = got[hub]
        if hub != hub_datasets.KEY or v.kind != "string":
            self.add("error", f"dataset '{name}' is loaded from '{hub}': vlsft reads local files and the Hugging Face "
                     "hub (hf_hub_url)", k.line, k.column, key=hub, hint="download it and name the file with "
                     "\"file_name\"")
            return None
        subset, folder = (got[key][1].value if key in got and got[key][1].kind == "string" else None
                          for key in ("subset", "folder"))
        path, why, hint = hub_datasets.snapshot(v.value, subset, folder, os.environ)
        if path is None:
            self.add("error", f"dataset '{name}': {why}", k.line, k.column, key=hub, hint=hint)
            return None
        got = {key: kv for key, kv in got.items() if key not in ("subset", "folder")}  # applied
        got["file_name"] = (k, JNode("string", path, v.line, v.column, json.dumps(path)))
        got["media_dir"] = path  # media paths inside the repository are relative to it
        return got

    # ---- InternVL meta JSON ---------------------------------------------------------------------
    def internvl_pairs(self, name: str, node: JNode) -> list | None:
        """An InternVL meta JSON entry as vlsft keys: ``root`` -> data_path (empty: none, a text-only dataset),
        ``annotation`` -> annotation_path, ``repeat_time`` and ``length`` as vlsft reads them (a repeat_time below
        1 keeps that fraction, as sampling_rate does), format ``internvl`` (the records' implicit ``<image>``)
        unless the entry sets a vlsft ``format``; InternVL's tiling / augmentation keys are not applied (a warning
        once per key and file; ``data_augment: false`` is what vlsft does anyway). None after an unknown key."""
        out, bad = [], False
        for k, v in node.value:
            if k.name == "root" and v is not None and v.kind == "string" and not v.value.strip():
                v = JNode("null", None, v.line, v.column, "null")
            if k.name in INTERNVL_UNUSED:
                if k.name not in self.unused and not (k.name == "data_augment" and v is not None and v.value is False):
                    self.unused.add(k.name)
                    what = "image augmentation" if k.name == "data_augment" else "image tiling"
                    self.add("warning", f"InternVL's '{k.name}' ({what}) is not applied by vlsft (said once, at "
                             f"dataset '{name}', for the whole file)", k.line, k.column, key=k.name,
                             hint="vlsft does not augment images" if k.name == "data_augment" else
                             "vlsft sizes images by data.min_pixels / data.max_pixels of the run YAML")
            elif k.name in INTERNVL_KEYS or k.name in KNOWN_KEYS:
                new = {"root": "data_path", "annotation": "annotation_path"}.get(k.name, k.name)
                out.append((JKey(new, k.line, k.column), v))
            else:
                hint = did_you_mean(k.name, INTERNVL_KEYS + INTERNVL_UNUSED + KNOWN_KEYS) or (
                    f"InternVL meta keys read: {', '.join(INTERNVL_KEYS)}")
                self.add("error", f"unknown key '{k.name}' in dataset '{name}'", k.line, k.column, key=k.name, hint=hint)
                bad = True
        if not any(k.name == "format" for k, _ in out):
            out.append((JKey("format", node.line, node.column), JNode("string", "internvl", node.line, node.column,
                                                                      '"internvl"')))
        return None if bad else out

    # ---- annotation files --------------------------------------------------------------------
    def files(self, name: str, spec: DatasetSpec, values: dict[str, JNode]) -> None:
        try:
            info: ann.ProbeInfo | BaseException = ann.probe(spec.annotation_path, fmt=spec.format_spec)
        except (OSError, ValueError) as exc:
            info = exc
        apply_file_info(self.result, name, info)


def apply_file_info(d: DatasetDictionary, name: str, info: ann.ProbeInfo | BaseException) -> None:
    """Add the file-level problems of dataset ``name`` to ``d`` from what reading its annotation file gave.

    ``info`` is a :class:`~qwenvl.data.annotations.ProbeInfo` (from :func:`~qwenvl.data.annotations.probe`
    or :meth:`~qwenvl.data.annotations.ScanResult.as_probe`) or the exception reading the file raised.
    Used by :func:`load_dictionary` (``check_files=True``) and by ``vlsft datasets check --deep``, which
    reads each file once for both purposes.
    """
    spec = d.entries[name]
    apath = spec.annotation_path
    if isinstance(info, BaseException):
        _add(d, name, "error", *_unreadable(d, name, info), key="annotation_path")
        return
    for p in info.problems:
        d.problems.append(p)
        d.dataset_of[p] = name
    if info.records is None:
        return
    d.record_counts[name] = info.records
    d.media_referenced[name] = info.media_line is not None
    d.formats[name] = info.format
    base = posixpath.basename(apath)
    if info.format is None:
        line, col = d.key_positions.get((name, "format"), d.positions.get(name, (None, None)))
        problem = _problem(d, "error", f"dataset '{ann.oneline(name)}': unknown annotation format: "
                           f"{ann.oneline(info.format_found)} (first at {base}:{info.format_line}); vlsft reads "
                           f"{formats.ACCEPTED}", d.path, line, col, "format",
                           "convert the records to one of these, or set \"format\" in the dictionary entry")
        d.problems.append(problem)
        d.dataset_of[problem] = name
    if info.refused is not None:
        what, line_no, fix = info.refused
        _add(d, name, "error", f"dataset '{name}': {what} (first at {base}:{line_no})", fix, key="annotation_path")
    for key, (count, line_no) in info.unread.items():
        fmt = info.format or "official"
        reads = " / ".join(repr(k) for k in spec.format_spec.with_name(fmt).reads_media if k) or "no media keys"
        hint = {"official": f"the official format reads 'image' / 'video'{_rename_hint(key)}",
                }.get(fmt, f"this dataset's format ({fmt}) reads {reads}")
        _add(d, name, "error", f"dataset '{name}': key '{key}' holds media the {fmt} format does not read: "
             f"{count} of the first samples would train without it (first at {base}:{line_no})",
             hint + (" (or set \"format\")" if not spec.format else ""), key="annotation_path")
    if info.records == 0:
        _add(d, name, "warning", f"dataset '{name}' has no records ({apath})", key="annotation_path")
    # a pre-packed .json may declare either its samples (what the trainer counts) or its packs
    if spec.length is not None and spec.length not in (info.records, info.top_level if info.packed else None):
        held = f"{info.records} {'record' if info.records == 1 else 'records'}"
        if info.packed:
            held = f"{info.records} samples in {info.top_level} packed lists"
        _add(d, name, "warning", f"dataset '{name}' declares length {spec.length} but {posixpath.basename(apath)} "
             f"holds {held}; the real count is used", f'set "length": {info.records}', key="length")
    if info.media_line is not None:
        _data_path_problem(d, name, info.media_line)


def _add(d: DatasetDictionary, name: str, severity: str, message: str, hint: str | None = None, *,
         key: str) -> None:
    """A problem of dataset ``name`` at its ``key`` in the dictionary (else at the entry)."""
    line, col = d.key_positions.get((name, key), d.positions.get(name, (None, None)))
    problem = _problem(d, severity, message, d.path, line, col, key, hint)
    d.problems.append(problem)
    d.dataset_of[problem] = name


_INTERNVL_WORDS = re.compile(r"\b(data_path|annotation_path)\b")


def _problem(d: DatasetDictionary, severity: str, message: str | None, file: str | None, line: int | None,
             column: int | None, key: str | None, hint: str | None) -> Problem:
    """A one-line problem of dictionary ``d``, in the words of its file: an InternVL meta JSON's ``root`` and
    ``annotation`` for data_path and annotation_path."""
    texts = [ann.oneline(t) for t in (message, key, hint)]
    if d.internvl:
        texts = [t and _INTERNVL_WORDS.sub(lambda m: {"data_path": "root"}.get(m[1], "annotation"), t) for t in texts]
    return Problem(severity, texts[0] or "", file, line, column, texts[1], texts[2])  # type: ignore[arg-type]


def _unreadable(d: DatasetDictionary, name: str, exc: BaseException) -> tuple[str, str | None]:
    """(message, hint) for an annotation file that could not be read."""
    apath = d.entries[name].annotation_path
    if isinstance(exc, FileNotFoundError):
        raw = d.raw_annotation_paths.get(name, "")
        relative = not (storage.is_url(raw) or os.path.isabs(raw))
        hint = "relative paths start at the dictionary's folder" if relative else None
        if raw.startswith("~"):
            hint = f"'~' was expanded to {os.path.expanduser('~')}"
        if "\\" in raw:
            hint = "write paths with / (this looks like a Windows path)"
        if not storage.is_url(apath) and os.path.islink(apath):
            hint = f"it is a symbolic link to {os.readlink(apath)}, which does not exist"
        return f"annotation file of dataset '{name}' not found: {apath}", hint
    if isinstance(exc, IsADirectoryError):
        return f"annotation_path of dataset '{name}' is a folder: {apath}", "point at the .json/.jsonl file"
    if isinstance(exc, PermissionError):
        return f"annotation file of dataset '{name}' is not readable: {apath}", "check the file permissions"
    return f"cannot read annotation file of dataset '{name}': {exc}", None


def _data_path_problem(d: DatasetDictionary, name: str, media_line: int) -> None:
    """Samples reference media (first at ``media_line``): data_path must be set and, when local, a folder."""
    spec = d.entries[name]
    if spec.data_path is None:
        line, col = d.positions.get(name, (None, None))
        problem = _problem(d, "error", f"dataset '{ann.oneline(name)}' has no data_path but its samples reference "
                           f"media (first at {posixpath.basename(spec.annotation_path)}:{media_line})", d.path, line,
                           col, "data_path", 'add "data_path": the folder the image/video paths are relative to')
        d.problems.append(problem)
        d.dataset_of[problem] = name
    elif not storage.is_url(spec.data_path) and not os.path.isdir(spec.data_path):
        what = "is not a folder" if os.path.exists(spec.data_path) else "does not exist"
        hint = "relative paths start at the dictionary's folder"
        if os.path.isabs(d.raw_data_paths.get(name, "")):
            hint = "media paths in the annotations are relative to this folder"
        _add(d, name, "error", f"data_path of dataset '{name}' {what}: {spec.data_path}", hint, key="data_path")


_SAMPLE_KEYS = {"conversations", "messages", "image", "video", "images", "videos"}


def _rename_hint(key: str) -> str:
    single = {"images": "image", "videos": "video"}.get(key)
    return f": rename '{key}' to '{single}'" if single else ""


def _is_llamafactory(root: JNode) -> bool:
    """A LLaMA-Factory dataset_info.json: its entries name ``file_name`` / ``formatting`` / hub URLs, never
    ``annotation_path``."""
    entries = [v for _, v in root.value if v is not None and v.kind == "object"]
    keys = {k.name for v in entries for k, _ in v.value}
    return bool(entries) and "annotation_path" not in keys and bool(keys & {"file_name", "formatting",
                                                                            "hf_hub_url", "ms_hub_url"})


def _is_internvl(root: JNode) -> bool:
    """An InternVL meta JSON: its entries name ``annotation`` (and ``root``), never vlsft's ``annotation_path`` /
    ``data_path`` (so a misspelt key in a vlsft dictionary still gets its did-you-mean)."""
    keys = {k.name for _, v in root.value if v is not None and v.kind == "object" for k, _ in v.value}
    return "annotation" in keys and not keys & {"annotation_path", "data_path", "file_name"}


def _looks_like_samples(root: JNode) -> bool:
    """An annotation file passed where the dictionary belongs: a sample object, or a list of them."""
    first = root
    if root.kind == "array":
        first = root.value[0] if root.value else None
        if first is not None and first.kind == "array":  # official pre-packed
            first = first.value[0] if first.value else None
    if first is None or first.kind != "object":
        return False
    # a dictionary maps names to objects, so a dataset named "image" is still an object; a sample's is not
    return any(k.name in _SAMPLE_KEYS and v is not None and v.kind in ("array", "string") for k, v in first.value)


# keys people write for the known ones (checked before the spelling match, which would map "ann_path" to data_path)
_SYNONYMS = {
    "annotation_path": ("ann_path", "ann", "anno_path", "annotation", "annotations", "annotation_file", "ann_file",
                        "json_path", "jsonl_path", "json", "jsonl", "file", "label_path", "labels"),
    "data_path": ("image_folder", "image_dir", "image_root", "images", "media", "media_dir", "media_root", "root",
                  "data_root", "data_dir", "folder", "video_folder", "video_dir", "img_dir", "image_path"),
    "length": ("num_samples", "size", "count", "n", "samples", "num", "len", "total"),
    "sampling_rate": ("rate", "ratio", "weight", "fraction", "sample_ratio", "percent", "percentage", "prob"),
    "repeat_time": ("repeat", "repeats", "repeat_times", "times", "epochs", "upsample", "multiplier"),
}
_SYNONYM_OF = {alias: key for key, aliases in _SYNONYMS.items() for alias in aliases}


def _key_hint(word: str) -> str:
    key = _SYNONYM_OF.get(word.strip().lower().replace("-", "_").replace(" ", "_"))
    if key == "sampling_rate":
        return "did you mean 'sampling_rate'? (a fraction: 0.5 keeps half; or 'repeat_time' for copies)"
    if key is not None:
        return f"did you mean '{key}'?"
    return did_you_mean(word, KNOWN_KEYS) or f"allowed keys: {', '.join(KNOWN_KEYS)}"


def _as_number(text: str, percent_ok: bool = False) -> float | None:
    """The number a quoted value means (``"1,000"`` -> 1000.0, ``"50%"`` -> 0.5 for rates), or None."""
    text = text.strip().replace(",", "").replace("_", "")
    scale = 1.0
    if percent_ok and text.endswith("%"):
        text, scale = text[:-1].strip(), 0.01
    try:
        value = float(text) * scale
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def load_dictionary(path: str | os.PathLike, *, check_files: bool = True,
                    base_dir: str | os.PathLike | None = None) -> DatasetDictionary:
    """Load and check a dataset dictionary. Never raises for user errors; see ``.problems`` / ``.ok``.

    Relative paths resolve against the file's folder, or ``base_dir`` when given (a run's saved copy of a
    dictionary resolves against its original's folder, see ``vlsft predict``).

    With ``check_files`` each annotation file is opened: existence, format, record count against
    ``length``, and whether samples reference media without a ``data_path``. Per-sample checks are
    :func:`qwenvl.data.annotations.scan` (``vlsft datasets check --deep``).
    """
    loader = _Loader(str(path), check_files, None if base_dir is None else str(base_dir))
    res = loader.load()
    res.problems.sort(key=lambda p: (p.file != res.path, p.file or "", p.line or 0, p.column or 0))
    return res
