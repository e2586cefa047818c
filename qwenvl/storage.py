"""One storage layer for local paths and object-store URLs (torch-free).

Everything that reads annotations or media goes through here: ``vlsft datasets check``,
``vlsft datasets preview`` and the trainer. Local paths use the OS directly (fast path);
URLs (``s3://…`` and other fsspec schemes) go through fsspec.

NOTE: the S3 specifics (endpoint/credential configuration, retries, error translation,
per-process filesystem instances) are filled in by the object-storage work (issue 5).
"""

from __future__ import annotations

import os
import posixpath
from typing import Iterable

_URL_MARK = "://"


def is_url(path: str) -> bool:
    return _URL_MARK in str(path)


def join(base: str | None, rel: str) -> str:
    """Resolve a media path from an annotation against the dataset's ``data_path``.

    Absolute paths and URLs in the annotation win over ``data_path`` (as in the official code).
    """
    rel = str(rel)
    if is_url(rel) or os.path.isabs(rel) or not base:
        return rel
    base = str(base)
    if is_url(base):
        return posixpath.join(base, rel)
    return os.path.join(base, rel)


def _fs(path: str):
    import fsspec

    fs, _, _ = fsspec.core.get_fs_token_paths(path)
    return fs


def read_bytes(path: str) -> bytes:
    if not is_url(path):
        with open(path, "rb") as f:
            return f.read()
    return _fs(path).cat_file(path)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    return _fs(path).exists(path)


def list_names(directory: str) -> set[str]:
    """Names of the entries directly inside ``directory`` (empty set if it does not exist)."""
    if not is_url(directory):
        try:
            return set(os.listdir(directory))
        except (FileNotFoundError, NotADirectoryError):
            return set()
    fs = _fs(directory)
    try:
        return {posixpath.basename(p.rstrip("/")) for p in fs.ls(directory, detail=False)}
    except FileNotFoundError:
        return set()


def existing(paths: Iterable[str]) -> set[str]:
    """The subset of ``paths`` that exist, using one directory listing per parent folder."""
    by_dir: dict[str, list[str]] = {}
    for p in paths:
        parent = posixpath.dirname(p) if is_url(p) else os.path.dirname(p)
        by_dir.setdefault(parent, []).append(p)
    found: set[str] = set()
    for parent, members in by_dir.items():
        names = list_names(parent or ".")
        for p in members:
            base = posixpath.basename(p) if is_url(p) else os.path.basename(p)
            if base in names:
                found.add(p)
    return found
