"""Pre-flight across nodes (src/vlsft/preflight.py): two "nodes" on loopback. A wrong master address, a closed
port, a node with another dataset dictionary, a node that never joins: each ends in one clear line on the nodes
concerned within seconds (VLSFT_PREFLIGHT_TIMEOUT), before any model loads, nothing left running; nodes that agree
go on together."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vlsft import preflight

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plan(node_rank: int, port: int, dictionary: Path, args=("--a", "1"), addr="127.0.0.1", nnodes=2):
    dist = SimpleNamespace(nnodes=nnodes, node_rank=node_rank, master_addr=addr, master_port=port)
    return SimpleNamespace(trainer_args=list(args), config=SimpleNamespace(
        distributed=dist, data=SimpleNamespace(dictionary=str(dictionary))))


def _both(plan0, plan1, env=None):
    """Run node 0 and node 1 concurrently; each side's exception (or None)."""
    env = env or {preflight.TIMEOUT_ENV: "5"}
    out = {}

    def side(name, plan):
        try:
            preflight.run(plan, env)
            out[name] = None
        except preflight.PreflightError as exc:
            out[name] = str(exc)

    threads = [threading.Thread(target=side, args=("node0", plan0)), threading.Thread(target=side, args=("node1", plan1))]
    for t in threads:
        t.start()
        time.sleep(0.3)  # node 1 starts after node 0 (it retries while node 0 is not up anyway)
    for t in threads:
        t.join(30)
    return out


def test_agreeing_nodes_go_together_and_a_single_node_does_nothing(tmp_path):
    d = tmp_path / "dict.json"
    d.write_text("{}")
    port = _port()
    assert _both(_plan(0, port, d), _plan(1, port, d)) == {"node0": None, "node1": None}
    preflight.run(_plan(0, port, d, nnodes=1))  # returns at once: no socket, nothing to meet


def test_a_node_with_another_plan_or_dictionary_is_named_on_both_sides(tmp_path):
    d0, d1 = tmp_path / "a.json", tmp_path / "b.json"
    d0.write_text('{"x": 1}')
    d1.write_text('{"x": 2}')
    port = _port()
    out = _both(_plan(0, port, d0), _plan(1, port, d1))
    assert "node 1" in out["node0"] and "dataset dictionary" in out["node0"] and "\n" not in out["node0"]
    assert "differs from node 0" in out["node1"] and "dataset dictionary" in out["node1"]
    port = _port()
    out = _both(_plan(0, port, d0), _plan(1, port, d0, args=("--a", "2")))
    assert "run plan (trainer arguments)" in out["node0"] and "run plan" in out["node1"]


def test_a_node_that_never_joins_and_a_closed_port_end_within_the_timeout(tmp_path):
    d = tmp_path / "dict.json"
    d.write_text("{}")
    env = {preflight.TIMEOUT_ENV: "2"}
    t0 = time.monotonic()
    with pytest.raises(preflight.PreflightError, match=r"node\(s\) 1 never joined node 0"):
        preflight.run(_plan(0, _port(), d), env)
    with pytest.raises(preflight.PreflightError, match="could not start with node 0 at 127.0.0.1:.*refused"):
        preflight.run(_plan(1, _port(), d), env)  # nobody listens there
    assert time.monotonic() - t0 < 10
    with pytest.raises(preflight.PreflightError, match="does not resolve on node 1"):
        preflight.run(_plan(1, _port(), d, addr="no-such-host.invalid"), env)


def _env(tmp_path) -> dict:
    e = dict(os.environ)
    e.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1", VLSFT_PREFLIGHT_TIMEOUT="4")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    return e


def test_vlsft_train_ends_in_one_line_before_the_model_loads(tmp_path):
    """The real front door of two nodes with different dictionaries, and of a node whose master does not resolve:
    exit 2, one error line each, no rank started (no logs folder), no process left behind."""
    demo = REPO / "configs" / "demo" / "Dataset-Dictionary.json"
    other = tmp_path / "dict" / "Dataset-Dictionary.json"
    shutil.copytree(demo.parent, other.parent)
    data = json.loads(other.read_text())
    first = next(iter(data))
    data[first]["sampling_rate"] = 0.5
    other.write_text(json.dumps(data))
    port = _port()

    def node(rank: int, dictionary: Path, addr: str = "127.0.0.1") -> subprocess.Popen:
        return subprocess.Popen(
            [VLSFT, "train", "--config", str(REPO / "configs" / "demo.yaml"), f"output.dir={tmp_path / f'out{rank}'}",
             f"data.dictionary={dictionary}", "distributed.nnodes=2", f"distributed.node_rank={rank}",
             f"distributed.master_addr={addr}", f"distributed.master_port={port}", "distributed.nproc_per_node=1"],
            env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)

    p0 = node(0, demo)
    time.sleep(1)
    p1 = node(1, other)
    for p, rank in ((p0, 0), (p1, 1)):
        _, err = p.communicate(timeout=120)
        lines = [x for x in err.splitlines() if x.strip()]
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
        assert "node 1" in lines[0] and "dataset dictionary" in lines[0], lines
        assert not (tmp_path / f"out{rank}" / "logs").exists()
    p = node(1, demo, addr="no-such-host.invalid")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "distributed.master_addr 'no-such-host.invalid' does not resolve" in err, err
