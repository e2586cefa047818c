"""Run the launch command as a child process; forward signals; return its exit status (torch-free).

* The child gets its own process group (``start_new_session``), so a Ctrl-C in the terminal reaches
  only ``vlsft``, which forwards SIGINT / SIGTERM / SIGHUP (a closed terminal or ssh session) to the
  child's whole group (torchrun and its ranks). A second signal, or a child still alive ``grace_s``
  seconds after the first, gets SIGKILL.
* The child dies with its launcher: it is started with ``PR_SET_PDEATHSIG`` = SIGKILL (Linux), so
  ``kill -9`` of ``vlsft`` ends torchrun at once, and each rank, watching torchrun
  (:mod:`qwenvl.stopsignal`), stops within seconds - also in the middle of a checkpoint save (a SIGTERM there
  would have torchrun ask the ranks for one more checkpoint and wait up to 30 s; a hard kill means "stop now",
  and ``resume: auto`` skips a half-written checkpoint).
* The command is an argv list, never a shell string.
* A rank that dies makes torchrun stop the other ranks and exit non-zero (its default failure
  handling with no restarts); that status is returned, so ``vlsft train`` ends promptly.
* :func:`launch` (``vlsft train``) also pipes the child's stderr through :class:`StderrFilter`: every
  byte goes to a log file, and the terminal gets everything live (progress bars included) except
  torchrun's own closing traceback (``ChildFailedError`` / ``SignalException``, ~30 lines that repeat
  what the failing rank's ``error:`` line said). Its status follows the rank: 2 when the rank exited 2
  (an input error), 128 + N when ``vlsft`` got signal N (130 SIGINT, 143 SIGTERM, 129 SIGHUP), the
  failing rank's own status otherwise.
* Under SLURM, :func:`slurm_topology` supplies ``nnodes`` / ``node_rank`` / ``master_addr`` from
  ``SLURM_NNODES`` / ``SLURM_NODEID`` / the first host of ``SLURM_JOB_NODELIST``, and for several nodes a
  ``master_port`` derived from ``SLURM_JOB_ID`` (:func:`slurm_port`).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:  # subprocess/threading load only when a child is run (print-args needs just the SLURM parser)
    import subprocess

FORWARDED = tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s is not None)
PR_SET_PDEATHSIG = 1


@dataclass
class LaunchResult:
    status: int  # what `vlsft train` exits with (see the module docstring)
    child_status: int  # torchrun's own exit status (128 + N when it died of signal N)
    signal: int | None = None  # the first signal vlsft received and forwarded
    rank_status: int | None = None  # the failing rank's exit status, as torchrun reported it
    log: str | None = None


def _die_with_parent(parent: int):
    """preexec_fn: SIGTERM this child when its parent (vlsft) dies, even by SIGKILL (Linux prctl)."""

    def set_pdeathsig() -> None:
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):  # not Linux: the launcher's signal forwarding still applies
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(128 + int(signal.SIGKILL))

    return set_pdeathsig


_GLOG = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S*torch/distributed/elastic/\S+\] ")
_NOISE = re.compile(r"failed \(exitcode: |Sending process \d+ closing signal|Received \w+ death signal|"
                    r"Unable to shutdown process|Stopping worker group|Process \d+ got signal")
_FAILED = re.compile(r"failed \(exitcode: (-?\d+)\)")
_ROOT_EXIT = re.compile(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.S)


class StderrFilter:
    """Copies the child's stderr to ``log`` (all of it) and to ``out`` (all but torchrun's own failure report).

    Fed raw chunks: complete lines are judged one by one; a partial line holding a carriage return (a
    progress bar redrawing itself) is written at once so progress stays live.
    """

    def __init__(self, out: IO[bytes], log: IO[bytes] | None = None):
        self.out, self.log = out, log
        self.pending = b""
        self.partial = False  # part of the current line was already written
        self.held: list[bytes] | None = None  # a traceback being read: whose is it?
        self.suppress = False  # torchrun's report started: the rest goes to the log only
        self.report = ""
        self.rank_status: int | None = None

    def feed(self, chunk: bytes) -> None:
        if self.log is not None:
            self.log.write(chunk)
            self.log.flush()
        if self.suppress:
            self._note(chunk.decode("utf-8", "replace"))
            return
        *lines, self.pending = (self.pending + chunk).split(b"\n")
        for line in lines:
            self._line(line + b"\n")
        if self.pending and b"\r" in self.pending and self.held is None and not self.suppress:
            self._write(self.pending)
            self.pending, self.partial = b"", True

    def close(self) -> None:
        if self.pending:
            self._line(self.pending)
            self.pending = b""
        if self.held and not self.suppress:
            self._write(b"".join(self.held))
        self.held = None
        if self.report:
            m = _ROOT_EXIT.search(self.report)
            if m:
                self.rank_status = int(m.group(1))

    def _note(self, text: str) -> None:
        if len(self.report) < 1 << 16:
            self.report += text

    def _line(self, line: bytes) -> None:
        if self.suppress:
            self._note(line.decode("utf-8", "replace"))
            return
        if self.partial:
            self.partial = False
            self._write(line)
            return
        text = line.decode("utf-8", "replace")
        if self.held is not None:
            self.held.append(line)
            if text.startswith((" ", "\t")) or not text.strip():
                return
            block = b"".join(self.held)
            self.held = None
            if text.startswith("torch.distributed.elastic.") or b"/torchrun\"" in block or \
                    b"torch/distributed/run.py" in block:
                self.suppress = True
                self._note(block.decode("utf-8", "replace"))
            else:
                self._write(block)
            return
        if text.startswith("Traceback (most recent call last):"):
            self.held = [line]
            return
        m = _FAILED.search(text)
        if m and self.rank_status is None:
            self.rank_status = int(m.group(1))
        if _GLOG.match(text) and _NOISE.search(text):
            return
        self._write(line)

    def _write(self, data: bytes) -> None:
        try:
            self.out.write(data)
            self.out.flush()
        except (OSError, ValueError):  # the terminal went away (SIGHUP); the log still has everything
            pass


def run_child(argv: Sequence[str], env: Mapping[str, str] | None = None, *, grace_s: float = 60.0,
              cwd: str | None = None) -> int:
    """Run ``argv``; return its exit status (128 + N when it died of signal N)."""
    return launch(argv, env, grace_s=grace_s, cwd=cwd, filter_stderr=False).child_status


def launch(argv: Sequence[str], env: Mapping[str, str] | None = None, *, grace_s: float = 60.0,
           cwd: str | None = None, log_path: str | os.PathLike | None = None,
           filter_stderr: bool = True) -> LaunchResult:
    """Run ``argv`` (see the module docstring); ``log_path``: where the child's full stderr is appended."""
    if isinstance(argv, str):  # never a shell string
        raise TypeError("argv must be a list of arguments, not a string")
    import subprocess
    import sys
    import threading

    log, log_path = _open_log(log_path, argv)
    piped = filter_stderr or log is not None
    proc = subprocess.Popen(list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                            start_new_session=True, preexec_fn=_die_with_parent(os.getpid()),
                            stderr=subprocess.PIPE if piped else None)
    received: list[int] = []
    killer: list[threading.Timer] = []
    filt = StderrFilter(sys.stderr.buffer if filter_stderr else _Null(), log) if piped else None
    reader = _pump_stderr(proc, filt) if filt is not None else None

    def _kill_group() -> None:
        _signal_group(proc, signal.SIGKILL)

    def _forward(signum, _frame) -> None:
        received.append(signum)
        if len(received) == 1:
            _signal_group(proc, signum)
            t = threading.Timer(grace_s, _kill_group)
            t.daemon = True
            t.start()
            killer.append(t)
        else:
            _kill_group()

    previous = {}
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        for s in FORWARDED:
            previous[s] = signal.signal(s, _forward)
    try:
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:  # pragma: no cover - handler replaced SIGINT
                _forward(signal.SIGINT, None)
        if reader is not None:
            reader.join(timeout=10)
            filt.close()
    finally:
        for t in killer:
            t.cancel()
        if in_main:
            for s, h in previous.items():
                signal.signal(s, h)
        if log is not None:
            log.close()
    return _result(rc, filt, received, log_path)


