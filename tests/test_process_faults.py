"""Process faults through the real CLI (issue 9 items 1, 2 and 5): `vlsft train` -> torchrun -> qwenvl.train, CPU.

* build_tiny never deletes a folder vlsft did not make;
* one writer per output dir (a second `vlsft train` is refused fast, naming the holder);
* SIGTERM: the ranks checkpoint and stop, exit 143, no torchrun traceback, the lock is gone;
* kill -9 / SIGHUP of vlsft: torchrun and every rank stop promptly (no orphan keeps training);
* an input error raised inside a rank: its one `error:` line, exit 2, torchrun's traceback only in the log.

Runs are tiny (one process, no DeepSpeed, small images) and long runs are stopped as soon as training began.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from plan_fixtures import write_run_yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
VLSFT = str(Path(sys.executable).with_name("vlsft"))


def write_yaml(path: Path, model: Path, out: Path, *, steps: int, port: int, save_steps: int = 100000,
               build_tiny: bool = False) -> Path:
    """One process, no DeepSpeed, full fine-tuning at a small learning rate."""
    return write_run_yaml(
        path, model, out, model={"attn_implementation": None, "build_tiny": build_tiny},
        training={"max_steps": steps, "save_steps": save_steps, "learning_rate": 1.0e-4, "bf16": False,
                  "gradient_accumulation_steps": None, "lr_scheduler_type": None},
        distributed={"nproc_per_node": 1, "deepspeed": "none", "master_port": port}, output={"resume": "auto"})


@pytest.fixture()
def env(tmp_path):
    e = dict(os.environ)
    e.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    e["WANDB_MODE"] = "disabled"
    for k in ("VLSFT_TEST_CRASH_RANK", "VLSFT_OUTPUT_LOCK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        e.pop(k, None)
    return e


class Training:
    """A real `vlsft train` in the background; its stdout/stderr collected by threads."""

    def __init__(self, cfg: Path, env: dict, *extra: str):
        self.proc = subprocess.Popen([VLSFT, "train", "--config", str(cfg), *extra], env=env, cwd=REPO,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, sink in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")), daemon=True).start()

    def wait_training(self, timeout: float = 240) -> None:
        t0 = time.time()
        while not any("'loss'" in x or '"loss"' in x for x in self.out):
            assert self.proc.poll() is None, "".join(self.out[-20:] + self.err[-40:])
            assert time.time() - t0 < timeout, "training never logged a loss:\n" + "".join(self.err[-40:])
            time.sleep(0.2)

    def descendants(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children(recursive=True)

    def kill_everything(self) -> None:
        """Test cleanup: every trainer process this test started (orphans included), then vlsft itself."""
        for k in psutil.Process(os.getpid()).children(recursive=True):
            if k.pid != self.proc.pid and "qwenvl" in " ".join(k.cmdline()):
                k.kill()
        if self.proc.poll() is None:
            self.proc.kill()

    def finish(self, timeout: float = 120) -> tuple[int, str, str]:
        rc = self.proc.wait(timeout=timeout)
        time.sleep(0.3)  # let the reader threads drain
        return rc, "".join(self.out), "".join(self.err)


def _all_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    t0 = time.time()
    alive = procs
    while time.time() - t0 < timeout:
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive:
            return []
        time.sleep(0.2)
    return alive


def test_build_tiny_refuses_a_folder_it_did_not_make(tmp_path, env):
    """Issue 9 item 1: build_tiny into an existing non-empty folder without a model deleted it; now: refused."""
    mine = tmp_path / "my-stuff"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    (mine / "sub").mkdir()
    (mine / "sub" / "data.csv").write_text("1,2")
    (tmp_path / "yamls").mkdir()
    for yaml_path, name_or_path in ((tmp_path / "run.yaml", mine), (tmp_path / "yamls" / "run.yaml", "..")):
        cfg = write_yaml(yaml_path, Path(name_or_path), tmp_path / "out", steps=1, port=29721, build_tiny=True)
        p = subprocess.run([VLSFT, "train", "--config", str(cfg)], env=env, capture_output=True, text=True,
                           timeout=60, cwd=REPO)
        errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
        assert p.returncode == 2, p.stderr
        assert len(errors) == 1 and "model.build_tiny" in errors[0] and "nothing was changed" in errors[0], p.stderr
        assert "Traceback" not in p.stderr
    assert (mine / "thesis.tex").read_text() == "years of work" and (mine / "sub" / "data.csv").is_file()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["my-stuff", "run.yaml", "yamls"]  # no temp folder left


def test_second_writer_refused_and_sigterm_checkpoints_and_exits_143(tmp_path, env, tiny_model_dir):
    """Issue 9 item 2 (one writer) and item 5 (SIGTERM -> 143, no SignalException traceback, a checkpoint)."""
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_model_dir, out, steps=100000, port=29723)
    first = Training(cfg, env)
    try:
        first.wait_training()
        lock = json.loads((out / "vlsft" / "lock").read_text())
        assert lock["pid"] == first.proc.pid and "run.yaml" in lock["command"]
        t0 = time.time()
        second = subprocess.run([VLSFT, "train", "--config", str(cfg), "distributed.master_port=29725"], env=env,
                                capture_output=True, text=True, timeout=60, cwd=REPO)
        assert time.time() - t0 < 30
        errors = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert second.returncode == 2, second.stderr
        assert len(errors) == 1 and "in use by another run" in errors[0] and f"pid {first.proc.pid}" in errors[0]
        assert first.proc.poll() is None  # the first run is untouched

        first.proc.send_signal(signal.SIGTERM)
        rc, stdout, stderr = first.finish()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    assert rc == 143, stderr[-3000:]
    assert "Traceback" not in stderr and "SignalException" not in stderr, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr
    assert "SignalException" in (out / "vlsft" / "torchrun.log").read_text()  # kept in the log
    from qwenvl.runpolicy import checkpoint_problem, list_checkpoints

    cps = list_checkpoints(out)
    assert len(cps) == 1 and checkpoint_problem(cps[0][1]) is None, cps  # saved on the signal
    assert not (out / "model.safetensors").exists()  # an interrupted run writes no "final" model
    assert not (out / "vlsft" / "lock").exists()


@pytest.mark.parametrize("how", ["kill9", "sighup"])
def test_ranks_never_outlive_vlsft(tmp_path, env, tiny_model_dir, how):
    """Issue 9 item 2 (orphans): kill -9 of vlsft, or SIGHUP (closed terminal), stops torchrun and every rank."""
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_model_dir, out, steps=100000, port=29727 if how == "kill9" else 29729)
    run = Training(cfg, env)
    try:
        run.wait_training()
        kids = run.descendants()
        assert any("torchrun" in " ".join(k.cmdline()) for k in kids)
        assert any("qwenvl.train" in " ".join(k.cmdline()) for k in kids), [k.cmdline() for k in kids]
        run.proc.send_signal(signal.SIGKILL if how == "kill9" else signal.SIGHUP)
        left = _all_gone(kids, timeout=15)
        assert not left, [(p.pid, p.cmdline()) for p in left]
        rc, _, stderr = run.finish(timeout=30)
        if how == "sighup":
            assert rc == 129 and "Traceback" not in stderr, stderr[-3000:]
    finally:
        run.kill_everything()


def test_input_error_inside_a_rank_is_one_line_exit_2(tmp_path, env, tiny_model_dir):
    """Issue 9 item 5: an input error found by the rank (here: fewer samples than one batch with
    dataloader_drop_last, which the front door passes through: the rank counts the samples it keeps) shows the
    rank's own line, not torchrun's ChildFailedError."""
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_model_dir, out, steps=2, port=29731)
    p = subprocess.run([VLSFT, "train", "--config", str(cfg), "training.per_device_train_batch_size=64",
                        "training.extra.dataloader_drop_last=true"], env=env,
                       capture_output=True, text=True, timeout=240, cwd=REPO)
    errors = [x for x in p.stderr.splitlines() if x.startswith("error:")]
    assert p.returncode == 2, p.stderr[-3000:]
    assert len(errors) == 1 and "fewer than one batch on every rank" in errors[0], p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr
    log = out / "vlsft" / "torchrun.log"
    assert f"full output is in {log}" in p.stderr
    assert "ChildFailedError" in log.read_text()  # torchrun's report is kept, in the log


def test_killed_rank_survivors_print_one_line_no_traceback(tmp_path, env, tiny_model_dir):
    """Issue 19 item 9: kill -9 of one rank of two mid-training: the surviving rank's collective fails; it prints
    one `error:` line on a line of its own (not glued to the progress bar), no traceback, and vlsft ends."""
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_model_dir, out, steps=100000, port=29733)
    run = Training(cfg, env, "distributed.nproc_per_node=2")
    try:
        run.wait_training()
        ranks = [k for k in run.descendants() if "qwenvl.train" in " ".join(k.cmdline())
                 and k.environ().get("LOCAL_RANK") == "1"]
        assert ranks, [k.cmdline() for k in run.descendants()]
        ranks[0].kill()
        rc, _, stderr = run.finish(timeout=120)
    finally:
        run.kill_everything()
    assert rc != 0
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [x for x in stderr.splitlines() if "another rank stopped" in x]
    assert len(lines) == 1 and lines[0].startswith("error: [rank 0, node "), stderr[-3000:]
    assert "while in training step " in lines[0], lines  # the phase the survivor was in
    assert stderr.rstrip().splitlines()[-1].startswith("error: training exited with status")
    log = (out / "vlsft" / "torchrun.log").read_text()
    assert any(x.startswith("error: [rank 0, node ") and "another rank stopped" in x
               for x in log.splitlines())  # not glued


def test_lost_peer_only_names_collective_failures():
    from qwenvl.train import lost_peer

    assert lost_peer(RuntimeError("[gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:38325: Connection reset "
                                  "by peer. This is typically caused by a remote worker hanging")) == \
        "connection reset by peer"
    assert lost_peer(RuntimeError("Connection reset by peer")) is None  # not from a collective: keep the traceback
    assert lost_peer(ValueError("NCCL Connection reset by peer")) is None
    assert lost_peer(RuntimeError("gloo: shapes do not match")) is None
    # a hung peer: the collective timeout (ddp_timeout) ends the wait, named like a dead one
    assert lost_peer(RuntimeError("[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=9, "
                                  "OpType=ALLREDUCE) ran for 1800012 milliseconds before timing out.")) == \
        "collective operation timeout"


@pytest.fixture()
def small_disk(tmp_path):
    """A 48 MiB tmpfs (root can mount one on the development and CI machines): a disk that fills up."""
    where = tmp_path / "disk"
    where.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48M", "tmpfs", str(where)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {p.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_full_disk_during_a_save_is_one_line(tmp_path, env, tiny_model_dir, small_disk):
    """Issue 19 item 9: the disk fills during the checkpoint save: one line naming the place and the free space,
    exit 2, no traceback (it was the rank's SafetensorError traceback and exit 1)."""
    out = small_disk / "out"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_model_dir, out, steps=4, port=29737, save_steps=2)
    p = subprocess.run([VLSFT, "train", "--config", str(cfg)], env=env, cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-4000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    lines = [x for x in p.stderr.splitlines() if "no space left on the device holding" in x]
    assert len(lines) == 1 and lines[0].startswith("error: [rank 0]") and "MB free" in lines[0], p.stderr[-3000:]
    assert "# done" not in p.stdout


def test_no_space_message_and_detection(tmp_path):
    from qwenvl.runpolicy import is_no_space, no_space_message

    msg = no_space_message(tmp_path / "not" / "yet")
    assert str(tmp_path / "not" / "yet") in msg and "MB free" in msg and "move output.dir" in msg
    assert is_no_space(OSError(28, "No space left on device"))
    try:
        try:
            raise OSError(28, "No space left on device")
        except OSError as inner:
            raise RuntimeError("save failed") from inner
    except RuntimeError as outer:
        assert is_no_space(outer)
    assert not is_no_space(OSError(13, "Permission denied"))
    with pytest.raises(OSError) as e, open("/dev/full", "w") as f:  # the kernel's own always-full device
        f.write("x")
        f.flush()
    assert is_no_space(e.value)


def test_kill9_of_vlsft_during_a_checkpoint_save_stops_every_rank(tmp_path, env, tiny_model_dir):
    """Issue 19 item 9: kill -9 of vlsft while a checkpoint is being saved (made slow by a test hook: 120 s)
    leaves no rank running: torchrun dies with vlsft, the rank notices its launcher is gone and exits within its
    10 s grace, save or not (torchrun's own SIGTERM path waited 30 s and asked for one more checkpoint)."""
    out = tmp_path / "out"
    cfg = write_yaml(tmp_path / "run.yaml", tiny_model_dir, out, steps=100000, port=29739, save_steps=2)
    run = Training(cfg, dict(env, VLSFT_TEST_SAVE_DELAY_S="120"))
    try:
        run.wait_training()
        t0 = time.time()
        while not any("VLSFT_TEST_SAVE_DELAY_S" in x for x in run.err):
            assert time.time() - t0 < 60, "".join(run.err[-20:])
            time.sleep(0.2)
        time.sleep(2)  # inside the (slow) save
        kids = run.descendants()
        assert any("qwenvl.train" in " ".join(k.cmdline()) for k in kids)
        run.proc.send_signal(signal.SIGKILL)
        left = _all_gone(kids, timeout=20)
        assert not left, [(p.pid, p.cmdline()) for p in left]
    finally:
        run.kill_everything()
