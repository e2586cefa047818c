"""Pre-flight across nodes: every node reaches node 0 and runs the same thing, before any model loads (torch-free).

A multi-node ``vlsft train`` (``distributed.nnodes`` > 1) starts with a few seconds of checks on plain TCP, at
``master_addr:master_port`` - the port torchrun's rendezvous takes right after:

* node 0 listens there and waits for every other node (:data:`DEFAULT_TIMEOUT_S`, ``VLSFT_PREFLIGHT_TIMEOUT``);
* every other node resolves ``master_addr`` (a name that does not resolve is one line at once), connects (retrying
  while node 0 is not up yet) and sends a hello: its node rank, host name, the vlsft version, a hash of the
  trainer arguments (the run plan) and a hash of the dataset dictionary's bytes;
* node 0 compares each hello with its own and answers; when all nodes agree it tells them to go, closes the port
  and launches torchrun, as they do.

Whatever goes wrong ends on every node within the timeout in one line naming the node and what differs or what
did not answer - a wrong master address, a closed port, a node started with other code, another plan or another
dictionary, a node that never joins - instead of torchrun's silent rendezvous wait after the model has loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass

from qwenvl.problems import UserError

DEFAULT_TIMEOUT_S = 60.0
TIMEOUT_ENV = "VLSFT_PREFLIGHT_TIMEOUT"
_RETRY_S = 0.5


class PreflightError(UserError):
    """A node cannot start together with the others (one line)."""


@dataclass(frozen=True)
class Hello:
    node_rank: int
    host: str
    version: str
    plan: str  # hash of the trainer arguments (identical on every node)
    dictionary: str  # hash of the dataset dictionary's bytes ("" when it is remote)

    def differs(self, other: Hello) -> str | None:
        for key, what in (("version", "vlsft version"), ("plan", "run plan (trainer arguments)"),
                          ("dictionary", "dataset dictionary")):
            if getattr(self, key) != getattr(other, key):
                return f"{what} ({getattr(other, key)[:12]} here, {getattr(self, key)[:12]} on node 0)"
        return None


def timeout_s(environ=os.environ) -> float:
    try:
        return max(1.0, float(environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def hello_for(plan, node_rank: int) -> Hello:
    import vlsft

    digest = hashlib.sha256(json.dumps(list(plan.trainer_args)).encode()).hexdigest()
    path = str(plan.config.data.dictionary)
    dictionary = ""
    if "://" not in path:
        try:
            with open(path, "rb") as f:
                dictionary = hashlib.sha256(f.read()).hexdigest()
        except OSError:
            dictionary = "unreadable"
    return Hello(node_rank, socket.gethostname(), vlsft.__version__, digest, dictionary)


class _Conn:
    """One JSON message per line over a socket, each read bounded by a deadline."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buf = sock, b""

    def send(self, obj: dict) -> None:
        self.sock.sendall((json.dumps(obj) + "\n").encode())

    def recv(self, deadline: float) -> dict | None:
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(4096)
            except OSError:
                return None
            if not chunk:
                return None
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        try:
            return json.loads(line)
        except ValueError:
            return None

    def close(self) -> None:
        self.sock.close()


def run(plan, environ=os.environ) -> None:
    """The pre-flight of this node (nothing for a single-node run); raises :class:`PreflightError`."""
    dist = plan.config.distributed
    if dist.nnodes <= 1:
        return
    me = hello_for(plan, dist.node_rank)
    limit = timeout_s(environ)
    if dist.node_rank == 0:
        _serve(me, dist.nnodes, int(dist.master_port), limit)
    else:
        _join(me, str(dist.master_addr), int(dist.master_port), limit)


def _serve(me: Hello, nnodes: int, port: int, limit: float) -> None:
    deadline = time.monotonic() + limit
    peers: dict[int, _Conn] = {}
    with socket.create_server(("", port), reuse_port=False) as server:
        server.settimeout(_RETRY_S)
        try:
            while len(peers) < nnodes - 1 and time.monotonic() < deadline:
                try:
                    conn, _ = server.accept()
                except TimeoutError:
                    continue
                _admit(me, _Conn(conn), peers, nnodes, deadline)
            missing = [r for r in range(1, nnodes) if r not in peers]
            if missing:
                raise PreflightError(
                    f"pre-flight: node(s) {', '.join(map(str, missing))} never joined node 0 ({me.host}, port {port}) "
                    f"within {limit:g} s: start `vlsft train` with the same run YAML on every node (node_rank 0.."
                    f"{nnodes - 1}), with master_addr pointing at this machine and the port open between them")
            for conn in peers.values():
                conn.send({"go": True})
        finally:
            for conn in peers.values():
                conn.close()


def _admit(me: Hello, conn: _Conn, peers: dict, nnodes: int, deadline: float) -> None:
    got = conn.recv(deadline)
    try:
        other = Hello(**got) if isinstance(got, dict) else None
    except TypeError:
        other = None
    if other is None:
        conn.close()
        return
    why = other.differs(me) if 0 < other.node_rank < nnodes else f"node_rank {other.node_rank} is out of range"
    if why is None and other.node_rank in peers:
        why = f"node_rank {other.node_rank} is already taken by another node"
    if why:
        conn.send({"ok": False, "why": why})
        conn.close()
        raise PreflightError(f"pre-flight: node {other.node_rank} ({other.host}) differs from node 0 ({me.host}): "
                             f"{why.replace(' here,', ' there,')}: start every node from the same vlsft, run YAML "
                             "and dataset dictionary")
    conn.send({"ok": True})
    peers[other.node_rank] = conn


def _join(me: Hello, addr: str, port: int, limit: float) -> None:
    try:
        socket.getaddrinfo(addr, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise PreflightError(f"pre-flight: distributed.master_addr {addr!r} does not resolve on node {me.node_rank} "
                             f"({me.host}): {exc.strerror or exc}; set it to node 0's address") from None
    deadline = time.monotonic() + limit
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((addr, port), timeout=_RETRY_S * 4) as sock:
                conn = _Conn(sock)
                conn.send(asdict(me))
                verdict = conn.recv(deadline)
                if verdict is None:
                    last = "node 0 accepted the connection but did not answer"
                    break
                if not verdict.get("ok"):
                    raise PreflightError(f"pre-flight: node {me.node_rank} ({me.host}) differs from node 0: "
                                         f"{verdict.get('why')}: start every node from the same vlsft, run YAML "
                                         "and dataset dictionary")
                if conn.recv(deadline) is not None:  # {"go": true}: every node is here
                    return
                last = "node 0 stopped before every node had joined"
                break
        except OSError as exc:  # refused (node 0 not listening yet), unreachable, reset: try again until the deadline
            last = exc.strerror or type(exc).__name__
            time.sleep(_RETRY_S)
    raise PreflightError(f"pre-flight: node {me.node_rank} ({me.host}) could not start with node 0 at {addr}:{port} "
                         f"within {limit:g} s ({last}): start node 0 too, and check distributed.master_addr, "
                         "distributed.master_port and the firewall between the nodes")
