"""Hugging Face hub ids as ``model.name_or_path`` (torch-free): where the standard cache holds a model, and the one
download ``vlsft train`` makes.

A hub id is ``namespace/name`` in the hub's spelling (``Qwen/Qwen2.5-VL-7B-Instruct``) that is not a folder; the
revision is ``main`` unless ``model.revision`` names a branch, tag or commit.

* :func:`locate` reads the cache the way ``huggingface_hub`` lays it out (``<cache>/models--Qwen--X/refs/<revision>``
  holds the commit; ``snapshots/<commit>/`` the files; ``trees/<commit>.json`` the listing of the snapshot, written
  by ``snapshot_download``), without importing ``huggingface_hub`` (its download modules cost ~0.4 s; print-args
  answers in well under that) and without any network access. tests/test_hub.py compares it with
  ``huggingface_hub.try_to_load_from_cache``.
* :func:`download` is ``huggingface_hub.snapshot_download`` into the standard cache with its progress bars; every
  failure is one :class:`HubError` line saying what to do.

The environment is the user's, read as ``huggingface_hub`` reads it: ``HF_HUB_CACHE`` / ``HF_HOME`` /
``XDG_CACHE_HOME`` (the cache), ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` (no network), ``HF_ENDPOINT`` (a mirror
or a local hub), ``HF_TOKEN`` (else the token ``hf auth login`` stored). The token is handed to ``huggingface_hub``
and never shown: messages name the variable, not its value.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

from qwenvl.problems import UserError

DEFAULT_REVISION = "main"
DEFAULT_ENDPOINT = "https://huggingface.co"
#: ``namespace/name``: letters, digits, ``-_.``; no ``--`` or ``..``; not starting or ending with ``-`` / ``.``
#: (huggingface_hub's validate_repo_id, with the namespace required so a bare folder name is never read as an id)
_PART = r"(?![.-])[\w.-]{1,96}(?<![.-])"
HUB_ID = re.compile(rf"{_PART}/{_PART}")
COMMIT = re.compile(r"[0-9a-f]{40}")
TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
_TRUE = {"1", "ON", "YES", "TRUE"}


class HubError(UserError):
    """A hub id that cannot be resolved into a local snapshot (one line)."""


def is_hub_id(name: str) -> bool:
    """``namespace/name`` spelled as the hub spells repository ids (whether it exists is not checked)."""
    return bool(HUB_ID.fullmatch(name)) and "--" not in name and ".." not in name and not name.endswith(".git")


def cache_dir(environ: Mapping[str, str]) -> str:
    """The hub cache folder, as huggingface_hub.constants.HF_HUB_CACHE computes it from ``environ``."""
    def expand(path: str) -> str:
        return os.path.expandvars(os.path.expanduser(path))

    home = expand(environ.get("HF_HOME") or os.path.join(
        environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"))
    return expand(environ.get("HF_HUB_CACHE") or environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub"))


def offline(environ: Mapping[str, str]) -> bool:
    """``HF_HUB_OFFLINE`` (or transformers' ``TRANSFORMERS_OFFLINE``) is on: the cache only, no request."""
    return (environ.get("HF_HUB_OFFLINE") or environ.get("TRANSFORMERS_OFFLINE") or "").upper() in _TRUE


def endpoint(environ: Mapping[str, str]) -> str:
    return (environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token_source(environ: Mapping[str, str]) -> str | None:
    """The variable the token comes from (its name, never its value), or None."""
    return next((name for name in TOKEN_VARS if environ.get(name)), None)


@dataclass(frozen=True)
class HubModel:
    """What the cache holds of one hub id at one revision."""

    repo_id: str
    revision: str  # as asked: main, a branch, a tag or a commit
    cache: str  # the hub cache folder
    commit: str | None = None  # the commit the revision resolved to when it was last downloaded (refs/<revision>)
    folder: str | None = None  # snapshots/<commit>, when it exists
    missing: int | None = None  # files the snapshot's listing names that are absent (None: no listing cached)
    endpoint: str = DEFAULT_ENDPOINT  # where `vlsft train` would download from (HF_ENDPOINT)
    offline: bool = False  # HF_HUB_OFFLINE: the cache only
    token_var: str | None = None  # the variable holding the token (its name only)
    repo_type: str = "model"  # or "dataset" (a LLaMA-Factory hf_hub_url entry: qwenvl.data.hub_datasets)

    @property
    def config_json(self) -> str | None:
        """The cached ``config.json`` of this revision, or None."""
        path = os.path.join(self.folder, "config.json") if self.folder else None
        return path if path and os.path.isfile(path) else None

    @property
    def complete(self) -> bool:
        """Every file of the snapshot is cached (judged by the listing snapshot_download keeps, else by a
        config.json next to whole-looking weights)."""
        if self.repo_type != "model":  # a dataset: its files, by the listing when there is one
            return self.folder is not None and self.missing in (0, None)
        if self.config_json is None:
            return False
        if self.missing is not None:
            return self.missing == 0
        return _weights_present(self.folder)

    def state(self) -> str:
        """A few words for print-args: what the cache holds."""
        if self.complete:
            return f"in the Hugging Face cache at commit {self.commit[:10] if self.commit else '?'}"
        if self.folder:
            missing = f"{self.missing} files missing" if self.missing else "weights missing"
            return f"partly in the Hugging Face cache ({missing})"
        return "not in the Hugging Face cache"

    def source(self) -> str:
        """Where the missing files would come from, in words (the token by its variable's name only)."""
        if self.offline:
            return "HF_HUB_OFFLINE is on: the cache only"
        token = f"the token in {self.token_var} (masked)" if self.token_var else "no token"
        return f"`vlsft train` downloads what is missing from {self.endpoint} with {token}"

    def to_json(self) -> dict:
        return {"hub_id": self.repo_id, "revision": self.revision, "commit": self.commit, "cache": self.cache,
                "snapshot": self.folder, "complete": self.complete, "endpoint": self.endpoint,
                "offline": self.offline, "token": self.token_var}


def repo_folder(cache: str, repo_id: str, repo_type: str = "model") -> str:
    return os.path.join(cache, f"{repo_type}s--" + repo_id.replace("/", "--"))


def locate(repo_id: str, revision: str | None, environ: Mapping[str, str], repo_type: str = "model") -> HubModel:
    """What the cache of ``environ`` holds of ``repo_id`` (a ``repo_type`` repository) at ``revision`` (no network,
    no huggingface_hub)."""
    revision = revision or DEFAULT_REVISION
    cache = cache_dir(environ)
    how = {"endpoint": endpoint(environ), "offline": offline(environ), "token_var": token_source(environ),
           "repo_type": repo_type}
    storage = repo_folder(cache, repo_id, repo_type)
    commit = revision if COMMIT.fullmatch(revision) else None
    if commit is None:
        try:
            with open(os.path.join(storage, "refs", revision), encoding="utf-8") as f:
                commit = f.read().strip() or None
        except (OSError, UnicodeDecodeError):
            commit = None
    folder = os.path.join(storage, "snapshots", commit) if commit else None
    if folder is None or not os.path.isdir(folder):
        return HubModel(repo_id, revision, cache, commit, **how)
    return HubModel(repo_id, revision, cache, commit, folder, _missing(storage, commit, folder), **how)


def _missing(storage: str, commit: str, folder: str) -> int | None:
    """Files of ``trees/<commit>.json`` (snapshot_download's listing) absent from the snapshot; None: no listing."""
    try:
        with open(os.path.join(storage, "trees", f"{commit}.json"), encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(files, dict):
        return None
    return sum(not os.path.exists(os.path.join(folder, *name.split("/"))) for name in files)


def _weights_present(folder: str) -> bool:
    """A safetensors / bin weight file, or an index whose shards are all there (no listing to go by)."""
    from qwenvl.runpolicy import MODEL_FILES

    for name in MODEL_FILES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".index.json"):
            return True
        try:
            with open(path, encoding="utf-8") as f:
                shards = set(json.load(f)["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False
        return all(os.path.isfile(os.path.join(folder, s)) for s in shards)
    return False


# --------------------------------------------------------------------------------------------------- the download

def download(repo_id: str, revision: str | None, environ: Mapping[str, str], repo_type: str = "model") -> str:
    """``snapshot_download`` of ``repo_id`` at ``revision`` into the standard cache (progress bars on stderr; the
    files already cached are not fetched again); the local snapshot folder. Offline: the cached snapshot, if whole.
    Every failure is a one-line :class:`HubError`."""
    from huggingface_hub import snapshot_download

    revision = revision or DEFAULT_REVISION
    try:
        return snapshot_download(repo_id, repo_type=repo_type, revision=revision, cache_dir=cache_dir(environ),
                                 endpoint=endpoint(environ), local_files_only=offline(environ),
                                 token=next((environ[n] for n in TOKEN_VARS if environ.get(n)), None))
    except Exception as exc:  # noqa: BLE001 - each kind is one line below; anything else too, never a traceback
        raise HubError(download_failure(repo_id, revision, environ, exc, repo_type)) from None


def download_failure(repo_id: str, revision: str, environ: Mapping[str, str], exc: Exception,
                     repo_type: str = "model") -> str:
    """One line for a failed download: what happened and the fix."""
    from huggingface_hub import errors

    from qwenvl.secrets import redact

    where, cache = endpoint(environ), cache_dir(environ)
    what = f"{'' if repo_type == 'model' else repo_type + ' '}{repo_id} (revision {revision})"
    token = f"the token in {token_source(environ)}" if token_source(environ) else "no token (set HF_TOKEN)"
    fetch = (f"`hf download {repo_id}{'' if repo_type == 'model' else f' --repo-type {repo_type}'}"
             f"{'' if revision == DEFAULT_REVISION else f' --revision {revision}'}`")
    if isinstance(exc, errors.IncompleteSnapshotError):
        line = (f"{what}: the Hugging Face cache {cache} holds an incomplete snapshot and HF_HUB_OFFLINE is on; "
                f"complete it with {fetch} where the hub is reachable (same HF_HOME), or unset HF_HUB_OFFLINE")
    elif isinstance(exc, errors.LocalEntryNotFoundError) and offline(environ):
        line = (f"{what} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is on, so it cannot be "
                f"downloaded; run {fetch} where the hub is reachable (same HF_HOME), or unset HF_HUB_OFFLINE")
    elif isinstance(exc, errors.GatedRepoError):
        line = (f"{what} on {where} is gated: accept its terms on its hub page, then export HF_TOKEN with a token "
                f"of that account (sent: {token})")
    elif isinstance(exc, errors.RepositoryNotFoundError):
        line = (f"{what} was not found on {where} (sent: {token}): check the id, or for a private {repo_type} "
                "export HF_TOKEN" + ("; a local folder is written as a path (./models/x or /models/x)"
                                     if repo_type == "model" else ""))
    elif isinstance(exc, errors.RevisionNotFoundError):
        line = f"{what}: {where} has no revision {revision!r}; check " + (
            "model.revision (a branch, tag or commit)" if repo_type == "model" else "the revision")
    elif isinstance(exc, errors.LocalEntryNotFoundError):  # no connection and nothing cached
        line = (f"cannot reach {where} to download {what}, and it is not in the Hugging Face cache {cache}: check "
                "the network (or HF_ENDPOINT), or download it elsewhere with " + fetch + " and set HF_HUB_OFFLINE=1")
    elif isinstance(exc, OSError) and getattr(exc, "errno", None) == 28:
        line = f"no space left in the Hugging Face cache {cache} while downloading {what}: free space or set HF_HOME"
    else:
        detail = " ".join(str(exc).split())[:300]
        line = f"cannot download {what} from {where}: {type(exc).__name__}: {detail}"
    return redact(line, dict(environ))
