"""LLaMA-Factory ``hf_hub_url`` entries: a dataset on the Hugging Face hub, read from the standard cache (torch-free).

A ``dataset_info.json`` entry ``{"hf_hub_url": "org/name", "subset": ..., "folder": ...}`` (no ``file_name``) names a
dataset repository. Its files are read where ``huggingface_hub`` keeps them (``<cache>/datasets--org--name/
snapshots/<commit>/``, found without network by :func:`qwenvl.hub.locate`): the snapshot folder is the dataset's
``annotation_path`` (a folder of parquet / arrow shards, :mod:`qwenvl.data.hf_source`: the ``train`` split) and
its ``data_path``; ``folder`` (LLaMA-Factory's ``data_dir``) and ``subset`` (a configuration stored as a
sub-folder, as most parquet repositories do) narrow it. ``vlsft train`` downloads the repositories of the datasets
it uses first (:func:`fetch`, on each node, with progress bars; ``HF_HUB_OFFLINE``: the cache only);
``datasets check`` and ``print-args`` read the cache only, and say how to fill it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

from qwenvl import hub

KEY = "hf_hub_url"


def snapshot(repo_id: str, subset: str | None, folder: str | None, environ: Mapping[str, str]) \
        -> tuple[str | None, str, str | None]:
    """(the local folder of the dataset, ""; or None, what is wrong, the fix) for an ``hf_hub_url`` entry."""
    if not hub.is_hub_id(repo_id):
        return None, f"hf_hub_url {repo_id!r} is not a hub dataset id (namespace/name)", \
            'write it as the hub spells it, e.g. "HuggingFaceH4/llava-instruct-mix-vsft"'
    found = hub.locate(repo_id, None, environ, repo_type="dataset")
    if not found.complete:
        state = "partly in" if found.folder else "not in"
        return None, (f"hf_hub_url {repo_id} is {state} the Hugging Face cache {found.cache}"
                      + (" and HF_HUB_OFFLINE is on" if found.offline else "")), \
            (f"`vlsft train` downloads it; to check it first: hf download {repo_id} --repo-type dataset "
             "(same HF_HOME)")
    path = found.folder
    if folder:
        path = os.path.join(path, *folder.split("/"))
        if not os.path.isdir(path):
            return None, f"hf_hub_url {repo_id} has no folder {folder!r} (in {found.folder})", \
                "check 'folder' against the repository's files"
    if subset:
        sub = next((os.path.join(path, *c) for c in ((subset,), ("data", subset))
                    if os.path.isdir(os.path.join(path, *c))), None)
        if sub is None:
            return None, f"hf_hub_url {repo_id}: subset {subset!r} is not a folder of the repository ({path})", \
                "name the subset's folder with 'folder', or download its files and use 'file_name'"
        path = sub
    return path, "", None


def used_entries(dictionary: str, use: list[str] | None) -> list[tuple[str, str]]:
    """``(name, repo id)`` of the ``hf_hub_url`` entries (without a ``file_name``) of a local dictionary that ``use``
    names (every one when ``use`` is empty); [] for anything unreadable (the dictionary's own checks say why)."""
    try:
        with open(dictionary, encoding="utf-8") as f:
            entries = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(entries, dict):
        return []
    names = {u.split("%", 1)[0].strip() for u in use or []}
    return [(name, e[KEY]) for name, e in entries.items()
            if isinstance(e, dict) and isinstance(e.get(KEY), str) and "file_name" not in e
            and (not names or name in names)]


def fetch(entries: list[tuple[str, str]], environ: Mapping[str, str], say: Callable[[str], None]) -> None:
    """Download (or, offline, find whole) each repository into this node's Hugging Face cache; HubError (one line)
    otherwise."""
    for name, repo_id in entries:
        found = hub.locate(repo_id, None, environ, repo_type="dataset")
        say(f"# dataset {name}: {repo_id} " + ("is in the Hugging Face cache; checking for updates" if found.complete
                                                else f"downloading into {found.cache}"))
        folder = hub.download(repo_id, None, environ, repo_type="dataset")
        say(f"# dataset {name}: {repo_id} is in {folder}")
