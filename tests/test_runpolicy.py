"""qwenvl.runpolicy: complete checkpoints, run markers, resume decisions, DeepSpeed presets, the output lock.

Checkpoints here are real files in the formats the Trainer writes (a safetensors file with a parsable header,
a JSON trainer state, DeepSpeed's ``latest`` + ``global_step*/`` zip states), cut the way a crash or a full
disk cuts them.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qwenvl.problems import UserError
from qwenvl.runpolicy import (
    DEEPSPEED_PRESETS,
    OutputLock,
    OutputLocked,
    checkpoint_problem,
    decide_resume,
    deepspeed_off,
    deepspeed_preset_path,
    run_markers,
)


def write_safetensors(path: Path, n: int = 4) -> Path:
    """A real safetensors file: 8-byte header length, JSON header, ``n`` float32 values."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]},
                         "__metadata__": {"format": "pt"}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack(f"<{n}f", *range(n)))
    return path


def write_checkpoint(d: Path, step: int, *, state: bool = True, deepspeed: bool = False) -> Path:
    """A checkpoint folder as the Trainer leaves it (``state=False``: the trainer state is not written yet)."""
    d.mkdir(parents=True, exist_ok=True)
    write_safetensors(d / "model.safetensors")
    if deepspeed:
        tag = d / f"global_step{step}"
        tag.mkdir()
        for name in ("mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"):
            with zipfile.ZipFile(tag / name, "w") as z:
                z.writestr("archive/data.pkl", b"x" * 64)
        (d / "latest").write_text(tag.name)
    if state:
        (d / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": [{"loss": 1.0}],
                                                          "max_steps": 10}))
    return d


