"""Media existence for the deep check: local folders by one listing each, http(s) URLs by HEAD (torch-free).

A video may be a folder of frame images (LLaVA-Video, ShareGPTVideo, InternVL: ``"video": "videos/clip_0001/"``):
:func:`frame_files` lists its image files in natural order, shared by the trainer (:mod:`qwenvl.data.vision`),
the deep check and ``--decode``.

A media file is a regular file this process can read: a folder named ``x.png``, a dangling symbolic
link and a symlink loop are not (the trainer could not open them either; the same rule as
:func:`qwenvl.data.sample_rules.local_media_problem`). A web server has no listing: one HEAD request per
URL, a host that does not answer is tried once.
"""

from __future__ import annotations

import os
import re

from qwenvl import storage
from qwenvl.data.sample_rules import local_media_problem
from qwenvl.secrets import mask_urls, url_host, url_without_userinfo


def local_listing(folder: str) -> tuple[set[str], set[str]]:
    """``(regular files, every name)`` directly inside ``folder`` (both empty when it cannot be listed).

    One ``scandir`` per folder: the entry type comes with the listing, so only symbolic links cost a
    ``stat`` (a dangling link or a loop is not a file)."""
    files: set[str] = set()
    names: set[str] = set()
    try:
        it = os.scandir(folder)
    except OSError:
        return files, names
    with it:
        for entry in it:
            names.add(entry.name)
            try:
                if entry.is_file():
                    files.add(entry.name)
            except OSError:
                pass
    return files, names


#: the files of a frame folder that are its frames (lower-cased extension); other files and hidden ones are ignored
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple:
    """Sort key with digit runs compared as numbers (``frame_2`` before ``frame_10``); equal numbers written
    differently (``01`` / ``1``) are ordered by the name itself."""
    parts: list = _DIGITS.split(name)
    parts[1::2] = [int(p) for p in parts[1::2]]
    return parts, name


def is_frame_folder(path: str) -> bool:
    """Whether a video path names a folder of frames: a path ending with ``/``, or a local folder."""
    if path[-1:] == "/":
        return not storage.is_http_url(path)  # a web server has no listing: read (and refused) as a file
    return not storage.is_url(path) and os.path.isdir(path)


def _is_frame(name: str) -> bool:
    return name[:1] != "." and os.path.splitext(name)[1].lower() in FRAME_EXTENSIONS


def frame_files(folder: str) -> tuple[list[str], str | None]:
    """The frames of a video given as a folder (local or object storage): the full paths of its image files
    (:data:`FRAME_EXTENSIONS`, not hidden) in natural order, or ``([], why)`` when there are none.

    Only the folder's own entries count (no subfolders). Object storage: one listing of the prefix; a storage
    error that no sample can escape (bucket, credentials, endpoint) is raised."""
    if storage.is_url(folder):
        names = storage.list_names(folder)
        kept = [n for n in names if _is_frame(n)]
        if not names:
            return [], "an empty folder or not found (a video given as frames needs its image files)"
    else:
        names, kept = set(), []
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    names.add(entry.name)
                    try:
                        if _is_frame(entry.name) and entry.is_file():
                            kept.append(entry.name)
                    except OSError:
                        pass
        except FileNotFoundError:
            return [], "not found"
        except OSError as e:
            return [], f"a folder that cannot be listed ({e.strerror or type(e).__name__})"
        if not names:
            return [], "an empty folder (a video given as frames needs its image files)"
    if not kept:
        return [], (f"a folder with no image files ({len(names)} other entr{'y' if len(names) == 1 else 'ies'}; "
                    f"frames are {', '.join(FRAME_EXTENSIONS)} files)")
    base = folder if folder[-1:] == "/" else folder + "/"
    return [base + n for n in sorted(kept, key=natural_key)], None


def frame_folder_missing(missing: list[tuple[str, str, str | None]], videos: set[str]
                         ) -> list[tuple[str, str, str | None]]:
    """``missing`` (``(full, rel, why)`` of media that are not regular files) with the videos that name a folder
    of frames judged by :func:`frame_files` instead: dropped when it holds frames, else ``why`` says what it
    holds. Object-storage folders are listed LIST_CONCURRENCY at a time."""
    from concurrent.futures import ThreadPoolExecutor

    folders = [(i, full) for i, (full, rel, why) in enumerate(missing)
               if rel in videos and (why == "a folder, not a file" or (why is None and is_frame_folder(full)))]
    if not folders:
        return missing

    def judge(full: str) -> str | None:
        try:
            return frame_files(full)[1]
        except storage.StorageError as e:
            return f"a folder that cannot be listed ({e})"

    remote = [full for _, full in folders if storage.is_url(full)]
    with ThreadPoolExecutor(max_workers=min(storage.LIST_CONCURRENCY, max(1, len(remote)))) as pool:
        verdicts = dict(zip(remote, pool.map(judge, remote), strict=True))
    judged = {i: verdicts[full] if full in verdicts else judge(full) for i, full in folders}
    out = []
    for i, (full, rel, why) in enumerate(missing):
        if i not in judged:
            out.append((full, rel, why))
        elif judged[i] is not None:  # None: a folder of frames, which is a video
            out.append((full, rel, judged[i]))
    return out


