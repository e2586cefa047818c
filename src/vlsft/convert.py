"""``vlsft datasets convert``: every dataset of a dictionary as official-format JSONL plus a dataset dictionary.

Media given as paths stay where they are (the new dictionary keeps each dataset's ``data_path``). Media embedded
in the annotations — base64 ``data:`` URLs, and the image bytes of a Hugging Face parquet / arrow dataset, which
:mod:`qwenvl.data.hf_source` reads as such URLs — cannot be read by the official trainer: each distinct one is
written once as a file in ``<out>/<name>-media/`` (named by its content's SHA-256, the extension from its media
type) and the record names that file. When every medium of a dataset was embedded, its ``data_path`` becomes that
folder (relative to the new dictionary, so the output folder can be moved); otherwise the extracted files are
named by their absolute path beside the dataset's own ``data_path``.

The output folder is written whole or not at all (:func:`qwenvl.safe_write.atomic_folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from qwenvl.data.dictionary import DatasetDictionary, DatasetSpec, load_dictionary
from qwenvl.problems import Problem
from vlsft import render

SHOWN = 20  # skipped samples listed per dataset (the rest are counted)
_EXTENSIONS = {"image/png": ".png", "image/jpeg": ".jpg", "image/jpg": ".jpg", "image/gif": ".gif",
               "image/webp": ".webp", "image/bmp": ".bmp", "image/tiff": ".tiff", "video/mp4": ".mp4",
               "video/webm": ".webm", "video/quicktime": ".mov", "video/x-matroska": ".mkv", "video/avi": ".avi",
               "video/x-msvideo": ".avi"}


@dataclass
class MediaFolder:
    """The files extracted from one dataset's embedded media: ``<tmp>/<name>`` while the output is written."""

    tmp: Path  # the output folder being written
    name: str  # the media folder's name inside it
    files: dict[str, str] = field(default_factory=dict)  # sha256 -> file name

    def write(self, url: str, data: bytes, kind: str) -> str:
        """The file name holding these bytes (of ``url``), written once per content."""
        digest = hashlib.sha256(data).hexdigest()
        if digest not in self.files:
            mime = url[5:].split(";", 1)[0].strip().lower()
            name = digest[:24] + _EXTENSIONS.get(mime, ".mp4" if kind == "video" else ".png")
            folder = self.tmp / self.name
            folder.mkdir(exist_ok=True)
            with open(folder / name, "xb") as f:
                f.write(data)
            self.files[digest] = name
        return self.files[digest]


def _media_items(off: dict):
    """(key, index or None, value) of each medium of an official record."""
    for key in ("image", "video"):
        value = off.get(key)
        if type(value) is list:
            yield from ((key, i, v) for i, v in enumerate(value))
        elif value is not None:
            yield key, None, value


def _embedded(value) -> bool:
    return type(value) is str and value[:5].lower() == "data:"


def all_embedded(samples: list) -> bool:
    """Whether the samples have media and every one of them is embedded (then they are named relative to the
    media folder, which becomes the dataset's ``data_path``)."""
    items = [v for off, *_ in samples for _k, _i, v in _media_items(off)]
    return bool(items) and all(_embedded(v) for v in items)


def extract_media(samples: list, media: MediaFolder, final: str) -> tuple[list, list[tuple[int, str]]]:
    """``samples`` (official record, own system prompt, line) with their embedded media replaced by files in
    ``media``: named relative to the media folder when :func:`all_embedded`, else by the path they will have under
    ``final`` (the output folder once in place). Returns (the samples kept, (line, why) of each one left out: an
    embedded medium that cannot be read, as ``datasets check --deep`` says)."""
    from qwenvl.data.sample_rules import data_url_bytes

    relative = all_embedded(samples)
    kept, dropped = [], []
    for off, own, line in samples:
        decoded, why = [], ""
        for key, i, value in _media_items(off):
            if _embedded(value):
                data, why = data_url_bytes(value, key)
                if data is None:
                    why = f"an embedded {key} {why}"
                    break
                decoded.append((key, i, value, data))
        if why:  # nothing of this sample written
            dropped.append((line, f"bad sample: {why}"))
            continue
        new = dict(off)
        for key, i, value, data in decoded:
            name = media.write(value, data, key)
            path = name if relative else os.path.join(final, media.name, name)
            if i is None:
                new[key] = path
            else:
                new[key] = list(new[key]) if new[key] is off[key] else new[key]
                new[key][i] = path
        kept.append((new, own))
    return kept, dropped


def _sharegpt(off: dict, system: str | None) -> dict:
    """An official record from :func:`qwenvl.data.formats.to_official` in the sharegpt layout, its own system
    prompt (if any) as the first turn: how vlsft reads a system prompt per sample."""
    conv = [{"from": "gpt", "value": t["content"]} if "role" in t else t for t in off["conversations"]]
    out: dict = {"conversations": ([{"from": "system", "value": system}] if system is not None else []) + conv}
    for key in ("image", "video"):
        if off.get(key) is not None:
            out[key + "s"] = off[key] if type(off[key]) is list else [off[key]]
    if off.get("objects") is not None:
        out["objects"] = off["objects"]
    return out