def test_complete_checkpoint_needs_parsable_state_and_whole_weights(tmp_path):
    cp = write_checkpoint(tmp_path / "checkpoint-2", 2)
    assert checkpoint_problem(cp) is None
    state = (cp / "trainer_state.json").read_text()
    (cp / "trainer_state.json").write_text(state[: len(state) // 2])  # cut mid-write
    assert "truncated or not JSON" in checkpoint_problem(cp)
    (cp / "trainer_state.json").write_text("{}")  # JSON, but not a trainer state
    assert "lacks global_step" in checkpoint_problem(cp)
    (cp / "trainer_state.json").write_text(state)
    blob = (cp / "model.safetensors").read_bytes()
    (cp / "model.safetensors").write_bytes(blob[:-3])  # weights cut short
    assert "model.safetensors is truncated" in checkpoint_problem(cp)
    (cp / "model.safetensors").write_bytes(blob[:20])  # cut inside the header
    assert "model.safetensors" in checkpoint_problem(cp)
    (cp / "model.safetensors").unlink()
    assert checkpoint_problem(cp) == "no weights"
    # sharded: the index must name shards that exist and are whole
    write_safetensors(cp / "model-00001-of-00002.safetensors")
    (cp / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    assert "model-00002-of-00002.safetensors, which is missing" in checkpoint_problem(cp)
    write_safetensors(cp / "model-00002-of-00002.safetensors")
    assert checkpoint_problem(cp) is None
    # a pytorch_model.bin must be a whole zip
    other = write_checkpoint(tmp_path / "checkpoint-3", 3)
    (other / "model.safetensors").unlink()
    with zipfile.ZipFile(other / "pytorch_model.bin", "w") as z:
        z.writestr("archive/data.pkl", b"x" * 256)
    assert checkpoint_problem(other) is None
    (other / "pytorch_model.bin").write_bytes((other / "pytorch_model.bin").read_bytes()[:100])
    assert "pytorch_model.bin is truncated" in checkpoint_problem(other)


def test_deepspeed_state_must_be_whole(tmp_path):
    cp = write_checkpoint(tmp_path / "checkpoint-4", 4, deepspeed=True)
    assert checkpoint_problem(cp) is None
    optim = next((cp / "global_step4").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:30])
    assert "optim_states.pt is truncated" in checkpoint_problem(cp)
    optim.unlink()
    assert "lacks its model or optimizer states" in checkpoint_problem(cp)
    (cp / "latest").write_text("global_step9")
    assert "latest names global_step9, which is missing" in checkpoint_problem(cp)


def test_resume_auto_skips_a_truncated_trainer_state_with_a_warning(tmp_path):
    """Issue 9 item 4: the newest checkpoint's trainer_state.json is cut (crash / full disk): resume the previous."""
    out = tmp_path / "out"
    write_checkpoint(out / "checkpoint-4", 4, deepspeed=True)
    newest = write_checkpoint(out / "checkpoint-8", 8, deepspeed=True)
    text = (newest / "trainer_state.json").read_text()
    (newest / "trainer_state.json").write_text(text[:17])
    warnings: list[str] = []
    assert decide_resume(str(out), "auto", False, warn=warnings.append) == str(out / "checkpoint-4")
    assert len(warnings) == 1 and "checkpoint-8" in warnings[0] and "trainer_state.json is truncated" in warnings[0]
    with pytest.raises(UserError, match=r"checkpoint-8 is incomplete \(trainer_state.json is truncated"):
        decide_resume(str(out), str(newest), False)


def test_run_markers_one_list(tmp_path):
    d = tmp_path / "out"
    assert run_markers(d) == []
    d.mkdir()
    (d / "vlsft").mkdir()
    (d / "vlsft" / "lock").write_text("{}")
    (d / "notes.txt").write_text("mine")
    assert run_markers(d) == []
    (d / "checkpoint-10").mkdir()
    (d / "checkpoint-9").mkdir()
    (d / "checkpoint-x").mkdir()  # not a checkpoint name
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"")
    assert run_markers(d) == ["checkpoint-9", "checkpoint-10", "model.safetensors", "config.json"]


def test_plan_and_trainer_share_the_markers(tmp_path):
    """print-args warns about exactly the folders the trainer refuses (one marker list)."""
    from plan_fixtures import make_project

    from vlsft.plan import plan_from_file

    cfg = make_project(tmp_path)
    out = tmp_path / "runs" / "first"
    out.mkdir(parents=True)
    (out / "pytorch_model.bin").write_bytes(b"x")  # a saved model only: the old plan list missed it
    plan = plan_from_file(cfg, ["output.resume=never"])
    assert any("already holds a run (pytorch_model.bin)" in w for w in plan.warnings), plan.warnings
    with pytest.raises(UserError, match=r"already holds a run \(pytorch_model.bin\)"):
        decide_resume(str(out), "never", False)


def test_deepspeed_words_and_presets():
    for off in (None, False, "", "none", "NONE", " off ", "false", "no"):
        assert deepspeed_off(off), off
    for on in ("zero3", "configs/zero3.json", "{}"):
        assert not deepspeed_off(on)
    for name in DEEPSPEED_PRESETS:
        assert deepspeed_preset_path(name).is_file()
    assert deepspeed_preset_path("zero9") is None


def test_output_lock_refuses_a_second_writer_and_takes_over_stale(tmp_path):
    out = tmp_path / "out"
    first = OutputLock(out, "vlsft train --config a.yaml").acquire()
    info = json.loads(first.path.read_text())
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname() and "a.yaml" in info["command"]
    # a second process (a real one: flock is per open file) is refused, naming the holder
    code = ("import sys; from qwenvl.runpolicy import OutputLock, OutputLocked\n"
            "try:\n    OutputLock(sys.argv[1], 'second').acquire()\nexcept OutputLocked as e:\n"
            "    print(e); sys.exit(2)\n")
    p = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and f"pid {os.getpid()}" in p.stdout and "a.yaml" in p.stdout, p.stdout + p.stderr
    first.release()
    assert not first.path.exists()
    # stale: the holder died without releasing (kill -9): its pid is gone
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    first.path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": 0,
                                      "command": "vlsft train --config old.yaml"}))
    lock = OutputLock(out, "new").acquire()
    assert len(lock.warnings) == 1 and "stale" in lock.warnings[0] and "no longer running" in lock.warnings[0]
    lock.release()
    # another host: cannot be checked from here, so refused with how to remove it
    first.path.write_text(json.dumps({"host": "gpu-node-7", "pid": 12345, "started": 0, "command": "vlsft train"}))
    with pytest.raises(OutputLocked, match=r"another host .*gpu-node-7.*delete .*lock"):
        OutputLock(out, "new").acquire()
    assert first.path.exists()  # not ours to remove