def _open_log(log_path: str | os.PathLike | None, argv: Sequence[str]):
    """(the log file opened for appending, its path), or (None, None) when it cannot be opened (the run goes on
    unlogged); a full disk is raised."""
    if log_path is None:
        return None, None
    try:
        # never through a link (a user's file put there): O_NOFOLLOW fails on one, and the run goes on unlogged
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        log = os.fdopen(fd, "ab")  # noqa: SIM115 - closed by launch
        log.write(f"=== {' '.join(argv)}\n".encode())
    except OSError as exc:
        import errno

        if exc.errno == errno.ENOSPC:
            raise
        return None, None
    return log, log_path


def _pump_stderr(proc, filt: StderrFilter):
    """A daemon thread feeding the child's stderr to ``filt`` until it closes."""
    import threading

    def pump() -> None:
        fd = proc.stderr.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            filt.feed(chunk)

    reader = threading.Thread(target=pump, name="stderr-filter", daemon=True)
    reader.start()
    return reader


def _result(rc: int, filt: StderrFilter | None, received: list[int], log_path) -> LaunchResult:
    """The exit status: 128 + N after forwarding signal N; 0 for a clean exit; on a failure the failing rank's own
    status when the launcher's output named one, else the launcher's."""
    child = 128 - rc if rc < 0 else rc
    rank = filt.rank_status if filt is not None else None
    if received:
        status = 128 + int(received[0])
    elif child == 0:
        status = 0
    elif rank is not None and rank != 0:
        status = 128 - rank if rank < 0 else rank
    else:
        status = child
    return LaunchResult(status=status, child_status=child, signal=int(received[0]) if received else None,
                        rank_status=rank, log=str(log_path) if log_path is not None else None)