def inputs(path: str, to: str, out: str) -> DatasetDictionary:
    """The dictionary to convert, or one line: another target, an unusable dictionary, an ``--out`` that is not a
    new (or empty) folder. A dictionary some of whose entries are unreadable (LLaMA-Factory's own catalogue holds
    alpaca and ranking entries) is converted without them: :func:`convert` lists each as left out."""
    from qwenvl.safe_write import target_problem

    if to != "official":
        render.fail(Problem("error", f"--to {to!r}: the only target is 'official'", hint="write --to official"))
    d = load_dictionary(path)
    refused = {d.dataset_of[p] for p in d.errors if p in d.dataset_of}
    if not d.ok and (not set(d.datasets) - refused or any(p not in d.dataset_of for p in d.errors)):
        render.fail(*d.errors)  # nothing readable, or the file itself is wrong: one line each, nothing written
    why = target_problem(out, "--out", folder=True)  # a link, a path under a file, unwritable, a too-long name
    if why:
        render.fail(why)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        render.fail(Problem("error", f"--out {out} exists and is not an empty folder: nothing is overwritten",
                            hint="give a new folder"))
    return d


def _official_samples(name: str, spec: DatasetSpec, err):
    """(the dataset's format, its samples in the official format with their own system prompt and line, (line,
    why) of each sample left out); (None, the warning, []) when the annotation file cannot be read."""
    from qwenvl.data import formats
    from qwenvl.data.annotations import iter_records

    try:
        records = list(iter_records(spec.annotation_path))
    except (OSError, ValueError) as exc:  # the dataset is left out (one line), the others are written
        return None, Problem("warning", f"left out: dataset '{name}': cannot read annotations: {exc}",
                             spec.annotation_path, hint="fix the file (or drop the entry) and convert again"), []
    fmt = formats.settle(spec.format_spec, [(line, r) for line, r in records[:formats.DETECT_RECORDS]])
    samples: list[tuple[dict, str | None, int]] = []
    skipped: list[tuple[int, str]] = []
    files: dict[tuple[str, str], str] = {}  # (key, full path) -> why it is not usable media ("" = it is)
    for line, rec in records:
        why = "not valid JSON" if isinstance(rec, ValueError) else ""
        off, own, why = (None, None, why) if why else formats.to_official(rec, fmt)
        if off is not None:
            off = _plain_paths(off)
            why = _media_problem(off, spec.data_path, fmt.name not in formats.OFFICIAL_SHAPED, files)
        if off is None or why:
            skipped.append((line, why))
            continue
        samples.append((off, own, line))
    return fmt, samples, skipped


def _file_path(value):
    return value[7:] if type(value) is str and value[:7].lower() == "file://" else value


def _plain_paths(off: dict) -> dict:
    """``off`` with its ``file://`` media named by their path: vlsft reads such a URL, the official trainer joins
    it to its data path."""
    if not any(_file_path(v) is not v for _k, _i, v in _media_items(off)):
        return off
    new = dict(off)
    for key in ("image", "video"):
        value = off.get(key)
        new[key] = [_file_path(v) for v in value] if type(value) is list else _file_path(value)
    return {k: v for k, v in new.items() if v is not None or k in off}


def _media_problem(off: dict, data_path: str | None, foreign: bool, files: dict) -> str:
    """Why an official record's local media make it a sample the output cannot hold ("" when none): a file that
    is missing or not a regular readable file (``datasets check --deep``'s verdict), a video folder with no frames,
    or (``foreign``: converted from another format) a video given as a folder of frames, which the official format
    cannot say, as for a list of frame images. Embedded media are extract_media's; URLs are not fetched."""
    from qwenvl import storage
    from qwenvl.data.media_exist import frame_files, is_frame_folder
    from qwenvl.data.sample_rules import local_media_problem

    for key, _i, value in _media_items(off):
        if type(value) is not str or _embedded(value) or storage.is_url(value):
            continue
        full = storage.join(data_path, value) if data_path else value
        if (key, full) not in files:
            if key == "video" and is_frame_folder(full):
                bad = None if foreign else frame_files(full)[1]
                why = ("a video given as a folder of frame images, which the official format cannot say" if foreign
                       else f"bad sample: video folder {full} is {bad}" if bad else "")
            else:
                bad = local_media_problem(full)
                why = "" if bad is None else (f"bad sample: media file not found: {full}" if bad == "not found"
                                              else f"bad sample: media file {full} is {bad}")
            files[(key, full)] = why
        if files[(key, full)]:
            return files[(key, full)]
    return ""


def _file_name(name: str, taken) -> str:
    """``<name>.jsonl`` made safe as a file name, numbered when two names fold to the same one."""
    stem = "".join(c if c.isalnum() or c in "._-" else "_" for c in name).lstrip(".") or "dataset"
    file_name = f"{stem}.jsonl"
    k = 2
    while file_name in taken:
        file_name, k = f"{stem}-{k}.jsonl", k + 1
    return file_name


