"""Run the launch command as a child process; forward signals; return its exit status (torch-free).

* The child gets its own process group (``start_new_session``), so a Ctrl-C in the terminal reaches
  only ``vlsft``, which forwards SIGINT / SIGTERM to the child's whole group (torchrun and its ranks).
  A second signal, or a child still alive ``grace_s`` seconds after the first, gets SIGKILL.
* The command is an argv list, never a shell string.
* A rank that dies makes torchrun stop the other ranks and exit non-zero (its default failure
  handling with no restarts); that status is returned, so ``vlsft train`` ends promptly.
* Under SLURM, :func:`slurm_topology` supplies ``nnodes`` / ``node_rank`` / ``master_addr`` from
  ``SLURM_NNODES`` / ``SLURM_NODEID`` / the first host of ``SLURM_JOB_NODELIST``.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # subprocess/threading load only when a child is run (print-args needs just the SLURM parser)
    import subprocess

FORWARDED = (signal.SIGINT, signal.SIGTERM)


def run_child(argv: Sequence[str], env: Mapping[str, str] | None = None, *, grace_s: float = 60.0,
              cwd: str | None = None) -> int:
    """Run ``argv``; return its exit status (128 + N when it died of signal N)."""
    if isinstance(argv, str):  # never a shell string
        raise TypeError("argv must be a list of arguments, not a string")
    import subprocess
    import threading

    proc = subprocess.Popen(list(argv), env=dict(env) if env is not None else None, cwd=cwd,
                            start_new_session=True)
    received: list[int] = []
    killer: list[threading.Timer] = []

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
    finally:
        for t in killer:
            t.cancel()
        if in_main:
            for s, h in previous.items():
                signal.signal(s, h)
    return 128 - rc if rc < 0 else rc


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
    """``nnodes`` / ``node_rank`` / ``master_addr`` derived from SLURM variables (empty outside SLURM)."""
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
    return out