class _Null:
    def write(self, data) -> int:
        return len(data)

    def flush(self) -> None:
        pass


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM hostlist: ``gpu[03-05,09],cpu1`` -> ``gpu03``, ``rack[1-2]-n[07-08]`` -> ``rack1-n07``.

    Commas inside brackets do not separate hosts; every bracket group contributes its first value (zero
    padding kept: ``n[0001-0004]`` -> ``n0001``). A malformed list (unclosed bracket) returns its first item as is.
    """
    nodelist = nodelist.strip()
    host, depth = [], 0
    for ch in nodelist:
        if ch == "," and depth == 0:
            break
        depth += ch == "["
        depth -= ch == "]"
        host.append(ch)
    first = "".join(host).strip()
    if depth != 0:
        return first
    return re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(",")[0].split("-")[0].strip(), first)


def slurm_topology(environ: Mapping[str, str]) -> dict[str, object]:
    """``nnodes`` / ``node_rank`` / ``master_addr`` (and ``master_port`` for several nodes) derived from SLURM
    variables (empty outside SLURM)."""
    out: dict[str, object] = {}
    if not environ.get("SLURM_JOB_ID") and not environ.get("SLURM_NODEID"):
        return out
    nnodes = environ.get("SLURM_NNODES") or environ.get("SLURM_JOB_NUM_NODES") or ""
    if nnodes.strip().isdigit() and int(nnodes) > 0:
        out["nnodes"] = int(nnodes)
    if environ.get("SLURM_NODEID", "").strip().isdigit():
        out["node_rank"] = int(environ["SLURM_NODEID"])
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    if nodelist and nodelist.strip() and first_slurm_host(nodelist):
        out["master_addr"] = first_slurm_host(nodelist)
    job = (environ.get("SLURM_JOB_ID") or "").strip()
    if out.get("nnodes", 1) > 1 and job.isdigit():
        out["master_port"] = slurm_port(int(job))
    return out


def slurm_port(job_id: int) -> int:
    """The rendezvous port of a multi-node SLURM job: 29500 + job id mod 1000, the same on every node of the job
    and, unlike a fixed 29500, different for two jobs whose first node is the same machine (below the Linux
    ephemeral range, which starts at 32768)."""
    return 29500 + job_id % 1000