def _entry(spec: DatasetSpec, file_name: str, length: int, per_sample: bool, system: str | None,
           data_path: str | None) -> dict:
    entry: dict = {"annotation_path": file_name, "length": length}
    if data_path is not None or spec.data_path is not None:
        entry["data_path"] = data_path if data_path is not None else spec.data_path
    for key in ("sampling_rate", "repeat_time", "train_on", "bbox_format", "frame_fps", "thinking_loss",
                "reasoning_effort"):
        if getattr(spec, key) is not None:
            entry[key] = getattr(spec, key)
    entry["format"] = "sharegpt" if per_sample else "official"
    if system is not None or spec.system is not None:
        entry["system"] = system if system is not None else spec.system
    return entry


def _one_dataset(name: str, spec: DatasetSpec, tmp: Path, final: str, taken: set,
                 err) -> tuple[str, dict, int] | None:
    """Writes one dataset's JSONL (and its media folder) into ``tmp``: (its file name, its dictionary entry, how
    many samples were left out); None (after one warning line) when its annotation file cannot be read."""
    fmt, samples, skipped = _official_samples(name, spec, err)
    if fmt is None:
        err.print(render.problem_text(samples), highlight=False)
        return None
    file_name = _file_name(name, taken)
    media = MediaFolder(tmp, file_name[:-len(".jsonl")] + "-media")
    relative = all_embedded(samples)
    kept, dropped = extract_media(samples, media, final)
    skipped += dropped
    for line, why in sorted(skipped)[:SHOWN]:
        err.print(render.problem_text(Problem("warning", f"left out: {why}", spec.annotation_path, line)),
                  highlight=False)
    if len(skipped) > SHOWN:
        err.print(f"[yellow]warning[/yellow]: {name}: ... and {len(skipped) - SHOWN:,} more left out")
    prompts = {own for _, own in kept}
    per_sample = len(prompts) > 1  # a system prompt of some samples only: it stays in those samples
    system = None if per_sample or not prompts else next(iter(prompts))
    with open(tmp / file_name, "x", encoding="utf-8") as f:
        for off, own in kept:
            f.write(json.dumps(_sharegpt(off, own) if per_sample else off, ensure_ascii=False) + "\n")
    data_path = media.name if relative and media.files else None
    target = ("sharegpt (its samples' system prompts differ, which the official format cannot say per "
              "sample)" if per_sample else "official")
    sys.stdout.write(f"{name}: {fmt.name} -> {target}, {len(kept):,} sample(s) written"
                     + (f", {len(skipped):,} left out" if skipped else "")
                     + (f", {len(media.files):,} embedded media file(s) written to "
                        f"{os.path.join(final, media.name)}" if media.files else "") + "\n")
    return file_name, _entry(spec, file_name, len(kept), per_sample, system, data_path), len(skipped)


def convert(d: DatasetDictionary, out: str) -> int:
    """Writes the output folder whole (or nothing, with one line); the count of samples left out."""
    from qwenvl.safe_write import Interrupted, UnsafeTarget, atomic_folder

    err = render.stderr()
    entries: dict[str, dict] = {}
    taken: set[str] = set()
    left_out = 0
    final = os.path.abspath(out)
    for p in d.errors:  # an entry that cannot be read (inputs() let the others through): listed, left out
        err.print(render.problem_text(replace(p, severity="warning", message=f"left out: {p.message}")),
                  highlight=False)
    # an entry with an error (unreadable or unknown-format annotations, no data_path for its media, ...) is not
    # converted: it was listed as left out just above
    refused = {d.dataset_of[p] for p in d.errors if p in d.dataset_of}
    left_out += len(refused) + sum(p not in d.dataset_of for p in d.errors)
    try:
        with atomic_folder(out, "--out") as tmp:
            for name, spec in d.datasets.items():
                if name in refused:
                    continue
                done = _one_dataset(name, spec, tmp, final, taken, err)
                if done is None:  # its annotations could not be read after all: one line, left out
                    left_out += 1
                    continue
                file_name, entries[name], skipped = done
                taken.add(file_name)
                left_out += skipped
            with open(tmp / "Dataset-Dictionary.json", "x", encoding="utf-8") as f:  # the dictionary last
                json.dump(entries, f, indent=2, ensure_ascii=False)
                f.write("\n")
    except UnsafeTarget as exc:
        render.fail(exc)
    except Interrupted as exc:
        render.fail(exc.message(out), code=128 + exc.signum)
    sys.stdout.write(f"wrote {os.path.join(out, 'Dataset-Dictionary.json')} ({render.plural(len(entries), 'dataset')})"
                     + ("; a dataset 'system' prompt is vlsft's: the official trainer always uses its default"
                        if any("system" in e for e in entries.values()) else "") + "\n")
    return left_out
