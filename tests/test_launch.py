"""vlsft.launch: the child process runner (real processes and signals) and the SLURM topology."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vlsft.launch import first_slurm_host, run_child, slurm_topology

CHILD = r"""
import os, signal, subprocess, sys, time
marker = sys.argv[1]
# the grandchild takes SIGINT's default even when started in the background (where it is inherited as ignored),
# and says so before the child reports ready (else a signal could land while its handler is not yet there)
grand = subprocess.Popen([sys.executable, "-c",
                          "import signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler); "
                          "open(sys.argv[1], 'w').write('1'); time.sleep(120)", marker + ".grand-ready"])
open(marker + ".grandchild", "w").write(str(grand.pid))
while not os.path.exists(marker + ".grand-ready"):
    time.sleep(0.02)
def on_term(signum, frame):
    open(marker, "w").write(f"got {signum}")
    sys.exit(7)
if sys.argv[2] == "obey":
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
open(marker + ".ready", "w").write("1")
time.sleep(120)
"""

WRAPPER = r"""
import sys
from vlsft.launch import run_child
sys.exit(run_child([sys.executable, "-c", sys.argv[1], sys.argv[2], sys.argv[3]], grace_s=float(sys.argv[4])))
"""


def _wait_for(path: Path, timeout: float = 30) -> None:
    t0 = time.time()
    while not path.exists():
        assert time.time() - t0 < timeout, f"{path} never appeared"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its dead parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_is_forwarded_and_exit_code_returned(tmp_path, sig):
    marker = tmp_path / "child"
    wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, CHILD, str(marker), "obey", "30"])
    _wait_for(Path(str(marker) + ".ready"))
    grand = int(Path(str(marker) + ".grandchild").read_text())
    wrapper.send_signal(sig)
    assert wrapper.wait(timeout=30) == 7  # the child's own exit status comes back
    assert marker.read_text() == f"got {int(sig)}"
    t0 = time.time()  # the whole process group got the signal: the grandchild is gone too
    while _alive(grand) and time.time() - t0 < 10:
        time.sleep(0.05)
    assert not _alive(grand)


def test_stubborn_child_is_killed_after_grace(tmp_path):
    marker = tmp_path / "child"
    wrapper = subprocess.Popen([sys.executable, "-c", WRAPPER, CHILD, str(marker), "ignore", "1"])
    _wait_for(Path(str(marker) + ".ready"))
    t0 = time.time()
    wrapper.send_signal(signal.SIGTERM)
    assert wrapper.wait(timeout=30) == 128 + signal.SIGKILL
    assert time.time() - t0 < 15


def test_exit_status_and_argv_list_only():
    assert run_child([sys.executable, "-c", "import sys; sys.exit(5)"]) == 5
    assert run_child([sys.executable, "-c", "print('a b; echo c')"]) == 0
    with pytest.raises(TypeError):
        run_child("echo hi")  # type: ignore[arg-type]


@pytest.mark.parametrize("nodelist,first", [
    ("gpu[03-05,09],cpu1", "gpu03"), ("node01", "node01"), ("a1,b2", "a1"), ("dgx-[7,9]", "dgx-7"),
    ("n[0001-0004]", "n0001"), ("gpu[01-04]", "gpu01"), ("node-a,node-b", "node-a"), ("gpu[01,03-05]", "gpu01"),
    ("rack[1-2]-n[07-08]", "rack1-n07"), ("node[1-2]-ib,login", "node1-ib"), (" host1 ", "host1"),
    ("10.0.0.[5-8]", "10.0.0.5"), ("a[7]", "a7"), ("gpu[01", "gpu[01"),
])
def test_first_slurm_host(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_slurm_topology_and_yaml_precedence(tmp_path):
    assert slurm_topology({}) == {}
    env = {"SLURM_JOB_ID": "42", "SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[10-13]"}
    assert slurm_topology(env) == {"nnodes": 4, "node_rank": 2, "master_addr": "gpu10", "master_port": 29542}

    from vlsft.cmd_train import apply_slurm
    from vlsft.config import load_run_config

    y = tmp_path / "run.yaml"
    y.write_text("model: {name_or_path: m}\ndata: {dictionary: d.json}\noutput: {dir: out}\n"
                 "distributed: {nproc_per_node: 8, master_addr: head.example}\n")
    cfg = load_run_config(y)
    taken = apply_slurm(cfg, env)
    # nnodes and node_rank come from SLURM; master_addr set in the YAML wins
    assert (cfg.distributed.nnodes, cfg.distributed.node_rank) == (4, 2)
    assert cfg.distributed.master_addr == "head.example"
    assert taken == ["distributed.nnodes=4", "distributed.node_rank=2", "distributed.master_port=29542"]
    cfg = load_run_config(y, ["distributed.nnodes=4", "distributed.node_rank=3"])
    assert apply_slurm(cfg, env) == ["distributed.master_port=29542"]  # explicit overrides win; the port was open
    assert cfg.distributed.node_rank == 3


def _ckpt(root: Path, step: int, complete: bool = True) -> Path:
    from test_runpolicy import write_checkpoint

    return write_checkpoint(root / f"checkpoint-{step}", step, state=complete)


def test_resume_decisions(tmp_path):
    from qwenvl.train import UserError, decide_resume, set_aside_old_checkpoints

    out = tmp_path / "out"
    assert decide_resume(str(out), "auto", False) is None  # nothing there: fresh
    out.mkdir()
    (out / "vlsft").mkdir()  # vlsft's own run files do not count as an earlier run
    assert decide_resume(str(out), "never", False) is None
    _ckpt(out, 5)
    _ckpt(out, 10)
    _ckpt(out, 15, complete=False)  # half-written: skipped
    assert decide_resume(str(out), "auto", False) == str(out / "checkpoint-10")
    assert decide_resume(str(out), str(out / "checkpoint-5"), False) == str(out / "checkpoint-5")
    with pytest.raises(UserError, match="incomplete"):
        decide_resume(str(out), str(out / "checkpoint-15"), False)
    with pytest.raises(UserError, match="does not exist"):
        decide_resume(str(out), str(out / "checkpoint-99"), False)
    with pytest.raises(UserError, match="already holds a run"):
        decide_resume(str(out), "never", False)
    assert decide_resume(str(out), "never", True) is None
    for name in ("model.safetensors", "config.json", "trainer_state.json"):  # the earlier run's final model
        (out / name).write_text(name)
    (out / "runs").mkdir()  # its logs
    (out / "vlsft" / "run.yaml").write_text("new run")
    moved = set_aside_old_checkpoints(str(out))
    assert sorted(p.name for p in moved.iterdir()) == ["checkpoint-10", "checkpoint-15", "checkpoint-5", "config.json",
                                                       "model.safetensors", "runs", "trainer_state.json"]
    assert (moved / "model.safetensors").read_text() == "model.safetensors"  # kept, not overwritten by the new save
    assert sorted(p.name for p in out.iterdir()) == [moved.name, "vlsft"]
    assert decide_resume(str(out), "auto", False) is None
    (out / "model.safetensors").write_text("second")  # a second overwrite: another folder, the first one kept
    again = set_aside_old_checkpoints(str(out))
    assert again != moved and (again / "model.safetensors").read_text() == "second" and moved.is_dir()
    # a finished run without checkpoints (final model only) is not overwritten by accident
    fin = tmp_path / "fin"
    fin.mkdir()
    (fin / "model.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="no complete checkpoint to resume") as err:
        decide_resume(str(fin), "auto", False)
    assert "resume=auto" not in str(err.value)  # the advice must not be the setting that just failed


def test_slurm_topology_variants():
    base = {"SLURM_JOB_ID": "7"}
    assert slurm_topology({**base, "SLURM_JOB_NUM_NODES": "2", "SLURM_NODELIST": "x[3-4]"}) == {
        "nnodes": 2, "master_addr": "x3", "master_port": 29507}
    # the port follows the job: two jobs whose first node is the same machine do not collide
    assert slurm_topology({"SLURM_JOB_ID": "1234567", "SLURM_NNODES": "2"})["master_port"] == 30067
    assert "master_port" not in slurm_topology({"SLURM_JOB_ID": "x1", "SLURM_NNODES": "2"})  # not a number: 29500
    assert slurm_topology({**base, "SLURM_NNODES": "0", "SLURM_NODEID": " 1 ", "SLURM_JOB_NODELIST": " "}) == {
        "node_rank": 1}
    assert slurm_topology({"SLURM_NNODES": "4"}) == {}  # not inside a job
