"""Writing a file or a folder the user named, safely (torch-free).

Every writer of a user-named destination (``datasets convert --out``, ``predict --out``, ``datasets preview
--draw``) goes through here, so a bad destination is ONE line (:class:`UnsafeTarget`, a
:class:`~qwenvl.problems.UserError`: exit 2) and nothing half-written is ever left:

* :func:`target_problem` refuses, before anything is written: a target that is a symbolic link (dangling or
  not: writing through it would write where the user did not name), a path under a regular file, a name longer
  than the filesystem allows (``File name too long``), and a folder this process cannot write in;
* :func:`atomic_file` writes into a temporary name in the destination folder, flushes and fsyncs it, then
  renames it into place (``exclusive``: never over an existing file); the temporary is removed on any error and
  on SIGINT / SIGTERM / SIGHUP (:class:`Interrupted`, exit 128 + N);
* :func:`atomic_folder` does the same for a whole new (or empty) folder: a hidden temporary folder beside it,
  renamed into place when complete; one left by a killed process (``kill -9``) is removed by the next.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from qwenvl.problems import UserError

_TMP_MARK = ".vlsft-tmp-"


class UnsafeTarget(UserError):
    """A destination vlsft will not write to (one line)."""


class Interrupted(BaseException):
    """A stop signal arrived while writing; the temporary is already removed."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    def message(self, what: str) -> str:
        name = signal.Signals(self.signum).name
        return f"error: interrupted by {name}: nothing was written to {what}; run it again"


def name_max(folder: str | os.PathLike) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _existing_ancestor(p: Path) -> Path:
    q = p
    while not os.path.lexists(q) and q != q.parent:
        q = q.parent
    return q


def name_problem(path: str | os.PathLike, what: str) -> str | None:
    """Why a part of ``path`` is longer than the filesystem allows (OSError 36, File name too long), else None."""
    p = Path(os.path.abspath(path))
    anc = _existing_ancestor(p.parent)
    limit = name_max(anc if os.path.lexists(anc) else "/")
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            short = part if len(part) <= 40 else part[:20] + "..." + part[-10:]
            return (f"{what} {short if len(str(path)) > 200 else path}: the name '{short}' is "
                    f"{len(os.fsencode(part))} bytes long, more than the filesystem allows ({limit}): choose a "
                    "shorter name")
    return None


def target_problem(path: str | os.PathLike, what: str, *, folder: bool = False) -> str | None:
    """Why ``path`` cannot be written safely (one line naming ``what``, e.g. ``--out``), else None.
    ``folder``: the target is a folder to create (it may exist as an empty folder)."""
    long = name_problem(path, what)
    if long:
        return long
    p = Path(os.path.abspath(path))
    if os.path.islink(p):
        return (f"{what} {path} is a symbolic link (to {os.readlink(p)}): vlsft does not write through links; "
                "give the real path or a new name")
    if folder:
        if os.path.exists(p) and not os.path.isdir(p):
            return f"{what} {path} is a file, not a folder: give a new folder (nothing is overwritten)"
    # walk up: a parent that is a file, a dangling link, or an unwritable folder
    q = p.parent
    while q != q.parent:
        if os.path.islink(q) and not os.path.exists(q):
            return (f"{what} {path}: {q} is a symbolic link to {os.readlink(q)}, which does not exist: create the "
                    "folder it points to or give another path")
        if os.path.exists(q):
            if not os.path.isdir(q):
                return f"{what} {path}: {q} is a file, not a folder: give a path in a folder"
            if not os.access(q, os.W_OK | os.X_OK):
                return f"{what} {path}: cannot write in the folder {q} (permission denied): choose a folder you can write"
            break
        q = q.parent
    return None


def check_target(path: str | os.PathLike, what: str, *, folder: bool = False) -> None:
    why = target_problem(path, what, folder=folder)
    if why:
        raise UnsafeTarget(why)