_READ_CHECK = hasattr(os, "geteuid") and os.geteuid() != 0  # root reads every file: no access() calls


def check_local(by_parent: dict[str, list[tuple[str, str, str]]], missing: list, case_twin: dict) -> None:
    """Media of local folders: a regular readable file, else ``(full, rel, why)`` in ``missing``."""
    for parent, members in by_parent.items():
        files, names = local_listing(parent or "/")
        gone = False
        for name, full, rel in members:
            if name in files:
                if _READ_CHECK and not os.access(full, os.R_OK):
                    missing.append((full, rel, "not readable (permission denied)"))
                continue
            gone = True
            missing.append((full, rel, None if name not in names else local_media_problem(full)))
        if gone:
            folded = {n.casefold(): n for n in files}  # only for folders with missing files
            for name, _, rel in members:
                if name not in names and name.casefold() in folded:
                    case_twin[rel] = folded[name.casefold()]


HTTP_TIMEOUT_S = 10.0  # per HEAD request of the http(s) media check (VLSFT_HTTP_TIMEOUT overrides)
HTTP_CONCURRENCY = 16


def _http_status(url: str, timeout: float) -> int | BaseException:
    """HTTP status of a HEAD request (a 1-byte GET when HEAD is refused), or the connection error."""
    import base64
    import urllib.error
    import urllib.request

    try:  # user:password@ is HTTP Basic authentication (as fsspec/aiohttp read the URL), not part of the host
        bare, auth = url_without_userinfo(url)
    except ValueError as e:
        return e
    auth_header = {} if auth is None else {
        "Authorization": "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode("ascii")}
    for method, headers in (("HEAD", {}), ("GET", {"Range": "bytes=0-0"})):
        try:
            with urllib.request.urlopen(urllib.request.Request(bare, method=method, headers={**headers, **auth_header}),
                                        timeout=timeout) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            if e.code in (405, 501) and method == "HEAD":
                continue
            return int(e.code)
        except (OSError, ValueError) as e:  # URLError, timeouts, refused connections, bad URLs
            return e
    return 405


def check_http(urls: dict[str, str]) -> tuple[list[tuple[str, str, str]], dict[str, tuple[str, str, int]]]:
    """``(missing [(url, rel, why)], unreachable {host: (first url, reason, media on that host)})``.

    ``host`` is ``host[:port]`` without userinfo; the URLs are returned as given (mask them with
    :func:`qwenvl.secrets.mask_url` before showing them).

    One request per URL (a web server has no listing), HTTP_CONCURRENCY at a time; a host that does not
    answer is tried once, its other URLs are not (each would wait for the timeout)."""
    from concurrent.futures import ThreadPoolExecutor

    try:
        timeout = float(os.environ.get("VLSFT_HTTP_TIMEOUT") or HTTP_TIMEOUT_S)
    except ValueError:
        timeout = HTTP_TIMEOUT_S
    by_host: dict[str, list[str]] = {}
    for url in urls:
        by_host.setdefault(url_host(url), []).append(url)  # host[:port], never the user:password@
    missing: list[tuple[str, str, str]] = []
    unreachable: dict[str, tuple[str, str, int]] = {}

    def judge(url: str, got: int | BaseException) -> None:
        if isinstance(got, BaseException):
            return
        if got == 404 or got == 410:
            missing.append((url, urls[url], f"HTTP {got}"))
        elif got >= 400:
            missing.append((url, urls[url], f"the server answers HTTP {got}"))

    with ThreadPoolExecutor(max_workers=min(HTTP_CONCURRENCY, max(1, len(urls)))) as pool:
        firsts = {host: members[0] for host, members in by_host.items()}
        rest: list[str] = []
        for (host, url), got in zip(firsts.items(), pool.map(lambda u: _http_status(u, timeout), firsts.values()),
                                    strict=True):
            if isinstance(got, BaseException):
                reason = getattr(got, "reason", None) or got
                unreachable[host] = (url, mask_urls(f"{type(reason).__name__}: {reason}" if not isinstance(reason, str)
                                                    else reason), len(by_host[host]))
                continue
            judge(url, got)
            rest.extend(by_host[host][1:])
        for url, got in zip(rest, pool.map(lambda u: _http_status(u, timeout), rest), strict=True):
            if isinstance(got, BaseException):
                missing.append((url, urls[url], f"no answer ({type(got).__name__})"))
            else:
                judge(url, got)
    return missing, unreachable