def os_error_line(exc: OSError, path: str | os.PathLike, what: str) -> str:
    """One line for an OSError met while writing ``path``."""
    reason = exc.strerror or str(exc)
    hint = {errno.EACCES: "choose a folder you can write", errno.EPERM: "choose a folder you can write",
            errno.EROFS: "the filesystem is read-only: choose another place",
            errno.ENOSPC: "free some space or choose another disk",
            errno.ENAMETOOLONG: "choose a shorter name", errno.ENOTDIR: "a part of the path is a file, not a folder",
            errno.ENOENT: "create the folder first or give another path"}.get(exc.errno, "check the path")
    return f"{what} {path}: cannot write: {reason}: {hint} (nothing was written)"


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT / SIGTERM / SIGHUP raise :class:`Interrupted` (once; repeats are ignored so the cleanup finishes);
    the previous handlers come back afterwards. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []

    def handler(signum, _frame) -> None:
        if got:
            return
        got.append(signum)
        raise Interrupted(signum)

    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is not None:
            with contextlib.suppress(OSError, ValueError):
                previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, old)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, what: str, *, mode: str = "w", exclusive: bool = True,
                mkdir: bool = False) -> Iterator[IO]:
    """A file object on a temporary file beside ``path``; on success it is fsynced and renamed to ``path``.
    :class:`UnsafeTarget` (nothing written) for a bad destination or an existing ``path`` when ``exclusive``."""
    check_target(path, what)
    p = Path(os.path.abspath(path))
    if exclusive and os.path.lexists(p):
        raise UnsafeTarget(f"{what} {path} exists: vlsft never overwrites a file; give a new path")
    with signals_raise():  # before the temporary exists: a stop signal right after it is made still removes it
        tmp = ""
        try:
            if mkdir:
                p.parent.mkdir(parents=True, exist_ok=True)
            while not tmp:  # the name is known before the file exists: a stop signal at any instant removes it
                tmp = f"{p.parent / ('.' + p.name[:100])}{_TMP_MARK}{os.getpid()}-{next(_made)}"
                try:
                    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
                except FileExistsError:  # left by an earlier process with this pid: not ours, the next name
                    tmp = ""
            with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
            if exclusive:
                try:
                    os.link(tmp, p)  # fails if the name appeared meanwhile: never over someone's file
                    os.unlink(tmp)
                except OSError as exc:  # a filesystem without hard links: a rename, the name checked just before
                    if exc.errno == errno.EEXIST or os.path.lexists(p):
                        raise UnsafeTarget(f"{what} {path} exists: vlsft never overwrites a file; give a new "
                                           "path") from None
                    os.replace(tmp, p)
            else:
                os.replace(tmp, p)
        except OSError as exc:
            with contextlib.suppress(OSError):
                if tmp:
                    os.unlink(tmp)
            raise UnsafeTarget(os_error_line(exc, path, what)) from None
        except BaseException:
            with contextlib.suppress(OSError):
                if tmp:
                    os.unlink(tmp)
            raise


_made = itertools.count()  # atomic_file's temporaries in this process


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def _remove_stale(out: Path) -> None:
    """Temporary folders of earlier writes to ``out`` whose process is gone (killed with SIGKILL)."""
    for p in out.parent.glob(f".{out.name}{_TMP_MARK}*"):
        pid = p.name.rpartition("-")[2]
        if not pid.isdigit() or not p.is_dir() or p.is_symlink():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        with contextlib.suppress(OSError):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


@contextlib.contextmanager
def atomic_folder(out: str | os.PathLike, what: str) -> Iterator[Path]:
    """A hidden temporary folder beside ``out`` to write into; renamed to ``out`` (new, or an empty folder) when
    the block ends normally; removed on any error and on a stop signal (:class:`Interrupted`)."""
    check_target(out, what, folder=True)
    p = Path(os.path.abspath(out))
    if os.path.isdir(p) and os.listdir(p):
        raise UnsafeTarget(f"{what} {out} exists and is not an empty folder: nothing is overwritten; give a new "
                           "folder")
    tmp = p.parent / f".{p.name}{_TMP_MARK}{os.getpid()}"
    with signals_raise():  # before the folder exists: a stop signal right after mkdir still removes it
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(p)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            yield tmp
            _fsync_tree(tmp)
            if os.path.isdir(p) and not os.path.islink(p):
                if os.listdir(p):
                    raise UnsafeTarget(f"{what} {out} was filled while vlsft wrote: nothing is overwritten; give a "
                                       "new folder")
                p.rmdir()
            tmp.rename(p)
        except OSError as exc:
            raise UnsafeTarget(os_error_line(exc, out, what)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
